"""The share bound on the constraint, applied per optimizer step (``loss.constraint_share``).

The trainer backpropagates each micro-batch's loss as usual and, when the bound is on and lambda
is not 0 (or the constraint does not scale with lambda), the constraint's part of it
(``LossOutput.constraint_part``) a second time into a separate buffer.
Before the optimizer step the gradient is split into the constraint's part ``g_c`` and the rest
``g_pg = g - g_c`` (the reward surrogate, and the KL term when it is on), and ``g_c`` is scaled by
:func:`dcmdp.algo.constraints.share_scale` so that ``|g_c| <= kappa |g_pg|`` over all parameters
(``loss.constraint_share_of=gradient``, :meth:`ConstraintGradients.apply`). With
``loss.constraint_share_of=update`` the buffer goes to :class:`ShareBoundedAdamW` instead
(:meth:`ConstraintGradients.hand_to`), which bounds the constraint's share of AdamW's step.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
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
        self.add_grads(grads)

    def add_grads(self, grads: Sequence[Tensor | None], scale: Tensor | float = 1.0) -> None:
        """Add ``scale * grads`` (one entry per parameter, None = none): gradients taken elsewhere,
        e.g. by the TRL integration, which learns the backward's scale only later."""
        for i, g in enumerate(grads):
            if g is None:
                continue
            if not (isinstance(scale, float) and scale == 1.0):
                g = g * (scale.to(g.device) if isinstance(scale, Tensor) else scale)
            held = self.grads[i]
            self.grads[i] = g if held is None else held + g

    @property
    def pending(self) -> bool:
        """Whether the buffer holds a gradient not yet applied or handed over."""
        return any(g is not None for g in self.grads)

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

    def total_norm(self) -> Tensor:
        """The norm of ``param.grad + buffer`` over all parameters (the update bound keeps the two
        parts apart: ``param.grad`` holds the rest of the gradient)."""
        norms = []
        for p, g_c in zip(self.params, self.grads):
            total = p.grad if g_c is None else (g_c if p.grad is None else p.grad + g_c)
            if total is not None:  # on the gradient's device: no read-back per tensor
                norms.append(torch.linalg.vector_norm(total.double()))
        if not norms:
            return torch.zeros((), dtype=torch.float64)
        return torch.linalg.vector_norm(torch.stack([n.to(norms[0].device) for n in norms]))

    def hand_to(self, optimizer: ShareBoundedAdamW, clip_coef: float | Tensor = 1.0) -> None:
        """Give the buffer, times ``clip_coef`` (the factor gradient clipping applied to
        ``param.grad``), to the optimizer's next step, and reset it."""
        grads = [None if g is None else g * clip_coef for g in self.grads]
        optimizer.set_constraint_grads(self.params, grads)
        self.grads = [None] * len(self.params)


#: Decay of the moving averages of each part's displacement that the update bound compares (a
#: window of about 100 steps: the time a constraint took to drive a run away in ``long_stress_q4_0``).
DRIFT_BETA = 0.99


class KappaMismatchError(ValueError):
    """An optimizer state saved under another kappa than the optimizer loading it."""


