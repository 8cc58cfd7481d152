"""Rollout: the engine's samples, the token batch the trainer reads, and the interface the loop uses.

| module      | what                                                                                  |
|-------------|---------------------------------------------------------------------------------------|
| ``step``    | ``rollout()``: sample G completions per prompt, validate, score; the ``Rollout`` record |
| ``source``  | ``RolloutSource`` ("next batch / publish weights") and ``SyncRollout``, today's source |
| ``batch``   | ``TokenBatch`` and ``build_token_batch``; ``drop_trainer_impossible``                  |
| ``logprobs``| the trainer's log-probs of the sampled tokens under the engine's sampling processing  |
"""

from dcmdp.rollout.batch import TokenBatch, build_token_batch, drop_trainer_impossible, padding_id
from dcmdp.rollout.logprobs import process_logits, sequence_logprobs, set_compute_dtype, token_logprobs
from dcmdp.rollout.source import RolloutSource, SyncRollout, step_seed
from dcmdp.rollout.step import Rollout, rollout

__all__ = [
    "Rollout",
    "RolloutSource",
    "SyncRollout",
    "TokenBatch",
    "build_token_batch",
    "drop_trainer_impossible",
    "padding_id",
    "process_logits",
    "rollout",
    "sequence_logprobs",
    "set_compute_dtype",
    "step_seed",
    "token_logprobs",
]
