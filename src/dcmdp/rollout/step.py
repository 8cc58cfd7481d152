"""The trainer's rollout step: sample G completions per prompt on the engine, validate and score them.

:func:`rollout` is one synchronous step (the engine is a black box returning tokens and the
log-probs mu of what it sampled); it hands the trainer a :class:`Rollout`, group-contiguous, with
any group that holds an invalid sample or a reward error dropped whole. The training loop reaches
it through :class:`dcmdp.rollout.source.SyncRollout`, behind the small "next batch / publish
weights" interface an asynchronous worker will implement.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from dcmdp.engines.base import Completion, RolloutEngine, SamplingSettings
from dcmdp.tasks import Problem, Task


@dataclass
class Rollout:
    """One step's samples, group-contiguous: completions[g*G:(g+1)*G] answer problems[g]."""

    problems: list[Problem]
    prompts: list[list[int]]
    completions: list[Completion]
    rewards_N: torch.Tensor
    counts: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    version: int | None = None
    """The policy version (updates applied) whose weights sampled it; None = the current one."""


def rollout(
    engine: RolloutEngine,
    task: Task,
    tokenizer: Any,
    problems: list[Problem],
    sampling: SamplingSettings,
    group_size: int,
    seed: int,
) -> Rollout:
    """Sample, validate and score. A group with any invalid sample or reward error is dropped
    whole (its advantages would be biased) and counted."""
    t0 = time.perf_counter()
    prompts = [tokenizer.encode(p.prompt, add_special_tokens=False) for p in problems]
    result = engine.generate(prompts, sampling, n=group_size, seed=seed)
    by_prompt: dict[int, list[Completion]] = {}
    for c in result.completions:
        by_prompt.setdefault(c.prompt_index, []).append(c)
    kept_problems: list[Problem] = []
    kept_prompts: list[list[int]] = []
    kept: list[Completion] = []
    rewards: list[float] = []
    reward_errors = 0
    dropped_groups = 0
    for i, problem in enumerate(problems):
        group = by_prompt.get(i, [])
        if len(group) != group_size:
            dropped_groups += 1
            continue
        group_rewards = []
        for c in group:
            text = tokenizer.decode(c.token_ids, skip_special_tokens=True)
            try:
                group_rewards.append(float(task.reward(problem, text)))
            except Exception:
                reward_errors += 1
                break
        if len(group_rewards) != group_size or not all(math.isfinite(r) for r in group_rewards):
            dropped_groups += 1
            continue
        idx = len(kept_problems)
        kept_problems.append(problem)
        kept_prompts.append(prompts[i])
        for c in group:
            kept.append(Completion(idx, c.token_ids, c.logprobs, c.finish_reason))
        rewards.extend(group_rewards)
    if not kept:
        raise RuntimeError(
            f"no usable samples this step: {dropped_groups} groups dropped "
            f"(engine drops: {result.dropped}, reward errors: {reward_errors})"
        )
    counts = {
        "rollout/dropped_samples": float(sum(result.dropped.values())),
        "rollout/dropped_groups": float(dropped_groups),
        "rollout/reward_errors": float(reward_errors),
        "rollout/tokens": float(result.num_tokens),
        "rollout/truncated_frac": sum(c.finish_reason == "length" for c in kept) / len(kept),
    }
    return Rollout(kept_problems, kept_prompts, kept, torch.tensor(rewards), counts, time.perf_counter() - t0)
