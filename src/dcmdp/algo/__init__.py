"""The algorithm: pure functions and small records, tensors and plain numbers in, tensors out.

| module            | what                                                                          |
|-------------------|-------------------------------------------------------------------------------|
| ``advantages``    | GRPO group-normalised advantages, the degenerate-group fraction               |
| ``aggregation``   | the loss aggregation modes (token-mean, seq-mean-token-mean, ...)             |
| ``masked``        | the masked means every other module uses                                      |
| ``discrepancy``   | the probability gap delta, D, and the engine-trainer diagnostics              |
| ``loss_core``     | loss records (``LossInputs``, ``LossSettings``, ``LossOutput``), the registry  |
| ``losses``        | one function per policy loss (GRPO, TIS, ..., DCMDP), all importable here     |
| ``kl``            | the k3 KL to a reference policy                                              |
| ``multiplier``    | the Lagrange multiplier (dual ascent, PID, automatic c) and its settings      |
| ``multiplier_parts`` | what the multipliers share (``LambdaState``) and their checks             |
"""
