"""Moved to :mod:`dcmdp.rollout`; this module keeps ``dcmdp.logprobs`` imports working (see README, Layout)."""

from dcmdp.rollout import (
    TokenBatch,
    build_token_batch,
    padding_id,
    process_logits,
    sequence_logprobs,
    token_logprobs,
)

__all__ = [
    "TokenBatch",
    "build_token_batch",
    "padding_id",
    "process_logits",
    "sequence_logprobs",
    "token_logprobs",
]
