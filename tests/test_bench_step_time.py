"""benchmarks/bench_step_time.py: the phase summary is right on hand-made rows and the script runs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_step_time import PHASES, summarise_metrics  # noqa: E402


def _row(step: int, scale: float) -> dict:
    row = {"kind": "train", "step": step, "time/step": 10 * scale, "perf/tokens_per_s": 100 * scale}
    row["rollout/tokens"] = 50.0
    row.update({k: scale for k in PHASES})
    return row


def test_summary_drops_the_warm_up_step_and_takes_medians() -> None:
    rows = [_row(1, 100.0), _row(2, 1.0), _row(3, 2.0), _row(4, 3.0), {"kind": "eval", "time/eval": 4.0}]
    s = summarise_metrics(rows)
    assert s["time/step"] == 20.0  # median of 10, 20, 30: step 1 (1000) is left out
    assert all(s[k] == 2.0 for k in PHASES)
    assert s["perf/tokens_per_s"] == 200.0
    assert s["time/eval"] == 4.0
    assert s["steps_per_min"] == 3.0
    with pytest.raises(ValueError, match="no train rows"):
        summarise_metrics([{"kind": "eval", "time/eval": 1.0}])


def test_script_runs_a_short_job_and_prints_every_phase(tiny_model_dir: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "bench_step_time.py"),
            "--steps",
            "3",
            f"model.path={tiny_model_dir}",
            "engine.type=transformers",
            "engine.dtype=float32",
            "run.prompts_per_step=4",
            "run.group_size=2",
            "run.eval_problems=8",
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    for name in (*PHASES, "time/step", "time/eval", "generated tokens/s"):
        assert name in proc.stdout, name
