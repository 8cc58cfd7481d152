"""Where the training loop gets its rollouts and sends its new weights: one small interface.

The loop asks a :class:`RolloutSource` for the next batch and hands it the weights after each
update; it never manages processes, queues or shared memory itself (STYLE principle 12). It also
evaluates on the deployment engine through it, and closes it.

- :class:`SyncRollout` (``run.max_staleness=0``, the default) samples on the engine in the
  caller's thread when asked, so a batch always comes from the current weights.
- :class:`dcmdp.rollout.pipeline.AsyncRollout` (``run.max_staleness >= 1``) owns the engine in a
  worker process that samples ahead while the trainer updates; a batch may be up to
  ``max_staleness`` versions old and says which (``Rollout.version``).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any, Protocol

import torch

from dcmdp.engines.base import GenerateResult, RolloutEngine, SamplingSettings
from dcmdp.rollout.step import Rollout, rollout
from dcmdp.tasks import Problem, Task


class RolloutSource(Protocol):
    """What the training loop needs from its rollouts: the next batch, and a place for new weights."""

    def next_batch(self, step: int) -> Rollout:
        """The scored samples of training step ``step`` (1-based)."""
        ...

    def publish_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """The trainer's parameters after an update (HF names); later batches sample with them."""
        ...

    def evaluate(
        self, problems: list[Problem], greedy: SamplingSettings, sampled: SamplingSettings | None, seed: int
    ) -> dict[str, float]:
        """``eval/*`` accuracy on the deployment engine with the newest published weights."""
        ...

    def probe(self, prompts: list[list[int]], sampling: SamplingSettings, seed: int) -> GenerateResult:
        """One sample of each prompt from the engine with the newest published weights (the
        weight-sync check, :mod:`dcmdp.sync_check`)."""
        ...

    def close(self) -> None:
        """Release the engine (and any process that holds it)."""
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

    def evaluate(
        self, problems: list[Problem], greedy: SamplingSettings, sampled: SamplingSettings | None, seed: int
    ) -> dict[str, float]:
        from dcmdp.evaluate import evaluate_accuracy

        t0 = time.perf_counter()
        row = evaluate_accuracy(self.engine, self.task, self.tokenizer, problems, greedy, sampled, seed=seed)
        row["time/eval"] = time.perf_counter() - t0
        return row

    def probe(self, prompts: list[list[int]], sampling: SamplingSettings, seed: int) -> GenerateResult:
        return self.engine.generate(prompts, sampling, n=1, seed=seed)

    def close(self) -> None:
        self.engine.close()
