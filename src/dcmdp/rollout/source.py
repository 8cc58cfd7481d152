"""Where the training loop gets its rollouts and sends its new weights: one small interface.

The loop asks a :class:`RolloutSource` for the next batch and hands it the weights after each
update; it never manages processes, queues or shared memory itself (STYLE principle 12).
:class:`SyncRollout` is today's source: it samples on the engine in the caller's thread when asked
(so the batch always comes from the current weights) and pushes the weights in memory when
given them.

An asynchronous worker will be a second implementation in this package: it samples the next
batch while the trainer updates, so ``next_batch`` may return a batch sampled with weights one
or more updates old, and ``publish_weights`` queues the new weights for the worker. The loop
stays as it is; the records a batch carries (``Rollout``: prompts, completions with the engine's
log-probs mu, rewards) are already what an off-policy step needs, since the trainer recomputes
pi_old itself and the losses correct for pi_old / mu.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Protocol

import torch

from dcmdp.engines.base import RolloutEngine, SamplingSettings
from dcmdp.rollout.step import Rollout, rollout
from dcmdp.tasks import Task


class RolloutSource(Protocol):
    """What the training loop needs from its rollouts: the next batch, and a place for new weights."""

    def next_batch(self, step: int) -> Rollout:
        """The scored samples of training step ``step`` (1-based)."""
        ...

    def publish_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """The trainer's parameters after an update (HF names); later batches sample with them."""
        ...


def step_seed(run_seed: int, step: int) -> int:
    """The seed of training step ``step``: it draws the step's problems and seeds the engine."""
    return run_seed * 1_000_003 + step


class SyncRollout:
    """Synchronous rollouts: sample on ``engine`` when asked, push weights to it when given.

    Step ``step`` draws ``prompts_per_step`` train problems and ``group_size`` samples of each,
    both seeded by :func:`step_seed`, so a run repeats exactly.
    """

    def __init__(
        self,
        engine: RolloutEngine,
        task: Task,
        tokenizer: Any,
        sampling: SamplingSettings,
        prompts_per_step: int,
        group_size: int,
        seed: int,
    ) -> None:
        self.engine = engine
        self.task = task
        self.tokenizer = tokenizer
        self.sampling = sampling
        self.prompts_per_step = prompts_per_step
        self.group_size = group_size
        self.seed = seed

    def next_batch(self, step: int) -> Rollout:
        seed = step_seed(self.seed, step)
        problems = self.task.problems("train", self.prompts_per_step, seed=seed)
        return rollout(self.engine, self.task, self.tokenizer, problems, self.sampling, self.group_size, seed)

    def publish_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        self.engine.load_weights(named_tensors)
