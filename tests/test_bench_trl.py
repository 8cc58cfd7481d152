"""benchmarks/bench_trl.py: each arm runs for real in its own process and reports sane figures.

Two steps of a small batch (8 prompts x 4 completions, 4 new tokens) on the warm-started tiny Qwen3
(a random model never earns a reward, so its advantages and gradients are zero and nothing would
move): step times, start-up and peak RSS are finite and positive, tokens were generated, and the
weights changed on every side, so TRL is not timed doing a no-op. The table arithmetic is checked
on hand-made results.
"""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path
from types import ModuleType

import pytest

pytest.importorskip(
    "trl", reason="TRL is not installed (scripts/install_integrations.sh installs trl 1.16.0)"
)

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_trl.py"


def load_bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_trl", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


bench = load_bench()


@pytest.mark.slow
@pytest.mark.parametrize(
    "arm", ["trl", "dcmdp-hf-fp32", pytest.param("dcmdp-vllm-bf16", marks=pytest.mark.vllm)]
)
def test_arm_measures_real_training(arm: str) -> None:
    if arm == "dcmdp-vllm-bf16":
        pytest.importorskip("vllm")
    settings = bench.Settings(model=bench.default_model_dir(), steps=2, prompts=8, group=4, max_tokens=4)
    res = bench.run_arm(arm, settings, timeout_s=300)
    assert res.arm == arm
    assert len(res.step_s) == 2 and len(res.tokens) == 2 and len(res.rollout_s) == 2
    for value in [*res.step_s, *res.rollout_s, res.startup_s, res.peak_rss_mib, res.median_step_s()]:
        assert math.isfinite(value) and value > 0
    assert all(0 < t <= 8 * 4 * 4 for t in res.tokens)
    assert res.peak_rss_mib > 100  # torch alone is more than this: a real per-process reading
    assert res.weights_changed is True


def result(arm: str, steps: list[float], rss: float) -> object:
    return bench.ArmResult(arm, 1.0, steps, [100] * len(steps), [0.1] * len(steps), rss)


def test_figures_and_table() -> None:
    trl = bench.combine([result("trl", [9.0, 1.0, 3.0, 2.0], 800.0)])
    fast = bench.combine([result("x", [5.0, 0.5, 1.5, 1.0], 400.0)])
    assert trl["median_step_s"] == 2.0  # step 1 left out
    assert trl["steps_per_min"] == 30.0
    assert trl["tokens_per_s"] == pytest.approx(300 / 6.0)
    table = bench.format_table({"trl": trl, "x": fast})
    assert "| x |" in table and "2.00x | 0.50x |" in table
    assert bench.step_intervals(10.0, [11.0, 13.0, 14.5]) == [1.0, 2.0, 1.5]
