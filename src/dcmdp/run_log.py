"""What the training loop writes while it runs: the step's metrics row, the progress line, warnings,
metric writers, the summary.

Metrics go to ``metrics.jsonl`` (always, :class:`dcmdp.checkpoint.MetricsLog`), and to TensorBoard
and Weights & Biases when the config asks (:func:`open_writers`); :func:`emit` writes one row to
all of them.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from dcmdp.algo.advantages import degenerate_group_fraction
from dcmdp.algo.constraints import MEASURES
from dcmdp.algo.guard import GuardedMultiplier
from dcmdp.algo.multiplier import AutoTolerance, Multiplier
from dcmdp.checkpoint import MetricsLog
from dcmdp.config import Config
from dcmdp.rollout import Rollout, TokenBatch


def step_metrics(
    cfg: Config, ro: Rollout, batch: TokenBatch, measured: dict[str, float], times: dict[str, float]
) -> dict[str, float]:
    """The metrics row of a step (docs/metrics.md), before the multiplier's."""
    rewards = ro.rewards_N
    return {
        "reward/mean": float(rewards.mean()),
        "reward/std": float(rewards.std(unbiased=False)),
        "reward/accuracy": float((rewards >= 1.0).float().mean()),
        "reward/degenerate_groups": float(degenerate_group_fraction(rewards, cfg.run.group_size)),
        # every sample, also those left out of the loss (their tokens were generated all the same)
        "response/mean_tokens": sum(len(c.token_ids) for c in ro.completions) / len(ro.completions),
        **measured,
        "time/rollout": ro.seconds,
        "time/rollout_wait": times["time/rollout_wait"],
        "time/recompute": times["time/recompute"],
        "time/update": times["time/update"],
        "time/dual": times["time/dual"],
        "time/sync": times["time/sync"],
        "time/step": times["time/step"],
        **({"time/behaviour": times["time/behaviour"]} if "time/behaviour" in times else {}),
        "perf/tokens_per_s": ro.counts["rollout/tokens"] / max(ro.seconds, 1e-9),
    }


def unreachable_tolerance(
    recent_d: list[float],
    tolerance: float | None,
    uses_multiplier: bool,
    window: int = 20,
    floor: bool = False,
) -> str | None:
    """A warning when the measured gap stayed above twice c for ``window`` steps in a row.

    Then the constraint is out of the engine's reach: lambda only grows and the gap penalty takes
    over the update (docs/RESULTS.md: runs with c far below the engine's floor gap lost accuracy
    or collapsed). None when all is well or the loss does not use lambda. ``floor``: c was
    already raised by ``multiplier.tolerance_floor``, so the gap has grown since the warm-up.
    """
    if not uses_multiplier or tolerance is None or len(recent_d) < window:
        return None
    last = recent_d[-window:]
    if min(last) <= 2 * tolerance:
        return None
    if floor:
        return (
            f"warning: the measured gap D stayed above 2c for {window} steps (min {min(last):.4g}, c {tolerance:.4g}, "
            "raised to the gap of the first steps by multiplier.tolerance_floor): the gap has doubled "
            "since, so lambda keeps growing and the gap penalty can swamp the reward signal. Consider "
            "a larger multiplier.tolerance_floor or a smaller multiplier.lam_max (see docs/RESULTS.md)."
        )
    return (
        f"warning: the measured gap D stayed above 2c for {window} steps (min {min(last):.4g}, c {tolerance:.4g}): "
        "the tolerance looks out of this engine's reach, so lambda keeps growing and the gap penalty "
        "can swamp the reward signal. Consider multiplier.tolerance_floor=1 (c raised to the gap "
        "measured in the first steps), multiplier.tolerance=null (automatic c), a larger c, or a "
        "smaller cap than multiplier.lam_max (see docs/RESULTS.md)."
    )


def impossible_tokens_warning(dropped_frac: float, limit: float = 0.2) -> str | None:
    """A warning when more than ``limit`` of a step's samples were dropped for holding a token the
    trainer gives probability 0 (``discrepancy/trainer_impossible_seq_frac``); None otherwise."""
    if not dropped_frac > limit:
        return None
    return (
        f"warning: {dropped_frac:.0%} of this step's samples hold a token the trainer gives "
        "probability 0 under the same top-k / top-p (the engine's kept set differs at its "
        "precision); those samples are left out of the loss and of D, so most of the batch "
        "is lost. Consider sampling.top_k=0 and sampling.top_p=1.0, or a closer engine "
        "precision (docs/concepts.md, 'Tokens the trainer cannot sample')."
    )


