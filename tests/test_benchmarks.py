"""The CPU benchmarks run from a fresh clone and print their figures (tiny settings)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_loss_overhead import LOSSES, time_losses  # noqa: E402


def test_loss_overhead_times_every_loss_on_the_same_batch(tiny_model_dir: Path) -> None:
    from dcmdp.models import load_model

    model = load_model(tiny_model_dir)
    times = time_losses(model, prompts=4, group=2, length=4, repeats=2)
    assert set(times) == set(LOSSES)
    assert all(len(v) == 2 and all(t > 0 for t in v) for v in times.values())


@pytest.mark.slow
@pytest.mark.vllm
def test_bench_engines_prints_both_engines(tiny_model_dir: Path) -> None:
    pytest.importorskip("vllm")
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "bench_engines.py"),
            "--model",
            str(tiny_model_dir),
            "--prompts",
            "4",
            "--samples",
            "2",
            "--max-tokens",
            "4",
            "--dtypes",
            "float32",
            "--repeats",
            "1",
            "--sync-repeats",
            "1",
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "generated tokens/s" in proc.stdout and "vllm" in proc.stdout
