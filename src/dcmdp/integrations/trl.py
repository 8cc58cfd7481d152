"""DCMDP in TRL: ``DCMDPGRPOTrainer``, a ``GRPOTrainer`` whose loss gains the DCMDP term.

    from dcmdp.integrations.trl import DCMDPGRPOConfig, DCMDPGRPOTrainer

    args = DCMDPGRPOConfig(output_dir="out", use_vllm=True, dcmdp_tolerance=0.0037, ...)
    trainer = DCMDPGRPOTrainer(model=..., reward_funcs=..., args=args, train_dataset=...)
    trainer.train()

What it adds to TRL's GRPO loss (DCMDP, arXiv 2606.08779; see ``dcmdp.integrations.dcmdp_term``):

  penalty (default): loss + lam * token-mean_t |exp(logp_t) - exp(rollout_logp_t)|
  hinge:             loss + lam * token-mean_t max(0, |...| - c)
  shaping:           TRL's surrogate run on A_t - lam * |...| (delta detached) instead of A

and, once per optimizer step, the dual step ``lam <- clip(lam + eta (D - c), lam_min, lam_max)`` on D,
the token mean of the gap over every completion token of the step on every process.

Where each piece comes from:

- ``logp``: the current policy's per-token log-probs, the ones TRL's own ``_compute_loss`` computes
  (captured from its call to ``_get_per_token_logps_and_entropies``: no second forward, no copy of
  TRL's loss code).
- ``rollout_logp``: ``inputs["sampling_per_token_logps"]`` when ``use_vllm=True`` (vLLM's processed
  log-probs: the engine mu of the paper). Without vLLM TRL samples with ``model.generate`` and keeps
  no sampling log-probs; the reference is then ``inputs["old_per_token_logps"]``, TRL's teacher-forced
  recompute at generation time. That exists only when generation and optimisation are misaligned
  (``num_iterations > 1`` or ``steps_per_generation > gradient_accumulation_steps``); D then measures
  how far the policy has moved since the completions were generated, not an engine mismatch. With
  neither available the trainer refuses to start (D would be 0 by construction).
- D for the dual step: the gap of ``rollout_logp`` against the policy that generated. With several
  optimizer steps per generation (``num_iterations > 1`` or ``steps_per_generation >
  gradient_accumulation_steps``) and vLLM, that is TRL's ``old_per_token_logps`` (pi_old), as in
  dcmdp's own trainer and in verl, so eta means the same thing everywhere; the penalty itself acts
  on the current policy. Without vLLM ``rollout_logp`` is pi_old itself and D is the drift.
- Sampling filters: with vLLM, top-k / top-p / min-p / a repetition penalty are refused (vLLM's
  processed log-probs include them, TRL's trainer log-probs apply only the temperature, so D would
  measure the filtered-out mass), and a vLLM server must run with ``--logprobs-mode
  processed_logprobs``.
- Corrections: TRL's own vLLM importance-sampling correction (``vllm_importance_sampling_correction``,
  on by default in TRL: sequence_mask, cap 3) is **off** by default in :class:`DCMDPGRPOConfig`, so
  TRL + DCMDP optimises the same objective as ``loss.type=dcmdp`` and the verl loss. Turning it on
  gives DCMDP plus TRL's correction, the counterpart of ``loss.correction=seq_mis`` (or the mode you
  pick) with the constraint in dcmdp's composed losses, and lowers the update bound's default
  kappa to 0.25 as ``dcmdp train`` does for a composed loss; so does TRL's off-policy sequence
  mask (``off_policy_mask_threshold``, dcmdp's ``opsm``). Token-level TIS and IcePop composed with
  DCMDP collapsed at 0.5 in the long regime; at 0.25 they held, as did a sequence mask
  (``seq_mis``, like TRL's default mode; docs/RESULTS.md); OPSM and sequence truncation (``seq_tis``,
  ``vllm_importance_sampling_mode='sequence_truncate'``) composed failed on some seeds at every
  kappa tried, so with DCMDP they are refused, as in ``dcmdp train``, unless
  ``dcmdp_allow_failed_composition=True``.
- The multiplier: one per process, all identical. Each process sums the gap and the token count of
  its micro-batches; at the gradient-accumulation boundary (``accelerator.sync_gradients``) the two
  sums are all-reduced, every process computes the same D and takes the same dual step.

Normalisation: the penalty of a micro-batch is scaled by its share of the accumulation window's tokens
(TRL's ``num_items_in_batch`` normaliser of ``loss_type="dapo"``), so the accumulated, data-parallel
averaged gradient is that of lam times the token mean of delta over the whole step, whatever
``loss_type`` normalises the surrogate with. In evaluation the penalty is the micro-batch token mean.

Update bound (``dcmdp_constraint_share``, kappa; None = 0.5 for penalty and hinge, 0.25 with one of
TRL's corrections on (``dcmdp train``'s default for a composed loss), off for shaping,
whose constraint lives inside TRL's surrogate through the advantages): ``dcmdp train``'s
``loss.constraint_share_of=update``. The optimizer is :class:`~dcmdp.grad_share.ShareBoundedAdamW`
(built by :meth:`DCMDPGRPOTrainer.create_optimizer` from Trainer's AdamW settings and parameter
groups), which needs the constraint's gradient ``g_c`` apart from the rest ``g_pg``:

- ``_compute_loss``: the term's gradient goes into a :class:`~dcmdp.grad_share.ConstraintGradients`
  buffer (the one ``dcmdp train`` uses) with
  ``torch.autograd.grad(..., retain_graph=True)``, and the term enters the returned loss through
  :class:`_RouteToBuffer`, the identity whose backward sends nothing into the model and scales that
  gradient by the factor the trainer applied to the loss before its backward. ``param.grad`` is then
  TRL's surrogate alone; the logged loss includes the term.
- Trainer's clip (``_clip_grad_norm``; ``_get_grad_norm`` when ``max_grad_norm`` is 0): the buffer is
  averaged over the processes like DDP's ``param.grad``, both parts are scaled by one factor
  ``min(1, max_norm / (|g_pg + g_c| + 1e-6))`` (``ConstraintGradients.total_norm``), and the
  buffer goes to ``ShareBoundedAdamW.set_constraint_grads`` (``ConstraintGradients.hand_to``)
  before ``optimizer.step()`` (a step pre-hook refuses a step with the buffer still full).

It refuses, naming ``dcmdp_constraint_share=0``: another ``optim`` than torch's AdamW or another
optimizer passed in, fp16 with a GradScaler, DeepSpeed / FSDP / tensor or context parallelism,
weights that transformers loaded sharded (``distributed_config``, ``tp_plan``: DTensors), and
reentrant gradient checkpointing set through ``gradient_checkpointing_kwargs``. Its state saves and
loads through Trainer's own checkpoint; a checkpoint saved with the bound on resumes with it off as
torch's AdamW state (the policy part's moments). Costs while lambda > 0: a second backward pass per
micro-batch (with gradient checkpointing it recomputes the forward too), a gradient-sized buffer
plus a transient copy per micro-batch, and with several processes one extra all-reduce per
parameter tensor per optimizer step (not bucketed).

Logged through ``self._metrics`` (TRL averages them per logging step): ``dcmdp/lambda`` (used in the
step), ``dcmdp/lambda_next``, ``dcmdp/prob_gap`` (the step's D), ``dcmdp/tolerance``,
``dcmdp/penalty``, and every ``discrepancy/*`` metric of ``dcmdp.algo.discrepancy.discrepancy_metrics``
(micro-batch values averaged over processes); with the update bound ``dcmdp/constraint_scale`` and
``dcmdp/constraint_share`` (``ShareBoundedAdamW.last_metrics``, once per optimizer step). The
multiplier's state is saved in each checkpoint as ``dcmdp_multiplier.json``, written before TRL's own
save (which ends with the checkpoint rotation and the hub push), and restored on resume; a checkpoint
without it is an error.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from accelerate.utils import DistributedType
from torch import Tensor
from torch.distributed.tensor import DTensor
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from trl import GRPOConfig, GRPOTrainer

from dcmdp.algo.discrepancy import METRIC_NAMES, PAPER_GAP_THRESHOLD, discrepancy_metrics
from dcmdp.config import COMPOSED_FAILURES
from dcmdp.grad_share import ConstraintGradients, ShareBoundedAdamW, as_adamw_state
from dcmdp.integrations import (
    MULTIPLIER_STATE_FILE,
    DCMDPOptions,
    build_multiplier,
    dcmdp_term,
    load_multiplier_state,
    loss_tolerance,
    save_multiplier_state,
    shaped_advantages,
)
from dcmdp.integrations import gap_sum as gap_sum_of

#: The two places TRL keeps rollout log-probs, in order of preference.
SAMPLING_LOGPS = "sampling_per_token_logps"
OLD_LOGPS = "old_per_token_logps"


# The defaults of the dcmdp_* fields are DCMDPOptions' (dcmdp's multiplier settings): one definition.
_O = DCMDPOptions


#: vLLM sampling parameters that change the distribution the log-probs are taken from, with the
#: values that leave it alone (TRL's trainer applies only the temperature).
_NEUTRAL_SAMPLING: dict[str, tuple[Any, ...]] = {
    "top_k": (None, 0, -1),
    "top_p": (None, 1.0),
    "min_p": (None, 0.0),
    "repetition_penalty": (None, 1.0),
    "presence_penalty": (None, 0.0),
    "frequency_penalty": (None, 0.0),
}
_CONSTRAINED_DECODING = (
    "logit_bias",
    "bad_words",
    "allowed_token_ids",
    "structured_outputs",
    "guided_decoding",
)


@dataclass
class DCMDPGRPOConfig(GRPOConfig):
    """``GRPOConfig`` plus the DCMDP fields (``dcmdp_*``); defaults are the paper's (8B dense)."""

    dcmdp_loss_form: str = field(
        default=_O.loss_form,
        metadata={
            "help": "How the discrepancy reaches the policy: 'penalty' (lambda * token-mean gap, differentiable; "
            "the paper's reading), 'shaping' (advantages minus lambda * gap) or 'hinge' (lambda * token-mean of "
            "the gap above the tolerance)."
        },
    )
    dcmdp_lambda_init: float = field(
        default=_O.lambda_init, metadata={"help": "Initial multiplier lambda_0 (paper: 0.1 dense, 0.05 MoE)."}
    )
    dcmdp_eta: float = field(
        default=_O.eta,
        metadata={"help": "Dual step size eta (paper: 1.0); the integral gain of the PID multiplier."},
    )
    dcmdp_tolerance: float | None = field(
        default=_O.tolerance,
        metadata={
            "help": "Tolerance c on the mean probability gap D (paper: 0.0037 dense, 0.005 MoE). None chooses c "
            "from the first `dcmdp_auto_warmup_steps` measurements."
        },
    )
    dcmdp_lambda_min: float = field(
        default=_O.lambda_min, metadata={"help": "Lower bound of the multiplier."}
    )
    dcmdp_lambda_max: float = field(
        default=_O.lambda_max, metadata={"help": "Upper bound of the multiplier."}
    )
    dcmdp_multiplier: str = field(
        default=_O.multiplier,
        metadata={"help": "'dual_ascent' (the paper's projected dual ascent) or 'pid' (PID Lagrangian)."},
    )
    dcmdp_pid_kp: float = field(default=_O.pid_kp, metadata={"help": "PID multiplier: proportional gain."})
    dcmdp_pid_kd: float = field(default=_O.pid_kd, metadata={"help": "PID multiplier: derivative gain."})
    dcmdp_ema: float | None = field(
        default=_O.ema, metadata={"help": "EMA decay of the measured gap before the dual step; None = raw."}
    )
    dcmdp_auto_warmup_steps: int = field(
        default=_O.auto_warmup_steps,
        metadata={"help": "Automatic tolerance: optimizer steps measured before c is set."},
    )
    dcmdp_auto_quantile: float = field(
        default=_O.auto_quantile,
        metadata={"help": "Automatic tolerance: c = this quantile of the warm-up gaps ..."},
    )
    dcmdp_auto_multiple: float = field(
        default=_O.auto_multiple, metadata={"help": "... times this multiple."}
    )
    dcmdp_tolerance_floor: float = field(
        default=_O.tolerance_floor,
        metadata={
            "help": "A fixed c is raised to at least this multiple of the warm-up gaps' quantile "
            "(the engine's measured floor); 0 = off."
        },
    )
    dcmdp_constraint_share: float | None = field(
        default=_O.constraint_share,
        metadata={
            "help": "Update bound kappa, as `dcmdp train`'s loss.constraint_share with constraint_share_of=update: "
            "the optimizer is dcmdp's ShareBoundedAdamW, which holds the constraint's displacement of each weight "
            "tensor (averaged over about 100 steps) to at most kappa times the reward gradient's. None = 0.5 for "
            "'penalty' and 'hinge' (0.25 with vllm_importance_sampling_correction on and vLLM, or with "
            "off_policy_mask_threshold set), off for 'shaping' (its constraint acts through the advantages and cannot be "
            "split off; a value > 0 with it is an error); 0 = off. On, it needs optim='adamw_torch' or "
            "'adamw_torch_fused' (or your own ShareBoundedAdamW), no fp16 GradScaler, no FSDP / DeepSpeed / "
            "tensor parallelism (plain data parallel works), and costs a second backward pass per micro-batch "
            "while lambda > 0 and three times AdamW's optimizer state."
        },
    )
    # TRL turns its own vLLM importance-sampling correction on by default (sequence_mask, cap 3).
    # DCMDP is the other answer to the same mismatch, and dcmdp's core loss and the verl loss run
    # without a correction, so here it is off unless asked for (module docstring, "Corrections").
    vllm_importance_sampling_correction: bool = field(
        default=False,
        metadata={
            "help": "TRL's vLLM importance-sampling correction on top of DCMDP (off by default here; TRL's "
            "default is on). On, the objective is DCMDP + TRL's correction, dcmdp's loss.correction axis."
        },
    )

    dcmdp_allow_failed_composition: bool = field(
        default=False,
        metadata={
            "help": "Allow DCMDP beside a TRL correction whose dcmdp counterpart composed with the constraint "
            "was measured to fail: off_policy_mask_threshold (dcmdp's opsm) and vllm_importance_sampling_mode="
            "'sequence_truncate' (seq_tis). Refused unless true, as `dcmdp train` refuses them."
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.dcmdp_options()  # raises ValueError naming a bad field
        self.check_compositions()

    def check_compositions(self) -> None:
        """Raise ``ValueError`` for a correction beside DCMDP that ``dcmdp train`` refuses
        (:meth:`failed_compositions`), unless ``dcmdp_allow_failed_composition``. Run when the
        config is built and again by the trainer (a field may be set in between)."""
        failed = self.failed_compositions()
        if not failed or self.dcmdp_allow_failed_composition:
            return
        instead = "leave TRL's corrections off (DCMDP alone)"
        if self.use_vllm:
            instead += (
                ", or use vllm_importance_sampling_correction with vllm_importance_sampling_mode='sequence_mask' "
                "or 'token_truncate' (dcmdp's seq_mis and tis composed held with the penalty form; docs/RESULTS.md)"
            )
        raise ValueError(
            "DCMDP beside "
            + " and ".join(
                f"{setting} (dcmdp's {name}: {COMPOSED_FAILURES[name]})" for setting, name in failed
            )
            + ": refused, as `dcmdp train` refuses the composition (no update bound tried made it hold). "
            f"Instead {instead}; to run it anyway, set dcmdp_allow_failed_composition=True"
        )

    def failed_compositions(self) -> list[tuple[str, str]]:
        """(TRL setting, dcmdp correction) for each of TRL's corrections on in this config whose
        counterpart composed with the constraint failed in dcmdp's measurements (``COMPOSED_FAILURES``)."""
        out = []
        if self.off_policy_mask_threshold is not None:
            out.append((f"off_policy_mask_threshold={self.off_policy_mask_threshold}", "opsm"))
        mode = getattr(self, "vllm_importance_sampling_mode", None)
        if self.use_vllm and self.vllm_importance_sampling_correction and mode == "sequence_truncate":
            out.append(("vllm_importance_sampling_mode='sequence_truncate'", "seq_tis"))
        return out

    def dcmdp_options(self) -> DCMDPOptions:
        """The ``dcmdp_*`` fields as the framework-neutral :class:`DCMDPOptions` (validated)."""
        return DCMDPOptions(
            loss_form=self.dcmdp_loss_form,
            lambda_init=self.dcmdp_lambda_init,
            eta=self.dcmdp_eta,
            tolerance=self.dcmdp_tolerance,
            lambda_min=self.dcmdp_lambda_min,
            lambda_max=self.dcmdp_lambda_max,
            multiplier=self.dcmdp_multiplier,
            pid_kp=self.dcmdp_pid_kp,
            pid_kd=self.dcmdp_pid_kd,
            ema=self.dcmdp_ema,
            auto_warmup_steps=self.dcmdp_auto_warmup_steps,
            auto_quantile=self.dcmdp_auto_quantile,
            auto_multiple=self.dcmdp_auto_multiple,
            tolerance_floor=self.dcmdp_tolerance_floor,
            constraint_share=self.dcmdp_constraint_share,
            # TRL's corrections: its IS correction on vLLM's samples only (GRPOTrainer: use_vllm and
            # the flag), its off-policy sequence mask (OPSM) with or without vLLM
            corrected=bool(self.use_vllm and self.vllm_importance_sampling_correction)
            or self.off_policy_mask_threshold is not None,
        )


#: ``args.optim`` values whose optimizer is torch's AdamW, the one ShareBoundedAdamW extends.
TORCH_ADAMW = ("adamw_torch", "adamw_torch_fused")
_BOUND_OFF = "or turn the update bound off with dcmdp_constraint_share=0"


class _RouteToBuffer(torch.autograd.Function):
    """The identity on the DCMDP term's value, whose backward sends no gradient into the model and
    gives the gradient it receives to ``on_backward``. That gradient is the factor the trainer scaled
    the loss by before its backward (Trainer's 1 / gradient-accumulation steps when it divides, or any
    other), so the buffer receives exactly what ``param.grad`` would have received."""

    @staticmethod
    def forward(ctx: Any, term: Tensor, on_backward: Callable[[Tensor], None]) -> Tensor:  # type: ignore[override]
        ctx.on_backward = on_backward
        return term.detach().clone()

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[None, None]:  # type: ignore[override]
        ctx.on_backward(grad_output)
        return None, None


@dataclass
class _Capture:
    """What one ``_compute_loss`` call shares with the log-prob hook it triggers inside TRL."""

    inputs: dict[str, Any]
    """A shallow copy of TRL's micro-batch: shaping writes its advantages here, never into TRL's buffer."""
    rollout_logp_BT: Tensor
    mask_BT: Tensor
    lam: float
    logp_BT: Tensor | None = None


class DCMDPGRPOTrainer(GRPOTrainer):
    """TRL's ``GRPOTrainer`` with DCMDP: the loss term, the multiplier and its dual step, the metrics.

    Takes the same arguments as ``GRPOTrainer``; ``args`` must be a :class:`DCMDPGRPOConfig`.
    ``self.multiplier`` is the Lagrange multiplier (``value``, ``tolerance``, ``state_dict()``).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        given = kwargs.get("args", args[2] if len(args) > 2 else None)
        if isinstance(given, DCMDPGRPOConfig):  # before TRL loads the model or starts vLLM
            given.check_compositions()
        super().__init__(*args, **kwargs)
        if not isinstance(self.args, DCMDPGRPOConfig):
            raise TypeError(
                f"DCMDPGRPOTrainer needs args=DCMDPGRPOConfig(...), got {type(self.args).__name__}"
            )
        self.dcmdp_args: DCMDPGRPOConfig = self.args
        self.dcmdp = self.dcmdp_args.dcmdp_options()
        self.dcmdp_args.check_compositions()  # again: a field may have been set after the config was built
        self.multiplier = build_multiplier(self.dcmdp)
        self.dcmdp_rollout_key = self._rollout_logps_key()
        if self.dcmdp_rollout_key == SAMPLING_LOGPS:
            self._check_sampling_filters()
        # Gap sum and token count of the current accumulation window, this process only.
        self._dcmdp_window = torch.zeros(2, dtype=torch.float64)
        self._dcmdp_capture: _Capture | None = None
        #: kappa of the update bound (0 = off; see the module docstring, "Update bound").
        self.update_bound = self.dcmdp.update_bound()
        self._constraint: ConstraintGradients | None = None
        self._constraint_this_step = False  # some micro-batch of this optimizer step had lambda > 0
        self._bounded_optimizer: ShareBoundedAdamW | None = None
        if self.update_bound > 0:
            self._check_update_bound_setup()
            given = self._given_optimizer()
            if isinstance(given, ShareBoundedAdamW):  # the caller's own (optimizers=(opt, sched))
                self._hook_bounded_optimizer(given)

    def _rollout_logps_key(self) -> str:
        """Which of TRL's inputs holds the rollout log-probs (see the module docstring)."""
        if self.use_vllm:
            return SAMPLING_LOGPS
        generate_every = self._steps_per_generation() * self.num_iterations
        if self.dcmdp_args.gradient_accumulation_steps % generate_every != 0:
            return OLD_LOGPS
        raise ValueError(
            "DCMDP needs the log-probs the completions were sampled with, and this configuration gives "
            "none: without vLLM TRL keeps no sampling log-probs, and when steps_per_generation * "
            "num_iterations divides gradient_accumulation_steps (e.g. num_iterations=1 with the default "
            "steps_per_generation) it computes no old_per_token_logps either. Set use_vllm=True (the "
            "engine's log-probs, what DCMDP is for), or num_iterations > 1 (D then measures the policy's "
            "drift since generation)."
        )

    def _check_sampling_filters(self) -> None:
        """vLLM's log-probs are those of the processed distribution (top-k / top-p / min-p /
        repetition penalty applied) while TRL's trainer log-probs apply the temperature only: D would
        absorb the truncated mass and lambda would grow for no numerical reason. Refuse them."""
        a = self.dcmdp_args
        on = [
            name
            for name, value, off in (
                ("top_k", a.top_k, (None, 0, -1)),
                ("top_p", a.top_p, (None, 1.0)),
                ("min_p", a.min_p, (None, 0.0)),
                ("repetition_penalty", a.repetition_penalty, (None, 1.0)),
            )
            if value not in off
        ]
        # generation_kwargs reach vLLM's SamplingParams last and override the fields above
        extra = a.generation_kwargs if isinstance(a.generation_kwargs, dict) else {}
        for key, value in extra.items():
            neutral = _NEUTRAL_SAMPLING.get(key)
            if key == "temperature" and value not in (None, a.temperature):
                on.append(
                    f"generation_kwargs.temperature={value} (the trainer divides by temperature={a.temperature})"
                )
            elif (neutral is not None and value not in neutral) or (
                key in _CONSTRAINED_DECODING and value not in (None, {}, [])
            ):
                on.append(f"generation_kwargs.{key}")
        if getattr(a, "vllm_structured_outputs_regex", None):
            on.append("vllm_structured_outputs_regex")
        if on:
            raise ValueError(
                f"DCMDP with use_vllm=True needs sampling without {', '.join(on)}: vLLM's sampling log-probs "
                "include these filters and TRL's trainer log-probs do not, so D would measure the filtered-out "
                "mass instead of the engine mismatch. Sample with the temperature only."
            )
        if self.vllm_mode == "server" and self.accelerator.is_main_process:
            info = self.vllm_generation.vllm_client.get_server_info()
            mode = info.get("model_config", {}).get("logprobs_mode")
            if mode not in (None, "processed_logprobs"):
                raise ValueError(
                    f"the vLLM server runs with --logprobs-mode {mode}; DCMDP needs the log-probs of the "
                    "distribution it sampled from: restart it with --logprobs-mode processed_logprobs"
                )

    def _steps_per_generation(self) -> int:
        spg = self.dcmdp_args.steps_per_generation
        assert spg is not None  # GRPOConfig.__post_init__ sets it (default: gradient_accumulation_steps)
        return spg

    # ----------------------------------------------------------------------------- the hook

    def _get_per_token_logps_and_entropies(self, *args: Any, **kwargs: Any) -> Any:
        """TRL's log-prob forward, unchanged; inside our ``_compute_loss`` its result is kept, and the
        shaping form rewrites the advantages TRL reads right after this call."""
        out = super()._get_per_token_logps_and_entropies(*args, **kwargs)
        capture = self._dcmdp_capture
        if capture is not None:
            if capture.logp_BT is not None:
                raise RuntimeError(
                    "TRL's _compute_loss computed per-token log-probs twice; this TRL version is not supported"
                )
            capture.logp_BT = out[0]
            if self.dcmdp.loss_form == "shaping":
                adv = capture.inputs["advantages"]
                adv_BT = (adv[:, None] if adv.dim() == 1 else adv).expand_as(out[0])
                capture.inputs["advantages"] = shaped_advantages(
                    adv_BT, out[0], capture.rollout_logp_BT, capture.mask_BT, capture.lam
                )
        return out

    def _mode(self) -> str:
        assert self.model is not None
        return "train" if self.model.training else "eval"  # as TRL decides it

    def _compute_loss(self, model: Any, inputs: dict[str, Any]) -> Tensor:
        mode = self._mode()
        if self.dcmdp_rollout_key not in inputs:
            raise KeyError(f"TRL's batch has no {self.dcmdp_rollout_key!r}; keys: {sorted(inputs)}")
        rollout_logp_BT = inputs[self.dcmdp_rollout_key]
        mask_BT = inputs["completion_mask"]
        if "tool_mask" in inputs:
            mask_BT = mask_BT * inputs["tool_mask"]
        # vLLM reports NaN for tokens it could not score: they leave the DCMDP mask (TRL's own IS
        # correction neutralises them the same way).
        mask_BT = (mask_BT != 0) & torch.isfinite(rollout_logp_BT)
        capture = _Capture(dict(inputs), rollout_logp_BT, mask_BT, self.multiplier.value)

        self._dcmdp_capture = capture
        try:
            loss = super()._compute_loss(model, capture.inputs)
        finally:
            self._dcmdp_capture = None
        if capture.logp_BT is None:
            raise RuntimeError(
                "TRL's _compute_loss did not call _get_per_token_logps_and_entropies; this TRL version is "
                "not supported"
            )
        term, gap_sum, n_tokens, penalty = self._dcmdp_term(capture)
        at_old = inputs.get(OLD_LOGPS) if self.dcmdp_rollout_key == SAMPLING_LOGPS else None
        if at_old is not None and n_tokens > 0:
            # Several optimizer steps per generation: the dual step reads the engine gap at the policy
            # that generated (pi_old, TRL's recompute), as dcmdp's trainer and verl do, not a gap that
            # also holds the policy's drift within the step.
            gap_sum = gap_sum_of(at_old, rollout_logp_BT, mask_BT)
        self._log_micro_batch(mode, capture, penalty)
        if mode == "train":
            term = term * (n_tokens / self._window_tokens(inputs))
            if self.update_bound > 0:
                term = self._split_off(term, capture.lam)
            self._dcmdp_window += torch.tensor([gap_sum, n_tokens], dtype=torch.float64)
            if self.accelerator.sync_gradients:
                self._dual_step(capture.lam)
        return loss + term

    # ----------------------------------------------------------------------------- pieces

    def _dcmdp_term(self, capture: _Capture) -> tuple[Tensor, float, float, float]:
        """(token-mean DCMDP term, gap sum, token count, penalty value) of this micro-batch.

        An empty mask (every completion masked) gives a zero term and a NaN penalty (skipped in the logs).
        """
        assert capture.logp_BT is not None
        n_tokens = float(capture.mask_BT.sum())
        if n_tokens == 0:
            zero = torch.zeros((), dtype=capture.logp_BT.dtype, device=capture.logp_BT.device)
            return zero, 0.0, 0.0, float("nan")
        out = dcmdp_term(
            capture.logp_BT,
            capture.rollout_logp_BT,
            capture.mask_BT,
            lam=capture.lam,
            tolerance=loss_tolerance(self.multiplier),
            form=self.dcmdp.loss_form,
        )
        gap = float(out.metrics["dcmdp/prob_gap"])
        return out.loss, gap * n_tokens, n_tokens, float(out.metrics["dcmdp/penalty"])

    def _window_tokens(self, inputs: dict[str, Any]) -> float:
        """Tokens of one accumulation window on this process, as TRL's ``dapo`` normaliser counts them."""
        per_process = float(inputs["num_items_in_batch"]) / self.accelerator.num_processes
        return max(per_process * self.current_gradient_accumulation_steps / self._steps_per_generation(), 1.0)

    def _dual_step(self, lam_used: float) -> None:
        """All-reduce the window's gap sum and token count, then one identical dual step on every rank."""
        totals = self.accelerator.reduce(self._dcmdp_window.to(self.accelerator.device), reduction="sum")
        self._dcmdp_window.zero_()
        gap_sum, n_tokens = totals.tolist()
        if n_tokens == 0:
            return  # nothing measured this step (every completion masked): lambda stays
        d = gap_sum / n_tokens
        c = self.multiplier.tolerance
        self.multiplier.update(d)
        m = self._metrics["train"]
        m["dcmdp/prob_gap"].append(d)
        m["dcmdp/lambda"].append(lam_used)
        m["dcmdp/lambda_next"].append(self.multiplier.value)
        m["dcmdp/tolerance"].append(float("nan") if c is None else float(c))

    def _log_micro_batch(self, mode: str, capture: _Capture, penalty: float) -> None:
        """``dcmdp/penalty`` and every ``discrepancy/*`` metric of the micro-batch, averaged over processes.

        One gather per micro-batch, on every process (an empty micro-batch sends NaN, which the mean skips).
        """
        assert capture.logp_BT is not None
        names = ("dcmdp/penalty", *METRIC_NAMES)
        device = self.accelerator.device
        if bool(capture.mask_BT.any()):
            c = self.multiplier.tolerance
            values = discrepancy_metrics(
                capture.logp_BT.detach(),
                capture.rollout_logp_BT,
                capture.mask_BT,
                gap_threshold=PAPER_GAP_THRESHOLD if c is None else float(c),
            )
            stacked = torch.stack([values[k] for k in METRIC_NAMES]).float().to(device)
            local = torch.cat([torch.tensor([penalty], device=device), stacked])
        else:
            local = torch.full((len(names),), float("nan"), device=device)
        gathered = self.accelerator.gather(local).view(-1, len(names))
        for name, value in zip(names, gathered.nanmean(dim=0).tolist()):
            self._metrics[mode][name].append(value)
        if mode == "eval":
            self._metrics[mode]["dcmdp/lambda"].append(capture.lam)

    # ----------------------------------------------------------------------------- update bound

    def _given_optimizer(self) -> Any:
        """Trainer's `optimizer` attribute (None until built or passed in). Read through getattr: where
        TRL is not installed (the type check runs before it is), mypy cannot type the inherited attribute."""
        return getattr(self, "optimizer", None)

    def _check_update_bound_setup(self) -> None:
        """Refuse what the update bound cannot run with, naming the way out."""
        a, kappa = self.dcmdp_args, self.update_bound
        what = f"the update bound (dcmdp_constraint_share={kappa})"
        given = self._given_optimizer()
        if given is not None:
            if not isinstance(given, ShareBoundedAdamW):
                raise ValueError(
                    f"{what} needs dcmdp's ShareBoundedAdamW, which takes the constraint's gradient apart "
                    f"from the rest, got optimizers=({type(given).__name__}, ...): pass "
                    f"dcmdp.grad_share.ShareBoundedAdamW(..., kappa={kappa}) or no optimizer, {_BOUND_OFF}"
                )
            if given.kappa != kappa:
                raise ValueError(
                    f"{what} and the ShareBoundedAdamW passed in (kappa={given.kappa}) disagree: set "
                    f"dcmdp_constraint_share={given.kappa}"
                )
        elif self.optimizer_cls_and_kwargs is not None:
            raise ValueError(
                f"{what} builds its own optimizer (ShareBoundedAdamW, AdamW that bounds the constraint's step); "
                f"drop optimizer_cls_and_kwargs, {_BOUND_OFF}"
            )
        elif a.optim not in TORCH_ADAMW:
            raise ValueError(
                f"{what} replaces torch's AdamW by dcmdp's ShareBoundedAdamW, an AdamW that bounds the "
                f"constraint's step; optim={str(getattr(a.optim, 'value', a.optim))!r} is another optimizer: "
                f"use optim='adamw_torch' or 'adamw_torch_fused', {_BOUND_OFF}"
            )
        if a.fp16 or self.accelerator.scaler is not None:
            raise ValueError(
                f"{what} does not run with fp16 mixed precision: its GradScaler scales the loss before the "
                f"backward pass and unscales only param.grad, not the constraint's part; use bf16 or float32, "
                f"{_BOUND_OFF}"
            )
        sharded = (
            self.is_deepspeed_enabled
            or self.is_fsdp_enabled
            or self.is_fsdp_xla_enabled
            # transformers' own distributed loading (from_pretrained(distributed_config=...), tp_plan):
            # accelerate then reports plain data parallelism, but the weights are DTensors
            or getattr(self, "is_distributed_loading_by_transformers", False)
            or (self.model is not None and any(isinstance(p, DTensor) for p in self.model.parameters()))
        )
        if sharded or self.accelerator.distributed_type in (
            DistributedType.DEEPSPEED,
            DistributedType.FSDP,
            DistributedType.MEGATRON_LM,
            DistributedType.XLA,
        ):
            raise ValueError(
                f"{what} runs with plain data parallelism (DDP) only: with DeepSpeed, FSDP, Megatron, XLA or "
                f"weights loaded sharded by transformers (distributed_config, tp_plan) the "
                f"gradients are sharded or reduced where this trainer cannot add the constraint's part; "
                f"{_BOUND_OFF}"
            )
        pc = getattr(self.accelerator, "parallelism_config", None)
        if pc is not None and any(
            getattr(pc, name, False)
            for name in ("tp_enabled", "cp_enabled", "sp_enabled", "dp_shard_enabled")
        ):
            raise ValueError(
                f"{what} runs with plain data parallelism (DDP) only, not with parallelism_config's tensor, "
                f"context, sequence or sharded data parallelism; {_BOUND_OFF}"
            )
        checkpointing = a.gradient_checkpointing_kwargs
        if (
            a.gradient_checkpointing
            and isinstance(checkpointing, dict)
            and checkpointing.get("use_reentrant")
        ):
            raise ValueError(
                f"{what} backpropagates the constraint with torch.autograd.grad, which reentrant gradient "
                "checkpointing does not support: set gradient_checkpointing_kwargs={'use_reentrant': False} "
                f"(transformers' default), {_BOUND_OFF}"
            )

    def create_optimizer(self, model: Any = None) -> torch.optim.Optimizer:
        """Trainer's optimizer, or with the update bound on ShareBoundedAdamW with the settings and the
        decay / no-decay parameter groups Trainer would give torch's AdamW."""
        if self.update_bound == 0 or self._given_optimizer() is not None:
            return super().create_optimizer(model)
        opt_model = self.model if model is None else model
        assert opt_model is not None
        decay = set(self.get_decay_parameter_names(opt_model))
        named = [(n, p) for n, p in opt_model.named_parameters() if p.requires_grad]
        a = self.args
        groups: list[dict[str, Any]] = [
            {"params": [p for n, p in named if n in decay], "weight_decay": a.weight_decay},
            {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0},
        ]
        optimizer = ShareBoundedAdamW(
            cast(Any, groups),  # parameter groups, as every torch optimizer takes them
            lr=a.learning_rate,
            betas=(a.adam_beta1, a.adam_beta2),
            eps=a.adam_epsilon,
            weight_decay=a.weight_decay,
            kappa=self.update_bound,
        )
        self._hook_bounded_optimizer(optimizer)
        self.optimizer = optimizer
        return optimizer

    def _hook_bounded_optimizer(self, optimizer: ShareBoundedAdamW) -> None:
        self._bounded_optimizer = optimizer
        optimizer.register_step_pre_hook(self._before_bounded_step)
        optimizer.register_step_post_hook(self._after_bounded_step)

    def _constraint_buffer(self) -> ConstraintGradients:
        if self._constraint is None:
            assert self.model is not None
            self._constraint = ConstraintGradients(self.model.parameters(), self.update_bound)
        return self._constraint

    def _split_off(self, term: Tensor, lam: float) -> Tensor:
        """The update bound: the term's gradient goes to the constraint's buffer and ``param.grad`` gets
        the policy part alone; the returned tensor has the term's value (the logged loss includes it)."""
        if lam == 0:
            return term.detach()  # lam * (...) has a zero gradient at lam 0: no second backward pass
        # lambda is the same on every process (an empty micro-batch is not), so this flag is too
        self._constraint_this_step = True
        if not term.requires_grad:  # no completion token in this micro-batch
            return term.detach()
        buffer = self._constraint_buffer()
        grads = torch.autograd.grad(term, buffer.params, retain_graph=True, allow_unused=True)
        routed: Tensor = _RouteToBuffer.apply(term, functools.partial(buffer.add_grads, grads))
        return routed

    def _clip_grad_norm(self, model: Any) -> Any:
        if self.update_bound == 0:
            return super()._clip_grad_norm(model)
        return self._clip_and_hand_over(float(self.args.max_grad_norm))

    def _get_grad_norm(self, model: Any, grad_norm: Any = None) -> Any:
        if self.update_bound > 0 and grad_norm is None:  # max_grad_norm <= 0: Trainer only measures
            grad_norm = self._clip_and_hand_over(math.inf)
        return super()._get_grad_norm(model, grad_norm=grad_norm)

    def _clip_and_hand_over(self, max_norm: float) -> Tensor:
        """Clip the policy part (``param.grad``) and the constraint's (the buffer) by one factor from the
        norm of their sum, as ``dcmdp train`` does, and give the constraint's part to ShareBoundedAdamW
        for the step that follows. Returns the norm before clipping (Trainer logs it as grad_norm)."""
        if self._bounded_optimizer is None:
            raise RuntimeError(
                "the update bound is on but ShareBoundedAdamW was not created (create_optimizer)"
            )
        buffer = self._constraint_buffer()
        if self.accelerator.num_processes > 1 and self._constraint_this_step:
            # DDP averaged param.grad over the processes; the buffer is averaged the same way. Every
            # process sends every tensor (zeros where it has none) so the collectives line up; at
            # lambda 0 no process has any, and none sends.
            filled = [torch.zeros_like(p) if g is None else g for p, g in zip(buffer.params, buffer.grads)]
            buffer.grads = list(self.accelerator.reduce(filled, reduction="mean"))
        norm = buffer.total_norm()
        coef: Tensor | float = 1.0
        if not math.isinf(max_norm):  # as torch.nn.utils.clip_grad_norm_ scales every gradient
            coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
            for p in buffer.params:
                if p.grad is not None:
                    p.grad.mul_(coef.to(p.grad.device))
        buffer.hand_to(self._bounded_optimizer, coef)
        self._constraint_this_step = False
        return norm

    def _before_bounded_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        if self._constraint is not None and self._constraint.pending:
            raise RuntimeError(
                "the optimizer is stepping with the constraint's gradient still in the update bound's buffer: "
                "the training loop did not call Trainer._clip_grad_norm or _get_grad_norm before "
                "optimizer.step() (transformers 5.19's Trainer does), so the constraint would be lost; "
                f"run with a Trainer loop that does, {_BOUND_OFF}"
            )

    def _after_bounded_step(self, optimizer: ShareBoundedAdamW, args: Any, kwargs: Any) -> None:
        for name, value in optimizer.last_metrics.items():  # dcmdp/constraint_scale, dcmdp/constraint_share
            self._metrics["train"][name].append(value)

    # ----------------------------------------------------------------------------- checkpoints

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        # Before TRL's save: it ends with the checkpoint rotation and the hub push, so a crash in
        # between must not leave a newest checkpoint without lambda.
        if self.args.should_save:
            folder = os.path.join(
                self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
            )
            save_multiplier_state(folder, self.multiplier.state_dict())
        super()._save_checkpoint(model, trial)

    def train(self, *args: Any, **kwargs: Any) -> Any:
        # A window that an earlier train() call left unfinished (an exception between two
        # micro-batches) must not reach this call's first optimizer step: Trainer zeroes param.grad
        # when it starts, and this clears what the DCMDP term keeps beside it.
        self._dcmdp_window.zero_()
        self._constraint = None
        self._constraint_this_step = False
        return super().train(*args, **kwargs)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)
        given = self._given_optimizer()
        if checkpoint is not None and self.update_bound == 0 and given is not None:
            # A checkpoint saved with the update bound on holds ShareBoundedAdamW's extra state;
            # torch's AdamW would keep (and save again) it for good: keep the policy part's moments.
            inner = getattr(given, "optimizer", given)
            if not isinstance(inner, ShareBoundedAdamW):
                inner.load_state_dict(as_adamw_state(inner.state_dict()))
        if checkpoint is not None:
            self.multiplier.load_state_dict(load_multiplier_state(checkpoint))


__all__ = ["MULTIPLIER_STATE_FILE", "DCMDPGRPOConfig", "DCMDPGRPOTrainer"]