class ShareBoundedAdamW(torch.optim.Optimizer):
    """AdamW that bounds the constraint's share of how far the weights *move*
    (``loss.constraint_share_of=update``).

    A bound on the gradient does not bound the step: AdamW divides each coordinate by its running
    RMS, so a small constraint gradient that points the same way step after step moves the weights
    as fast as a large, noisy policy gradient (docs/RESULTS.md, ``harm_share``). A bound on each
    step is not enough either: the policy gradient's steps point many ways and partly cancel over
    time (its net displacement grows like the square root of the number of steps when it is mostly
    noise), the constraint's point one way and add up, so a constraint held to half of every step
    still carried the weights in the long regime (docs/RESULTS.md). So this optimizer bounds the
    net displacement, per parameter tensor:

    * AdamW's moments are kept for the policy part of the gradient ``g_pg`` (the reward
      surrogate, and the KL term when it is on) and for the constraint's part ``g_c``, and both
      parts are divided by ``sqrt(v_pg + v_c)``: about AdamW's RMS when the parts are not
      correlated, never near 0 where they cancel (one second moment of the whole gradient divided
      each part's momentum by about 0 there), and the policy part alone is AdamW's step when there
      is no constraint. ``u_pg = m_pg_hat / (sqrt(v_pg_hat + v_c_hat) + eps)``, ``u_c`` likewise.
    * Moving averages (decay :data:`DRIFT_BETA`) of each part's displacement, ``e_pg`` and
      ``e_c``, are kept per tensor, and the constraint's step is scaled by the largest
      ``s in [0, 1]`` with ``|e_c| <= kappa |e_pg|`` after the step. The weights then move
      ``-lr (u_pg + s u_c)`` (and decoupled weight decay).

    So, per tensor, the constraint's exponentially weighted displacement (a window of about 100
    steps) stays within kappa times the reward gradient's, whenever it was within it the step
    before: while the policy gradient is mostly noise its average displacement is small and so is
    the constraint's budget; while no sample carries a reward signal both decay. What this does not
    bound: the constraint's net displacement when the policy's direction reverses or rotates (its
    average stays large while its net displacement returns to 0; a review measured 2-5x kappa over
    300-400 steps of a square wave), or over runs much longer than the window (with a pure-noise
    policy the ratio grows like the square root of the number of steps: 1.1x at 1,000 steps,
    1.6x at 2,000 with kappa 0.5). When the policy's average shrinks faster than the window
    forgets, the constraint's stays above its budget (and the constraint takes no step) until it
    decays back under it. lambda sets how hard the constraint pulls within the budget, and, as
    both parts share the denominator, a large lambda also shrinks the policy's own step where
    the two gradients share coordinates (and with it the budget); kappa does not undo that, as
    ``v_c`` comes from the whole constraint gradient, not the share of it that steps (a toy: where
    the constraint's gradient is 1x / 3x / 6x the policy's, the policy moves 0.81x / 0.54x / 0.37x
    as far as under AdamW, the same at kappa 0.1, 0.25 and 0.5). Optimizer memory is three
    times AdamW's (two first moments, two second moments, two displacement averages).

    The trainer backpropagates the two parts separately: ``p.grad`` holds the policy part and
    :meth:`set_constraint_grads` the constraint's, before each :meth:`step`. A state saved by
    ``torch.optim.AdamW`` loads as the policy part; :func:`as_adamw_state` turns a saved state into
    AdamW's (the policy part's moments).
    """

    def __init__(
        self,
        params: Iterable[torch.nn.Parameter],
        lr: float,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.01,
        kappa: float = 0.5,  # dcmdp train's default for a constraint alone (config.DEFAULT_SHARE)
        drift_beta: float = DRIFT_BETA,
    ) -> None:
        if not kappa >= 0:
            raise ValueError(f"kappa must be >= 0, got {kappa!r}")
        if not 0 <= drift_beta < 1:
            raise ValueError(f"drift_beta must be in [0, 1), got {drift_beta!r}")
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})
        self.kappa = float(kappa)  # a plain float: a numpy scalar in the state would fail a weights-only load
        self.drift_beta = drift_beta
        self._constraint: dict[torch.nn.Parameter, Tensor] = {}
        self.last_metrics: dict[str, float] = {}

    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        """torch's optimizer state, with kappa beside it, so that a checkpoint is not resumed under
        another share without a word (:meth:`load_state_dict` refuses it)."""
        return {**super().state_dict(), "kappa": self.kappa}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's, after checking the kappa the state was saved with (states saved before it was
        recorded carry none, and load as they are)."""
        saved = state_dict.get("kappa")
        if saved is not None and float(saved) != self.kappa:
            raise KappaMismatchError(
                f"this optimizer state was saved by a ShareBoundedAdamW with kappa={saved}, and this one has "
                f"kappa={self.kappa} (the update bound's share: dcmdp train's loss.constraint_share, TRL's "
                f"dcmdp_constraint_share): set it to {saved} to resume the run, or start a new one"
            )
        super().load_state_dict({k: v for k, v in state_dict.items() if k != "kappa"})

    def set_constraint_grads(self, params: list[torch.nn.Parameter], grads: list[Tensor | None]) -> None:
        """The constraint's gradient for the next :meth:`step` (None = none); ``p.grad`` is the rest."""
        self._constraint = {p: g for p, g in zip(params, grads) if g is not None}

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        if closure is not None:
            raise ValueError("ShareBoundedAdamW does not take a closure")
        b = self.drift_beta
        moved_c = wanted_c = sq_e_pg = sq_e_c = 0.0
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr = group["lr"]
            for p in group["params"]:
                g_c = self._constraint.get(p)
                if p.grad is None and g_c is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0)
                for key in ("exp_avg", "exp_avg_sq", "exp_avg_c", "exp_avg_sq_c", "drift", "drift_c"):
                    if key not in state:  # fresh, or a state torch.optim.AdamW saved
                        state[key] = torch.zeros_like(p)
                state["step"] += 1
                t = float(state["step"])
                g_pg = p.grad if p.grad is not None else torch.zeros_like(p)
                state["exp_avg"].mul_(beta1).add_(g_pg, alpha=1 - beta1)
                state["exp_avg_sq"].mul_(beta2).addcmul_(g_pg, g_pg, value=1 - beta2)
                state["exp_avg_c"].mul_(beta1)
                state["exp_avg_sq_c"].mul_(beta2)
                if g_c is not None:
                    state["exp_avg_c"].add_(g_c, alpha=1 - beta1)
                    state["exp_avg_sq_c"].addcmul_(g_c, g_c, value=1 - beta2)
                if lr == 0:  # a frozen group: moments as AdamW keeps them, no step
                    continue
                denom = (
                    ((state["exp_avg_sq"] + state["exp_avg_sq_c"]) / (1 - beta2**t))
                    .sqrt_()
                    .add_(group["eps"])
                    .mul_((1 - beta1**t) / lr)
                )
                d_pg = state["exp_avg"] / denom  # lr u_pg
                d_c = state["exp_avg_c"] / denom  # lr u_c
                e_pg, e_c = state["drift"], state["drift_c"]
                e_pg.mul_(b).add_(d_pg, alpha=1 - b)
                e_c.mul_(b)
                s = drift_scale(e_c, d_c.mul_(1 - b), self.kappa * float(e_pg.double().norm()))
                e_c.add_(d_c, alpha=s)
                p.mul_(1 - lr * group["weight_decay"])
                p.sub_(d_pg).sub_(d_c, alpha=s / (1 - b))
                wanted = float(d_c.double().norm()) / (1 - b)
                wanted_c += wanted
                moved_c += s * wanted
                sq_e_pg += float(e_pg.double().pow(2).sum())
                sq_e_c += float(e_c.double().pow(2).sum())
        self._constraint = {}
        scale = moved_c / wanted_c if wanted_c > 0 else 1.0
        norm_pg, norm_c = sq_e_pg**0.5, sq_e_c**0.5
        share = norm_c / norm_pg if norm_pg > 0 else (0.0 if norm_c == 0 else float("inf"))
        self.last_metrics = {"dcmdp/constraint_scale": scale, "dcmdp/constraint_share": share}


