"""What the training loop builds from a config before its first step (see dcmdp.trainer).

Each function reads the config and returns the record a part of the loop uses: the sampling
settings, the engine spec, the multiplier, the loss settings of a step, the learning-rate
schedule, the base model's path, and the rollout source (in-process or a worker process).
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from dcmdp.algo.losses import LossSettings
from dcmdp.algo.multiplier import (
    GUARD_MARGIN,
    WARMUP_LOSS_TOLERANCE,
    Multiplier,
    MultiplierSettings,
    build_multiplier,
)
from dcmdp.config import Config, ConfigError
from dcmdp.engines.base import EngineSpec, SamplingSettings, make_engine
from dcmdp.models import resolve_model
from dcmdp.rollout import RolloutSource, SyncRollout
from dcmdp.rollout.pipeline import AsyncRollout, WorkerSpec, rollout_cores
from dcmdp.tasks import make_task

Logger = Callable[[str], None]


def sampling_settings(cfg: Config, eos_ids: int | tuple[int, ...]) -> SamplingSettings:
    """The rollout settings; every engine stops exactly at ``eos_ids`` (all the model's EOS ids,
    ``dcmdp.models.eos_token_ids``)."""
    s = cfg.sampling
    stop = (eos_ids,) if isinstance(eos_ids, int) else tuple(eos_ids)
    return SamplingSettings(s.temperature, s.top_p, s.top_k, s.max_tokens, stop_token_ids=stop)


def engine_spec(cfg: Config, model_path: Path) -> EngineSpec:
    e = cfg.engine
    return EngineSpec(
        type=e.type,
        model=str(model_path),
        dtype=e.dtype,
        quantization=e.quantization,
        seed=cfg.run.seed,
        max_model_len=e.max_model_len,
        kv_cache_gb=e.kv_cache_gb,
        device=cfg.model.device,
        fp32_modules=tuple(e.fp32_modules),
    )


def multiplier_from_config(m: MultiplierSettings, *, update_bound: bool) -> Multiplier:
    """The Lagrange multiplier for a config (dual ascent or PID, fixed or automatic c). A reward
    guard left at null is off where the update bound is on (``update_bound``:
    :func:`dcmdp.trainer.bounds_update`), unless ``reward_guard_relative`` asks for the guard, and
    else at :data:`~dcmdp.algo.multiplier.GUARD_MARGIN`."""
    if m.reward_guard is None:
        off = update_bound and m.reward_guard_relative == 0
        m = dataclasses.replace(m, reward_guard=0.0 if off else GUARD_MARGIN)
    return build_multiplier(m)


def loss_settings(cfg: Config, lam: float, tolerance: float | None) -> LossSettings:
    """The loss knobs of ``cfg.loss`` (:meth:`~dcmdp.config.LossConfig.settings`, the one mapping)
    plus this step's lambda and c."""
    # Before an automatic tolerance is set, a tolerance above every measure's range turns the
    # hinge off: the warm-up measures the discrepancy without acting on it.
    return cfg.loss.settings(lam=lam, tolerance=tolerance if tolerance is not None else WARMUP_LOSS_TOLERANCE)


def lr_lambda(cfg: Config, total_updates: int) -> Callable[[int], float]:
    warm = cfg.optim.warmup_steps

    def f(i: int) -> float:
        if warm > 0 and i < warm:
            return (i + 1) / warm
        if cfg.optim.schedule == "cosine":
            progress = (i - warm) / max(1, total_updates - warm)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return 1.0

    return f


def engine_label(cfg: Config) -> str:
    """The deployment setting in words, e.g. "vllm bfloat16" or "transformers float32 int3"."""
    return " ".join(
        [cfg.engine.type, cfg.engine.dtype] + ([cfg.engine.quantization] if cfg.engine.quantization else [])
    )


def resolve_base_model(cfg: Config, log: Logger) -> Path:
    if cfg.model.path == "default":
        from dcmdp.pretrain import ensure_base_model

        log("base model: the default tiny Qwen3 warm-started on arithmetic (cached after the first run)")
        return Path(ensure_base_model(cache_dir=cfg.model.cache_dir))
    try:
        return resolve_model(cfg.model.path, cache_dir=cfg.model.cache_dir)
    except ValueError as exc:  # neither a model directory nor a named model
        raise ConfigError(f"model.path: {exc}") from None


def make_source(
    cfg: Config,
    base_path: Path,
    tokenizer: Any,
    sampling: SamplingSettings,
    model: torch.nn.Module,
    start_step: int,
    log: Logger,
    engine_factory: Callable[[EngineSpec], Any] = make_engine,
) -> RolloutSource:
    """The rollout source of a run: in-process when synchronous (the engine built by
    ``engine_factory``), a worker process otherwise (which builds its own)."""
    spec = engine_spec(cfg, base_path)
    task = make_task(cfg.task.name, **cfg.task.options)
    if cfg.run.max_staleness == 0:
        return SyncRollout(
            engine_factory(spec),
            task,
            tokenizer,
            sampling,
            cfg.run.prompts_per_step,
            cfg.run.group_size,
            cfg.run.seed,
        )
    worker_cores, _ = rollout_cores()
    worker = WorkerSpec(
        engine=spec,
        task=task,
        tokenizer_path=str(base_path),
        sampling=sampling,
        prompts_per_step=cfg.run.prompts_per_step,
        group_size=cfg.run.group_size,
        seed=cfg.run.seed,
        threads=max(1, len(worker_cores)),
        cores=worker_cores,
        # vLLM's CPU backend binds its OpenMP threads itself ("auto" leaves the last core free,
        # the worker's own): point it at the worker's cores unless the user chose.
        env={
            "VLLM_CPU_OMP_THREADS_BIND": os.environ.get(
                "VLLM_CPU_OMP_THREADS_BIND", ",".join(map(str, worker_cores))
            )
        },
    )
    source = AsyncRollout(
        worker,
        model.named_parameters(),
        cfg.run.max_staleness,
        start_version=start_step,
        timeout_s=cfg.run.rollout_timeout_s,
        last_step=cfg.run.steps,
    )
    log(
        f"rollout worker: pid {source.process.pid}, cores {list(worker_cores)}, "
        f"max_staleness {cfg.run.max_staleness}"
    )
    return source
