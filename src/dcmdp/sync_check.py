"""Weight-sync verification: is the engine serving the trainer's weights?

A weight sync that silently leaves part of the engine at old weights (a skipped tensor, a tied
lm_head not refreshed, an MoE expert not re-packed, a stale prefix cache) does not crash: the run
trains on samples from a policy it is not updating, and the measured gap absorbs the bug as if it
were precision (trl #5312, prime-rl #1650). After a sync the engine samples a fixed probe (a few
fixed prompts, fixed seed, T = 1, no sampling filter) and the trainer scores the same tokens; the
mean |log pi - log mu| over them is compared with the floor measured at the run's first check:

    gap > max(factor x floor, floor + margin)   ->   SyncCheckError, the run stops

The floor is measured before the initial sync when the run starts from the weights the engine
loaded itself (a new run: engine and trainer then hold the same weights without any sync, so the
gap is the engine's precision alone); the first check right after the initial sync already
compares with it, which catches a sync that breaks the engine on its first push. A resumed run
has no such reference: its first check after the sync becomes the floor and must itself stay
under ``first_max``. Later checks run every ``every`` steps. Cost: one generate of the probe and one
trainer forward of it (``time/sync_check``; docs/RESULTS.md has the measured share of a step).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from dcmdp.engines.base import Completion, SamplingSettings
from dcmdp.rollout.batch import build_token_batch
from dcmdp.rollout.logprobs import sequence_logprobs


class SyncCheckError(RuntimeError):
    """The engine's log-probs of the probe are far from the trainer's: the sync is broken."""


@dataclass(frozen=True)
class SyncCheckSettings:
    every: int = 10
    """Check after the first sync, then every N steps (0 = never)."""
    factor: float = 8.0
    margin: float = 0.005
    """Nats of mean |log ratio| above the floor a check tolerates besides the factor."""
    first_max: float = 1.0
    """The first check's gap must be below this (nats of mean |log ratio| per token)."""
    num_prompts: int = 4
    max_tokens: int = 24
    seed: int = 1234


def probe_gap(
    model: torch.nn.Module,
    prompts: list[list[int]],
    completions: list[Completion],
    sampling: SamplingSettings,
    pad_id: int | None,
) -> dict[str, float]:
    """Mean |log pi - log mu| and mean |pi - mu| over the probe's sampled tokens."""
    batch = build_token_batch(prompts, completions, pad_id)
    device = next(model.parameters()).device
    batch = batch.to(device)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        logp = sequence_logprobs(model, batch, sampling)
    model.train(was_training)
    mask = batch.response_mask_BT
    ok = mask & torch.isfinite(logp)
    diff = (logp - batch.engine_logp_BT)[ok].double()
    impossible = int((mask & ~torch.isfinite(logp)).sum())
    return {
        "sync/abs_log_ratio": float(diff.abs().mean()) if diff.numel() else math.nan,
        "sync/prob_gap": float((logp.exp() - batch.engine_logp_BT.exp())[ok].double().abs().mean())
        if diff.numel()
        else math.nan,
        "sync/tokens": float(int(mask.sum())),
        "sync/trainer_impossible": float(impossible),
    }


class SyncVerifier:
    """Runs the probe after a sync and stops the run when the engine is not serving the weights."""

    def __init__(self, settings: SyncCheckSettings, prompts: list[list[int]], max_tokens: int) -> None:
        self.settings = settings
        self.prompts = prompts
        self.sampling = SamplingSettings(temperature=1.0, max_tokens=max_tokens)
        self.floor: float | None = None

    def measure_floor(self, source: Any, model: torch.nn.Module, pad_id: int | None) -> float:
        """The engine's own gap before any sync (engine and trainer at the same weights)."""
        result = source.probe(self.prompts, self.sampling, self.settings.seed)
        self.floor = probe_gap(model, self.prompts, result.completions, self.sampling, pad_id)[
            "sync/abs_log_ratio"
        ]
        return self.floor

    def due(self, step: int, first: bool) -> bool:
        s = self.settings
        return s.every > 0 and (first or self.floor is None or step % s.every == 0)

    def limit(self) -> float:
        s = self.settings
        assert self.floor is not None
        return max(s.factor * self.floor, self.floor + s.margin)

    def check(self, step: int, source: Any, model: torch.nn.Module, pad_id: int | None) -> dict[str, float]:
        """Probe the engine through ``source.probe`` and compare; raises :class:`SyncCheckError`."""
        result = source.probe(self.prompts, self.sampling, self.settings.seed)
        out = probe_gap(model, self.prompts, result.completions, self.sampling, pad_id)
        gap = out["sync/abs_log_ratio"]
        if self.floor is None:
            if not gap <= self.settings.first_max:
                raise SyncCheckError(
                    f"weight-sync check at step {step}: the engine's log-probs of a fixed probe differ from "
                    f"the trainer's by {gap:.4f} nats per token on average (more than "
                    f"engine.sync_check_first_max={self.settings.first_max}) right after the first sync: "
                    "the engine is not serving the trainer's weights (a tensor not loaded, a tied lm_head "
                    "not refreshed, a quantized or packed copy not rebuilt)"
                )
            self.floor = gap
        elif not gap <= self.limit():
            raise SyncCheckError(
                f"weight-sync check at step {step}: the engine's log-probs of a fixed probe differ from the "
                f"trainer's by {gap:.4f} nats per token, against {self.floor:.4f} at the first check "
                f"(limit {self.limit():.4f} = max({self.settings.factor} x floor, floor + "
                f"{self.settings.margin})): the engine is not serving the trainer's current weights. "
                "The last checkpoint is kept; see docs/engines.md (weight sync) and "
                "engine.sync_check_every to tune or turn off (0) the check"
            )
        out["sync/floor"] = self.floor
        return out