def drift_scale(e: Tensor, step: Tensor, budget: float) -> float:
    """The largest ``s in [0, 1]`` with ``|e + s step| <= budget`` (0 when ``|e|`` is already over
    it; the average then decays until it is not)."""
    ee = float(e.double().pow(2).sum())
    if ee > budget**2:
        return 0.0
    ss = float(step.double().pow(2).sum())
    if ss == 0.0:
        return 1.0
    es = float((e.double() * step.double()).sum())
    # s^2 ss + 2 s es + ee - budget^2 <= 0: the larger root (the smaller is <= 0 as ee <= budget^2)
    root = (-es + max(es * es - ss * (ee - budget**2), 0.0) ** 0.5) / ss
    return min(1.0, max(0.0, root))


def as_adamw_state(state_dict: dict[str, Any]) -> dict[str, Any]:
    """A :class:`ShareBoundedAdamW` state as ``torch.optim.AdamW`` reads it: the policy part's
    moments (the rest is dropped; a state without it is returned as it is)."""
    extra = ("exp_avg_c", "exp_avg_sq_c", "drift", "drift_c")
    states = {key: {k: v for k, v in st.items() if k not in extra} for key, st in state_dict["state"].items()}
    return {**{k: v for k, v in state_dict.items() if k != "kappa"}, "state": states}
