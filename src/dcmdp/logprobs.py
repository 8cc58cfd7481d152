"""Trainer-side log-probs of sampled tokens, under the same processing the engine sampled with.

The engine returns log mu(o_t) of the distribution it *sampled from*: logits / temperature, then
top-k and top-p truncation renormalised over the kept set. The trainer must compute log pi(o_t)
of the same processed distribution, or the ratio pi/mu is biased even with identical weights
(see ../docs/concepts.md, "Known traps").
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from dcmdp.engines.base import Completion, SamplingSettings


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


@dataclass
class TokenBatch:
    """Prompts and responses packed right-padded for one teacher-forced forward pass.

    Position t of the ``_BT`` tensors predicts ``input_ids_BL[:, t + 1]`` (T = L - 1).
    """

    input_ids_BL: Tensor
    attention_mask_BL: Tensor
    targets_BT: Tensor
    response_mask_BT: Tensor  # bool: True where the target is a response token
    engine_logp_BT: Tensor  # engine log-probs at response positions, 0 elsewhere

    @property
    def num_response_tokens(self) -> int:
        return int(self.response_mask_BT.sum())

    def to(self, device: str | torch.device) -> TokenBatch:
        return TokenBatch(
            self.input_ids_BL.to(device),
            self.attention_mask_BL.to(device),
            self.targets_BT.to(device),
            self.response_mask_BT.to(device),
            self.engine_logp_BT.to(device),
        )

    def select(self, rows: Tensor | slice) -> TokenBatch:
        return TokenBatch(
            self.input_ids_BL[rows],
            self.attention_mask_BL[rows],
            self.targets_BT[rows],
            self.response_mask_BT[rows],
            self.engine_logp_BT[rows],
        )


def padding_id(pad_id: int | None) -> int:
    """The id written at padding positions: ``pad_id``, or 0 when the tokenizer has none.

    Padding sits where the attention mask is 0 and is never a target of the response mask, so
    any id in the vocabulary gives the same log-probs (``tests/test_stop_and_pad.py``); 0 always
    is one. Used by ``build_token_batch`` and the Transformers engine alike.
    """
    return 0 if pad_id is None else int(pad_id)


def build_token_batch(
    prompts: Sequence[Sequence[int]], completions: Sequence[Completion], pad_id: int | None
) -> TokenBatch:
    """Pack each completion after its prompt (``prompts[c.prompt_index]``), right-padded with
    ``padding_id(pad_id)`` (a tokenizer without a pad token passes None)."""
    seqs = [list(prompts[c.prompt_index]) + list(c.token_ids) for c in completions]
    length = max(len(s) for s in seqs)
    B = len(seqs)
    input_ids = torch.full((B, length), padding_id(pad_id), dtype=torch.long)
    attn = torch.zeros((B, length), dtype=torch.long)
    resp = torch.zeros((B, length - 1), dtype=torch.bool)
    eng = torch.zeros((B, length - 1), dtype=torch.float32)
    for i, (s, c) in enumerate(zip(seqs, completions, strict=True)):
        p = len(prompts[c.prompt_index])
        if p == 0:
            raise ValueError("a prompt must hold at least one token (the first response token needs context)")
        input_ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        attn[i, : len(s)] = 1
        r = len(c.token_ids)
        resp[i, p - 1 : p - 1 + r] = True
        eng[i, p - 1 : p - 1 + r] = torch.tensor(c.logprobs, dtype=torch.float32)
    return TokenBatch(input_ids, attn, input_ids[:, 1:].clone(), resp, eng)


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
        logits = model(input_ids=ids, attention_mask=attn, use_cache=False).logits[:, :-1]
        parts.append(token_logprobs(logits, batch.targets_BT[start : start + step].to(device), sampling))
    return torch.cat(parts, dim=0)
