"""Typed run configuration: dataclasses with a docstring per field, validated when built.

A config comes from (lowest to highest priority) the defaults below, a YAML file (loaded with
``yaml.safe_load``, so a tampered file cannot run code) and ``section.field=value`` overrides on
the command line. It is at most two levels deep. Every run writes its resolved config as
``config.yaml`` beside its metrics.

Size: about 530 lines, over the 500 we aim for: every field's docstring (the source of
docs/configuration.md) and every range check sit beside the field they describe.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dcmdp.algo.aggregation import AGG_MODES
from dcmdp.algo.loss_core import CONSTRAINT_SAMPLES
from dcmdp.algo.losses import (
    CONSTRAINTS,
    CORRECTIONS,
    MEASURES,
    MULTIPLIER_LOSSES,
    POLICY_LOSSES,
    SHORTHANDS,
    LossSettings,
    PolicyLossFn,
    compose_loss,
    get_policy_loss,
    uses_multiplier,
)
from dcmdp.algo.multiplier import MULTIPLIER_KINDS, MultiplierSettings, build_multiplier
from dcmdp.config_parse import ConfigError, coerce_value, read_config_file
from dcmdp.engines.base import DTYPES, ENGINE_QUANTIZATIONS, engine_names
from dcmdp.tasks import TASKS, Task, make_task, task_options

#: The valid ``multiplier.type`` values: the multiplier registry's kinds.
MULTIPLIER_TYPES = MULTIPLIER_KINDS
LR_SCHEDULES = ("constant", "cosine")
TRAINER_DTYPES = ("float32", "bfloat16", "float16")
DEVICES = ("auto", "cpu", "cuda")


@dataclass
class ModelConfig:
    path: str = "default"
    """Local Hugging Face model dir, a named model (tiny-qwen3, tiny-qwen3-moe, tiny-qwen3-bpe,
    smollm2-135m), "default": the tiny Qwen3 warm-started on the default task, or "long-addition":
    the 4,096-token BPE Qwen3 warm-started on long_addition (both built by `dcmdp pretrain`;
    "long-addition-cap2000" is the latter with the pretrain step cap of 2,000 it had before
    issue 13's session 21, which the long-response experiments name)."""
    dtype: str = "float32"
    """Trainer precision: float32 | bfloat16 (weights and optimizer in bfloat16) | float16 (weights
    and optimizer in float32, every forward and backward in float16, no loss scaling: pair it with
    engine.dtype=float16, the FP16 remedy of docs/why-disagree.md)."""
    device: str = "auto"
    """Trainer device: auto (cuda when a GPU is visible, else cpu) | cpu | cuda. The engine follows."""
    cache_dir: str = ".cache/models"
    """Where named and warm-started models are built and reused."""


@dataclass
class EngineConfig:
    type: str = "vllm"
    """Rollout engine: vllm | transformers | llamacpp | fake."""
    dtype: str = "bfloat16"
    """Engine precision: float32 | bfloat16 | float16. The deployment setting training aligns to."""
    quantization: str | None = None
    """vLLM quantization name; transformers: int8 | int4 | int3 | fp8; llamacpp: F32 | BF16 | Q8_0 | Q4_0."""
    fp32_modules: list[str] = field(default_factory=list)
    """Module groups the engine keeps in float32 while the rest runs at engine.dtype /
    engine.quantization, the remedy docs/why-disagree.md measures: lm_head, norms, router,
    embeddings, attention, mlp, or attention.L / mlp.L / router.L for layer L. transformers: any
    (with a quantization: left unquantized); vllm: [lm_head] only (its head_dtype float32)."""
    kv_cache_gb: float = 1.0
    """vLLM KV cache on CPU, GiB."""
    max_model_len: int = 128
    """Longest prompt + response the engine accepts."""
    sync_check_every: int = 10
    """Weight-sync check: after the first sync and then every N steps the engine samples a fixed
    probe and the trainer scores it; a gap far above the first check's stops the run (0 = off).
    See docs/engines.md, "Is the engine serving my weights?"."""
    sync_check_factor: float = 8.0
    """The check fails when the probe's mean |log ratio| exceeds max(factor x floor, floor + margin).
    Healthy runs reached 3.6x their floor (bf16, lr 1e-3, 150 steps; docs/engines.md), hence 8."""
    sync_check_margin: float = 0.005
    """Nats per token above the floor the check always tolerates."""
    sync_check_first_max: float = 1.0
    """The first check (right after the initial sync) fails above this many nats per token."""


@dataclass
class SamplingConfig:
    temperature: float = 1.0
    """Sampling temperature; the trainer recomputes log-probs at the same temperature."""
    top_p: float = 1.0
    """Nucleus sampling (1.0 = off); the trainer applies the same truncation."""
    top_k: int = 0
    """Top-k sampling (0 = off); the trainer applies the same truncation."""
    max_tokens: int = 8
    """Longest response, in tokens."""


@dataclass
class TaskConfig:
    name: str = "arithmetic"
    """Task from the registry (see docs/tasks.md)."""
    options: dict[str, Any] = field(default_factory=dict)
    """Task options, e.g. {digits: 2, ops: "+"}."""


# The loss knobs' defaults are LossSettings' (the losses' own record): one definition each.
_L = LossSettings

#: kappa of the update bound for a constraint alone (``loss.constraint_share`` null, no correction):
#: what kept every DCMDP form from collapsing in ``harm`` and the long regime. 0.25 was the default
#: for about an hour of issue 13's session 19 (the penalty form at 0.25 led GRPO by +0.025 [+0.004,
#: +0.045] over nine long-response seeds and held in ``harm``), and was set back when the hinge form
#: at 0.25 collapsed on a long-response seed where it had held at 0.5 (docs/RESULTS.md,
#: ``dcmdp_k0.25``, ``dcmdp_hinge_k0.25``).
DEFAULT_SHARE = 0.5
#: kappa of the update bound when an importance correction is composed with the constraint
#: (``loss.constraint_share`` null): DCMDP + TIS collapsed in 3 of 5 long-response seeds at 0.5 and
#: held in 9 of 9 at 0.25 (docs/RESULTS.md, ``dcmdp_tis_k0.25``); at 0.25 seq-MIS composed held on 3 of 3
#: seeds and the geometric mask on 9 of 9 (+0.031 over GRPO, the gap lower on all nine), OPSM collapsed on 1 of 3 and seq-TIS failed on 2 of 3 (and
#: at 0.1 OPSM collapsed on another 1 of 3 and seq-TIS did no better).
COMPOSED_SHARE = 0.25
#: Corrections whose composition with a constraint failed at :data:`COMPOSED_SHARE` and at 0.1 in the
#: long regime (docs/RESULTS.md, ``dcmdp_seq_tis_k0.25``, ``dcmdp_opsm_k0.25``, ``dcmdp_opsm_k0.1``,
#: ``dcmdp_seq_tis_k0.1``). No setting measured made them safe, so the config refuses them unless
#: ``loss.allow_failed_composition=true`` (and a start-up caution repeats why when it is set).
COMPOSED_FAILURES = {
    "seq_tis": "DCMDP + seq-TIS (the penalty form on the probability gap) failed on 2 of 3 long-response seeds "
    "at update-bound kappa 0.25 (training reward 0.02, the gap rising to 0.010-0.011 with lambda at its bound; "
    "seq-TIS alone held on one of the two) and did no better at 0.1 on that one",
    "opsm": "DCMDP + OPSM (the penalty form on the probability gap) collapsed on 1 of 3 long-response seeds at "
    "update-bound kappa 0.25 (greedy accuracy 0-0.008 from step 50, the gap rising to 0.015 with lambda at its "
    "bound; OPSM alone held on that seed) and on another 1 of 3 at 0.1, one that had held at 0.25",
}


@dataclass
class LossConfig:
    type: str = "dcmdp"
    """Policy loss by name, a shorthand for an (importance correction, constraint) pair: grpo, tis,
    icepop, seq_tis, seq_mis, geo_mask, offpolicy_seq_mask (a correction, no constraint), dcmdp
    (differentiable gap penalty), dcmdp_shaping, dcmdp_hinge, dcmdp_full (a constraint, no
    correction). ``correction`` and ``constraint`` below override either half."""
    correction: str = "auto"
    """Importance correction: auto (the one of ``type``), none, tis, icepop, seq_tis, seq_mis,
    geo_mask, opsm. E.g. ``loss.type=dcmdp loss.correction=tis`` is DCMDP together with TIS
    (in the long regime it collapsed in 3 of 5 seeds with the update bound at kappa 0.5 and held in
    9 of 9 at 0.25, now its default: ``constraint_share``; docs/RESULTS.md). At 0.25 seq_mis and
    geo_mask composed with the penalty held on 3 of 3 and 9 of 9 long seeds (geo_mask: +0.031 over
    GRPO, level with DCMDP alone at the same kappa over nine); opsm collapsed on 1 of 3 and
    seq_tis failed on 2 of 3 (reward lost, the gap rising), and at 0.1 no better, so those two are
    refused with a constraint unless ``allow_failed_composition``."""
    constraint: str = "auto"
    """Discrepancy constraint: auto (the one of ``type``), none, penalty (pathwise part of the
    gradient of D), shaping (score-function part), hinge (penalty on the excess over c), full (both
    parts)."""
    measure: str = "prob_gap"
    """What the constraint bounds, per token: prob_gap (the paper's |pi - mu|), k3 (k3 estimate
    of KL(mu||pi)) or abs_log_ratio (|log pi - log mu|). Set ``multiplier.tolerance`` in its units."""
    constraint_share: float | None = None
    """Share bound kappa on the constraint, 0 = off; null (the default) = 0.5 for a constraint
    alone and 0.25 when an importance correction is composed with it (DCMDP + TIS collapsed in 3
    of 5 long-response seeds at 0.5 and held in 9 of 9 at 0.25; seq-TIS and OPSM composed failed in
    2 of 3 and 1 of 3 at 0.25; alone, the penalty form at 0.25 led GRPO over nine long seeds, but
    the hinge form at 0.25 collapsed on one where it held at 0.5; the resolved value:
    ``LossConfig.share()``). By default (``constraint_share_of=update``)
    the constraint may move each weight tensor at most kappa times as far as the reward's gradient
    moves it (averaged over about 100 steps): what kept every DCMDP form from collapsing where c
    lies below the engine's floor (docs/RESULTS.md). With ``gradient``, per optimizer step the
    constraint's gradient is scaled down to at most kappa times the norm of the rest of the
    gradient (docs/concepts.md, "Keeping the constraint safe"). Costs a second backward pass per
    micro-batch while lambda > 0; ignored by losses without a constraint."""
    constraint_share_of: str = "update"
    """What the share bound bounds: gradient (the constraint's gradient against the rest of the
    gradient, per optimizer step; AdamW's per-coordinate scaling still lets a small, steady
    constraint gradient take most of the step) or update (how far the weights move: per parameter
    tensor, an exponentially weighted average over about 100 steps of the constraint's
    displacement is held to at most kappa times that of the policy gradient's; not a bound on the
    net displacement when the policy's direction reverses, or over runs much longer than the
    window. The two parts are backpropagated separately, float32 advised; the optimizer is dcmdp's
    ShareBoundedAdamW, AdamW when there is no constraint, with three times its state)."""
    constraint_gap: str = "engine"
    """With ``run.max_staleness >= 1``, which gap the constraint and the dual step act on: engine
    (the engine against the policy version that sampled the batch, as in a synchronous run) or
    total (the engine against the current policy, which adds the staleness gap). Ignored when
    synchronous, where the two are the same."""
    clip_low: float = _L.clip_low
    """PPO ratio clip below: 1 - clip_low."""
    clip_high: float = _L.clip_high
    """PPO ratio clip above: 1 + clip_high (clip-higher, DAPO)."""
    agg: str = _L.agg
    """Loss aggregation: token-mean | seq-mean-token-mean | seq-mean-token-sum | constant."""
    agg_constant: float | None = _L.agg_constant
    """The normaliser of agg=constant (e.g. batch size x max tokens, Dr. GRPO)."""
    tis_cap: float = _L.tis_cap
    """tis: token weight min(rho, tis_cap)."""
    icepop_low: float = _L.icepop_low
    """icepop: lower bound of the kept ratio range."""
    icepop_high: float = _L.icepop_high
    """icepop: upper bound of the kept ratio range."""
    seq_cap: float = _L.seq_cap
    """seq_tis: truncation of prod rho; seq_mis: rejection threshold."""
    geo_low: float = _L.geo_low
    """geo_mask: lower bound on the geometric-mean ratio."""
    geo_high: float = _L.geo_high
    """geo_mask: upper bound on the geometric-mean ratio."""
    opsm_delta: float = _L.opsm_delta
    """offpolicy_seq_mask: drop negative-advantage sequences whose mean log(mu/pi) exceeds this."""
    shaping_baseline: bool = _L.shaping_baseline
    """shaping / full constraint: centre the cost m_t on the token mean of the (mini)batch before it
    shifts the advantages (off = the paper's reading (b) as written). With samples from the
    engine, the uncentred cost's constant part pushes pi away from the engine in expectation
    (src/dcmdp/algo/constraints.py, cost_shift). Not with optim.grad_accum > 1. Experimental: see
    docs/RESULTS.md, long_stress_q4_0, for what it did and did not do."""
    constraint_samples: str = _L.constraint_samples
    """Which samples the constraint acts on: all (the paper) or signal, only samples with a nonzero
    advantage (with binary rewards: the groups whose rewards differ), its penalty still divided by
    every response token, so the constraint weighs less when fewer groups carry a reward signal and
    nothing when none do. Not in the TRL and verl adapters. Experimental: docs/RESULTS.md,
    long_stress_q4_0, says what it did."""
    allow_failed_composition: bool = False
    """Run a correction composed with a constraint that was measured to fail (seq_tis or opsm with
    any constraint: in the long regime they collapsed or lost the reward on 1-2 of 3 seeds at kappa
    0.25, and at 0.1 on the seeds run, where each correction alone held). Refused unless true: use the
    constraint alone, or tis, seq_mis or geo_mask composed with it, which held (docs/RESULTS.md)."""
    kl_coef: float = 0.0
    """Coefficient of a k3 KL penalty to the initial (reference) policy; 0 = off."""
    scale_adv_by_std: bool = True
    """GRPO advantages divided by the group std (False = Dr. GRPO)."""

    def composition(self) -> tuple[str, str, str] | None:
        """(correction, constraint, measure) after the overrides are applied to ``type``; None for
        a loss registered by a user under its own name (it is used as it is)."""
        if self.type not in SHORTHANDS:
            return None
        correction, constraint = SHORTHANDS[self.type]
        return (
            correction if self.correction == "auto" else self.correction,
            constraint if self.constraint == "auto" else self.constraint,
            self.measure,
        )

    def composed(self) -> bool:
        """Whether a built-in importance correction is composed with a constraint."""
        parts = self.composition()
        return parts is not None and parts[0] != "none" and parts[1] != "none"

    def share(self) -> float:
        """kappa of the share bound this loss runs with: ``constraint_share``, or when it is null
        :data:`COMPOSED_SHARE` for a built-in correction composed with a constraint and
        :data:`DEFAULT_SHARE` otherwise."""
        if self.constraint_share is not None:
            return float(self.constraint_share)
        return COMPOSED_SHARE if self.composed() else DEFAULT_SHARE

    def loss_fn(self) -> PolicyLossFn:
        """The composed loss this section describes."""
        parts = self.composition()
        return get_policy_loss(self.type) if parts is None else compose_loss(*parts)

    def uses_multiplier(self) -> bool:
        """Whether the loss reads lambda (it has a constraint)."""
        parts = self.composition()
        return self.type in MULTIPLIER_LOSSES if parts is None else uses_multiplier(parts[1])

    def settings(self, lam: float = 0.0, tolerance: float = LossSettings.tolerance) -> LossSettings:
        """The loss knobs as the losses read them, with this step's lambda and c: the one mapping
        from this section to :class:`~dcmdp.algo.losses.LossSettings`, field by field (a test
        checks that every ``LossSettings`` field but ``lam`` and ``tolerance`` is set here)."""
        return LossSettings(
            clip_low=self.clip_low,
            clip_high=self.clip_high,
            agg=self.agg,
            agg_constant=self.agg_constant,
            tis_cap=self.tis_cap,
            icepop_low=self.icepop_low,
            icepop_high=self.icepop_high,
            seq_cap=self.seq_cap,
            geo_low=self.geo_low,
            geo_high=self.geo_high,
            opsm_delta=self.opsm_delta,
            shaping_baseline=self.shaping_baseline,
            constraint_samples=self.constraint_samples,
            lam=lam,
            tolerance=tolerance,
        )


#: The ``multiplier`` section is the multiplier's own settings record: its fields, defaults and
#: docstrings are defined once, in :class:`dcmdp.algo.multiplier.MultiplierSettings`.
MultiplierConfig = MultiplierSettings


@dataclass
class OptimConfig:
    lr: float = 1e-4
    """AdamW learning rate."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas (paper: 0.9, 0.95)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    grad_clip: float = 1.0
    """Max global grad norm (0 = off)."""
    schedule: str = "constant"
    """constant | cosine (both after linear warm-up)."""
    warmup_steps: int = 0
    """Linear learning-rate warm-up, in optimizer steps."""
    epochs: int = 1
    """Passes over each step's rollouts."""
    minibatches: int = 1
    """Optimizer steps per epoch (the batch is split into this many minibatches)."""
    grad_accum: int = 1
    """Micro-batches per minibatch (gradient accumulation)."""


@dataclass
class RunConfig:
    steps: int = 60
    """Training steps (one rollout + update + dual step + sync each)."""
    prompts_per_step: int = 32
    """Prompts sampled per step (P)."""
    group_size: int = 8
    """Completions per prompt (G), the GRPO group."""
    seed: int = 0
    """Seeds problems, engine sampling, shuffling and initialisation."""
    out_dir: str = "runs/default"
    """Run directory: metrics.jsonl, config.yaml, checkpoints/, tensorboard/."""
    eval_every: int = 10
    """Evaluate on the deployment engine every N steps, at step 0 and at the end (0 = off)."""
    eval_problems: int = 256
    """Eval-split problems per evaluation."""
    eval_sampled: bool = True
    """Also report accuracy of one sample per eval prompt at the training temperature."""
    checkpoint_every: int = 10
    """Checkpoint every N steps and at the end (0 = off)."""
    keep_checkpoints: int = 2
    """Newest checkpoints kept (0 = all)."""
    tensorboard: bool = True
    """Also write TensorBoard event files."""
    wandb: bool = False
    """Also log to Weights & Biases (needs the wandb package)."""
    wandb_project: str = "dcmdp"
    """W&B project name."""
    threads: int = 0
    """torch CPU threads (0 = leave as is)."""
    max_staleness: int = 0
    """Asynchronous rollouts: 0 = synchronous (sample, then update, in one process); N >= 1 = a
    worker process owns the engine and samples ahead while the trainer updates, so a batch is up
    to N policy versions old (docs/concepts.md, "Asynchronous rollouts")."""
    recompute: str = "auto"
    """pi_old: auto = take it from the update's own first forward (detached) when there is one
    optimizer step per batch (optim.epochs = minibatches = grad_accum = 1), saving a forward pass;
    always = a separate no-grad forward before the update (needed for several optimizer steps)."""
    rollout_timeout_s: float = 600.0
    """With ``max_staleness >= 1``: stop the run when the rollout worker sends nothing this long
    (its start may take up to 300 s whatever this says)."""


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    multiplier: MultiplierConfig = field(default_factory=MultiplierConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def __post_init__(self) -> None:
        validate(self)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


SECTIONS: dict[str, type] = {f.name: f.default_factory for f in dataclasses.fields(Config)}  # type: ignore[misc]


def _choice(name: str, value: Any, allowed: typing.Iterable[Any]) -> None:
    allowed = list(allowed)
    if value not in allowed:
        raise ConfigError(f"{name}: {value!r} is not allowed; valid values: {', '.join(map(str, allowed))}")


def _positive(name: str, value: float, strict: bool = True) -> None:
    bad = not math.isfinite(value) or (value <= 0 if strict else value < 0)
    if bad:
        raise ConfigError(f"{name}: must be {'> 0' if strict else '>= 0'}, got {value!r}")


def _no_nan(name: str, value: Any) -> None:
    """NaN is no setting: it would pass range checks a field does not make (the PID gains of a
    dual-ascent run) and, never equal to itself, make the saved run refuse every resume."""
    if isinstance(value, float) and math.isnan(value):
        raise ConfigError(f"{name}: must be a number, got nan")
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _no_nan(f"{name}[{i}]", item)
    elif isinstance(value, dict):
        for key, item in value.items():
            _no_nan(f"{name}.{key}", item)


def validate(cfg: Config) -> None:
    for section in SECTIONS:
        for f in dataclasses.fields(getattr(cfg, section)):
            _no_nan(f"{section}.{f.name}", getattr(getattr(cfg, section), f.name))
    _choice("model.dtype", cfg.model.dtype, TRAINER_DTYPES)
    _choice("model.device", cfg.model.device, DEVICES)
    _choice("engine.type", cfg.engine.type, engine_names())
    _choice("engine.dtype", cfg.engine.dtype, DTYPES)
    _choice("loss.type", cfg.loss.type, sorted(POLICY_LOSSES))
    _choice("loss.correction", cfg.loss.correction, ["auto", *CORRECTIONS])
    _choice("loss.constraint", cfg.loss.constraint, ["auto", *CONSTRAINTS])
    _choice("loss.measure", cfg.loss.measure, MEASURES)
    composed = (cfg.loss.correction, cfg.loss.constraint, cfg.loss.measure) != ("auto", "auto", "prob_gap")
    if cfg.loss.type not in SHORTHANDS and composed:
        raise ConfigError(
            f"loss.type: {cfg.loss.type!r} is a loss registered under its own name; loss.correction, "
            f"loss.constraint and loss.measure compose only the built-in ones ({', '.join(SHORTHANDS)})"
        )
    parts = cfg.loss.composition()
    failed = parts is not None and parts[0] in COMPOSED_FAILURES and parts[1] != "none"
    if parts is not None and failed and not cfg.loss.allow_failed_composition:
        raise ConfigError(
            f"loss.correction={parts[0]} with loss.constraint={parts[1]}: refused, because "
            f"{COMPOSED_FAILURES[parts[0]]}, and no kappa tried made it hold (the other forms and measures "
            "were not run with it, and are refused on that evidence). Use the constraint alone "
            "(loss.correction=none), or tis, seq_mis or geo_mask with it, which held with the penalty form "
            "(docs/RESULTS.md, "
            "'The methods side by side under today's defaults'); to run it anyway, for a measurement, "
            "set loss.allow_failed_composition=true (a run saved with it needs it again to resume)"
        )
    if cfg.loss.constraint_share is not None:
        _positive("loss.constraint_share", cfg.loss.constraint_share, strict=False)
    _choice("loss.constraint_share_of", cfg.loss.constraint_share_of, ("gradient", "update"))
    _choice("loss.constraint_gap", cfg.loss.constraint_gap, ("engine", "total"))
    _choice("loss.constraint_samples", cfg.loss.constraint_samples, CONSTRAINT_SAMPLES)
    _choice("run.recompute", cfg.run.recompute, ("auto", "always"))
    if cfg.engine.sync_check_every < 0:
        raise ConfigError(
            f"engine.sync_check_every: must be >= 0 (0 = off), got {cfg.engine.sync_check_every}"
        )
    _positive("engine.sync_check_factor", cfg.engine.sync_check_factor)
    _positive("engine.sync_check_margin", cfg.engine.sync_check_margin, strict=False)
    _positive("engine.sync_check_first_max", cfg.engine.sync_check_first_max)
    if cfg.run.max_staleness < 0:
        raise ConfigError(f"run.max_staleness: must be >= 0 (0 = synchronous), got {cfg.run.max_staleness}")
    _positive("run.rollout_timeout_s", cfg.run.rollout_timeout_s)
    _choice("loss.agg", cfg.loss.agg, AGG_MODES)
    _choice("multiplier.type", cfg.multiplier.type, MULTIPLIER_TYPES)
    _choice("optim.schedule", cfg.optim.schedule, LR_SCHEDULES)
    _positive("sampling.temperature", cfg.sampling.temperature)
    if not 0 < cfg.sampling.top_p <= 1:
        raise ConfigError(f"sampling.top_p: must be in (0, 1], got {cfg.sampling.top_p}")
    for name in ("sampling.max_tokens", "run.steps", "run.prompts_per_step", "run.group_size"):
        section, key = name.split(".")
        value = getattr(getattr(cfg, section), key)
        if value < 1:
            raise ConfigError(f"{name}: must be >= 1, got {value}")
    if cfg.run.group_size < 2:
        raise ConfigError("run.group_size: GRPO needs at least 2 samples per prompt")
    _positive("optim.lr", cfg.optim.lr)
    _positive("multiplier.eta", cfg.multiplier.eta)
    if cfg.multiplier.tolerance is not None:
        _positive("multiplier.tolerance", cfg.multiplier.tolerance)
    _positive("multiplier.lam_min", cfg.multiplier.lam_min, strict=False)
    if cfg.multiplier.lam_max < cfg.multiplier.lam_min:
        raise ConfigError("multiplier.lam_max: must be >= multiplier.lam_min")
    if not cfg.multiplier.lam_min <= cfg.multiplier.init <= cfg.multiplier.lam_max:
        raise ConfigError("multiplier.init: must lie in [lam_min, lam_max]")
    _positive("loss.kl_coef", cfg.loss.kl_coef, strict=False)
    for name in ("optim.epochs", "optim.minibatches", "optim.grad_accum"):
        section, key = name.split(".")
        if getattr(getattr(cfg, section), key) < 1:
            raise ConfigError(f"{name}: must be >= 1")
    batch = cfg.run.prompts_per_step * cfg.run.group_size
    if cfg.loss.shaping_baseline and cfg.optim.grad_accum > 1:
        # the baseline is the token mean of the micro-batch the loss sees, not of the whole batch
        raise ConfigError(
            "loss.shaping_baseline: not supported with optim.grad_accum > 1 (the baseline would be "
            "each micro-batch's own mean, so accumulating would not equal one pass)"
        )
    if batch % (cfg.optim.minibatches * cfg.optim.grad_accum) != 0:
        raise ConfigError(
            f"optim.minibatches * optim.grad_accum = {cfg.optim.minibatches * cfg.optim.grad_accum} must "
            f"divide the rollout batch run.prompts_per_step * run.group_size = {batch}"
        )
    for name in ("run.eval_every", "run.checkpoint_every"):
        section, key = name.split(".")
        if getattr(getattr(cfg, section), key) < 0:
            raise ConfigError(f"{name}: must be >= 0 (0 = off)")
    _check_ranges(cfg)
    _check_loss_knobs(cfg)
    _check_multiplier(cfg)
    _check_task_options(cfg)


def _check_ranges(cfg: Config) -> None:
    """Numbers that would otherwise fail only after the model is loaded or the engine started."""
    if cfg.sampling.top_k < 0:
        raise ConfigError(f"sampling.top_k: must be >= 0 (0 = off), got {cfg.sampling.top_k}")
    if not all(0 <= b < 1 for b in cfg.optim.betas):
        raise ConfigError(f"optim.betas: each must be in [0, 1), got {list(cfg.optim.betas)}")
    _positive("optim.weight_decay", cfg.optim.weight_decay, strict=False)
    _positive("optim.grad_clip", cfg.optim.grad_clip, strict=False)
    _positive("engine.kv_cache_gb", cfg.engine.kv_cache_gb)
    m = cfg.multiplier
    if m.ema is not None and not 0 <= m.ema < 1:
        raise ConfigError(f"multiplier.ema: must be in [0, 1) or null, got {m.ema}")
    if not 0 <= m.auto_quantile <= 1:
        raise ConfigError(f"multiplier.auto_quantile: must be in [0, 1], got {m.auto_quantile}")
    if m.auto_warmup_steps < 1:
        raise ConfigError(f"multiplier.auto_warmup_steps: must be >= 1, got {m.auto_warmup_steps}")
    _positive("multiplier.auto_multiple", m.auto_multiple)
    _positive("multiplier.tolerance_floor", m.tolerance_floor, strict=False)
    if cfg.run.eval_problems < 1:
        raise ConfigError(f"run.eval_problems: must be >= 1, got {cfg.run.eval_problems}")
    if cfg.engine.max_model_len <= cfg.sampling.max_tokens:
        raise ConfigError(
            f"engine.max_model_len ({cfg.engine.max_model_len}) must exceed sampling.max_tokens "
            f"({cfg.sampling.max_tokens}): it holds the prompt and the response"
        )
    _check_fp32_modules(cfg.engine)
    allowed = ENGINE_QUANTIZATIONS.get(cfg.engine.type)
    if cfg.engine.quantization is not None and allowed is not None and cfg.engine.quantization not in allowed:
        raise ConfigError(
            f"engine.quantization: {cfg.engine.quantization!r} is not allowed for engine.type="
            f"{cfg.engine.type}; valid values: {', '.join(allowed)} or null"
        )
    if cfg.model.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ConfigError("model.device: 'cuda' but no CUDA device is visible (use auto or cpu)")


def _check_loss_knobs(cfg: Config) -> None:
    # The trainer builds these LossSettings at every step; a bad knob fails here instead.
    try:
        cfg.loss.settings()
    except ValueError as exc:
        raise ConfigError(str(exc).replace("LossSettings.", "loss.")) from None


def _check_multiplier(cfg: Config) -> None:
    # The trainer builds this multiplier once the model is loaded; every check it makes runs here.
    try:
        build_multiplier(cfg.multiplier)
    except ValueError as exc:
        raise ConfigError(f"multiplier: {exc}") from None


def _check_fp32_modules(e: EngineConfig) -> None:
    from dcmdp.engines.precision import check_group_labels, fp32_modules_problem

    try:
        labels = check_group_labels(e.fp32_modules)
    except ValueError as exc:
        raise ConfigError(f"engine.fp32_modules: {exc}") from None
    problem = fp32_modules_problem(e.type, labels)
    if problem:
        raise ConfigError(f"engine.fp32_modules: {problem}")


def _check_task_options(cfg: Config) -> None:
    """The task name and its option names (cheap: nothing is read; see :func:`build_task`)."""
    _choice("task.name", cfg.task.name, sorted(TASKS))
    valid = task_options(cfg.task.name)
    unknown = sorted(set(cfg.task.options) - set(valid))
    if unknown:
        raise ConfigError(
            f"task.options: task {cfg.task.name!r} has no option(s) {', '.join(map(repr, unknown))}; "
            f"valid options: {', '.join(valid) or '(none)'}"
        )
    missing = [k for k, d in valid.items() if d is inspect.Parameter.empty and k not in cfg.task.options]
    if missing:
        raise ConfigError(
            f"task.options: task {cfg.task.name!r} needs option(s) "
            + ", ".join(f"{k} (task.options.{k}=...)" for k in missing)
        )


def build_task(cfg: Config) -> Task:
    """Build the config's task and draw one problem of each split the trainer uses.

    A bad option value or a data file whose usable rows leave a split empty raises ``ConfigError``
    here, so ``train`` can call it before any model is loaded.
    """
    try:
        task = make_task(cfg.task.name, **cfg.task.options)
        task.problems("train", 1, seed=cfg.run.seed)
        task.problems("eval", 1, seed=cfg.run.seed + 10_000)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"task.options: {' '.join(str(exc).split())}") from None
    return task


def _section_from_dict(section: str, data: Any) -> Any:
    cls = SECTIONS[section]
    if not isinstance(data, dict):
        raise ConfigError(f"{section}: expected a mapping of fields, got {data!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in known:
            raise ConfigError(f"{section}.{key}: unknown field; valid fields: {', '.join(sorted(known))}")
        kwargs[key] = coerce_value(f"{section}.{key}", value, hints[key])
    return cls(**kwargs)


def config_from_dict(data: dict[str, Any]) -> Config:
    unknown = set(data) - set(SECTIONS)
    if unknown:
        raise ConfigError(f"{sorted(unknown)[0]}: unknown section; valid sections: {', '.join(SECTIONS)}")
    return Config(**{name: _section_from_dict(name, data.get(name, {}) or {}) for name in SECTIONS})


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``section.field=value`` strings (values parsed as YAML scalars) to a config dict."""
    out = {k: copy.deepcopy(v) if v is not None else {} for k, v in data.items()}
    for item in overrides:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise ConfigError(f"override {item!r}: expected section.field=value, e.g. optim.lr=3e-4")
        key, raw = item.split("=", 1)
        section, name = key.split(".", 1)
        if section not in SECTIONS:
            raise ConfigError(f"{key}: unknown section {section!r}; valid sections: {', '.join(SECTIONS)}")
        if not isinstance(out.setdefault(section, {}), dict):
            raise ConfigError(f"{section}: expected a mapping of fields, got {out[section]!r}")
        value = yaml.safe_load(raw) if raw != "" else ""
        if section == "task" and name.startswith("options."):
            options = out["task"].get("options") or {}
            if not isinstance(options, dict):
                raise ConfigError(f"task.options: expected a mapping, got {options!r}")
            out["task"]["options"] = {**options, name.split(".", 1)[1]: value}
        else:
            out[section][name] = value
    return out


def cautions(cfg: Config) -> list[str]:
    """Settings that are valid but were measured to fail, one line each, for the trainer to print
    when a run starts (the run goes ahead: a measurement on one task and model, not a rule)."""
    out = []
    parts = cfg.loss.composition()
    if parts is not None and cfg.loss.composed():
        on_update = cfg.loss.constraint_share_of == "update"
        small = 0 < cfg.loss.share() <= COMPOSED_SHARE
        if not (on_update and small):
            advice = [] if on_update else ["loss.constraint_share_of=update"]
            if not small:
                advice.append("loss.constraint_share unset (or at most 0.25)")
            out.append(
                f"loss.correction={parts[0]} with a constraint: DCMDP + TIS collapsed in 3 of 5 long-response "
                f"runs with the update bound at kappa 0.5 (and in the one run without it), and held in 9 of 9 "
                f"with loss.constraint_share={COMPOSED_SHARE}, the default for a composed loss (kappa chosen on "
                f"one seed; measured with TIS and the penalty form: docs/RESULTS.md); consider "
                + " and ".join(advice)
            )
    if parts is not None and parts[0] in COMPOSED_FAILURES and parts[1] != "none":
        out.append(
            f"loss.correction={parts[0]} with a constraint: {COMPOSED_FAILURES[parts[0]]}, with the "
            f"penalty form, where at loss.constraint_share={COMPOSED_SHARE} DCMDP + TIS held in 9 of 9, "
            "DCMDP + seq-MIS in 3 of 3 and DCMDP + geo_mask in 9 of 9 (docs/RESULTS.md); a smaller "
            "loss.constraint_share is no remedy: consider one of those, or the constraint alone"
        )
    m = cfg.multiplier
    if cfg.loss.type not in SHORTHANDS and not cfg.loss.uses_multiplier():
        measured = None
        if m.tolerance is None:
            measured = "multiplier.tolerance=null"
        elif m.tolerance_floor > 0:
            measured = f"multiplier.tolerance_floor={m.tolerance_floor}"
        if measured is not None:
            out.append(
                f"{measured} with loss.type={cfg.loss.type}, registered without uses_multiplier: the "
                "multiplier is stepped only for losses that read lambda, so this c is never measured and a "
                "loss reading LossSettings.tolerance gets "
                + ("a placeholder (hinge off)" if m.tolerance is None else f"{m.tolerance} unraised")
                + "; register it with uses_multiplier=True if it reads c"
            )
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    data = read_config_file(path) if path is not None else {}
    return config_from_dict(apply_overrides(data, overrides or []))


# Fields a resumed run may change: where and how it runs, how long, and what it reports. Any
# other change (loss, task, model, engine, sampling, optimizer, multiplier, seed, batch shape)
# would make the resumed run a different experiment than the one its first steps belong to.
#: Fields whose default changed after runs were saved without them: a saved config.yaml that lacks
#: one resumes with the value that run trained with (the guard was off before it existed).
DEFAULTS_BEFORE: dict[str, dict[str, Any]] = {
    "multiplier": {"reward_guard": 0.0, "tolerance_floor": 0.0},
    # the update bound became the default in issue 13; seq_tis and opsm composed with a constraint
    # were allowed (with a caution) until the config refused them
    "loss": {"constraint_share": 0.0, "constraint_share_of": "gradient", "allow_failed_composition": True},
}
#: What a saved ``loss.constraint_share: null`` stood for in a run saved before runs wrote their
#: resolved kappa out (:func:`run_config_text`): 0.5 for a constraint alone (:data:`DEFAULT_SHARE`),
#: :data:`COMPOSED_SHARE` for a composed loss. Runs saved since write the number itself. (Runs
#: started by commits 3ab01d9 to 5937531, on 2026-12-04 when the default alone was
#: 0.25, saved null and trained a constraint alone at 0.25: resume those with
#: ``loss.constraint_share=0.25``.)
SHARE_ALONE_BEFORE = 0.5
#: The file in a training run's directory that says what the run started from
#: (:func:`dcmdp.pretrain.warm_start_record`).
WARM_START_FILE = "warm_start.json"
#: Named models whose meaning changed, and the name of what they stood for before: a run that
#: named "long-addition" and has no ``warm_start.json`` (every run writes one since the change,
#: issue 13's session 21) most likely started from today's "long-addition-cap2000" (not certainly:
#: for about an hour of session 20 the name had a cap of 3,500 too). A resume of such a run may
#: change its model.path to that name (experiments/run.py does), and the trainer says so when it
#: keeps the old name.
RENAMED_BEFORE = {"long-addition": "long-addition-cap2000"}

RESUME_CHANGEABLE = (
    "run.steps",
    "run.out_dir",
    "run.eval_every",
    "run.eval_problems",
    "run.eval_sampled",
    "run.checkpoint_every",
    "run.keep_checkpoints",
    "run.tensorboard",
    "run.wandb",
    "run.wandb_project",
    "run.threads",
    "run.rollout_timeout_s",
    "model.device",
    "engine.kv_cache_gb",
    "engine.sync_check_every",
    "engine.sync_check_factor",
    "engine.sync_check_margin",
    "engine.sync_check_first_max",
    # a permission, not a setting: what the run trains is the composition, which cannot change
    "loss.allow_failed_composition",
)


@dataclass(frozen=True)
class Change:
    """One field that differs between a run's saved config and the config it resumes with."""

    field: str
    old: Any
    new: Any

    def __str__(self) -> str:
        return f"{self.field}: {_show(self.old)} -> {_show(self.new)}"


def _show(value: Any) -> str:
    text = yaml.safe_dump(_plain(value), default_flow_style=True, width=float("inf"))
    return text.strip().removesuffix("...").strip()


def _plain(value: Any) -> Any:
    """``value`` with tuples as lists, as YAML writes it: a tuple and a list of the same items are
    one setting (a config built in Python may hold either)."""
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def config_changes(old: Config, new: Config) -> list[Change]:
    """The fields whose values differ, as ``section.field`` in config order."""
    a, b = old.to_dict(), new.to_dict()
    return [
        Change(f"{section}.{key}", a[section][key], b[section][key])
        for section in SECTIONS
        for key in a[section]
        if _plain(a[section][key]) != _plain(b[section][key])
    ]


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for section, fields_ in top.items():
        if not isinstance(fields_, dict) or not isinstance(out.get(section), dict):
            out[section] = copy.deepcopy(fields_)
            continue
        for key, value in fields_.items():
            if key == "options" and isinstance(value, dict) and isinstance(out[section].get(key), dict):
                out[section][key] = {**out[section][key], **value}
            else:
                out[section][key] = value
    return out


def saved_run_config(out_dir: Path, how: str = "--resume") -> Config:
    """The config a run in ``out_dir`` was saved with (its ``config.yaml``), for resuming it.

    Fields the run saved before they existed take the values they stood for then
    (:data:`DEFAULTS_BEFORE`). A missing or invalid file raises ``ConfigError``.
    """
    saved_path = out_dir / "config.yaml"
    if not saved_path.is_file():
        what = "no such directory" if not out_dir.is_dir() else "it holds no config.yaml"
        raise ConfigError(
            f"{how}: cannot resume {out_dir} ({what}); pass run.out_dir=DIR of a run started by `dcmdp train`"
        )
    try:
        saved_data = read_config_file(saved_path)
        for section, values in DEFAULTS_BEFORE.items():  # fields a run saved before they existed
            existing = saved_data.get(section)
            if existing is None or isinstance(existing, dict):
                saved_data[section] = {**values, **(existing or {})}
        saved = config_from_dict(saved_data)
        if saved.loss.constraint_share is None:  # saved with null: the kappa null meant then
            saved.loss.constraint_share = COMPOSED_SHARE if saved.loss.composed() else SHARE_ALONE_BEFORE
        return saved
    except (ConfigError, yaml.YAMLError) as exc:
        raise ConfigError(
            f"{how}: {saved_path} is not a valid config: {' '.join(str(exc).split())} "
            "(edit that file to resume; overrides apply after it is read)"
        ) from None


def renamed_before(saved: Config, out_dir: Path) -> bool:
    """Whether the run in ``out_dir`` named a model whose name changed meaning (:data:`RENAMED_BEFORE`)
    before runs kept a ``warm_start.json``."""
    return saved.model.path in RENAMED_BEFORE and not (out_dir / WARM_START_FILE).exists()


def check_resume(saved: Config, cfg: Config, out_dir: Path, how: str = "--resume") -> list[Change]:
    """What resuming the run saved as ``saved`` with ``cfg`` changes; raises ``ConfigError`` (one
    line, naming ``how`` the run was resumed) when a change alters what the run trains: a field
    outside :data:`RESUME_CHANGEABLE`. The multiplier's fields count for every loss: a run without
    a constraint still checkpoints the multiplier's state, whose shape they set."""
    changes = config_changes(saved, cfg)
    refused = [c for c in changes if c.field not in RESUME_CHANGEABLE]
    if renamed_before(saved, out_dir) and cfg.model.path == RENAMED_BEFORE[saved.model.path]:
        refused = [c for c in refused if c.field != "model.path"]  # naming what the old name meant
    # null and the kappa it stands for are the same run: only a change of the resolved kappa counts,
    # and only for a loss with a constraint (without one the bound is never built)
    refused = [
        c
        for c in refused
        if not (
            c.field == "loss.constraint_share"
            and (saved.loss.share() == cfg.loss.share() or not cfg.loss.uses_multiplier())
        )
    ]
    # A cosine schedule's length is the run's length: extending the run would restart its decay.
    if cfg.optim.schedule == "cosine":
        refused += [c for c in changes if c.field == "run.steps"]
    if refused:
        from dcmdp.checkpoint import latest_checkpoint

        ckpt = latest_checkpoint(out_dir) or out_dir / "checkpoints" / "step_NNNNNN"
        kappa = ""
        if any(c.field == "loss.constraint_share" for c in refused):
            kappa = (
                f" (the run trained at kappa {saved.loss.share()}; a config.yaml saved with "
                f"loss.constraint_share: null, before runs wrote the number, reads as {SHARE_ALONE_BEFORE} "
                f"for a constraint alone and {COMPOSED_SHARE} composed: set loss.constraint_share="
                f"{saved.loss.share()} or leave it out)"
            )
        message = (
            f"{how} refuses to change what the run in {out_dir} trains: "
            f"{'; '.join(map(str, refused))}{kappa}. The run keeps its saved config.yaml; drop the change, "
            f"or start a new run from its checkpoint (model.path={ckpt} run.out_dir=NEW_DIR)"
        )
        raise ConfigError(" ".join(message.split()))  # one line, whatever the values hold
    return changes


def load_resume_config(
    path: str | Path | None = None, overrides: list[str] | None = None
) -> tuple[Config, list[Change]]:
    """The config to resume a run with, and what the command line changed in it.

    The run directory is ``run.out_dir`` of ``path`` and ``overrides`` (the default otherwise). Its
    saved ``config.yaml`` is the base; the fields of ``path`` and then ``overrides`` apply on top.
    A change to a field outside :data:`RESUME_CHANGEABLE` raises ``ConfigError``.
    """
    top = apply_overrides(read_config_file(path) if path is not None else {}, overrides or [])
    run_top = top.get("run") or {}
    out_dir = Path(str(run_top.get("out_dir", RunConfig.out_dir)))
    saved = saved_run_config(out_dir)
    merged = _merge(dataclasses.asdict(saved), top)
    merged["run"]["out_dir"] = str(out_dir)  # the directory resumed, wherever the run first lived
    cfg = config_from_dict(merged)
    return cfg, check_resume(saved, cfg, out_dir)


def run_config_text(cfg: Config) -> str:
    """The ``config.yaml`` a run saves: its config with ``loss.constraint_share`` resolved
    (``LossConfig.share()``) where it is null, so that a later change of the default cannot change
    what resuming the run trains."""
    if cfg.loss.constraint_share is None:
        cfg = dataclasses.replace(cfg, loss=dataclasses.replace(cfg.loss, constraint_share=cfg.loss.share()))
    return dump_config(cfg)


def dump_config(cfg: Config) -> str:
    def plain(v: Any) -> Any:
        if isinstance(v, tuple):
            return list(v)
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return yaml.safe_dump({k: plain(v) for k, v in cfg.to_dict().items()}, sort_keys=False)
