"""Transformers rollout engine: the trainer's own model code used as the sampler.

A reference engine. At float32 with no quantization it samples from exactly the distribution the
trainer recomputes (the discrepancy is float round-off, ~1e-7 nats); at bfloat16 / float16, or
with weight-only ``int8`` / ``int4`` / ``fp8`` fake quantization (see ``dcmdp.engines.quantize``), it is a
controllable source of train-inference discrepancy that needs nothing beyond PyTorch.

The sampling loop is written out here rather than delegated to ``model.generate`` so the
returned log-probs are, by construction, those of the distribution the token was drawn from:
at each step ``process_logits`` (temperature, then top-k, then top-p; the same function the
trainer uses) is applied to the last-position logits in float32, the token is drawn from
``softmax`` of the result with a seeded ``torch.Generator``, and its ``log_softmax`` value is
returned.

All ``len(prompts) * n`` rows run as one batch: prompts are left-padded, the attention mask
hides the padding and position ids count from each row's first real token (so a row sees the
same positions as in the trainer's right-padded recompute), then one token per step is decoded
with the KV cache.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from typing import Any

import torch

from dcmdp.engines.base import (
    Completion,
    EngineSpec,
    GenerateResult,
    SamplingSettings,
    check_generate_args,
    register_engine,
    validate_completions,
)
from dcmdp.engines.precision import (
    check_group_labels,
    close_under_tying,
    in_groups,
    keep_float32_,
    unmatched_groups,
)
from dcmdp.engines.quantize import (
    QUANT_MODES,
    quantizable_weight_names,
    quantize_linear_weights_,
    quantize_weight,
)
from dcmdp.models import resolve_device
from dcmdp.rollout.batch import padding_id
from dcmdp.rollout.logprobs import process_logits

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class TransformersEngine:
    """Samples with a Hugging Face causal LM held in this process. See the module docstring."""

    def __init__(self, spec: EngineSpec) -> None:
        from dcmdp.models import load_model

        if spec.quantization is not None and spec.quantization not in QUANT_MODES:
            raise ValueError(
                f"transformers engine: quantization {spec.quantization!r} is unknown; "
                f"valid: {', '.join(QUANT_MODES)} or none"
            )
        if not spec.model:
            raise ValueError("transformers engine: EngineSpec.model (a local HF model directory) is empty")
        self.spec = spec
        self.device = resolve_device(spec.device)
        self.dtype = TORCH_DTYPES[spec.dtype]
        kept = check_group_labels(spec.fp32_modules)
        # With kept groups the checkpoint is read in float32, so their weights are not rounded
        # through the engine dtype on the way (dcmdp.engines.precision).
        load_dtype = torch.float32 if kept else self.dtype
        self.model: Any = load_model(spec.model, dtype=load_dtype, device=self.device).eval()
        self.quantization = spec.quantization
        missing = unmatched_groups(self.model, kept)
        if missing:
            raise ValueError(
                f"engine.fp32_modules: {', '.join(missing)} name(s) no parameter of {spec.model} "
                "(see `dcmdp probe --attribute --per-layer` for the groups this model has)"
            )
        self.fp32_modules = close_under_tying(self.model, kept)
        exact = {
            n: p.detach().clone()
            for n, p in self.model.named_parameters(remove_duplicate=False)
            if in_groups(n, self.fp32_modules)
        }
        for p in self.model.parameters():  # parameters only: buffers (rotary inv_freq) as loaded
            p.data = p.data.to(self.dtype)
        self._quantized_names: set[str] = set()
        if self.quantization is not None:
            keep = [n for n in quantizable_weight_names(self.model) if in_groups(n, self.fp32_modules)]
            self._quantized_names = set(
                quantize_linear_weights_(self.model, self.quantization, skip_names=keep)
            )
        self.fp32_module_names = keep_float32_(self.model, self.fp32_modules, self.dtype)
        params = dict(self.model.named_parameters(remove_duplicate=False))
        with torch.no_grad():
            for name, value in exact.items():
                params[name].copy_(value)
        config = self.model.config
        self.vocab_size = int(self.model.get_output_embeddings().weight.shape[0])
        self.pad_id = padding_id(config.pad_token_id)  # left padding, masked: any id would do
        # Advances across calls made with seed=None, so repeated calls differ but a run replays.
        self._generator = torch.Generator(device=self.device).manual_seed(spec.seed)

    @torch.no_grad()
    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        sampling: SamplingSettings,
        n: int = 1,
        seed: int | None = None,
    ) -> GenerateResult:
        t0 = time.perf_counter()
        check_generate_args(prompts, n)
        if not prompts:
            return GenerateResult(completions=[], timings={"generate": 0.0})
        gen = self._generator if seed is None else torch.Generator(device=self.device).manual_seed(seed)
        rows = [list(p) for p in prompts for _ in range(n)]
        B, P = len(rows), max(len(r) for r in rows)

        # Left-pad: every row's next token is predicted at the last column.
        input_ids = torch.full((B, P), self.pad_id, dtype=torch.long)
        attn = torch.zeros((B, P), dtype=torch.long)
        for i, r in enumerate(rows):
            input_ids[i, P - len(r) :] = torch.tensor(r, dtype=torch.long)
            attn[i, P - len(r) :] = 1
        input_ids, attn = input_ids.to(self.device), attn.to(self.device)
        # Position of a real token = number of real tokens before it; pads get 0 (masked anyway).
        position_ids = (attn.cumsum(-1) - 1).clamp(min=0)
        next_pos = position_ids[:, -1:] + 1

        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        out = self.model(
            input_ids=input_ids,
            attention_mask=attn,
            position_ids=position_ids,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        stop = torch.tensor(sorted(set(sampling.stop_token_ids)), dtype=torch.long, device=self.device)
        tokens_BT: list[torch.Tensor] = []
        logps_BT: list[torch.Tensor] = []
        done = torch.zeros(B, dtype=torch.bool, device=self.device)
        length = torch.zeros(B, dtype=torch.long, device=self.device)  # tokens kept per row
        for step in range(sampling.max_tokens):
            logits = process_logits(
                out.logits[:, -1, :], sampling.temperature, sampling.top_k, sampling.top_p
            )
            logp_BV = torch.log_softmax(logits, dim=-1)
            tok_B = torch.multinomial(logp_BV.exp(), 1, generator=gen).squeeze(-1)
            tokens_BT.append(tok_B)
            logps_BT.append(logp_BV.gather(-1, tok_B[:, None]).squeeze(-1))
            length += (~done).long()
            done |= torch.isin(tok_B, stop)
            if bool(done.all()) or step == sampling.max_tokens - 1:
                break
            # Finished rows keep decoding (their tokens are discarded) so the batch stays rectangular.
            attn = torch.cat([attn, torch.ones((B, 1), dtype=attn.dtype, device=self.device)], dim=-1)
            out = self.model(
                input_ids=tok_B[:, None],
                attention_mask=attn,
                position_ids=next_pos,
                past_key_values=out.past_key_values,
                use_cache=True,
            )
            next_pos = next_pos + 1

        toks = torch.stack(tokens_BT, dim=1).cpu()
        lps = torch.stack(logps_BT, dim=1).float().cpu()
        lengths = length.cpu().tolist()
        stopped = done.cpu().tolist()
        completions = [
            Completion(
                prompt_index=i // n,
                token_ids=toks[i, : lengths[i]].tolist(),
                logprobs=lps[i, : lengths[i]].tolist(),
                finish_reason="stop" if stopped[i] else "length",
            )
            for i in range(B)
        ]
        kept, dropped = validate_completions(completions, self.vocab_size)
        return GenerateResult(
            completions=kept, timings={"generate": time.perf_counter() - t0}, dropped=dropped
        )

    @torch.no_grad()
    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy the given parameters in (cast to the engine dtype); quantized weights are
        re-quantized with the same deterministic rule, so a quantized engine stays quantized."""
        params = dict(self.model.named_parameters(remove_duplicate=False))
        for name, tensor in named_tensors:
            if name not in params:
                raise KeyError(f"transformers engine: model has no parameter {name!r}")
            target = params[name]
            if tensor.shape != target.shape:
                raise ValueError(
                    f"transformers engine: {name} has shape {tuple(tensor.shape)}, expected {tuple(target.shape)}"
                )
            value = tensor.detach().to(device=target.device, dtype=target.dtype)
            if self.quantization is not None and name in self._quantized_names:
                value = quantize_weight(value, self.quantization)
            target.copy_(value)

    def close(self) -> None:
        self.model = None
        if self.device == "cuda":
            torch.cuda.empty_cache()


@register_engine("transformers")
def make_transformers_engine(spec: EngineSpec) -> TransformersEngine:
    return TransformersEngine(spec)


__all__ = ["TORCH_DTYPES", "TransformersEngine"]
