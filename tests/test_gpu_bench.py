"""benchmarks/gpu_bench.py runs end to end (--smoke: tiny model on CPU) and reports every figure."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_bench_smoke_reports_all_figures(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_bench.py"), "--smoke", "--out", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["device"].startswith("CPU")
    train = report["train"]
    for key in ("time/rollout", "time/recompute", "time/update", "time/sync", "time/step"):
        assert math.isfinite(train[key]) and train[key] > 0, key
    # The phases are parts of the step.
    parts = sum(train[k] for k in ("time/rollout", "time/recompute", "time/update", "time/sync"))
    assert parts <= train["time/step"] * 1.5
    assert train["perf/tokens_per_s"] > 0
    assert set(report["loss_cost"]) >= {"grpo", "dcmdp"}
    assert all(v > 0 for v in report["loss_cost"].values())
    assert "time/step" in proc.stdout and "vs grpo" in proc.stdout


def test_gpu_bench_refuses_without_gpu_unless_smoke() -> None:
    import pytest
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: the script would run for real")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_bench.py")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "--smoke" in proc.stderr
