"""The rollout-engine protocol: the trainer sees an engine only as a black box that returns
sampled tokens and the log-probs of the distribution it sampled from.

An engine implements three calls:

- ``generate(prompts, sampling, n, seed) -> GenerateResult``: ``n`` completions per prompt,
  grouped by prompt (completions ``[i*n:(i+1)*n]`` belong to prompt ``i``), each with its token
  ids, the per-token log-probs *after* temperature / top-k / top-p processing (vLLM's
  ``processed_logprobs``), a finish reason and timings.
- ``load_weights(named_tensors)``: take the trainer's parameters in memory (no round trip through
  a checkpoint directory), so the next ``generate`` samples from the new policy.
- ``close()``.

Engines are built by ``make_engine(EngineSpec)`` from a registry keyed by ``EngineSpec.type``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

DTYPES = ("float32", "bfloat16", "float16")
# Quantization names the engines that define their own accept (vLLM checks its names itself).
ENGINE_QUANTIZATIONS: dict[str, tuple[str, ...]] = {
    "transformers": ("int8", "int4", "int3", "fp8"),
    "llamacpp": ("F32", "BF16", "F16", "Q8_0", "Q4_0"),
}


class UnsupportedQuantizationError(ValueError):
    """The requested quantization has no kernel on this machine (the message says which do)."""


@dataclass(frozen=True)
class SamplingSettings:
    """How the engine samples. The trainer recomputes log-probs under the same processing."""

    temperature: float = 1.0
    top_p: float = 1.0  # 1.0 = off
    top_k: int = 0  # 0 = off
    max_tokens: int = 32
    # Generation stops after any of these ids (the tokenizer's EOS is added by the caller).
    stop_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if not (self.temperature > 0 and math.isfinite(self.temperature)):
            raise ValueError(f"sampling.temperature must be a positive finite number, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"sampling.top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"sampling.top_k must be >= 0 (0 = off), got {self.top_k}")
        if self.max_tokens < 1:
            raise ValueError(f"sampling.max_tokens must be >= 1, got {self.max_tokens}")


@dataclass
class Completion:
    """One sampled response. ``logprobs[t]`` is log mu(token_ids[t] | prompt, token_ids[:t])."""

    prompt_index: int
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str  # "stop" (hit a stop id / EOS) or "length"


@dataclass
class GenerateResult:
    completions: list[Completion]
    # Seconds spent, e.g. {"generate": 0.8}; engines may add more keys.
    timings: dict[str, float] = field(default_factory=dict)
    # Samples the engine produced but validation rejected, by reason (see validate_completions).
    dropped: dict[str, int] = field(default_factory=dict)

    @property
    def num_tokens(self) -> int:
        return sum(len(c.token_ids) for c in self.completions)


@dataclass(frozen=True)
class EngineSpec:
    """Which engine to build and how. Fields not used by an engine type are ignored by it."""

    type: str = "vllm"  # see ENGINES
    model: str = ""  # local Hugging Face model directory
    dtype: str = "bfloat16"  # float32 | bfloat16 | float16
    # vLLM: a vLLM quantization name (e.g. "fp8") or None. transformers: "int8" | "int4" | "fp8" | None.
    # llamacpp: the GGUF type "F32" | "BF16" | "F16" | "Q8_0" | "Q4_0".
    quantization: str | None = None
    seed: int = 0
    max_model_len: int = 256
    kv_cache_gb: float = 1.0  # vLLM KV-cache size (GiB) on CPU
    gpu_memory_utilization: float = 0.3  # vLLM on CUDA
    device: str = "auto"  # "auto" | "cpu" | "cuda"
    # Module groups kept in float32 while the rest runs at ``dtype`` / ``quantization``
    # (dcmdp.engines.precision): transformers any group; vllm "lm_head" only.
    fp32_modules: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.type not in ENGINES and self.type not in _LAZY_ENGINES:
            raise ValueError(f"engine.type {self.type!r} is unknown; valid: {', '.join(engine_names())}")
        if self.dtype not in DTYPES:
            raise ValueError(f"engine.dtype {self.dtype!r} is unknown; valid: {', '.join(DTYPES)}")


class RolloutEngine(Protocol):
    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        sampling: SamplingSettings,
        n: int = 1,
        seed: int | None = None,
    ) -> GenerateResult: ...

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None: ...

    def close(self) -> None: ...


EngineFactory = Callable[[EngineSpec], RolloutEngine]
ENGINES: dict[str, EngineFactory] = {}
# Engines whose modules import heavy optional packages are registered by module path and
# imported only when asked for.
_LAZY_ENGINES: dict[str, str] = {
    "vllm": "dcmdp.engines.vllm_engine",
    "transformers": "dcmdp.engines.hf_engine",
    "llamacpp": "dcmdp.engines.llamacpp_engine",
    "fake": "dcmdp.engines.fake",
}


def register_engine(name: str) -> Callable[[EngineFactory], EngineFactory]:
    def deco(factory: EngineFactory) -> EngineFactory:
        ENGINES[name] = factory
        return factory

    return deco


def engine_names() -> list[str]:
    return sorted(set(ENGINES) | set(_LAZY_ENGINES))


def make_engine(spec: EngineSpec) -> RolloutEngine:
    """Build the engine named by ``spec.type``."""
    if spec.type not in ENGINES:
        import importlib

        importlib.import_module(_LAZY_ENGINES[spec.type])
    return ENGINES[spec.type](spec)


def check_generate_args(prompts: Sequence[Sequence[int]], n: int) -> None:
    """The argument checks every engine's ``generate`` starts with."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt must hold at least one token")


def validate_completions(
    completions: Sequence[Completion], vocab_size: int
) -> tuple[list[Completion], dict[str, int]]:
    """Drop samples an engine should never return and count each reason.

    A sample is dropped (never silently used) when: it is empty; its token and log-prob lists
    differ in length; a token id lies outside [0, vocab_size); a log-prob is NaN, +inf, -inf or
    positive (> 1e-4). Returns the kept completions and ``{"reason": count}``.
    """
    kept: list[Completion] = []
    dropped: dict[str, int] = {}

    def drop(reason: str) -> None:
        dropped[reason] = dropped.get(reason, 0) + 1

    for c in completions:
        if len(c.token_ids) == 0:
            drop("empty")
        elif len(c.token_ids) != len(c.logprobs):
            drop("length_mismatch")
        elif any(t < 0 or t >= vocab_size for t in c.token_ids):
            drop("token_out_of_vocab")
        elif any(not math.isfinite(lp) for lp in c.logprobs):
            drop("nonfinite_logprob")
        elif any(lp > 1e-4 for lp in c.logprobs):
            drop("positive_logprob")
        else:
            kept.append(c)
    return kept, dropped
