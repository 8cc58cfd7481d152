"""The share bound on the constraint's gradient, applied per optimizer step (``loss.constraint_share``).

The trainer backpropagates each micro-batch's loss as usual and, when the bound is on, the
constraint's part of it (``LossOutput.constraint_part``) a second time into a separate buffer.
Before the optimizer step the gradient is split into the constraint's part ``g_c`` and the rest
``g_pg = g - g_c`` (the reward surrogate, and the KL term when it is on), and ``g_c`` is scaled by
:func:`dcmdp.algo.constraints.share_scale` so that ``|g_c| <= kappa |g_pg|`` over all parameters.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

from dcmdp.algo.constraints import share_scale


class ConstraintGradients:
    """Accumulates the constraint's gradient over one optimizer step's micro-batches."""

    def __init__(self, params: Iterable[torch.nn.Parameter], kappa: float) -> None:
        self.params = [p for p in params if p.requires_grad]
        self.kappa = kappa
        self.grads: list[Tensor | None] = [None] * len(self.params)

    def add(self, constraint_loss: Tensor) -> None:
        """Backpropagate ``constraint_loss`` (already weighted like the micro-batch's loss) into the
        buffer; the graph is kept for the micro-batch's own backward pass."""
        grads = torch.autograd.grad(constraint_loss, self.params, retain_graph=True, allow_unused=True)
        for i, g in enumerate(grads):
            if g is not None:
                self.grads[i] = g if self.grads[i] is None else self.grads[i] + g  # type: ignore[operator]

    def apply(self) -> dict[str, float]:
        """Scale the constraint's share of every ``param.grad`` in place and reset the buffer;
        returns ``dcmdp/constraint_scale`` (1 = not binding) and ``dcmdp/constraint_share``
        (``|g_c| / |g_pg|`` before scaling; inf when there is no other gradient)."""
        sq_pg = sq_c = 0.0
        for p, g_c in zip(self.params, self.grads):
            if g_c is None:
                if p.grad is not None:
                    sq_pg += float(p.grad.double().pow(2).sum())
                continue
            total = p.grad if p.grad is not None else torch.zeros_like(g_c)
            sq_pg += float((total - g_c).double().pow(2).sum())
            sq_c += float(g_c.double().pow(2).sum())
        norm_pg, norm_c = sq_pg**0.5, sq_c**0.5
        scale = share_scale(norm_pg, norm_c, self.kappa)
        if scale < 1.0:
            for p, g_c in zip(self.params, self.grads):
                if g_c is not None and p.grad is not None:
                    p.grad.sub_(g_c, alpha=1.0 - scale)
        self.grads = [None] * len(self.params)
        share = norm_c / norm_pg if norm_pg > 0 else (0.0 if norm_c == 0 else float("inf"))
        return {"dcmdp/constraint_scale": scale, "dcmdp/constraint_share": share}
