"""The token batch: one step's prompts and sampled responses, packed for the trainer's forward pass.

The rollout hands the trainer a :class:`TokenBatch` (``build_token_batch`` from the engine's
completions); the trainer recomputes its own log-probs of the same tokens on it
(:func:`dcmdp.rollout.logprobs.sequence_logprobs`) and takes out of it the sequences it gives
probability 0 (:func:`drop_trainer_impossible`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from dcmdp.engines.base import Completion


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


def drop_trainer_impossible(
    batch: TokenBatch, old_logp_BT: torch.Tensor
) -> tuple[TokenBatch, dict[str, float]]:
    """Take out of the loss and of D every sequence holding a token the trainer gives probability 0.

    Under top-k / top-p at another precision the engine can sample a token outside the trainer's
    kept set (log pi_old = -inf). Such a sequence has probability 0 under the trainer, so its
    sequence-level importance weight pi/mu is exactly 0: dropping it is what an unbiased
    off-policy estimator does. Masking only the token would keep training on the tokens that
    follow an impossible prefix. The sequence's reward stays in its group's baseline (advantages
    are computed before this). Returns the batch with those rows' response mask cleared, and the
    counts (``discrepancy/trainer_impossible_*``, rates over the response tokens and sequences
    sampled).
    """
    mask = batch.response_mask_BT
    impossible_BT = mask & torch.isneginf(old_logp_BT)
    drop_B = impossible_BT.any(dim=1)
    tokens = max(1, int(mask.sum()))
    seqs = max(1, int(mask.any(dim=1).sum()))
    counts = {
        "discrepancy/trainer_impossible_tokens": float(impossible_BT.sum()),
        "discrepancy/trainer_impossible_token_rate": float(impossible_BT.sum()) / tokens,
        "discrepancy/trainer_impossible_seq_frac": float(drop_B.sum()) / seqs,
    }
    if bool(drop_B.any()):
        batch = dataclasses.replace(batch, response_mask_BT=mask & ~drop_B.unsqueeze(1))
    return batch, counts
