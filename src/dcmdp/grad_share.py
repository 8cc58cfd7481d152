"""The share bound on the constraint, applied per optimizer step (``loss.constraint_share``).

The trainer backpropagates each micro-batch's loss as usual and, when the bound is on, the
constraint's part of it (``LossOutput.constraint_part``) a second time into a separate buffer.
Before the optimizer step the gradient is split into the constraint's part ``g_c`` and the rest
``g_pg = g - g_c`` (the reward surrogate, and the KL term when it is on), and ``g_c`` is scaled by
:func:`dcmdp.algo.constraints.share_scale` so that ``|g_c| <= kappa |g_pg|`` over all parameters
(``loss.constraint_share_of=gradient``, :meth:`ConstraintGradients.apply`). With
``loss.constraint_share_of=update`` the buffer goes to :class:`ShareBoundedAdamW` instead
(:meth:`ConstraintGradients.hand_to`), which bounds the constraint's share of AdamW's step.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

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

    def hand_to(self, optimizer: ShareBoundedAdamW, clip_coef: float = 1.0) -> None:
        """Give the buffer, times ``clip_coef`` (the factor gradient clipping applied to
        ``param.grad``), to the optimizer's next step, and reset it."""
        grads = [None if g is None else g * clip_coef for g in self.grads]
        optimizer.set_constraint_grads(self.params, grads)
        self.grads = [None] * len(self.params)


class ShareBoundedAdamW(torch.optim.Optimizer):
    """AdamW that bounds the constraint's share of the *update*, not of the gradient
    (``loss.constraint_share_of=update``).

    The gradient bound above does not bound the step: AdamW divides each coordinate by its running
    RMS, so a small constraint gradient that points the same way step after step moves the weights
    as fast as a large, noisy policy gradient (docs/RESULTS.md, ``harm_share``). This optimizer
    runs AdamW's moments twice, on the policy part of the gradient ``g_pg = g - g_c`` (the reward
    surrogate, and the KL term when it is on) and on the constraint's part ``g_c``, and takes

        u_pg = m_pg_hat / (sqrt(v_pg_hat) + eps),  u_c = m_c_hat / (sqrt(v_c_hat) + eps)
        theta <- theta (1 - lr wd) - lr (u_pg + s u_c),  s = min(1, kappa |lr u_pg| / |lr u_c|)

    with norms over every parameter (each scaled by its group's lr). So the policy part of the step
    is exactly the step AdamW would take on the policy gradient alone (without a constraint this is
    AdamW, up to rounding), and the constraint adds at most ``kappa`` times its norm. In particular,
    while no sample carries a reward signal the policy part decays with its momentum and the
    constraint's part with it (weight decay still applies).

    Each part has its own second moment on purpose. With one second moment of the whole gradient,
    coordinates where the two parts cancel (the constraint pulling against the reward) have a tiny
    RMS while each part's momentum is large, and ``m_pg / sqrt(v)`` takes steps far larger than
    AdamW's; the first version of this class did, and in the ``harm`` setting it moved the weights
    until the int3 engine's weight-sync probe read 9-18x its floor.

    Optimizer memory is twice AdamW's (two first and two second moments). The trainer hands the
    constraint's gradient of each step to :meth:`set_constraint_grads` before :meth:`step`
    (``p.grad`` holds the whole gradient, as for any optimizer). A state saved by
    ``torch.optim.AdamW`` loads as the policy part (the constraint's moments start at 0);
    :func:`as_adamw_state` turns a saved state into AdamW's (the policy part's moments).
    """

    def __init__(
        self,
        params: Iterable[torch.nn.Parameter],
        lr: float,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.01,
        kappa: float = 0.5,
    ) -> None:
        if not kappa >= 0:
            raise ValueError(f"kappa must be >= 0, got {kappa!r}")
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})
        self.kappa = kappa
        self._constraint: dict[torch.nn.Parameter, Tensor] = {}
        self.last_metrics: dict[str, float] = {}

    def set_constraint_grads(self, params: list[torch.nn.Parameter], grads: list[Tensor | None]) -> None:
        """The constraint's part of each ``param.grad`` for the next :meth:`step` (None = no part)."""
        self._constraint = {p: g for p, g in zip(params, grads) if g is not None}

    @staticmethod
    def _directions(state: dict[str, Any], group: dict[str, Any]) -> tuple[Tensor, Tensor]:
        beta1, beta2 = group["betas"]
        t = float(state["step"])
        out = []
        for m, v in (("exp_avg", "exp_avg_sq"), ("exp_avg_c", "exp_avg_sq_c")):
            denom = (state[v] / (1 - beta2**t)).sqrt_().add_(group["eps"]).mul_(1 - beta1**t)
            out.append(state[m] / denom)
        return out[0], out[1]

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        if closure is not None:
            raise ValueError("ShareBoundedAdamW does not take a closure")
        stepped: list[tuple[torch.nn.Parameter, dict[str, Any]]] = []
        sq_pg = torch.zeros((), dtype=torch.float64)
        sq_c = torch.zeros((), dtype=torch.float64)
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                for key in ("exp_avg_c", "exp_avg_sq_c"):  # fresh, or a state torch.optim.AdamW saved
                    if key not in state:
                        state[key] = torch.zeros_like(p)
                state["step"] += 1
                g_c = self._constraint.get(p)
                g_pg = p.grad if g_c is None else p.grad - g_c
                state["exp_avg"].mul_(beta1).add_(g_pg, alpha=1 - beta1)
                state["exp_avg_sq"].mul_(beta2).addcmul_(g_pg, g_pg, value=1 - beta2)
                state["exp_avg_c"].mul_(beta1)
                state["exp_avg_sq_c"].mul_(beta2)
                if g_c is not None:
                    state["exp_avg_c"].add_(g_c, alpha=1 - beta1)
                    state["exp_avg_sq_c"].addcmul_(g_c, g_c, value=1 - beta2)
                u_pg, u_c = self._directions(state, group)
                lr2 = group["lr"] ** 2
                sq_pg += lr2 * u_pg.double().pow(2).sum().cpu()
                sq_c += lr2 * u_c.double().pow(2).sum().cpu()
                stepped.append((p, group))
        norm_pg, norm_c = float(sq_pg) ** 0.5, float(sq_c) ** 0.5
        scale = share_scale(norm_pg, norm_c, self.kappa)
        for p, group in stepped:  # the directions again, rather than two model-sized copies held
            u_pg, u_c = self._directions(self.state[p], group)
            p.mul_(1 - group["lr"] * group["weight_decay"])
            p.add_(u_pg.add_(u_c, alpha=scale), alpha=-group["lr"])
        self._constraint = {}
        share = norm_c / norm_pg if norm_pg > 0 else (0.0 if norm_c == 0 else float("inf"))
        self.last_metrics = {"dcmdp/constraint_scale": scale, "dcmdp/constraint_share": share}


def as_adamw_state(state_dict: dict[str, Any]) -> dict[str, Any]:
    """A :class:`ShareBoundedAdamW` state as ``torch.optim.AdamW`` reads it: the policy part's
    moments (the constraint's are dropped; a state without them is returned as it is)."""
    states = {}
    for key, st in state_dict["state"].items():
        states[key] = {k: v for k, v in st.items() if k not in ("exp_avg_c", "exp_avg_sq_c")}
    return {**state_dict, "state": states}
