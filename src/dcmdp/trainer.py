"""The DCMDP training loop (one readable function of named steps; the math lives elsewhere).

Per step (:func:`train_step`; see ../docs/concepts.md):
  1. rollout    the engine samples G completions for each of P prompts, with log-probs mu
  2. score      the task's verifiable reward per completion
  3. advantages GRPO group normalisation
  4. recompute  the trainer's log-probs pi_old of the same tokens (same sampling processing)
  5. measure    discrepancy between pi_old and mu (D = mean probability gap, and the rest)
  6. update     minibatch gradient steps on the configured policy loss, lambda as a number
  7. dual step  lambda <- clip(lambda + eta (D - c), lambda_min, lambda_max), on the D of step 5
  8. sync       push the new weights to the engine, in memory
  9. eval       accuracy on the deployment engine every N steps
 10. log and checkpoint

Steps 1-2 and 8 go through a :class:`~dcmdp.rollout.RolloutSource` ("next batch / publish
weights"): :class:`~dcmdp.rollout.SyncRollout` by default, or, with ``run.max_staleness >= 1``,
:class:`~dcmdp.rollout.pipeline.AsyncRollout`, whose worker process samples ahead while the
update runs; a stale batch's engine gap and staleness gap are then measured apart (step 5).
A step reads a :class:`TrainState`; the update reads its :class:`Learner`. What the loop builds
from the config is in :mod:`dcmdp.run_setup`, what it writes in :mod:`dcmdp.run_log`.

Size: about 640 lines, over the 500 we aim for: the loop, its update, its crash-safe resume and
the bookkeeping of stale batches read best in one file; the helpers it calls live in
run_setup.py, run_log.py and rollout/pipeline.py.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, overload

import torch
from safetensors import SafetensorError

from dcmdp.algo.advantages import grpo_advantages
from dcmdp.algo.discrepancy import discrepancy_metrics, fill_masked
from dcmdp.algo.guard import GuardedMultiplier
from dcmdp.algo.losses import MEASURES, LossInputs, LossSettings, kl_to_reference_k3
from dcmdp.algo.multiplier import Multiplier
from dcmdp.checkpoint import (
    MetricsLog,
    latest_checkpoint,
    load_failure,
    load_trainer_state,
    random_states,
    save_checkpoint,
    set_random_states,
    unreadable,
)
from dcmdp.config import (
    RENAMED_BEFORE,
    WARM_START_FILE,
    Config,
    ConfigError,
    build_task,
    cautions,
    check_resume,
    renamed_before,
    run_config_text,
    saved_run_config,
    validate,
)
from dcmdp.engines.base import SamplingSettings, make_engine
from dcmdp.grad_share import ConstraintGradients, KappaMismatchError, ShareBoundedAdamW, as_adamw_state
from dcmdp.models import load_model, load_tokenizer, resolve_device
from dcmdp.rollout import (
    Rollout,
    RolloutSource,
    TokenBatch,
    build_token_batch,
    drop_trainer_impossible,
    rollout,
    sequence_logprobs,
    set_compute_dtype,
)
from dcmdp.rollout.pipeline import PolicyVersions
from dcmdp.run_log import (
    emit,
    final_summary,
    impossible_tokens_warning,
    open_writers,
    step_line,
    step_metrics,
    unreachable_tolerance,
    unwrap_auto,
)
from dcmdp.run_setup import (
    Logger,
    engine_label,
    engine_spec,
    loss_settings,
    lr_lambda,
    make_source,
    multiplier_from_config,
    resolve_base_model,
    sampling_settings,
)
from dcmdp.sync_check import SyncCheckSettings, SyncVerifier
from dcmdp.tasks import make_task

#: The metric the dual step reads with the default measure (``loss.measure=prob_gap``): D between
#: pi_old (the trainer before this step's update) and the engine's mu, on the step's own samples
#: (step 5). Not ``dcmdp/prob_gap`` of the loss, which is measured with the policy being updated.
#: Another measure reads its own ``discrepancy/*`` metric: :func:`dual_step_key`.
DUAL_STEP_READS = "discrepancy/prob_gap_mean"


def dual_step_key(cfg: Config) -> str:
    """The ``discrepancy/*`` metric the dual step compares with c: that of ``loss.measure``."""
    return MEASURES[cfg.loss.measure].discrepancy_key


def gap_key(cfg: Config) -> str:
    """The metric the dual step reads: :func:`dual_step_key`, or its ``total/*`` twin when stale
    rollouts constrain the total gap (``loss.constraint_gap=total``)."""
    key = dual_step_key(cfg)
    if cfg.run.max_staleness > 0 and cfg.loss.constraint_gap == "total":
        return "total/" + key.removeprefix("discrepancy/")
    return key


class DivergenceError(RuntimeError):
    """The loss or a gradient became NaN / inf; the run stops and keeps its last good checkpoint."""


@dataclass
class Learner:
    """The trainer side of a run: the policy and what updates it. Built once by :func:`train`."""

    cfg: Config
    model: torch.nn.Module
    ref_model: torch.nn.Module | None
    """The frozen initial policy of the KL term, or None when ``loss.kl_coef`` is 0."""
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    sampling: SamplingSettings
    """The engine's sampling processing, which the trainer's log-probs follow."""
    generator: torch.Generator
    """Shuffles the minibatches (seeded, checkpointed)."""


@dataclass
class TrainState:
    """Everything a training step works with. Built once by :func:`train`."""

    learner: Learner
    source: RolloutSource
    """Where rollouts come from and new weights go (``SyncRollout`` or ``AsyncRollout``)."""
    tokenizer: Any
    multiplier: Multiplier
    versions: PolicyVersions | None = None
    """With stale rollouts (``run.max_staleness >= 1``): the policy versions a batch may come from."""

    @property
    def cfg(self) -> Config:
        return self.learner.cfg


@dataclass
class UpdateBatch:
    """What the update reads from a step: the batch, pi_old, the reference log-probs, advantages."""

    batch: TokenBatch
    old_logp_BT: torch.Tensor
    ref_logp_BT: torch.Tensor | None
    advantages_N: torch.Tensor
    constraint_engine_logp_BT: torch.Tensor | None = None
    """What the constraint compares with when not mu (stale batches, ``loss.constraint_gap=engine``)."""
    logp_BT: torch.Tensor | None = None
    """The update's forward already taken (with grad) when pi_old came from it (:func:`reuses_forward`)."""


@contextmanager
def timed(times: dict[str, float], name: str) -> Iterator[None]:
    """Record the seconds the block takes as ``times[name]``."""
    t0 = time.perf_counter()
    try:
        yield
    finally:
        times[name] = time.perf_counter() - t0


# ----------------------------------------------------------------------------- the loop


def trainer_model(path: Any, dtype: str, device: str) -> torch.nn.Module:
    """The trainer's model at ``model.dtype``: float32 / bfloat16 weights in that dtype; float16 as
    float32 weights (and optimizer state) whose every forward and backward runs in float16
    (:func:`dcmdp.rollout.logprobs.set_compute_dtype`)."""
    if dtype == "float16":
        return set_compute_dtype(load_model(path, dtype=torch.float32, device=device), torch.float16)
    model: torch.nn.Module = load_model(path, dtype=getattr(torch, dtype), device=device)
    return model


def checkpoint_model(ckpt: Path, dtype: str, device: str) -> torch.nn.Module:
    """:func:`trainer_model` from checkpoint ``ckpt``; a weights or config file that will not load,
    or weights that hold a NaN or inf, raise :class:`CheckpointError` (other errors, such as
    running out of memory, pass through: they say nothing about the checkpoint)."""
    try:
        model = trainer_model(ckpt, dtype, device)
    except (OSError, EOFError, ValueError, SafetensorError) as exc:  # ValueError: a torn config.json
        raise unreadable(ckpt, load_failure("model weights", exc)) from exc
    for name, p in model.named_parameters():
        if not bool(torch.isfinite(p).all()):
            raise unreadable(ckpt, f"model weights: {name} holds a NaN or inf")
    return model


def bounds_update(cfg: Config) -> bool:
    """Whether the run bounds the constraint's share of the optimizer's step (``ShareBoundedAdamW``)."""
    return cfg.loss.share() > 0 and cfg.loss.uses_multiplier() and cfg.loss.constraint_share_of == "update"


def constraint_gradients(cfg: Config, model: torch.nn.Module) -> ConstraintGradients | None:
    """The buffer that keeps the constraint's gradient apart (for either share bound), None when
    the bound is off or the loss has no constraint."""
    if cfg.loss.share() > 0 and cfg.loss.uses_multiplier():
        return ConstraintGradients(model.parameters(), cfg.loss.share())
    return None


def make_optimizer(cfg: Config, model: torch.nn.Module) -> torch.optim.Optimizer:
    """AdamW, or with ``loss.constraint_share_of=update`` the AdamW that bounds the constraint's step."""
    if bounds_update(cfg):
        return ShareBoundedAdamW(
            model.parameters(),
            lr=cfg.optim.lr,
            betas=cfg.optim.betas,
            weight_decay=cfg.optim.weight_decay,
            kappa=cfg.loss.share(),
        )
    return torch.optim.AdamW(
        model.parameters(), lr=cfg.optim.lr, betas=cfg.optim.betas, weight_decay=cfg.optim.weight_decay
    )


def trained_steps(run_dir: Path) -> list[int]:
    """The steps a run in ``run_dir`` logged as trained (its metrics.jsonl's train rows)."""
    from dcmdp.checkpoint import read_metrics

    return [r["step"] for r in read_metrics(run_dir / "metrics.jsonl") if r.get("kind") == "train"]


def train(cfg: Config, resume: bool = False, log: Logger = print) -> dict[str, Any]:
    """Run (or resume) a training job; returns a summary with accuracy before and after."""
    validate(cfg)  # again: a Config's fields can be set after it was built
    run_dir = Path(cfg.run.out_dir)
    if resume and (run_dir / "config.yaml").is_file():  # the CLI's --resume checked this already
        how = "train(resume=True)"
        check_resume(saved_run_config(run_dir, how), cfg, run_dir, how)
    if resume and renamed_before(cfg, run_dir):
        log(
            f"note: this run was saved naming model.path={cfg.model.path} before that name's warm start "
            f"changed (issue 13, session 21); it most likely started from what is now "
            f"{RENAMED_BEFORE[cfg.model.path]}: resume with model.path={RENAMED_BEFORE[cfg.model.path]} "
            "to keep that one"
        )
    ckpt = latest_checkpoint(run_dir) if resume else None
    if not resume and (run_dir / "metrics.jsonl").exists():
        raise FileExistsError(
            f"{run_dir} already holds a run; pass --resume to continue it or choose another run.out_dir"
        )
    done = int(ckpt.name.split("_")[1]) if ckpt is not None else 0
    if ckpt is not None and done > cfg.run.steps:
        raise ConfigError(f"run.steps={cfg.run.steps}: the run in {run_dir} is already at step {done}")
    if ckpt is None and resume:  # no checkpoint: the log says how far it got
        logged = trained_steps(run_dir)
        if logged and max(logged) >= cfg.run.steps:
            if (run_dir / "checkpoints").is_dir():  # it saved checkpoints, the last one at its end
                raise ConfigError(
                    f"the run in {run_dir} logged step {max(logged)} but its checkpoints folder holds "
                    "no complete checkpoint, so its final weights are gone; start a new run (another "
                    "run.out_dir), or move metrics.jsonl away to train this one again from step 0"
                )
            done = max(logged)
    if done >= cfg.run.steps and (ckpt is not None or done > 0):
        log(
            f"{run_dir} already finished (step {done} of run.steps={cfg.run.steps}); to extend it, raise run.steps"
        )
        return {"run_dir": str(run_dir), "finished": True, "step": done}
    # a damaged checkpoint fails here, before any model is loaded or the saved config is rewritten
    state = load_trainer_state(ckpt) if ckpt is not None else None
    build_task(cfg)  # a bad task option or data file fails here, before any model is loaded
    base_path = resolve_base_model(cfg, log)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"run.out_dir: cannot create {run_dir} ({exc.strerror or exc})") from None
    if cfg.run.threads > 0:
        torch.set_num_threads(cfg.run.threads)
    if not resume:  # a fresh run replaces whatever config an earlier failed start left
        (run_dir / "config.yaml").write_text(run_config_text(cfg))
    if ckpt is None:  # what the run starts from, so results can be paired only across one warm start
        from dcmdp.pretrain import warm_start_record

        record = warm_start_record(cfg.model.path, base_path)
        (run_dir / WARM_START_FILE).write_text(json.dumps(record, indent=1) + "\n")

    tokenizer = load_tokenizer(base_path)
    device = resolve_device(cfg.model.device)
    if ckpt is None:
        model = trainer_model(base_path, cfg.model.dtype, device)
    else:
        model = checkpoint_model(ckpt, cfg.model.dtype, device)
    ref_model = trainer_model(base_path, cfg.model.dtype, device).eval() if cfg.loss.kl_coef > 0 else None
    task = make_task(cfg.task.name, **cfg.task.options)
    from dcmdp.models import eos_token_ids

    sampling = sampling_settings(cfg, eos_token_ids(base_path, tokenizer))
    greedy = SamplingSettings(1.0, 1.0, 1, cfg.sampling.max_tokens, sampling.stop_token_ids)
    optimizer = make_optimizer(cfg, model)
    total_updates = cfg.run.steps * cfg.optim.epochs * cfg.optim.minibatches
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, total_updates))
    multiplier = multiplier_from_config(cfg.multiplier, update_bound=bounds_update(cfg))
    generator = torch.Generator().manual_seed(cfg.run.seed)
    metrics_log = MetricsLog(run_dir / "metrics.jsonl")
    start_step = 0
    torch.manual_seed(cfg.run.seed)
    if state is not None:
        assert ckpt is not None
        saved = state["optimizer"]
        try:
            # the two optimizers' states cross (the bound turned on or off between runs of one job)
            optimizer.load_state_dict(
                saved if isinstance(optimizer, ShareBoundedAdamW) else as_adamw_state(saved)
            )
            scheduler.load_state_dict(state["scheduler"])
            multiplier.load_state_dict(state["multiplier"])
            generator.set_state(state["generator"])
            set_random_states(state["random"])
            start_step = int(state["step"])
        except KappaMismatchError as exc:  # every checkpoint of the run holds the same kappa
            raise ConfigError(f"cannot resume {run_dir}: {exc}") from None
        except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as exc:
            raise unreadable(ckpt, load_failure("trainer_state.pt", exc)) from exc
        dropped = metrics_log.truncate_after(start_step)
        log(f"resumed from {ckpt} at step {start_step} (dropped {dropped} log rows written after it)")
    elif resume:
        metrics_log.truncate_after(-1)
        log(f"no complete checkpoint in {run_dir}; starting from step 0")
    if resume:  # once the checkpoint has loaded: a resume that fails leaves the run's config as it was
        (run_dir / "config.yaml").write_text(run_config_text(cfg))
    writers = open_writers(cfg, run_dir)

    eval_problems = task.problems("eval", cfg.run.eval_problems, seed=cfg.run.seed + 10_000)
    log(f"engine: {engine_label(cfg)} | trainer {cfg.model.dtype}")
    for line in cautions(cfg):
        log(f"caution: {line}")
    learner = Learner(cfg, model, ref_model, optimizer, scheduler, sampling, generator)
    versions = PolicyVersions(cfg.run.max_staleness + 1) if cfg.run.max_staleness > 0 else None
    summary: dict[str, Any] = {"run_dir": str(run_dir)}
    source: RolloutSource | None = None
    try:
        # make_engine through this module, so tests can replace it (dcmdp.trainer.make_engine)
        source = make_source(cfg, base_path, tokenizer, sampling, model, start_step, log, make_engine)
        run = TrainState(learner, source, tokenizer, multiplier, versions)
        verifier = sync_verifier(cfg, task, tokenizer)
        if verifier is not None and ckpt is None:  # the engine loaded these very weights itself
            floor = verifier.measure_floor(source, model, tokenizer.pad_token_id)
            log(f"weight-sync check: engine floor before any sync {floor:.2e} nats/token")
        t_sync = time.perf_counter()
        source.publish_weights(model.named_parameters())
        if versions is not None:
            versions.save(start_step, model)
        log(f"initial weight sync {time.perf_counter() - t_sync:.2f}s")

        def check_sync(step: int, first: bool) -> dict[str, float]:
            if verifier is None or not verifier.due(step, first):
                return {}
            t0 = time.perf_counter()
            out = verifier.check(step, source, model, tokenizer.pad_token_id)
            out["time/sync_check"] = time.perf_counter() - t0
            return out

        first_check = check_sync(start_step, first=True)
        if first_check:
            log(
                f"weight-sync check after the initial sync: probe gap {first_check['sync/abs_log_ratio']:.2e} "
                f"nats/token (floor {first_check['sync/floor']:.2e})"
            )

        def run_eval(step: int) -> dict[str, float]:
            row = source.evaluate(
                eval_problems, greedy, sampling if cfg.run.eval_sampled else None, cfg.run.seed + 20_000
            )
            emit(metrics_log, writers, {"kind": "eval", "step": step, **row})
            return row

        recent_d: list[float] = []
        warned = warned_impossible = False
        if start_step == 0 and cfg.run.eval_every:
            before = run_eval(0)
            log(f"step 0 eval: greedy accuracy {before['eval/accuracy_greedy']:.3f}")
        for step in range(start_step + 1, cfg.run.steps + 1):
            row = train_step(run, step)
            row.update(check_sync(step, first=False))
            emit(metrics_log, writers, {"kind": "train", "step": step, **row})
            d_read = row.get(gap_key(cfg), math.nan)
            if math.isfinite(d_read):
                recent_d.append(d_read)
            auto = unwrap_auto(multiplier)
            floor = auto is not None and auto.at_least is not None
            c_now = None if auto is not None and auto.warming_up else multiplier.tolerance
            warning = unreachable_tolerance(recent_d, c_now, cfg.loss.uses_multiplier(), floor=floor)
            if warning is not None and not warned:
                log(warning)
                warned = True
            impossible = impossible_tokens_warning(row["discrepancy/trainer_impossible_seq_frac"])
            if impossible is not None and not warned_impossible:
                log(impossible)
                warned_impossible = True
            log(step_line(cfg, step, row, multiplier))
            if cfg.run.eval_every and (step % cfg.run.eval_every == 0 or step == cfg.run.steps):
                ev = run_eval(step)
                log(f"step {step} eval: greedy accuracy {ev['eval/accuracy_greedy']:.3f}")
            if cfg.run.checkpoint_every and (step % cfg.run.checkpoint_every == 0 or step == cfg.run.steps):
                state = {
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "multiplier": multiplier.state_dict(),
                    "generator": generator.get_state(),
                    "random": random_states(),
                    "step": step,
                }
                save_checkpoint(run_dir, step, model, tokenizer, state, keep=cfg.run.keep_checkpoints)
        summary.update(final_summary(run_dir, multiplier, cfg.loss.uses_multiplier()))
    finally:
        if source is not None:
            source.close()
        for w in writers:
            w.close()
    return summary


def sync_verifier(cfg: Config, task: Any, tokenizer: Any) -> SyncVerifier | None:
    """The weight-sync check of ``engine.sync_check_*`` (None when off): a fixed probe of a few
    eval prompts, scored by the engine after a sync and by the trainer."""
    e = cfg.engine
    if e.sync_check_every == 0:
        return None
    settings = SyncCheckSettings(
        e.sync_check_every, e.sync_check_factor, e.sync_check_margin, e.sync_check_first_max
    )
    problems = task.problems("eval", settings.num_prompts, seed=settings.seed)
    prompts = [tokenizer.encode(p.prompt, add_special_tokens=False) for p in problems]
    room = e.max_model_len - max(len(p) for p in prompts) - 1
    return SyncVerifier(settings, prompts, max(1, min(settings.max_tokens, cfg.sampling.max_tokens, room)))


def train_step(run: TrainState, step: int) -> dict[str, float]:
    """One training step (steps 1-8 of the module docstring); returns its metrics row."""
    cfg, learner, multiplier = run.cfg, run.learner, run.multiplier
    times: dict[str, float] = {}
    with timed(times, "time/step"):
        with timed(times, "time/rollout_wait"):  # 1. rollout, 2. score (sampled ahead when async)
            ro = run.source.next_batch(step)
        advantages_N = grpo_advantages(  # 3. advantages
            ro.rewards_N, cfg.run.group_size, scale_by_std=cfg.loss.scale_adv_by_std
        )
        device = next(learner.model.parameters()).device
        batch = build_token_batch(ro.prompts, ro.completions, run.tokenizer.pad_token_id).to(device)
        advantages_N = advantages_N.to(device)
        logp_BT = None
        with timed(times, "time/recompute"):  # 4. recompute (or the update's own forward)
            if reuses_forward(cfg) and not has_dropout(learner.model):
                logp_BT, old_logp_BT, ref_logp_BT = forward_for_update(learner, batch)
            else:
                old_logp_BT, ref_logp_BT = recompute_logprobs(learner, batch)
        sampled = batch  # every sampled sequence, before the ones pi_old cannot sample leave
        batch, disc = measure_discrepancy(batch, old_logp_BT)  # 5. measure
        target_BT = None
        if run.versions is not None:  # stale rollouts: the engine gap and the staleness gap apart
            with timed(times, "time/behaviour"):
                behaviour_BT, gaps = split_gaps(run, ro.version, step, sampled, batch, old_logp_BT, disc)
            disc = gaps
            if cfg.loss.constraint_gap == "engine" and behaviour_BT is not old_logp_BT:
                target_BT = engine_at_current(batch.engine_logp_BT, old_logp_BT, behaviour_BT)
        with timed(times, "time/update"):  # 6. update, lambda as a number
            settings = loss_settings(cfg, multiplier.value, multiplier.tolerance)
            upd: dict[str, float] = {}
            if batch.num_response_tokens > 0:  # else every sample was dropped: no D, no update
                data = UpdateBatch(batch, old_logp_BT, ref_logp_BT, advantages_N, target_BT, logp_BT)
                upd = update_policy(learner, data, settings)
        lam_used, c_used = multiplier.value, multiplier.tolerance
        with timed(times, "time/dual"):  # 7. dual step (the reward guard first, if on)
            if isinstance(multiplier, GuardedMultiplier) and cfg.loss.uses_multiplier():
                multiplier.observe_reward(float(ro.rewards_N.mean()))
            uses_multiplier = dual_step(cfg, multiplier, disc.get(gap_key(cfg), math.nan))
        with timed(times, "time/sync"):  # 8. sync
            run.source.publish_weights(learner.model.named_parameters())
            if run.versions is not None:
                run.versions.save(step, learner.model)
    row = step_metrics(cfg, ro, batch, {**ro.counts, **disc, **upd}, times)
    if uses_multiplier:
        row["multiplier/lambda"] = lam_used
        row["multiplier/lambda_next"] = multiplier.value
        if isinstance(multiplier, GuardedMultiplier):
            row["multiplier/guard_cap"] = multiplier.cap
            row["multiplier/guard_tripped"] = float(multiplier.tripped)
        # the c this step's loss used; NaN while an automatic tolerance is still measuring
        row["multiplier/tolerance"] = math.nan if c_used is None else float(c_used)
    return row


# ----------------------------------------------------------------------------- the named steps


def recompute_logprobs(learner: Learner, batch: TokenBatch) -> tuple[torch.Tensor, torch.Tensor | None]:
    """pi_old (and the reference's log-probs when the KL term is on) of the sampled tokens, no grad."""
    with torch.no_grad():
        learner.model.eval()
        old_logp_BT = sequence_logprobs(learner.model, batch, learner.sampling)
        ref = learner.ref_model
        ref_logp_BT = sequence_logprobs(ref, batch, learner.sampling) if ref is not None else None
    return old_logp_BT, ref_logp_BT


def reuses_forward(cfg: Config) -> bool:
    """Whether pi_old comes from the update's own forward: one optimizer step on the whole batch
    (the parameters have not moved yet, so its detached log-probs are pi_old) and ``run.recompute``
    left at auto."""
    o = cfg.optim
    return cfg.run.recompute == "auto" and o.epochs == 1 and o.minibatches == 1 and o.grad_accum == 1


def has_dropout(model: torch.nn.Module) -> bool:
    """Whether a training-mode forward is random (dropout on): then pi_old needs its own
    deterministic (eval-mode) forward, whatever ``run.recompute`` says."""
    config = getattr(model, "config", None)
    rates = [getattr(config, k, 0.0) or 0.0 for k in ("attention_dropout", "hidden_dropout", "dropout")]
    modules = [m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    return any(float(r) > 0 for r in [*rates, *modules])


def forward_for_update(
    learner: Learner, batch: TokenBatch
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The update's forward (with grad), pi_old as its detached copy, and the reference's log-probs."""
    learner.model.train()
    logp_BT = sequence_logprobs(learner.model, batch, learner.sampling)
    ref_logp_BT = None
    if learner.ref_model is not None:
        with torch.no_grad():
            ref_logp_BT = sequence_logprobs(learner.ref_model, batch, learner.sampling)
    return logp_BT, logp_BT.detach(), ref_logp_BT


def measure_discrepancy(batch: TokenBatch, old_logp_BT: torch.Tensor) -> tuple[TokenBatch, dict[str, float]]:
    """The ``discrepancy/*`` metrics of pi_old against mu. Sequences holding a token the trainer
    gives probability 0 (top-k / top-p under its own precision) leave the batch, and the measures
    are over the kept ones, except D (``prob_gap_mean``, what the dual step reads), which counts
    every sampled token (docs/concepts.md, "Tokens the trainer cannot sample")."""
    full_mask = batch.response_mask_BT
    batch, impossible = drop_trainer_impossible(batch, old_logp_BT)
    disc: dict[str, float] = {**impossible, **{m.discrepancy_key: math.nan for m in MEASURES.values()}}
    if batch.num_response_tokens > 0:
        measured = discrepancy_metrics(old_logp_BT, batch.engine_logp_BT, batch.response_mask_BT)
        disc.update({k: float(v) for k, v in measured.items()})
    if impossible["discrepancy/trainer_impossible_tokens"] > 0:
        # Leaving those sequences out of D would hide the largest gaps (trainer 0, engine ~0.2)
        # and read the constraint as met when it is not. The probability gap stays finite there
        # (|0 - mu|), so D over every sampled token is what the dual step reads; the other
        # measures (log ratios are infinite there) stay on the kept sequences.
        # The same holds for the measures another loss.measure reads: k3 and |log ratio| are
        # clamped at |log r| = 20, so they are finite there too (about 19 and 20).
        old = fill_masked(old_logp_BT, full_mask, 0.0)
        engine = fill_masked(batch.engine_logp_BT, full_mask, 0.0)
        for measure in MEASURES.values():
            key = measure.discrepancy_key
            if key in disc:
                disc[key + "_kept"] = disc[key]
            disc[key] = float(measure.token_fn(old, engine)[full_mask].double().mean())
    return batch, disc


def split_gaps(
    run: TrainState,
    version: int | None,
    step: int,
    sampled: TokenBatch,
    batch: TokenBatch,
    old_logp_BT: torch.Tensor,
    total: dict[str, float],
) -> tuple[torch.Tensor, dict[str, float]]:
    """Score a batch with the policy version that sampled it, and measure three gaps:
    ``discrepancy/*`` the engine against that version (the engine gap, measured on every sampled
    sequence ``sampled`` exactly as a synchronous run measures it, tokens that version cannot
    sample included), ``staleness/*`` that version against the current policy pi_old on the
    sequences the update keeps (``batch``), ``total/*`` the engine against pi_old (``total``,
    measured by step 5). Returns the behaviour log-probs and the metrics."""
    current = step - 1
    lag = 0 if version is None else current - version
    behaviour_BT = old_logp_BT
    if lag > 0:
        assert run.versions is not None and version is not None
        model_v = run.versions.model_at(version, run.learner.model)
        with torch.no_grad():
            behaviour_BT = sequence_logprobs(model_v, sampled, run.learner.sampling)
    _, engine = measure_discrepancy(sampled, behaviour_BT)
    out = {**engine, **{"total/" + k.removeprefix("discrepancy/"): v for k, v in total.items()}}
    out["staleness/versions"] = float(lag)
    mask = batch.response_mask_BT & torch.isfinite(behaviour_BT) & torch.isfinite(old_logp_BT)
    if bool(mask.any()):
        stale = discrepancy_metrics(old_logp_BT, behaviour_BT, mask)
        out.update({"staleness/" + k.removeprefix("discrepancy/"): float(v) for k, v in stale.items()})
    return behaviour_BT, out


def engine_at_current(
    engine_logp_BT: torch.Tensor, old_logp_BT: torch.Tensor, behaviour_logp_BT: torch.Tensor
) -> torch.Tensor:
    """mu carried to the current policy: ``mu + (pi_old - pi_behaviour)`` per token, so a gap to
    it is the engine gap of the sampling version. Where either trainer log-prob is -inf, mu."""
    shift = old_logp_BT - behaviour_logp_BT
    ok = torch.isfinite(shift)
    return torch.where(ok, engine_logp_BT + torch.where(ok, shift, torch.zeros_like(shift)), engine_logp_BT)


def dual_step(cfg: Config, multiplier: Multiplier, measured_d: float) -> bool:
    """One multiplier update on ``measured_d``, only for losses that read lambda (for the others a
    changing lambda in the logs would describe a constraint that is not there) and only when D was
    measured. Returns whether the loss reads lambda."""
    uses_multiplier = cfg.loss.uses_multiplier()
    if uses_multiplier and math.isfinite(measured_d):
        multiplier.update(measured_d)
    return uses_multiplier


def weighted(
    loss: torch.Tensor, token_terms: torch.Tensor | None, weight: float, token_weight: float
) -> torch.Tensor:
    """A micro-batch's loss weighted for accumulation: its token-mean terms by ``token_weight``,
    the rest by ``weight`` (the share of its aggregation mode, :func:`micro_weight`)."""
    if token_terms is None or weight == token_weight:
        return loss * weight
    return (loss - token_terms) * weight + token_terms * token_weight


def micro_weight(agg: str, batch: TokenBatch, total_tokens: int, total_seqs: int) -> float:
    """Share of a minibatch's loss carried by one micro-batch, so accumulation equals one pass.

    ``total_seqs`` counts the minibatch's sequences with at least one response token, as the
    seq-mean aggregations do.
    """
    if agg == "token-mean":
        return batch.num_response_tokens / total_tokens
    if agg.startswith("seq-mean"):
        return int(batch.response_mask_BT.any(dim=1).sum()) / total_seqs
    return 1.0  # "constant": sum / constant already adds up across micro-batches


@overload
def update_policy(learner: Learner, data: UpdateBatch, settings: LossSettings, /) -> dict[str, float]: ...


@overload
def update_policy(
    cfg: Config,
    model: torch.nn.Module,
    ref_model: torch.nn.Module | None,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    batch: TokenBatch,
    old_logp_BT: torch.Tensor,
    ref_logp_BT: torch.Tensor | None,
    advantages_N: torch.Tensor,
    sampling: SamplingSettings,
    settings: LossSettings,
    generator: torch.Generator,
    /,
) -> dict[str, float]: ...


def update_policy(*args: Any) -> dict[str, float]:
    """Epochs x minibatches optimizer steps, each accumulating grad_accum micro-batches:
    ``update_policy(learner, UpdateBatch(batch, old_logp_BT, ref_logp_BT, advantages_N), settings)``.

    The twelve-argument form of earlier versions, ``update_policy(cfg, model, ref_model, optimizer,
    scheduler, batch, old_logp_BT, ref_logp_BT, advantages_N, sampling, settings, generator)``,
    still works (tests and scripts call it); it builds the same two records. With the update bound
    (the default for a loss with a constraint) the optimizer must be the one
    :func:`make_optimizer` builds; another raises ``ValueError`` naming the settings that turn the
    bound off.
    """
    if len(args) == 12 and isinstance(args[0], Config):
        cfg, model, ref_model, opt, sched, batch, old, ref, adv, sampling, settings, gen = args
        learner = Learner(cfg, model, ref_model, opt, sched, sampling, gen)
        return _update_policy(learner, UpdateBatch(batch, old, ref, adv), settings)
    if len(args) != 3:
        raise TypeError("update_policy(learner, data, settings) takes 3 arguments (or the 12 of old)")
    return _update_policy(*args)


def _update_policy(learner: Learner, data: UpdateBatch, settings: LossSettings) -> dict[str, float]:
    cfg, model, batch = learner.cfg, learner.model, data.batch
    loss_fn = cfg.loss.loss_fn()
    bound = constraint_gradients(cfg, model)
    update_bound = bounds_update(cfg)
    bounded = learner.optimizer if isinstance(learner.optimizer, ShareBoundedAdamW) else None
    if update_bound and bounded is None:
        raise ValueError(
            "loss.constraint_share_of=update (the default with a constraint) needs the optimizer that "
            "bounds the constraint's step (dcmdp.trainer.make_optimizer builds it), got "
            f"{type(learner.optimizer).__name__}; to use another optimizer, turn the bound off "
            "(loss.constraint_share=0) or bound the gradient instead (loss.constraint_share_of=gradient)"
        )
    N = batch.input_ids_BL.shape[0]
    sums: dict[str, float] = {}
    count = 0
    lr_used = float(learner.scheduler.get_last_lr()[0])
    model.train()
    for _ in range(cfg.optim.epochs):
        # One minibatch needs no shuffle; keeping the rollout order keeps runs bit-reproducible
        # against examples/minimal_dcmdp.py.
        order = (
            torch.arange(N) if cfg.optim.minibatches == 1 else torch.randperm(N, generator=learner.generator)
        )
        for mb in torch.tensor_split(order, cfg.optim.minibatches):
            mb_batch = batch.select(mb)
            total_tokens = mb_batch.num_response_tokens
            total_seqs = int(mb_batch.response_mask_BT.any(dim=1).sum())
            micro_done = 0
            for micro in torch.tensor_split(mb, cfg.optim.grad_accum):
                mbatch = batch.select(micro)
                if mbatch.num_response_tokens == 0:  # every sequence in it was dropped
                    continue
                micro_done += 1
                if data.logp_BT is not None:  # the forward taken for pi_old: one pass, every row
                    if count > 0 or len(micro) != N:
                        raise RuntimeError(
                            "a reused forward serves a single optimizer step on the whole batch"
                        )
                    logp = data.logp_BT[micro]
                else:
                    logp = sequence_logprobs(model, mbatch, learner.sampling)
                mask = mbatch.response_mask_BT
                inputs = LossInputs(
                    logp_BT=logp,
                    old_logp_BT=data.old_logp_BT[micro],
                    engine_logp_BT=mbatch.engine_logp_BT,
                    advantages_BT=data.advantages_N[micro].unsqueeze(1).expand_as(logp),
                    mask_BT=mask,
                    constraint_engine_logp_BT=(
                        None
                        if data.constraint_engine_logp_BT is None
                        else data.constraint_engine_logp_BT[micro]
                    ),
                )
                out = loss_fn(inputs, settings)
                loss = out.loss
                metrics: dict[str, Any] = dict(out.metrics)
                # Token-mean terms (the gap penalty, the KL to the reference) carry this
                # micro-batch's token share; the aggregated surrogate the share of its agg mode.
                token_terms = out.token_mean_part
                kl_term: torch.Tensor | float = 0.0
                if learner.ref_model is not None and data.ref_logp_BT is not None:
                    kl = kl_to_reference_k3(logp, data.ref_logp_BT[micro], mask)
                    kl_term = cfg.loss.kl_coef * kl
                    loss = loss + kl_term
                    token_terms = kl_term + (0.0 if token_terms is None else token_terms)
                    metrics["loss/kl_ref"] = kl.detach()
                if not torch.isfinite(loss):
                    raise DivergenceError(f"the loss became {loss.item()} (loss {cfg.loss.type})")
                weight = micro_weight(cfg.loss.agg, mbatch, total_tokens, total_seqs)
                token_weight = mbatch.num_response_tokens / total_tokens
                # At lambda 0 a constraint that scales with lambda has a gradient of exactly 0: its
                # backward pass is skipped (an empty buffer is a zero gradient to both modes).
                skip = settings.lam == 0 and out.constraint_scales_with_lam
                if bound is not None and out.constraint_part is not None and not skip:
                    bound.add(weighted(out.constraint_part, out.token_mean_part, weight, token_weight))
                if update_bound:  # param.grad gets the policy part alone, from its own graph
                    policy_part = out.policy_part
                    if policy_part is None:
                        policy_part = (
                            out.loss if out.constraint_part is None else out.loss - out.constraint_part
                        )
                    (policy_part * weight + kl_term * token_weight).backward()
                else:
                    weighted(loss, token_terms, weight, token_weight).backward()
                for k, v in metrics.items():
                    sums[k] = sums.get(k, 0.0) + float(v)
                count += 1
            if bound is not None and not update_bound:
                for k, v in bound.apply().items():
                    sums[k] = sums.get(k, 0.0) + v * micro_done
            max_norm = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")
            if update_bound:
                # param.grad holds the policy part, the bound's buffer the constraint's: the
                # gradient's norm is that of their sum, and both are scaled by one factor.
                assert bound is not None
                grad_norm = bound.total_norm()
                clip_coef = min(1.0, max_norm / (float(grad_norm) + 1e-6))
                if clip_coef < 1.0:
                    for p in model.parameters():
                        if p.grad is not None:
                            p.grad.mul_(clip_coef)
            else:
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
            if not torch.isfinite(grad_norm):
                learner.optimizer.zero_grad(set_to_none=True)
                raise DivergenceError(f"the gradient norm became {float(grad_norm)}")
            sums["optim/grad_norm"] = sums.get("optim/grad_norm", 0.0) + float(grad_norm) * micro_done
            lr_used = float(learner.scheduler.get_last_lr()[0])  # the rate this optimizer step uses
            if update_bound:
                assert bound is not None and bounded is not None
                bound.hand_to(bounded, clip_coef)
            learner.optimizer.step()
            if update_bound and bounded is not None:
                for k, v in bounded.last_metrics.items():
                    sums[k] = sums.get(k, 0.0) + v * micro_done
            learner.scheduler.step()
            learner.optimizer.zero_grad(set_to_none=True)
    out_metrics = {k: v / count for k, v in sums.items()}
    out_metrics["optim/lr"] = lr_used
    return out_metrics


__all__ = [
    "DUAL_STEP_READS",
    "DivergenceError",
    "Learner",
    "Rollout",
    "TrainState",
    "UpdateBatch",
    "drop_trainer_impossible",
    "dual_step_key",
    "engine_label",
    "engine_spec",
    "loss_settings",
    "lr_lambda",
    "micro_weight",
    "multiplier_from_config",
    "resolve_base_model",
    "rollout",
    "sampling_settings",
    "step_line",
    "timed",
    "train",
    "train_step",
    "trainer_model",
    "unreachable_tolerance",
    "update_policy",
]
