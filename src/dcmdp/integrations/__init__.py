"""DCMDP inside other RL frameworks: TRL's ``GRPOTrainer`` and verl's policy-loss registry.

The frameworks own the rollout, the distributed update and the logging; dcmdp adds what DCMDP
(arXiv 2606.08779) needs on top, computed with the library's own functions:

| module                          | hook                                                       | multiplier lives   |
|---------------------------------|------------------------------------------------------------|--------------------|
| :mod:`dcmdp.integrations.trl`   | ``DCMDPGRPOTrainer(GRPOTrainer)`` adds the DCMDP term      | on every rank (all-reduce of D, identical dual step) |
| :mod:`dcmdp.integrations.verl`  | policy loss ``"dcmdp"`` in verl's ``POLICY_LOSS_REGISTRY`` | on the driver (pushed to the actor each step) |

This package imports neither framework: each submodule imports its own, and ``trl`` needs TRL
installed, while ``verl`` imports without verl (the plain loss function still works).

What is shared here: the names of the three DCMDP loss forms, the options of the multiplier and
of the update bound (:class:`DCMDPOptions`; TRL alone applies the bound so far) and the function
that builds a multiplier from them, and :func:`dcmdp_term`, the DCMDP part of the loss alone (used
by TRL, whose own surrogate stays in place).
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import Tensor

from dcmdp.algo.discrepancy import fill_masked, prob_gap
from dcmdp.algo.losses import LossInputs, LossOutput, LossSettings, get_policy_loss
from dcmdp.algo.multiplier import MULTIPLIER_KINDS, WARMUP_LOSS_TOLERANCE, Multiplier, MultiplierSettings
from dcmdp.algo.multiplier import build_multiplier as build_core_multiplier
from dcmdp.algo.multiplier_parts import check_finite
from dcmdp.config import COMPOSED_SHARE, DEFAULT_SHARE

#: DCMDP loss form (the integrations' option value) -> dcmdp's registered core loss.
LOSS_FORMS: dict[str, str] = {
    "penalty": "dcmdp",  # reading (a): + lambda * token-mean(delta), differentiable
    "shaping": "dcmdp_shaping",  # reading (b): A <- A - lambda * delta.detach()
    "hinge": "dcmdp_hinge",  # + lambda * token-mean(max(0, delta - c))
}


def core_loss_name(form: str) -> str:
    """The dcmdp core loss registered for a loss form; an unknown form raises ``ValueError``."""
    if form not in LOSS_FORMS:
        raise ValueError(f"unknown DCMDP loss form {form!r}; valid forms: {', '.join(LOSS_FORMS)}")
    return LOSS_FORMS[form]


#: kappa of the update bound when ``DCMDPOptions.constraint_share`` is None (penalty and hinge):
#: ``dcmdp train``'s defaults, one definition each: alone, and with an importance correction beside it.
DEFAULT_CONSTRAINT_SHARE: float = DEFAULT_SHARE
CORRECTED_CONSTRAINT_SHARE: float = COMPOSED_SHARE

# Defaults of the multiplier options: the fields of dcmdp's own multiplier settings, so the
# integrations and `dcmdp train` share one definition of each.
_M = MultiplierSettings
# The multiplier settings' names that these options spell differently.
_OPTION_NAMES = {
    "init": "lambda_init",
    "lam_min": "lambda_min",
    "lam_max": "lambda_max",
    "kp": "pid_kp",
    "kd": "pid_kd",
    "ki": "eta",
}


#: The annotations of the numeric fields of :class:`DCMDPOptions` (checked finite when built).
_NUMBER_TYPES = {"float", "int", "float | None", "int | None"}


@dataclass(frozen=True)
class DCMDPOptions:
    """Framework-neutral DCMDP settings; each integration maps its own prefixed fields onto these.

    The multiplier options keep the names the TRL and verl configs have always used
    (``lambda_init``, ``lambda_min``, ``lambda_max``, ``pid_kp``, ``pid_kd``; the PID integral gain
    is ``eta``); :meth:`multiplier_settings` is the one mapping onto dcmdp's
    :class:`~dcmdp.algo.multiplier.MultiplierSettings`, whose defaults these are.
    Validated when built: an impossible combination raises ``ValueError`` naming the field.
    """

    loss_form: str = "penalty"
    """penalty (reading (a), the paper's) | shaping (reading (b)) | hinge."""
    lambda_init: float = _M.init
    """lambda_0 (paper: 0.1 dense, 0.05 MoE)."""
    eta: float = _M.eta
    """Dual step size (paper: 1.0); the PID multiplier uses it as its integral gain ki."""
    tolerance: float | None = _M.tolerance
    """c (paper: 0.0037 dense, 0.005 MoE); None = chosen from the first measurements (AutoTolerance)."""
    lambda_min: float = _M.lam_min
    """Lower bound of the projection."""
    lambda_max: float = _M.lam_max
    """Upper bound of the projection."""
    multiplier: str = _M.type
    """dual_ascent (the paper's projected dual ascent) | pid (PID Lagrangian)."""
    pid_kp: float = _M.kp
    """PID: proportional gain (ignored by dual_ascent)."""
    pid_kd: float = _M.kd
    """PID: derivative gain on increases of D (ignored by dual_ascent)."""
    ema: float | None = _M.ema
    """EMA decay of the measured D before the dual step; None = raw D."""
    auto_warmup_steps: int = _M.auto_warmup_steps
    """Automatic tolerance: steps measured before c is set."""
    auto_quantile: float = _M.auto_quantile
    """Automatic tolerance: c = quantile of the warm-up D's ..."""
    auto_multiple: float = _M.auto_multiple
    """... times this multiple."""
    tolerance_floor: float = _M.tolerance_floor
    """A fixed c is raised to at least this multiple of the warm-up D's quantile; 0 = off."""
    constraint_share: float | None = None
    """kappa of the update bound (``dcmdp train``'s ``loss.constraint_share`` with
    ``constraint_share_of=update``: :class:`~dcmdp.grad_share.ShareBoundedAdamW`); 0 = off, None =
    :meth:`update_bound`'s default per loss form. Read by TRL only: verl does not bound the update yet."""
    corrected: bool = False
    """Whether the framework applies an importance correction beside the constraint (TRL's
    ``vllm_importance_sampling_correction`` with vLLM, or its ``off_policy_mask_threshold``): then
    the default kappa is ``dcmdp train``'s for a composed loss (0.25, where DCMDP + TIS held; at
    0.5 it collapsed: docs/RESULTS.md)."""

    def __post_init__(self) -> None:
        core_loss_name(self.loss_form)
        share = self.constraint_share
        if share is not None:
            try:
                share = float(share)
            except (TypeError, ValueError):
                share = math.nan
            if not (math.isfinite(share) and share >= 0):
                raise ValueError(
                    f"dcmdp_constraint_share must be a finite number >= 0 (0 = off), got {self.constraint_share!r}"
                )
            if self.loss_form == "shaping" and share > 0:
                raise ValueError(
                    f"dcmdp_constraint_share={share} needs loss form 'penalty' or 'hinge': the 'shaping' form "
                    "reaches the weights through the advantages inside the framework's surrogate, so its "
                    "gradient cannot be split from the reward's; leave it unset (None) or 0 with 'shaping'"
                )
        for f in fields(self):  # also the ones this multiplier ignores: a NaN there is a typo too
            value = getattr(self, f.name)
            if value is not None and str(f.type) in _NUMBER_TYPES:  # YAML can hand over "nan"
                check_finite(f"dcmdp_{f.name}", value)
        if self.multiplier not in MULTIPLIER_KINDS:
            raise ValueError(
                f"unknown multiplier {self.multiplier!r}; valid kinds: {', '.join(MULTIPLIER_KINDS)}"
            )
        if self.loss_form == "hinge" and self.tolerance is None:
            # The hinge needs c inside the loss from the first step; an automatic c comes later.
            raise ValueError("loss form 'hinge' needs a fixed tolerance (tolerance=None is automatic)")
        try:
            build_multiplier(self)  # the multiplier's own checks name any bad number ...
        except ValueError as exc:  # ... in dcmdp's names: say it in these options' names
            message = str(exc)
            for core, here in _OPTION_NAMES.items():
                message = re.sub(rf"(?<![\w.]){core}\b", here, message)
            raise ValueError(f"{message} (TRL and verl: the dcmdp_ options of these names)") from None

    def multiplier_settings(self) -> MultiplierSettings:
        """These options as dcmdp's multiplier settings (the one mapping of the names)."""
        return MultiplierSettings(
            type=self.multiplier,
            init=self.lambda_init,
            eta=self.eta,
            tolerance=self.tolerance,
            lam_min=self.lambda_min,
            lam_max=self.lambda_max,
            ema=self.ema,
            kp=self.pid_kp,
            ki=self.eta,  # the PID integral gain plays eta's role
            kd=self.pid_kd,
            auto_warmup_steps=self.auto_warmup_steps,
            auto_quantile=self.auto_quantile,
            auto_multiple=self.auto_multiple,
            tolerance_floor=self.tolerance_floor,
            # The reward guard needs the step's training reward, which these integrations do not
            # pass to the multiplier: off here (dcmdp train has it where its update bound is off).
            reward_guard=0.0,
            reward_guard_relative=0.0,
        )

    def update_bound(self) -> float:
        """kappa of the update bound, 0 when off: ``constraint_share``, or when it is None
        ``dcmdp train``'s default for the penalty and hinge forms (0.5, or 0.25 when ``corrected``)
        and 0 for shaping (see ``constraint_share``)."""
        if self.constraint_share is not None:
            return float(self.constraint_share)
        if self.loss_form == "shaping":
            return 0.0
        return CORRECTED_CONSTRAINT_SHARE if self.corrected else DEFAULT_CONSTRAINT_SHARE


def build_multiplier(options: DCMDPOptions) -> Multiplier:
    """The Lagrange multiplier for ``options``: dual ascent or PID, fixed or automatic c.

    Built by ``dcmdp.algo.multiplier.build_multiplier``, so it updates and
    checkpoints exactly as in dcmdp's own trainer.
    """
    return build_core_multiplier(options.multiplier_settings())


def loss_tolerance(multiplier: Multiplier) -> float:
    """The c the loss should use now: the multiplier's, or 1.0 (hinge off) during an automatic warm-up."""
    c = multiplier.tolerance
    return WARMUP_LOSS_TOLERANCE if c is None else float(c)


def dcmdp_term(
    logp_BT: Tensor,
    engine_logp_BT: Tensor,
    mask_BT: Tensor,
    lam: float,
    tolerance: float,
    form: str,
) -> LossOutput:
    """The DCMDP part of the loss alone, as dcmdp's core loss for ``form`` computes it.

    It is the core loss (``dcmdp``, ``dcmdp_hinge`` or ``dcmdp_shaping``) evaluated with zero
    advantages and ``old_logp = logp.detach()``: the PPO surrogate ``-min(r A, clip(r) A)`` is then
    exactly 0 with exactly zero gradient, so what remains is the core's own DCMDP term, not a copy:

      penalty: ``lam * token-mean(|exp(logp) - exp(engine_logp)|)``
      hinge:   ``lam * token-mean(max(0, |exp(logp) - exp(engine_logp)| - tolerance))``
      shaping: 0 (the shaping reaches theta through the advantages: :func:`shaped_advantages`; the
               core would shape the zero advantages into a surrogate, so only its metrics are kept)

    ``loss`` is a token mean over ``mask_BT``; ``metrics`` carry ``dcmdp/prob_gap`` (D of these
    tokens), ``dcmdp/penalty`` and ``dcmdp/lambda``. The mask must select at least one token.
    """
    inputs = LossInputs(
        logp_BT=logp_BT,
        old_logp_BT=logp_BT.detach(),
        engine_logp_BT=engine_logp_BT,
        advantages_BT=torch.zeros_like(logp_BT.detach()),
        mask_BT=mask_BT,
    )
    out = get_policy_loss(core_loss_name(form))(inputs, LossSettings(lam=lam, tolerance=tolerance))
    if form == "shaping":
        return LossOutput(
            loss=torch.zeros((), dtype=logp_BT.dtype, device=logp_BT.device), metrics=out.metrics
        )
    return out


def shaped_advantages(
    advantages_BT: Tensor, logp_BT: Tensor, engine_logp_BT: Tensor, mask_BT: Tensor, lam: float
) -> Tensor:
    """DCMDP reading (b): ``A_t - lam * delta_t`` with ``delta_t = |exp(logp_t) - exp(engine_logp_t)|``
    detached (``dcmdp.algo.discrepancy.prob_gap``, as ``dcmdp_shaping`` uses it); unchanged outside the mask."""
    keep_BT = mask_BT != 0
    zero = torch.zeros((), dtype=logp_BT.dtype, device=logp_BT.device)
    delta_BT = prob_gap(
        torch.where(keep_BT, logp_BT.detach(), zero), torch.where(keep_BT, engine_logp_BT.detach(), zero)
    )
    return torch.where(keep_BT, advantages_BT - lam * delta_BT, advantages_BT)


def gap_sum(logp_BT: Tensor, rollout_logp_BT: Tensor, mask_BT: Tensor) -> float:
    """Sum over the masked tokens of the probability gap |pi - mu| (no gradient): the numerator of
    D that every rank / micro-batch reports so that D can be formed as a token mean."""
    with torch.no_grad():
        logp, rollout = fill_masked(logp_BT.float(), mask_BT), fill_masked(rollout_logp_BT.float(), mask_BT)
        return float(fill_masked(prob_gap(logp, rollout), mask_BT).sum())


#: File holding the multiplier's state inside each TRL or verl checkpoint folder.
MULTIPLIER_STATE_FILE = "dcmdp_multiplier.json"


def save_multiplier_state(folder: str, state: dict[str, Any]) -> None:
    """Write the multiplier's state into a checkpoint folder atomically (temp file + rename)."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, MULTIPLIER_STATE_FILE)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(state, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_multiplier_state(folder: str) -> dict[str, Any]:
    """The multiplier's state saved in a checkpoint folder; a missing file is an error, never a
    silent restart of lambda at its initial value."""
    path = os.path.join(folder, MULTIPLIER_STATE_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"{path} is missing: this checkpoint holds no DCMDP multiplier state (it was not saved by a "
            "DCMDP trainer, or the save was interrupted). Resuming would restart lambda at its initial "
            "value; resume from an earlier checkpoint or start a new run"
        )
    with open(path) as f:
        state: dict[str, Any] = json.load(f)
    return state


def finite_float(name: str, value: object) -> float:
    """``value`` as a finite float, or ``ValueError`` naming it (for metrics read from a framework)."""
    return check_finite(name, value)


__all__ = [
    "DEFAULT_CONSTRAINT_SHARE",
    "LOSS_FORMS",
    "MULTIPLIER_KINDS",
    "MULTIPLIER_STATE_FILE",
    "WARMUP_LOSS_TOLERANCE",
    "DCMDPOptions",
    "build_multiplier",
    "core_loss_name",
    "dcmdp_term",
    "finite_float",
    "gap_sum",
    "load_multiplier_state",
    "loss_tolerance",
    "save_multiplier_state",
    "shaped_advantages",
]
