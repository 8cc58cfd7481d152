"""DCMDP in verl: the policy loss ``"dcmdp"``, a driver-side multiplier, and a trainer that wires both.

Three pieces (DCMDP, arXiv 2606.08779; full set-up in docs/scaling-out.md and
configs/verl/dcmdp_multinode.yaml):

1. :func:`dcmdp_policy_loss`, registered in verl's ``POLICY_LOSS_REGISTRY`` as ``"dcmdp"`` when verl
   is importable (this module also imports without verl; the function then works on its own). It
   has verl's signature (the 7 keyword arguments of ``verl.workers.utils.losses.ppo_loss``) and
   computes dcmdp's core loss (``dcmdp.algo.losses``: ``dcmdp``, ``dcmdp_hinge`` or ``dcmdp_shaping``,
   the PPO clipped surrogate plus the DCMDP term) on verl's tensors.
2. :class:`DCMDPController`, on the driver: the Lagrange multiplier. Before each actor update it
   pushes the current lambda to the actor workers (``set_loss_fn`` with an actor config whose
   ``policy_loss.dcmdp_lambda`` is set: verl's own driver pushes the critic's loss the same way);
   after the update it reads the actor's reported D (``actor/dcmdp/prob_gap_sum`` over
   ``actor/dcmdp/tokens`` in the step's metrics)
   and takes the dual step. Every worker thus uses the same lambda, and there is one multiplier.
3. ``DCMDPPPOTrainer`` (registered as verl v1 trainer ``"dcmdp_sync"`` when verl's v1 trainer is
   importable): verl's synchronous PPO trainer with the controller wired into ``_update_actor``
   and the multiplier saved in each checkpoint (``dcmdp_multiplier.json``).

How the loss gets the rollout log-probs. verl does not pass them to a policy loss: it passes
``old_log_prob`` (pi_old, the trainer's recompute) and ``rollout_is_weights``. Two routes exist:

- bypass mode (``algorithm.rollout_correction.bypass_mode=true``) sets ``old_log_prob`` to the
  rollout log-probs but also forces ``policy_loss.loss_mode="bypass_mode"``, replacing any custom
  loss. Not usable.
- decoupled mode with token-level IS weights, ``w_t = exp(clamp(old_t - rollout_t, -20, 20))``:
  with ``rollout_is: token``, ``rollout_is_threshold`` >= e^20 (so verl's truncation never binds) and
  ``rollout_is_batch_normalize: false``, the weight carries mu and ``rollout_logp_t = old_t - log w_t``
  (:func:`engine_logp_from_is_weights`; float32 round trip error about 1e-7, far below a gap of
  1e-3) for every token whose |log ratio| is below 20. At the clamp the recovery is wrong (a token
  the engine sampled at p 0.5 that the trainer finds e^-25 as likely would come back at 4.5e-5 and
  read as no gap, exactly the tokens the constraint exists for), so a saturated weight stops the
  update with an error instead. This is the route used. The weights are not multiplied into the
  loss: DCMDP replaces importance weighting. Token rejection (``rollout_rs``) is refused: it drops
  the worst tokens from the mask before D is measured and biases D low, so lambda decays.
  :func:`check_verl_config` checks all of it, and refuses top-k / top-p sampling (vLLM's processed
  log-probs are renormalised over the kept set while verl's trainer applies the temperature only:
  D would absorb the truncated mass).

Loss normalisation follows verl's ``agg_loss``: with ``config.global_batch_info`` set (dp size and
the global token / sequence counts), the micro-batch loss is scaled so that the sum over
micro-batches, averaged over data-parallel ranks, is the global mean. For ``token-mean`` this is
exact for both the surrogate and the DCMDP term; for the ``seq-mean-*`` modes the surrogate is exact
and the term (a token mean per micro-batch) is weighted by each micro-batch's share of sequences.
``token-sum`` and ``seq-mean-token-sum-norm`` are not supported (dcmdp has no such aggregation).

What the dual step reads: the token mean over the whole update of the gap between pi_old (verl's
recompute before the update, ``old_log_prob``) and the rollout, as in dcmdp's own trainer and in
TRL (the penalty itself acts on the current policy; ``actor/dcmdp/prob_gap`` logs the current
policy's gap). verl averages a policy loss's metrics over micro-batches and
data-parallel ranks whatever their token counts (a mean of micro-batch means: 40 tokens at 0.001
and 4,000 at 0.010 would read 0.0055, not 0.0099), so every micro-batch reports the sum of its gaps
(``actor/dcmdp/prob_gap_sum``) and its token count (``actor/dcmdp/tokens``); both are averaged the
same way, and their ratio is the global token mean, exactly so when every mini-batch of the
step has the same number of micro-batches (one mini-batch per step, or fixed micro-batch sizes:
:func:`check_verl_config` refuses dynamic batch sizes with several mini-batches). An empty
micro-batch (verl pads with samples
whose response mask is all zero) gives a zero loss still connected to the graph, and zero sum and
count (verl then averages zeros into the displayed ``actor/*`` metrics of that step, such as
``actor/dcmdp/lambda``; the driver's ``dcmdp/*`` are unaffected).

The dual step happens only where a driver pushes lambda (``DCMDPPPOTrainer``, or your own trainer
calling :class:`DCMDPController`). Without a push the loss refuses to run rather than train silently
with a fixed ``dcmdp_lambda_init``; set ``policy_loss.dcmdp_fixed_lambda: true`` to run that on purpose.

Tested here: the loss against dcmdp's core function, through verl's own ``get_policy_loss_fn`` and
``ppo_loss`` call site, with verl's own IS-weight function and metric aggregation, and the shipped
YAML composed with verl's Hydra defaults (verl 0.9.1, CPU). Not run here: any Ray / multi-node run.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

import torch
from torch import Tensor

from dcmdp.algo.discrepancy import SAFETY_BOUND
from dcmdp.algo.losses import LossInputs, LossSettings, get_policy_loss
from dcmdp.integrations import (
    MULTIPLIER_STATE_FILE,
    WARMUP_LOSS_TOLERANCE,
    DCMDPOptions,
    build_multiplier,
    core_loss_name,
    finite_float,
    gap_sum,
    load_multiplier_state,
    loss_tolerance,
    save_multiplier_state,
)

#: The name the loss is registered under: ``actor_rollout_ref.actor.policy_loss.loss_mode``.
LOSS_NAME = "dcmdp"
#: The verl v1 trainer name: ``trainer.v1.trainer_mode``.
TRAINER_NAME = "dcmdp_sync"
#: The config class to name as ``actor_rollout_ref.actor.policy_loss._target_``.
POLICY_LOSS_CONFIG_TARGET = "dcmdp.integrations.verl.DCMDPPolicyLossConfig"
#: Where the driver finds D after the actor update: the ratio of these two step metrics (the
#: loss's, prefixed by verl), the global token mean (module docstring).
MEASURE_KEY = "actor/dcmdp/prob_gap"
GAP_SUM_KEY = "actor/dcmdp/prob_gap_sum"
TOKENS_KEY = "actor/dcmdp/tokens"
#: verl clamps the IS log ratio at +-20 before exp; a weight there no longer carries mu.
IS_LOG_CLAMP = 20.0
#: Smallest ``rollout_is_threshold`` that never truncates a token weight (weights are <= e^20).
MIN_IS_THRESHOLD = math.exp(SAFETY_BOUND)
#: verl ``loss_agg_mode`` values dcmdp's aggregation supports (same names, same formulas).
SUPPORTED_AGG_MODES: tuple[str, ...] = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")

try:
    from verl.trainer.ppo.core_algos import register_policy_loss as _verl_register_policy_loss
    from verl.workers.config import PolicyLossConfig as _VerlPolicyLossConfig

    VERL_AVAILABLE = True
except ImportError:  # verl is optional: the plain loss function and the controller work without it
    VERL_AVAILABLE = False


# ----------------------------------------------------------------------------- the loss


def engine_logp_from_is_weights(
    old_log_prob: Tensor, rollout_is_weights: Tensor, response_mask: Tensor
) -> Tensor:
    """Rollout log-probs from verl's token IS weights: ``old - log w`` where ``w = exp(clamp(old - rollout))``.

    Exact (to float rounding) when the weights are token level, untruncated and not batch-normalised
    (:func:`check_verl_config`). Positions outside the mask get ``old_log_prob``. A weight that is not
    positive at a response token (an IcePop ``"lower_upper"`` threshold zeroes tokens) raises.
    """
    keep = response_mask != 0
    w = rollout_is_weights.detach()
    n_bad = int((keep & ~(w > 0)).sum())
    if n_bad:
        raise ValueError(
            f"rollout_is_weights is zero or NaN at {n_bad} response token(s): the rollout log-probs cannot be "
            "recovered. DCMDP needs rollout_is: token with a single rollout_is_threshold >= "
            f"{MIN_IS_THRESHOLD:.3g} (no IcePop 'lower_upper' bounds)"
        )
    log_w = torch.log(torch.where(keep, w, torch.ones_like(w)))
    # verl computes w = exp(clamp(old - rollout, -20, 20)): at the clamp mu is lost (float32 puts
    # exp(+-20) within about 2e-6 of the bound in log space)
    n_sat = int((keep & (log_w.abs() >= IS_LOG_CLAMP - 1e-4)).sum())
    if n_sat:
        raise ValueError(
            f"{n_sat} response token(s) have |log pi_old - log mu| >= {IS_LOG_CLAMP:g}, where verl clamps the "
            "IS weight: their rollout log-probs cannot be recovered and their gap would read as about 0. "
            "Engine and trainer disagree by a factor e^20 there: check the weight sync and that the rollout "
            "samples with temperature only (no top-k / top-p), as check_verl_config requires"
        )
    old = old_log_prob.detach()
    return torch.where(keep, old - log_w, old)


def dcmdp_policy_loss(
    old_log_prob: Tensor,
    log_prob: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    loss_agg_mode: str = "token-mean",
    config: Any = None,
    rollout_is_weights: Tensor | None = None,
) -> tuple[Tensor, dict[str, Any]]:
    """verl policy loss ``"dcmdp"``: dcmdp's core DCMDP loss on verl's tensors.

    ``loss = scale * core(LossInputs(log_prob, old_log_prob, rollout_logp, advantages, response_mask))``
    with ``core`` = ``dcmdp`` / ``dcmdp_hinge`` / ``dcmdp_shaping`` (``policy_loss.dcmdp_loss_form``),
    ``rollout_logp`` recovered from ``rollout_is_weights`` (:func:`engine_logp_from_is_weights`),
    the PPO clip from ``config.clip_ratio_low`` / ``clip_ratio_high``, lambda from
    ``config.policy_loss.dcmdp_lambda`` (written by the driver each step) and ``scale`` matching
    verl's global-batch normalisation (module docstring). All tensors are [B, T].

    Args:
        config: verl's ``ActorConfig`` whose ``policy_loss`` is a :class:`DCMDPPolicyLossConfig`
            (any object with those attributes works; ``global_batch_info`` may be an empty dict).

    Returns:
        ``(loss, metrics)``: the metrics are the core's (``dcmdp/prob_gap``, ``dcmdp/penalty``,
        ``dcmdp/lambda``, ``clip/frac``, ``ratio/mean``, ...) as floats, prefixed ``actor/``.
    """
    if config is None:
        raise ValueError("the dcmdp policy loss needs verl's actor config (config=None was passed)")
    if rollout_is_weights is None:
        raise ValueError(
            "the dcmdp policy loss got no rollout_is_weights, so it cannot see the rollout log-probs. Set "
            "algorithm.rollout_correction.rollout_is=token, rollout_is_threshold >= "
            f"{MIN_IS_THRESHOLD:.3g}, bypass_mode=false, and actor_rollout_ref.rollout.calculate_log_probs=true"
        )
    if loss_agg_mode not in SUPPORTED_AGG_MODES:
        raise ValueError(
            f"loss_agg_mode {loss_agg_mode!r} is not supported by the dcmdp loss; use one of {SUPPORTED_AGG_MODES}"
        )
    pl = config.policy_loss
    form = _policy_loss_field(pl, "dcmdp_loss_form")
    lam = _policy_loss_field(pl, "dcmdp_lambda")
    if lam is None:  # no driver pushed lambda: no dual step will ever happen
        if not getattr(pl, "dcmdp_fixed_lambda", False):
            raise ValueError(
                "the dcmdp policy loss got no lambda from the driver, so no dual step runs and lambda would "
                f"stay at dcmdp_lambda_init for the whole run. Use trainer.v1.trainer_mode={TRAINER_NAME} "
                "(or call DCMDPController.push / observe around the actor update in your trainer), or set "
                "actor_rollout_ref.actor.policy_loss.dcmdp_fixed_lambda=true to train with a fixed lambda"
            )
        lam = _policy_loss_field(pl, "dcmdp_lambda_init")
    tolerance = _policy_loss_field(pl, "dcmdp_active_tolerance")
    if tolerance is None:
        tolerance = _policy_loss_field(pl, "dcmdp_tolerance")
    settings = LossSettings(
        clip_low=config.clip_ratio if config.clip_ratio_low is None else config.clip_ratio_low,
        clip_high=config.clip_ratio if config.clip_ratio_high is None else config.clip_ratio_high,
        agg=loss_agg_mode,
        lam=float(lam),
        tolerance=WARMUP_LOSS_TOLERANCE if tolerance is None else float(tolerance),
    )
    loss_fn = get_policy_loss(core_loss_name(form))
    tokens = int((response_mask != 0).sum())
    if tokens == 0:
        # verl pads a micro-batch with all-masked samples, and rejection can empty one: its share of
        # the global mean is zero. Same metric keys as a real micro-batch (verl's per-rank metric lists
        # must line up), all zero, and a zero loss that still reaches every parameter's graph.
        names = _core_metric_names(loss_fn, settings)
        metrics = {f"actor/{k}": 0.0 for k in names}
        metrics[GAP_SUM_KEY] = metrics[TOKENS_KEY] = 0.0
        return log_prob.sum() * 0.0, metrics
    inputs = LossInputs(
        logp_BT=log_prob,
        old_logp_BT=old_log_prob,
        engine_logp_BT=engine_logp_from_is_weights(old_log_prob, rollout_is_weights, response_mask),
        advantages_BT=advantages,
        mask_BT=response_mask,
    )
    out = loss_fn(inputs, settings)
    scale = _global_batch_scale(loss_agg_mode, response_mask, config.global_batch_info)
    values = torch.stack([v.float() for v in out.metrics.values()]).tolist()  # one device read-back
    metrics = {f"actor/{k}": v for k, v in zip(out.metrics, values)}
    # D for the dual step at pi_old (verl's recompute before the update), as in dcmdp's trainer
    # and TRL: with several mini-batches or epochs the current policy has drifted from it.
    metrics[GAP_SUM_KEY] = gap_sum(old_log_prob, inputs.engine_logp_BT, response_mask != 0)
    metrics[TOKENS_KEY] = float(tokens)
    return out.loss * scale, metrics


def _core_metric_names(loss_fn: Any, settings: LossSettings) -> list[str]:
    """The metric names the core loss reports, from one throwaway call on a one-token batch."""
    one = torch.zeros(1, 1)
    out = loss_fn(LossInputs(one, one, one, one, torch.ones(1, 1, dtype=torch.bool)), settings)
    return list(out.metrics)


def _policy_loss_field(pl: Any, name: str) -> Any:
    if not hasattr(pl, name):
        raise ValueError(
            f"actor_rollout_ref.actor.policy_loss has no field {name!r}: set its _target_ to "
            f"{POLICY_LOSS_CONFIG_TARGET} (see configs/verl/dcmdp_multinode.yaml)"
        )
    return getattr(pl, name)


def _global_batch_scale(agg: str, mask_BT: Tensor, info: Mapping[str, Any]) -> Tensor | float:
    """Factor turning dcmdp's micro-batch mean into verl's share of the global mean (``agg_loss``).

    token-mean: ``n_tokens_local * dp_size / batch_num_tokens``; seq-mean-*: ``n_seqs_local * dp_size /
    global_batch_size``; 1 when verl set no global counts (single process, no ``global_batch_info``).
    """
    dp_size = int(info.get("dp_size") or 1)  # verl's runtime dict, filled by ppo_loss per call
    keep = mask_BT != 0
    if agg == "token-mean":
        total, local = info.get("batch_num_tokens"), keep.sum()
        what = "batch_num_tokens"
    else:
        total, local = info.get("global_batch_size"), keep.any(dim=-1).sum()
        what = "global_batch_size"
    if total is None:
        if dp_size > 1:
            raise ValueError(f"global_batch_info has dp_size={dp_size} but no {what}")
        return 1.0
    return local.to(torch.float32) * dp_size / float(total)


# ----------------------------------------------------------------------------- verl config


# The defaults of the dcmdp_* fields are DCMDPOptions' (dcmdp's multiplier settings): one definition.
_O = DCMDPOptions


def _options_from(pl: Any) -> DCMDPOptions:
    """DCMDPOptions from a policy-loss config holding the ``dcmdp_*`` fields (dataclass or DictConfig)."""
    return DCMDPOptions(
        loss_form=pl.dcmdp_loss_form,
        lambda_init=pl.dcmdp_lambda_init,
        eta=pl.dcmdp_eta,
        tolerance=pl.dcmdp_tolerance,
        lambda_min=pl.dcmdp_lambda_min,
        lambda_max=pl.dcmdp_lambda_max,
        multiplier=pl.dcmdp_multiplier,
        pid_kp=pl.dcmdp_pid_kp,
        pid_kd=pl.dcmdp_pid_kd,
        ema=pl.dcmdp_ema,
        auto_warmup_steps=pl.dcmdp_auto_warmup_steps,
        auto_quantile=pl.dcmdp_auto_quantile,
        auto_multiple=pl.dcmdp_auto_multiple,
        tolerance_floor=pl.dcmdp_tolerance_floor,
    )


if VERL_AVAILABLE:

    @dataclass
    class DCMDPPolicyLossConfig(_VerlPolicyLossConfig):
        """verl's ``PolicyLossConfig`` plus the DCMDP fields; name it as the policy loss's ``_target_``.

        The ``dcmdp_*`` multiplier fields are read by the driver (:class:`DCMDPController`); the loss
        reads ``dcmdp_loss_form``, ``dcmdp_lambda`` and ``dcmdp_active_tolerance``, which the driver
        writes into the copy it pushes to the actor before every update.
        """

        loss_mode: str = LOSS_NAME
        dcmdp_loss_form: str = _O.loss_form
        """penalty (the paper's reading) | shaping | hinge."""
        dcmdp_lambda_init: float = _O.lambda_init
        """lambda_0 (paper: 0.1 dense, 0.05 MoE)."""
        dcmdp_eta: float = _O.eta
        """Dual step size (paper: 1.0); the PID integral gain."""
        dcmdp_tolerance: float | None = _O.tolerance
        """c (paper: 0.0037 dense, 0.005 MoE); null = automatic (not with the hinge)."""
        dcmdp_lambda_min: float = _O.lambda_min
        """Lower bound of the multiplier."""
        dcmdp_lambda_max: float = _O.lambda_max
        """Upper bound of the multiplier."""
        dcmdp_multiplier: str = _O.multiplier
        """dual_ascent | pid."""
        dcmdp_pid_kp: float = _O.pid_kp
        """PID: proportional gain."""
        dcmdp_pid_kd: float = _O.pid_kd
        """PID: derivative gain."""
        dcmdp_ema: float | None = _O.ema
        """EMA decay of D before the dual step; null = raw."""
        dcmdp_auto_warmup_steps: int = _O.auto_warmup_steps
        """Automatic tolerance: steps measured before c is set."""
        dcmdp_auto_quantile: float = _O.auto_quantile
        """Automatic tolerance: quantile of the warm-up D's ..."""
        dcmdp_auto_multiple: float = _O.auto_multiple
        """... times this multiple."""
        dcmdp_tolerance_floor: float = _O.tolerance_floor
        """A fixed c is raised to at least this multiple of the warm-up D's quantile; 0 = off."""
        dcmdp_measure_key: str = MEASURE_KEY
        """The step metric the driver's dual step reads."""
        dcmdp_lambda: float | None = None
        """Written by the driver: lambda for this update (None before the first push: lambda_init)."""
        dcmdp_active_tolerance: float | None = None
        """Written by the driver: the c the hinge uses now (None: dcmdp_tolerance, or 1.0 if automatic)."""
        dcmdp_fixed_lambda: bool = False
        """Allow the loss without a driver pushing lambda: a fixed dcmdp_lambda_init, no dual step."""

        def __post_init__(self) -> None:
            if self.loss_mode != LOSS_NAME:
                raise ValueError(
                    f"DCMDPPolicyLossConfig needs loss_mode={LOSS_NAME!r}, got {self.loss_mode!r}"
                )
            _options_from(self)  # raises ValueError naming a bad field

    _verl_register_policy_loss(LOSS_NAME)(dcmdp_policy_loss)


def check_verl_config(config: Any) -> None:
    """Raise ``ValueError`` listing every verl setting that keeps DCMDP from working (full OmegaConf config).

    Checks: the loss mode and its config ``_target_``, rollout log-probs on, decoupled (not bypass) mode,
    token-level IS weights that carry mu exactly, a supported aggregation mode, no distillation.
    """
    from omegaconf import OmegaConf

    def get(key: str) -> Any:
        return OmegaConf.select(config, key, default=None)

    problems = []
    actor = "actor_rollout_ref.actor"
    rc = "algorithm.rollout_correction"
    if get(f"{actor}.policy_loss.loss_mode") != LOSS_NAME:
        problems.append(f"{actor}.policy_loss.loss_mode must be {LOSS_NAME!r}")
    if get(f"{actor}.policy_loss._target_") != POLICY_LOSS_CONFIG_TARGET:
        problems.append(f"{actor}.policy_loss._target_ must be {POLICY_LOSS_CONFIG_TARGET}")
    if get(f"{actor}.loss_agg_mode") not in SUPPORTED_AGG_MODES:
        problems.append(f"{actor}.loss_agg_mode must be one of {SUPPORTED_AGG_MODES}")
    if get("actor_rollout_ref.rollout.calculate_log_probs") is not True:
        problems.append("actor_rollout_ref.rollout.calculate_log_probs must be true (the rollout log-probs)")
    if get(f"{rc}.bypass_mode"):
        problems.append(f"{rc}.bypass_mode must be false (bypass mode replaces the policy loss with its own)")
    if get(f"{rc}.rollout_is") != "token":
        problems.append(f"{rc}.rollout_is must be 'token' (the loss recovers the rollout log-probs from it)")
    threshold = get(f"{rc}.rollout_is_threshold")
    try:
        ok = float(threshold) >= MIN_IS_THRESHOLD
    except (TypeError, ValueError):  # None, or an IcePop "lower_upper" string
        ok = False
    if not ok:
        problems.append(
            f"{rc}.rollout_is_threshold must be one number >= {MIN_IS_THRESHOLD:.4g} (e.g. 1.0e9)"
        )
    if get(f"{rc}.rollout_is_batch_normalize"):
        problems.append(f"{rc}.rollout_is_batch_normalize must be false")
    mini, total = get(f"{actor}.ppo_mini_batch_size"), get("data.train_batch_size")
    if get(f"{actor}.use_dynamic_bsz") and mini is not None and total is not None and int(total) > int(mini):
        problems.append(
            f"{actor}.use_dynamic_bsz with several mini-batches per step (data.train_batch_size {total} > "
            f"ppo_mini_batch_size {mini}): verl averages each mini-batch's metrics over its own number of "
            "micro-batches, which dynamic batching varies, so D would not be the token mean. Use one "
            "mini-batch per step, or fixed micro-batches (use_dynamic_bsz: false)"
        )
    if get(f"{rc}.rollout_rs") not in (None, "null", "none"):
        problems.append(
            f"{rc}.rollout_rs must be null: rejection drops the worst tokens from the mask before D is "
            "measured, which biases D low and makes lambda decay"
        )
    ro = "actor_rollout_ref.rollout"
    top_k, top_p = get(f"{ro}.top_k"), get(f"{ro}.top_p")
    if top_k not in (None, -1, 0):
        problems.append(
            f"{ro}.top_k must be -1 (off): the engine's log-probs are renormalised over the top-k set while "
            "verl's trainer applies the temperature only, so D would absorb the truncated mass"
        )
    if top_p is not None and float(top_p) < 1.0:
        problems.append(f"{ro}.top_p must be 1 (off), for the same reason as top_k")
    mode, temperature = get(f"{ro}.logprobs_mode"), get(f"{ro}.temperature")
    if mode not in (None, "processed_logprobs") and not (
        mode == "raw_logprobs" and temperature in (None, 1, 1.0)
    ):
        problems.append(
            f"{ro}.logprobs_mode must be processed_logprobs (the log-probs of the distribution sampled "
            "from, temperature included), or raw_logprobs at temperature 1"
        )
    if get("distillation.enabled"):
        problems.append("distillation.enabled must be false (its loss replaces the policy loss)")
    if problems:
        raise ValueError("verl config is not set up for DCMDP:\n  - " + "\n  - ".join(problems))


# ----------------------------------------------------------------------------- the driver side


class DCMDPController:
    """The multiplier on verl's driver: push lambda before each actor update, dual step after it.

    Wiring in any verl trainer (``DCMDPPPOTrainer`` does exactly this)::

        actor_cfg = omega_conf_to_dataclass(config.actor_rollout_ref.actor)
        controller = DCMDPController.from_config(actor_cfg.policy_loss)
        ...
        controller.push(actor_rollout_wg, actor_cfg)   # before the update: lambda to every worker
        metrics.update(actor_update_metrics)
        metrics.update(controller.observe(metrics))    # after: D -> dual step -> dcmdp/* metrics
    """

    def __init__(self, options: DCMDPOptions, measure_key: str = MEASURE_KEY) -> None:
        self.options = options
        self.measure_key = measure_key
        self.multiplier = build_multiplier(options)

    @classmethod
    def from_config(cls, policy_loss_config: Any) -> DCMDPController:
        """From ``actor_rollout_ref.actor.policy_loss`` as a :class:`DCMDPPolicyLossConfig` (an OmegaConf
        node holds only the keys its YAML sets, so build the dataclass first: ``omega_conf_to_dataclass``)."""
        return cls(_options_from(policy_loss_config), measure_key=policy_loss_config.dcmdp_measure_key)

    @property
    def value(self) -> float:
        """The current lambda."""
        return self.multiplier.value

    def actor_loss_config(self, actor_config: Any) -> Any:
        """A copy of verl's ``ActorConfig`` whose policy loss carries the current lambda and c."""
        pl = replace(
            actor_config.policy_loss,
            dcmdp_lambda=self.multiplier.value,
            dcmdp_active_tolerance=loss_tolerance(self.multiplier),
        )
        return replace(actor_config, policy_loss=pl)

    def push(self, worker_group: Any, actor_config: Any) -> None:
        """Send the actor workers verl's ``ppo_loss`` bound to :meth:`actor_loss_config` (``set_loss_fn``)."""
        from verl.workers.utils.losses import ppo_loss

        worker_group.set_loss_fn(partial(ppo_loss, config=self.actor_loss_config(actor_config)))

    def measured_gap(self, metrics: Mapping[str, Any]) -> float:
        """D of the update: the gap sum over the token count (the global token mean, module
        docstring) for the default key; a custom ``measure_key`` is read as it is."""
        keys = (GAP_SUM_KEY, TOKENS_KEY) if self.measure_key == MEASURE_KEY else (self.measure_key,)
        missing = [k for k in keys if k not in metrics]
        if missing:
            raise KeyError(
                f"the step's metrics have no {', '.join(map(repr, missing))}: is the actor's policy loss 'dcmdp'? "
                f"dcmdp keys present: {sorted(k for k in metrics if 'dcmdp' in k)}"
            )
        if len(keys) == 1:
            return finite_float(self.measure_key, metrics[self.measure_key])
        total, tokens = (
            finite_float(GAP_SUM_KEY, metrics[GAP_SUM_KEY]),
            finite_float(TOKENS_KEY, metrics[TOKENS_KEY]),
        )
        if tokens <= 0:
            raise ValueError(
                "the actor update saw no response tokens: D is undefined (every micro-batch empty)"
            )
        return total / tokens

    def observe(self, metrics: Mapping[str, Any]) -> dict[str, float]:
        """One dual step on the D in the step's metrics; returns the ``dcmdp/*`` metrics to log."""
        d = self.measured_gap(metrics)
        lam_used, c = self.multiplier.value, self.multiplier.tolerance
        self.multiplier.update(d)
        return {
            "dcmdp/prob_gap": d,
            "dcmdp/lambda": lam_used,
            "dcmdp/lambda_next": self.multiplier.value,
            "dcmdp/tolerance": float("nan") if c is None else float(c),
        }

    def state_dict(self) -> dict[str, Any]:
        return self.multiplier.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.multiplier.load_state_dict(state)


def dcmdp_trainer_class(base: type) -> type:
    """``base`` (verl's ``PPOTrainerSync``, or anything with its ``_update_actor``,
    ``_save_checkpoint`` and ``_load_checkpoint``) with the controller wired in: lambda pushed
    before each actor update, the dual step after it, the multiplier in every checkpoint."""
    from omegaconf import OmegaConf

    class DCMDPPPOTrainer(base):  # type: ignore[misc, valid-type]
        """``PPOTrainerSync`` + DCMDP: lambda pushed before each actor update, dual step after it."""

        def __init__(self, config: Any) -> None:
            from verl.utils.config import omega_conf_to_dataclass

            check_verl_config(config)
            # The class is already chosen by its name; verl's replay buffer keys on the mode name,
            # and this is the sync trainer, so it must read "sync" from here on.
            OmegaConf.update(config, "trainer.v1.trainer_mode", "sync")
            self._dcmdp_actor_config = omega_conf_to_dataclass(config.actor_rollout_ref.actor)
            self.dcmdp = DCMDPController.from_config(self._dcmdp_actor_config.policy_loss)
            super().__init__(config)

        def _update_actor(self, batch: Any, metrics: dict) -> Any:
            self.dcmdp.push(self.actor_rollout_wg, self._dcmdp_actor_config)
            batch = super()._update_actor(batch, metrics=metrics)
            metrics.update(self.dcmdp.observe(metrics))
            return batch

        def _save_checkpoint(self) -> None:
            # Before verl's save: verl writes its "latest" marker last, so a crash in between must not
            # leave a latest checkpoint without lambda.
            folder = os.path.join(self.config.trainer.default_local_dir, f"global_step_{self.global_steps}")
            save_multiplier_state(folder, self.dcmdp.state_dict())
            super()._save_checkpoint()

        def _load_checkpoint(self) -> Any:
            out = super()._load_checkpoint()
            if self.global_steps > 0:
                t = self.config.trainer
                folder = (
                    t.resume_from_path
                    if t.resume_mode == "resume_path"
                    else os.path.join(
                        os.path.abspath(t.default_local_dir), f"global_step_{self.global_steps}"
                    )
                )
                self.dcmdp.load_state_dict(load_multiplier_state(folder))
            return out

    return DCMDPPPOTrainer


def _make_trainer_class() -> type:
    """verl's v1 synchronous trainer with the controller wired in (needs verl's full install)."""
    from verl.trainer.ppo.v1.trainer_base import register_trainer
    from verl.trainer.ppo.v1.trainer_sync import PPOTrainerSync

    cls = dcmdp_trainer_class(PPOTrainerSync)
    register_trainer(TRAINER_NAME)(cls)
    return cls


try:  # verl's v1 trainer needs Ray, TransferQueue, torchdata...: present on a cluster, maybe not here
    DCMDPPPOTrainer: type | None = _make_trainer_class()
except ImportError:
    DCMDPPPOTrainer = None


__all__ = [
    "GAP_SUM_KEY",
    "LOSS_NAME",
    "MEASURE_KEY",
    "MIN_IS_THRESHOLD",
    "MULTIPLIER_STATE_FILE",
    "POLICY_LOSS_CONFIG_TARGET",
    "SUPPORTED_AGG_MODES",
    "TOKENS_KEY",
    "TRAINER_NAME",
    "VERL_AVAILABLE",
    "DCMDPController",
    "DCMDPPPOTrainer",
    "check_verl_config",
    "dcmdp_policy_loss",
    "dcmdp_trainer_class",
    "engine_logp_from_is_weights",
    "load_multiplier_state",
    "save_multiplier_state",
]
