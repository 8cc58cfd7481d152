"""A scripted CPU engine for unit tests only. Never use it for training or measurements.

Three ways to get completions, checked in this order:

1. ``script``: a callable ``(prompts, sampling, n, seed) -> list[Completion]`` or a fixed list of
   ``Completion`` objects returned (copied) on every call.
2. ``model``: a causal LM (anything whose ``model(input_ids=ids_1L).logits`` or plain output is a
   ``(1, L, V)`` logits tensor). One row at a time, full forward per token, no KV cache: slow but
   obviously correct, it applies ``process_logits`` exactly as the trainer does.
3. ``probs_V``: a fixed next-token distribution (a unigram "model"), used for every position.

``make_engine(EngineSpec(type="fake", model=PATH))`` builds (2) from an HF model directory on CPU;
with ``model=""`` it builds (3) over a uniform 16-token vocabulary.

Failure injection, applied to the raw completions before ``validate_completions``:
``inject={index: kind}`` corrupts completion ``index`` with one of ``FAILURES``;
``raise_on_generate=exc`` makes ``generate`` raise ``exc`` (an engine crash).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch

from dcmdp.engines.base import (
    Completion,
    EngineSpec,
    GenerateResult,
    SamplingSettings,
    register_engine,
    validate_completions,
)
from dcmdp.rollout.logprobs import process_logits

ScriptFn = Callable[[Sequence[Sequence[int]], SamplingSettings, int, "int | None"], list[Completion]]
FAILURES = ("nan_logprob", "empty", "out_of_vocab", "length_mismatch")


def inject_failure(c: Completion, kind: str, vocab_size: int) -> Completion:
    """A corrupted copy of ``c``: the engine bugs ``validate_completions`` must catch."""
    c = copy.deepcopy(c)
    if kind == "nan_logprob":
        c.logprobs[-1] = math.nan
    elif kind == "empty":
        c.token_ids, c.logprobs = [], []
    elif kind == "out_of_vocab":
        c.token_ids[-1] = vocab_size
    elif kind == "length_mismatch":
        c.logprobs = c.logprobs[:-1] if len(c.logprobs) > 1 else [*c.logprobs, -1.0]
    else:
        raise ValueError(f"failure kind {kind!r} is unknown; valid: {', '.join(FAILURES)}")
    return c


class FakeEngine:
    """Test-only engine; see the module docstring."""

    def __init__(
        self,
        *,
        vocab_size: int,
        script: ScriptFn | Sequence[Completion] | None = None,
        model: Any = None,
        probs_V: torch.Tensor | None = None,
        inject: dict[int, str] | None = None,
        raise_on_generate: BaseException | None = None,
        seed: int = 0,
    ) -> None:
        if script is None and model is None and probs_V is None:
            raise ValueError("FakeEngine needs one of script, model or probs_V")
        self.vocab_size = vocab_size
        self.script = script
        self.model = model
        self.probs_V = probs_V
        self.inject = dict(inject or {})
        for kind in self.inject.values():
            if kind not in FAILURES:
                raise ValueError(f"failure kind {kind!r} is unknown; valid: {', '.join(FAILURES)}")
        self.raise_on_generate = raise_on_generate
        self.generator = torch.Generator().manual_seed(seed)
        self.loaded: list[dict[str, torch.Tensor]] = []  # every load_weights call, for assertions
        self.closed = False

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        sampling: SamplingSettings,
        n: int = 1,
        seed: int | None = None,
    ) -> GenerateResult:
        if self.closed:
            raise RuntimeError("FakeEngine.generate after close()")
        if self.raise_on_generate is not None:
            raise self.raise_on_generate
        t0 = time.perf_counter()
        if callable(self.script):
            raw = list(self.script(prompts, sampling, n, seed))
        elif self.script is not None:
            raw = copy.deepcopy(list(self.script))
        else:
            gen = self.generator if seed is None else torch.Generator().manual_seed(seed)
            raw = [self._sample(list(p), i, sampling, gen) for i, p in enumerate(prompts) for _ in range(n)]
        raw = [
            inject_failure(c, self.inject[i], self.vocab_size) if i in self.inject else c
            for i, c in enumerate(raw)
        ]
        kept, dropped = validate_completions(raw, self.vocab_size)
        return GenerateResult(
            completions=kept, timings={"generate": time.perf_counter() - t0}, dropped=dropped
        )

    @torch.no_grad()
    def _sample(
        self, prompt: list[int], index: int, sampling: SamplingSettings, gen: torch.Generator
    ) -> Completion:
        ids, logps = list(prompt), []
        finish = "length"
        for _ in range(sampling.max_tokens):
            if self.model is not None:
                out = self.model(input_ids=torch.tensor([ids]))
                logits_V = (out.logits if hasattr(out, "logits") else out)[0, -1]
            else:
                assert self.probs_V is not None
                logits_V = torch.log(self.probs_V)
            logp_V = torch.log_softmax(
                process_logits(logits_V, sampling.temperature, sampling.top_k, sampling.top_p), dim=-1
            )
            tok = int(torch.multinomial(logp_V.exp(), 1, generator=gen))
            ids.append(tok)
            logps.append(float(logp_V[tok]))
            if tok in sampling.stop_token_ids:
                finish = "stop"
                break
        return Completion(index, ids[len(prompt) :], logps, finish)

    @torch.no_grad()
    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        tensors = {name: t.detach().clone() for name, t in named_tensors}
        self.loaded.append(tensors)
        if isinstance(self.model, torch.nn.Module):
            params = dict(self.model.named_parameters())
            for name, t in tensors.items():
                params[name].copy_(t)

    def close(self) -> None:
        self.closed = True


@register_engine("fake")
def make_fake_engine(spec: EngineSpec) -> FakeEngine:
    """From a spec: sample from the HF model at ``spec.model`` on CPU, or uniform over 16 tokens."""
    if not spec.model:
        return FakeEngine(vocab_size=16, probs_V=torch.full((16,), 1 / 16), seed=spec.seed)
    from dcmdp.engines.hf_engine import TORCH_DTYPES
    from dcmdp.models import load_model

    model = load_model(spec.model, dtype=TORCH_DTYPES[spec.dtype], device="cpu").eval()
    vocab = int(model.get_output_embeddings().weight.shape[0])
    return FakeEngine(vocab_size=vocab, model=model, seed=spec.seed)
