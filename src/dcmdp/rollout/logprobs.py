"""Trainer-side log-probs of sampled tokens, under the same processing the engine sampled with.

The engine returns log mu(o_t) of the distribution it *sampled from*: logits / temperature, then
top-k and top-p truncation renormalised over the kept set. The trainer must compute log pi(o_t)
of the same processed distribution, or the ratio pi/mu is biased even with identical weights
(see ../docs/concepts.md, "Known traps"). The batch these functions read is
:class:`dcmdp.rollout.batch.TokenBatch`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from dcmdp.engines.base import SamplingSettings
from dcmdp.rollout.batch import TokenBatch


def process_logits(logits_NV: Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """Apply temperature, then top-k, then top-p (nucleus) truncation; removed entries get -inf.

    Same order as vLLM's sampler. Top-p keeps the smallest set of highest-probability tokens
    whose mass reaches top_p (the token that crosses the threshold is kept).
    """
    logits = logits_NV.float() / temperature
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        mass_before = torch.cumsum(probs, dim=-1) - probs
        remove_sorted = mass_before >= top_p
        remove = torch.zeros_like(remove_sorted).scatter(-1, order, remove_sorted)
        logits = logits.masked_fill(remove, float("-inf"))
    return logits


def token_logprobs(logits_BTV: Tensor, targets_BT: Tensor, sampling: SamplingSettings) -> Tensor:
    """log softmax(process(logits))[target] per position, in float32."""
    processed = process_logits(logits_BTV, sampling.temperature, sampling.top_k, sampling.top_p)
    logp = torch.log_softmax(processed, dim=-1)
    return logp.gather(-1, targets_BT.unsqueeze(-1)).squeeze(-1)


COMPUTE_DTYPE_ATTR = "dcmdp_compute_dtype"


def set_compute_dtype(model: torch.nn.Module, dtype: torch.dtype | None) -> torch.nn.Module:
    """Make :func:`sequence_logprobs` run ``model`` in ``dtype`` while its weights stay as they are.

    The trainer's ``model.dtype=float16``: weights and optimizer state stay float32 (the master
    copy), every forward casts them to float16 differentiably, so all operations and activations
    are float16 as in a float16 engine and the gradients land on the float32 weights."""
    setattr(model, COMPUTE_DTYPE_ATTR, dtype)
    return model


def forward_logits(model: torch.nn.Module, ids: Tensor, attn: Tensor) -> Tensor:
    dtype = getattr(model, COMPUTE_DTYPE_ATTR, None)
    if dtype is None:
        return model(input_ids=ids, attention_mask=attn, use_cache=False).logits
    from torch.func import functional_call

    # one entry per tensor: functional_call re-ties a tied embedding / lm_head pair itself
    params = {n: p.to(dtype) for n, p in model.named_parameters()}
    return functional_call(
        model, params, (), {"input_ids": ids, "attention_mask": attn, "use_cache": False}
    ).logits


def sequence_logprobs(
    model: torch.nn.Module, batch: TokenBatch, sampling: SamplingSettings, micro_batch: int = 0
) -> Tensor:
    """Teacher-forced log pi(target) for every position of ``batch`` (grad flows if enabled).

    ``micro_batch`` > 0 splits the rows to bound the size of the logits tensor (B x L x V).
    """
    B = batch.input_ids_BL.shape[0]
    step = micro_batch if micro_batch > 0 else B
    device = next(model.parameters()).device
    parts = []
    for start in range(0, B, step):
        ids = batch.input_ids_BL[start : start + step].to(device)
        attn = batch.attention_mask_BL[start : start + step].to(device)
        logits = forward_logits(model, ids, attn)[:, :-1]
        parts.append(token_logprobs(logits, batch.targets_BT[start : start + step].to(device), sampling))
    return torch.cat(parts, dim=0)