def unwrap_auto(multiplier: Multiplier) -> AutoTolerance | None:
    """The run's :class:`AutoTolerance` (an automatic c or a tolerance floor), under the reward
    guard if there is one; None for a fixed c."""
    inner = multiplier.multiplier if isinstance(multiplier, GuardedMultiplier) else multiplier
    return inner if isinstance(inner, AutoTolerance) else None


def step_line(cfg: Config, step: int, row: dict[str, float], multiplier: Multiplier) -> str:
    """One progress line; lambda and c only for losses that read them, c "auto" while warming up."""
    parts = [
        f"step {step:4d}/{cfg.run.steps}",
        f"reward {row['reward/mean']:.3f}",
        f"D {row['discrepancy/prob_gap_mean']:.5f}",
    ]
    if cfg.loss.measure != "prob_gap":  # the measure the dual step compares with c
        key = MEASURES[cfg.loss.measure].discrepancy_key
        parts.append(f"{cfg.loss.measure} {row.get(key, math.nan):.5f}")
    if "multiplier/lambda" in row:
        parts.append(f"lambda {row['multiplier/lambda']:.4f}")
        c = row["multiplier/tolerance"]
        auto = unwrap_auto(multiplier)
        seen = len(auto.collected) if auto is not None else 0
        measuring = f"measured {seen}/{cfg.multiplier.auto_warmup_steps} warm-up steps"
        floor = auto.at_least if auto is not None else None
        if math.isnan(c):
            parts.append(f"c auto ({measuring})")
        elif floor is None:
            parts.append(f"c {c:.5f}")
        elif auto is not None and auto.warming_up:  # multiplier.tolerance_floor, still measuring
            parts.append(f"c {c:.5f} (floor {measuring})")
        else:
            parts.append(f"c {c:.5f}" + (f" (raised from {floor:.5f})" if c > floor else ""))
    parts.append(
        f"loss {row['loss/total']:+.4f}" if "loss/total" in row else "no update (every sample dropped)"
    )
    parts.append(f"{row['time/step']:.2f}s ({row['perf/tokens_per_s']:.0f} tok/s)")
    return " ".join(parts)


class _TensorBoard:
    def __init__(self, run_dir: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.w = SummaryWriter(str(run_dir / "tensorboard"))

    def write(self, row: dict[str, Any]) -> None:
        for k, v in row.items():
            if isinstance(v, int | float) and k not in ("step",):
                self.w.add_scalar(k, v, row["step"])
        self.w.flush()

    def close(self) -> None:
        self.w.close()


class _Wandb:
    def __init__(self, cfg: Config, run_dir: Path) -> None:
        import wandb  # type: ignore[import-not-found]

        self.run = wandb.init(project=cfg.run.wandb_project, dir=str(run_dir), config=cfg.to_dict())

    def write(self, row: dict[str, Any]) -> None:
        self.run.log({k: v for k, v in row.items() if k != "kind"}, step=row["step"])

    def close(self) -> None:
        self.run.finish()


def open_writers(cfg: Config, run_dir: Path) -> list[Any]:
    writers: list[Any] = []
    if cfg.run.tensorboard:
        try:
            writers.append(_TensorBoard(run_dir))
        except ImportError:
            print("tensorboard is not installed; metrics go to metrics.jsonl only")
    if cfg.run.wandb:
        try:
            writers.append(_Wandb(cfg, run_dir))
        except ImportError:
            print("run.wandb=true but the wandb package is not installed (pip install wandb); skipping it")
    return writers


def emit(metrics_log: MetricsLog, writers: list[Any], row: dict[str, Any]) -> None:
    metrics_log.write(row)
    for w in writers:
        w.write(row)


def final_summary(run_dir: Path, multiplier: Multiplier, uses_multiplier: bool = True) -> dict[str, Any]:
    from dcmdp.checkpoint import read_metrics

    evals = [r for r in read_metrics(run_dir / "metrics.jsonl") if r.get("kind") == "eval"]
    out: dict[str, Any] = {}
    if uses_multiplier:
        out.update(multiplier=multiplier.value, tolerance=multiplier.tolerance)
    if evals and evals[0]["step"] == 0:  # "before" is the evaluation before any training step
        out["accuracy_before"] = evals[0]["eval/accuracy_greedy"]
        out["accuracy_after"] = evals[-1]["eval/accuracy_greedy"]
        if "eval/accuracy_sampled" in evals[0]:
            out["sampled_accuracy_before"] = evals[0]["eval/accuracy_sampled"]
            out["sampled_accuracy_after"] = evals[-1]["eval/accuracy_sampled"]
    return out
