"""Where a training step's time goes: rollout, log-prob recompute, update, dual step, weight sync,
and evaluation, plus rollout tokens per second, for the default job (or any overrides).

    python benchmarks/bench_step_time.py [--steps 30] [section.field=value ...]
    python benchmarks/bench_step_time.py --metrics runs/default/metrics.jsonl   # an existing run

Runs `dcmdp train` with the given overrides (default: the default job, shortened to --steps,
evaluation only at the start and the end) and prints the median of each phase over steps 2..N
(step 1 carries one-off warm-up costs), its share of the step, and the evaluation time.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")

from dcmdp.checkpoint import read_metrics

PHASES = ("time/rollout", "time/recompute", "time/update", "time/dual", "time/sync")


def summarise_metrics(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Median of each phase over the train rows after the first, eval time, tokens/s."""
    train = [r for r in rows if r.get("kind") == "train"]
    if not train:
        raise ValueError("no train rows in the metrics")
    steps = train[1:] or train
    out = {k: statistics.median(r[k] for r in steps) for k in (*PHASES, "time/step")}
    out["perf/tokens_per_s"] = statistics.median(r["perf/tokens_per_s"] for r in steps)
    out["rollout/tokens"] = statistics.median(r["rollout/tokens"] for r in steps)
    evals = [r["time/eval"] for r in rows if r.get("kind") == "eval" and "time/eval" in r]
    out["time/eval"] = statistics.median(evals) if evals else float("nan")
    out["steps_per_min"] = 60.0 / out["time/step"]
    out["steps"] = float(len(train))
    return out


def run_job(overrides: list[str], out_dir: Path) -> tuple[dict[str, float], float]:
    """Train with ``overrides`` into ``out_dir``; returns the phase summary and the wall time."""
    from dcmdp.config import load_config
    from dcmdp.trainer import train

    t0 = time.perf_counter()
    train(load_config(overrides=[*overrides, f"run.out_dir={out_dir}"]), log=lambda msg: None)
    wall = time.perf_counter() - t0
    return summarise_metrics(read_metrics(out_dir / "metrics.jsonl")), wall


def print_summary(s: dict[str, float]) -> None:
    step = s["time/step"]
    print(f"{'phase':16s} {'median s':>10s} {'share':>7s}")
    for k in PHASES:
        print(f"{k:16s} {s[k]:10.4f} {100 * s[k] / step:6.1f}%")
    other = step - sum(s[k] for k in PHASES)
    print(f"{'(other)':16s} {other:10.4f} {100 * other / step:6.1f}%")
    print(f"{'time/step':16s} {step:10.4f}  -> {s['steps_per_min']:.0f} steps/min")
    print(f"{'time/eval':16s} {s['time/eval']:10.4f}  (one evaluation, greedy + sampled)")
    print(
        f"rollout: {s['perf/tokens_per_s']:.0f} generated tokens/s ({s['rollout/tokens']:.0f} tokens per step)"
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("overrides", nargs="*", metavar="section.field=value")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--metrics", default=None, help="summarise this metrics.jsonl instead of training")
    args = ap.parse_args()
    if args.metrics:
        print_summary(summarise_metrics(read_metrics(Path(args.metrics))))
        return 0
    if args.steps < 2:
        ap.error("--steps must be at least 2 (step 1 is a warm-up)")
    overrides = [
        f"run.steps={args.steps}",
        f"run.eval_every={args.steps}",
        "run.checkpoint_every=0",
        "run.tensorboard=false",
        *args.overrides,
    ]
    summary, wall = run_job(overrides, Path(tempfile.mkdtemp(prefix="dcmdp-step-time-")) / "run")
    print(f"dcmdp train {' '.join(overrides)}  ({wall:.0f} s wall, load avg {os.getloadavg()[0]:.1f})")
    print_summary(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
