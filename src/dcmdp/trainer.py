"""The DCMDP training loop (one readable function of named steps; the math lives elsewhere).

Per step (see ../docs/concepts.md):
  1. rollout    the engine samples G completions for each of P prompts, with log-probs mu
  2. score      the task's verifiable reward per completion
  3. advantages GRPO group normalisation
  4. recompute  the trainer's log-probs pi_old of the same tokens (same sampling processing)
  5. measure    discrepancy between pi_old and mu (D = mean probability gap, and the rest)
  6. update     minibatch gradient steps on the configured policy loss, lambda as a number
  7. dual step  lambda <- clip(lambda + eta (D - c), lambda_min, lambda_max)
  8. sync       push the new weights to the engine, in memory
  9. eval       accuracy on the deployment engine every N steps
 10. log and checkpoint
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dcmdp.advantages import grpo_advantages
from dcmdp.checkpoint import (
    MetricsLog,
    latest_checkpoint,
    load_trainer_state,
    random_states,
    save_checkpoint,
    set_random_states,
)
from dcmdp.config import Config, ConfigError, MultiplierConfig, build_task, dump_config
from dcmdp.discrepancy import discrepancy_metrics
from dcmdp.engines.base import Completion, EngineSpec, RolloutEngine, SamplingSettings, make_engine
from dcmdp.evaluate import evaluate_accuracy
from dcmdp.logprobs import TokenBatch, build_token_batch, sequence_logprobs
from dcmdp.losses import MULTIPLIER_LOSSES, LossInputs, LossSettings, get_policy_loss, kl_to_reference_k3
from dcmdp.models import load_model, load_tokenizer, resolve_device, resolve_model
from dcmdp.multiplier import build_multiplier
from dcmdp.tasks import Problem, Task, make_task

Logger = Callable[[str], None]


class DivergenceError(RuntimeError):
    """The loss or a gradient became NaN / inf; the run stops and keeps its last good checkpoint."""


@dataclass
class Rollout:
    """One step's samples, group-contiguous: completions[g*G:(g+1)*G] answer problems[g]."""

    problems: list[Problem]
    prompts: list[list[int]]
    completions: list[Completion]
    rewards_N: torch.Tensor
    counts: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0


# ----------------------------------------------------------------------------- set-up helpers


def sampling_settings(cfg: Config, eos_ids: int | tuple[int, ...]) -> SamplingSettings:
    """The rollout settings; every engine stops exactly at ``eos_ids`` (all the model's EOS ids,
    ``dcmdp.models.eos_token_ids``)."""
    s = cfg.sampling
    stop = (eos_ids,) if isinstance(eos_ids, int) else tuple(eos_ids)
    return SamplingSettings(s.temperature, s.top_p, s.top_k, s.max_tokens, stop_token_ids=stop)


def engine_spec(cfg: Config, model_path: Path) -> EngineSpec:
    e = cfg.engine
    return EngineSpec(
        type=e.type,
        model=str(model_path),
        dtype=e.dtype,
        quantization=e.quantization,
        seed=cfg.run.seed,
        max_model_len=e.max_model_len,
        kv_cache_gb=e.kv_cache_gb,
        device=cfg.model.device,
    )


def multiplier_from_config(m: MultiplierConfig) -> Any:
    """The Lagrange multiplier for a config (dual ascent or PID, fixed or automatic c)."""
    return build_multiplier(
        m.type,
        init=m.init,
        tolerance=m.tolerance,
        lam_min=m.lam_min,
        lam_max=m.lam_max,
        ema=m.ema,
        eta=m.eta,
        kp=m.kp,
        ki=m.ki,
        kd=m.kd,
        auto_warmup_steps=m.auto_warmup_steps,
        auto_quantile=m.auto_quantile,
        auto_multiple=m.auto_multiple,
    )


def loss_settings(cfg: Config, lam: float, tolerance: float | None) -> LossSettings:
    """The loss knobs of ``cfg.loss`` (same field names) plus this step's lambda and c."""
    knobs = {
        f.name: getattr(cfg.loss, f.name)
        for f in dataclasses.fields(LossSettings)
        if hasattr(cfg.loss, f.name)
    }
    # Before an automatic tolerance is set, a tolerance of 1 (the largest possible gap) turns the
    # hinge off: the warm-up measures the discrepancy without acting on it.
    return LossSettings(**knobs, lam=lam, tolerance=tolerance if tolerance is not None else 1.0)


def unreachable_tolerance(
    recent_d: list[float], tolerance: float | None, uses_multiplier: bool, window: int = 20
) -> str | None:
    """A warning when the measured gap stayed above twice c for ``window`` steps in a row.

    Then the constraint is out of the engine's reach: lambda only grows and the gap penalty takes
    over the update (docs/RESULTS.md: runs with c far below the engine's floor gap lost accuracy
    or collapsed). None when all is well or the loss does not use lambda.
    """
    if not uses_multiplier or tolerance is None or len(recent_d) < window:
        return None
    last = recent_d[-window:]
    if min(last) <= 2 * tolerance:
        return None
    return (
        f"warning: the measured gap D stayed above 2c for {window} steps (min {min(last):.4g}, c {tolerance:.4g}): "
        "the tolerance looks out of this engine's reach, so lambda keeps growing and the gap penalty "
        "can swamp the reward signal. Consider multiplier.tolerance=null (automatic c from the "
        "measured gap), a larger c, or a cap such as multiplier.lam_max=0.3 (see docs/RESULTS.md)."
    )


def lr_lambda(cfg: Config, total_updates: int) -> Callable[[int], float]:
    warm = cfg.optim.warmup_steps

    def f(i: int) -> float:
        if warm > 0 and i < warm:
            return (i + 1) / warm
        if cfg.optim.schedule == "cosine":
            progress = (i - warm) / max(1, total_updates - warm)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return 1.0

    return f


# ----------------------------------------------------------------------------- the named steps


def rollout(
    engine: RolloutEngine,
    task: Task,
    tokenizer: Any,
    problems: list[Problem],
    sampling: SamplingSettings,
    group_size: int,
    seed: int,
) -> Rollout:
    """Sample, validate and score. A group with any invalid sample or reward error is dropped
    whole (its advantages would be biased) and counted."""
    t0 = time.perf_counter()
    prompts = [tokenizer.encode(p.prompt, add_special_tokens=False) for p in problems]
    result = engine.generate(prompts, sampling, n=group_size, seed=seed)
    by_prompt: dict[int, list[Completion]] = {}
    for c in result.completions:
        by_prompt.setdefault(c.prompt_index, []).append(c)
    kept_problems: list[Problem] = []
    kept_prompts: list[list[int]] = []
    kept: list[Completion] = []
    rewards: list[float] = []
    reward_errors = 0
    dropped_groups = 0
    for i, problem in enumerate(problems):
        group = by_prompt.get(i, [])
        if len(group) != group_size:
            dropped_groups += 1
            continue
        group_rewards = []
        for c in group:
            text = tokenizer.decode(c.token_ids, skip_special_tokens=True)
            try:
                group_rewards.append(float(task.reward(problem, text)))
            except Exception:
                reward_errors += 1
                break
        if len(group_rewards) != group_size or not all(math.isfinite(r) for r in group_rewards):
            dropped_groups += 1
            continue
        idx = len(kept_problems)
        kept_problems.append(problem)
        kept_prompts.append(prompts[i])
        for c in group:
            kept.append(Completion(idx, c.token_ids, c.logprobs, c.finish_reason))
        rewards.extend(group_rewards)
    if not kept:
        raise RuntimeError(
            f"no usable samples this step: {dropped_groups} groups dropped "
            f"(engine drops: {result.dropped}, reward errors: {reward_errors})"
        )
    counts = {
        "rollout/dropped_samples": float(sum(result.dropped.values())),
        "rollout/dropped_groups": float(dropped_groups),
        "rollout/reward_errors": float(reward_errors),
        "rollout/tokens": float(result.num_tokens),
        "rollout/truncated_frac": sum(c.finish_reason == "length" for c in kept) / len(kept),
    }
    return Rollout(kept_problems, kept_prompts, kept, torch.tensor(rewards), counts, time.perf_counter() - t0)


def drop_trainer_impossible(
    batch: TokenBatch, old_logp_BT: torch.Tensor
) -> tuple[TokenBatch, dict[str, float]]:
    """Take out of the loss and of D every sequence holding a token the trainer gives probability 0.

    Under top-k / top-p at another precision the engine can sample a token outside the trainer's
    kept set (log pi_old = -inf). Such a sequence has probability 0 under the trainer, so its
    sequence-level importance weight pi/mu is exactly 0: dropping it is what an unbiased
    off-policy estimator does. Masking only the token would keep training on the tokens that
    follow an impossible prefix. The sequence's reward stays in its group's baseline (advantages
    are computed before this). Returns the batch with those rows' response mask cleared, and the
    counts (``discrepancy/trainer_impossible_*``, rates over the response tokens and sequences
    sampled).
    """
    mask = batch.response_mask_BT
    impossible_BT = mask & torch.isneginf(old_logp_BT)
    drop_B = impossible_BT.any(dim=1)
    tokens = max(1, int(mask.sum()))
    seqs = max(1, int(mask.any(dim=1).sum()))
    counts = {
        "discrepancy/trainer_impossible_tokens": float(impossible_BT.sum()),
        "discrepancy/trainer_impossible_token_rate": float(impossible_BT.sum()) / tokens,
        "discrepancy/trainer_impossible_seq_frac": float(drop_B.sum()) / seqs,
    }
    if bool(drop_B.any()):
        batch = dataclasses.replace(batch, response_mask_BT=mask & ~drop_B.unsqueeze(1))
    return batch, counts


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
) -> dict[str, float]:
    """Epochs x minibatches optimizer steps, each accumulating grad_accum micro-batches."""
    loss_fn = get_policy_loss(cfg.loss.type)
    N = batch.input_ids_BL.shape[0]
    sums: dict[str, float] = {}
    count = 0
    lr_used = float(scheduler.get_last_lr()[0])
    model.train()
    for _ in range(cfg.optim.epochs):
        # One minibatch needs no shuffle; keeping the rollout order keeps runs bit-reproducible
        # against examples/minimal_dcmdp.py.
        order = torch.arange(N) if cfg.optim.minibatches == 1 else torch.randperm(N, generator=generator)
        for mb in torch.tensor_split(order, cfg.optim.minibatches):
            mb_batch = batch.select(mb)
            total_tokens = mb_batch.num_response_tokens
            total_seqs = int(mb_batch.response_mask_BT.any(dim=1).sum())
            for micro in torch.tensor_split(mb, cfg.optim.grad_accum):
                mbatch = batch.select(micro)
                if mbatch.num_response_tokens == 0:  # every sequence in it was dropped
                    continue
                logp = sequence_logprobs(model, mbatch, sampling)
                mask = mbatch.response_mask_BT
                adv = advantages_N[micro].unsqueeze(1).expand_as(logp)
                out = loss_fn(
                    LossInputs(logp, old_logp_BT[micro], mbatch.engine_logp_BT, adv, mask), settings
                )
                loss = out.loss
                metrics: dict[str, Any] = dict(out.metrics)
                # Token-mean terms (the gap penalty, the KL to the reference) carry this
                # micro-batch's token share; the aggregated surrogate the share of its agg mode.
                token_terms = out.token_mean_part
                if ref_model is not None and ref_logp_BT is not None:
                    kl = kl_to_reference_k3(logp, ref_logp_BT[micro], mask)
                    loss = loss + cfg.loss.kl_coef * kl
                    token_terms = cfg.loss.kl_coef * kl + (0.0 if token_terms is None else token_terms)
                    metrics["loss/kl_ref"] = kl.detach()
                if not torch.isfinite(loss):
                    raise DivergenceError(f"the loss became {loss.item()} (loss {cfg.loss.type})")
                weight = micro_weight(cfg.loss.agg, mbatch, total_tokens, total_seqs)
                token_weight = mbatch.num_response_tokens / total_tokens
                if token_terms is None or weight == token_weight:
                    (loss * weight).backward()
                else:
                    ((loss - token_terms) * weight + token_terms * token_weight).backward()
                for k, v in metrics.items():
                    sums[k] = sums.get(k, 0.0) + float(v)
                count += 1
            grad_norm = torch.nn.utils.clip_grad_norm_(
                model.parameters(), cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")
            )
            if not torch.isfinite(grad_norm):
                optimizer.zero_grad(set_to_none=True)
                raise DivergenceError(f"the gradient norm became {float(grad_norm)}")
            sums["optim/grad_norm"] = (
                sums.get("optim/grad_norm", 0.0) + float(grad_norm) * cfg.optim.grad_accum
            )
            lr_used = float(scheduler.get_last_lr()[0])  # the rate this optimizer step uses
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
    out_metrics = {k: v / count for k, v in sums.items()}
    out_metrics["optim/lr"] = lr_used
    return out_metrics


# ----------------------------------------------------------------------------- the loop


def train(cfg: Config, resume: bool = False, log: Logger = print) -> dict[str, Any]:
    """Run (or resume) a training job; returns a summary with accuracy before and after."""
    run_dir = Path(cfg.run.out_dir)
    ckpt = latest_checkpoint(run_dir) if resume else None
    if not resume and (run_dir / "metrics.jsonl").exists():
        raise FileExistsError(
            f"{run_dir} already holds a run; pass --resume to continue it or choose another run.out_dir"
        )
    done = int(ckpt.name.split("_")[1]) if ckpt is not None else 0
    if ckpt is not None and done > cfg.run.steps:
        raise ConfigError(f"run.steps={cfg.run.steps}: the run in {run_dir} is already at step {done}")
    if ckpt is None and resume:  # no checkpoint (run.checkpoint_every=0): the log says how far it got
        from dcmdp.checkpoint import read_metrics

        logged = [r["step"] for r in read_metrics(run_dir / "metrics.jsonl") if r.get("kind") == "train"]
        if logged and max(logged) >= cfg.run.steps:
            done = max(logged)
    if done >= cfg.run.steps and (ckpt is not None or done > 0):
        log(f"{run_dir} already finished (step {done} of run.steps={done}); to extend it, raise run.steps")
        return {"run_dir": str(run_dir), "finished": True, "step": done}
    build_task(cfg)  # a bad task option or data file fails here, before any model is loaded
    base_path = resolve_base_model(cfg, log)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"run.out_dir: cannot create {run_dir} ({exc.strerror or exc})") from None
    if cfg.run.threads > 0:
        torch.set_num_threads(cfg.run.threads)
    (run_dir / "config.yaml").write_text(dump_config(cfg))

    tokenizer = load_tokenizer(base_path)
    dtype = getattr(torch, cfg.model.dtype)
    device = resolve_device(cfg.model.device)
    model = load_model(ckpt if ckpt is not None else base_path, dtype=dtype, device=device)
    ref_model = load_model(base_path, dtype=dtype, device=device).eval() if cfg.loss.kl_coef > 0 else None
    task = make_task(cfg.task.name, **cfg.task.options)
    from dcmdp.models import eos_token_ids

    sampling = sampling_settings(cfg, eos_token_ids(base_path, tokenizer))
    greedy = SamplingSettings(1.0, 1.0, 1, cfg.sampling.max_tokens, sampling.stop_token_ids)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=cfg.optim.lr, betas=cfg.optim.betas, weight_decay=cfg.optim.weight_decay
    )
    total_updates = cfg.run.steps * cfg.optim.epochs * cfg.optim.minibatches
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, total_updates))
    multiplier = multiplier_from_config(cfg.multiplier)
    generator = torch.Generator().manual_seed(cfg.run.seed)
    metrics_log = MetricsLog(run_dir / "metrics.jsonl")
    start_step = 0
    torch.manual_seed(cfg.run.seed)
    if ckpt is not None:
        state = load_trainer_state(ckpt)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        multiplier.load_state_dict(state["multiplier"])
        generator.set_state(state["generator"])
        set_random_states(state["random"])
        start_step = int(state["step"])
        dropped = metrics_log.truncate_after(start_step)
        log(f"resumed from {ckpt} at step {start_step} (dropped {dropped} log rows written after it)")
    elif resume:
        metrics_log.truncate_after(-1)
        log(f"no complete checkpoint in {run_dir}; starting from step 0")
    writers = open_writers(cfg, run_dir)

    eval_problems = task.problems("eval", cfg.run.eval_problems, seed=cfg.run.seed + 10_000)
    log(f"engine: {engine_label(cfg)} | trainer {cfg.model.dtype}")
    engine = make_engine(engine_spec(cfg, base_path))
    summary: dict[str, Any] = {"run_dir": str(run_dir)}
    try:
        t_sync = time.perf_counter()
        engine.load_weights(model.named_parameters())
        log(f"initial weight sync {time.perf_counter() - t_sync:.2f}s")

        def run_eval(step: int) -> dict[str, float]:
            t0 = time.perf_counter()
            row = evaluate_accuracy(
                engine,
                task,
                tokenizer,
                eval_problems,
                greedy,
                sampling if cfg.run.eval_sampled else None,
                seed=cfg.run.seed + 20_000,
            )
            row["time/eval"] = time.perf_counter() - t0
            emit(metrics_log, writers, {"kind": "eval", "step": step, **row})
            return row

        recent_d: list[float] = []
        warned = warned_impossible = False
        if start_step == 0 and cfg.run.eval_every:
            before = run_eval(0)
            log(f"step 0 eval: greedy accuracy {before['eval/accuracy_greedy']:.3f}")
        for step in range(start_step + 1, cfg.run.steps + 1):
            row = train_step(
                cfg,
                step,
                engine,
                task,
                tokenizer,
                model,
                ref_model,
                optimizer,
                scheduler,
                multiplier,
                sampling,
                generator,
            )
            emit(metrics_log, writers, {"kind": "train", "step": step, **row})
            if math.isfinite(row["discrepancy/prob_gap_mean"]):
                recent_d.append(row["discrepancy/prob_gap_mean"])
            warning = unreachable_tolerance(
                recent_d, multiplier.tolerance, cfg.loss.type in MULTIPLIER_LOSSES
            )
            if warning is not None and not warned:
                log(warning)
                warned = True
            dropped_frac = row["discrepancy/trainer_impossible_seq_frac"]
            if dropped_frac > 0.2 and not warned_impossible:
                log(
                    f"warning: {dropped_frac:.0%} of this step's samples hold a token the trainer gives "
                    "probability 0 under the same top-k / top-p (the engine's kept set differs at its "
                    "precision); those samples are left out of the loss and of D, so most of the batch "
                    "is lost. Consider sampling.top_k=0 and sampling.top_p=1.0, or a closer engine "
                    "precision (docs/concepts.md, 'Tokens the trainer cannot sample')."
                )
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
        summary.update(final_summary(run_dir, multiplier, cfg.loss.type in MULTIPLIER_LOSSES))
    finally:
        engine.close()
        for w in writers:
            w.close()
    return summary


def train_step(
    cfg: Config,
    step: int,
    engine: RolloutEngine,
    task: Task,
    tokenizer: Any,
    model: torch.nn.Module,
    ref_model: torch.nn.Module | None,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    multiplier: Any,
    sampling: SamplingSettings,
    generator: torch.Generator,
) -> dict[str, float]:
    t_step = time.perf_counter()
    seed = cfg.run.seed * 1_000_003 + step
    problems = task.problems("train", cfg.run.prompts_per_step, seed=seed)
    ro = rollout(engine, task, tokenizer, problems, sampling, cfg.run.group_size, seed)

    advantages_N = grpo_advantages(ro.rewards_N, cfg.run.group_size, scale_by_std=cfg.loss.scale_adv_by_std)
    device = next(model.parameters()).device
    batch = build_token_batch(ro.prompts, ro.completions, tokenizer.pad_token_id).to(device)
    advantages_N = advantages_N.to(device)

    t0 = time.perf_counter()
    with torch.no_grad():
        model.eval()
        old_logp_BT = sequence_logprobs(model, batch, sampling)
        ref_logp_BT = sequence_logprobs(ref_model, batch, sampling) if ref_model is not None else None
    t_recompute = time.perf_counter() - t0
    # Tokens the engine sampled that the trainer's processed distribution (top-k / top-p under
    # its own precision) gives probability 0: their sequences leave the loss and D.
    batch, impossible = drop_trainer_impossible(batch, old_logp_BT)
    disc: dict[str, float] = {**impossible, "discrepancy/prob_gap_mean": math.nan}
    if batch.num_response_tokens > 0:  # else every sample was dropped: no D, no update
        measured = discrepancy_metrics(old_logp_BT, batch.engine_logp_BT, batch.response_mask_BT)
        disc.update({k: float(v) for k, v in measured.items()})

    t0 = time.perf_counter()
    settings = loss_settings(cfg, multiplier.value, multiplier.tolerance)
    upd: dict[str, float] = {}
    if batch.num_response_tokens > 0:
        upd = update_policy(
            cfg,
            model,
            ref_model,
            optimizer,
            scheduler,
            batch,
            old_logp_BT,
            ref_logp_BT,
            advantages_N,
            sampling,
            settings,
            generator,
        )
    t_update = time.perf_counter() - t0

    t0 = time.perf_counter()
    # The dual step, only for losses that read lambda: for the others a changing lambda in the
    # logs would describe a constraint that is not there.
    lam_used = multiplier.value
    uses_multiplier = cfg.loss.type in MULTIPLIER_LOSSES
    if uses_multiplier and math.isfinite(disc["discrepancy/prob_gap_mean"]):
        multiplier.update(disc["discrepancy/prob_gap_mean"])
    t_dual = time.perf_counter() - t0

    t0 = time.perf_counter()
    engine.load_weights(model.named_parameters())
    t_sync = time.perf_counter() - t0

    step_time = time.perf_counter() - t_step
    rewards = ro.rewards_N
    row: dict[str, float] = {
        "reward/mean": float(rewards.mean()),
        "reward/std": float(rewards.std(unbiased=False)),
        "reward/accuracy": float((rewards >= 1.0).float().mean()),
        "reward/degenerate_groups": float(
            (rewards.view(-1, cfg.run.group_size).std(dim=1, unbiased=False) == 0).float().mean()
        ),
        "response/mean_tokens": batch.num_response_tokens / len(ro.completions),
        **ro.counts,
        **disc,
        **upd,
        "time/rollout": ro.seconds,
        "time/recompute": t_recompute,
        "time/update": t_update,
        "time/dual": t_dual,
        "time/sync": t_sync,
        "time/step": step_time,
        "perf/tokens_per_s": ro.counts["rollout/tokens"] / max(ro.seconds, 1e-9),
    }
    if uses_multiplier:
        row["multiplier/lambda"] = lam_used
        row["multiplier/lambda_next"] = multiplier.value
        # NaN while an automatic tolerance is still measuring its warm-up steps
        row["multiplier/tolerance"] = (
            math.nan if multiplier.tolerance is None else float(multiplier.tolerance)
        )
    return row


def engine_label(cfg: Config) -> str:
    """The deployment setting in words, e.g. "vllm bfloat16" or "transformers float32 int3"."""
    return " ".join(
        [cfg.engine.type, cfg.engine.dtype] + ([cfg.engine.quantization] if cfg.engine.quantization else [])
    )


def step_line(cfg: Config, step: int, row: dict[str, float], multiplier: Any) -> str:
    """One progress line; lambda and c only for losses that read them, c "auto" while warming up."""
    parts = [
        f"step {step:4d}/{cfg.run.steps}",
        f"reward {row['reward/mean']:.3f}",
        f"D {row['discrepancy/prob_gap_mean']:.5f}",
    ]
    if "multiplier/lambda" in row:
        parts.append(f"lambda {row['multiplier/lambda']:.4f}")
        c = row["multiplier/tolerance"]
        if math.isnan(c):
            seen = len(getattr(multiplier, "_collected", []))
            parts.append(f"c auto (measured {seen}/{cfg.multiplier.auto_warmup_steps} warm-up steps)")
        else:
            parts.append(f"c {c:.5f}")
    parts.append(
        f"loss {row['loss/total']:+.4f}" if "loss/total" in row else "no update (every sample dropped)"
    )
    parts.append(f"{row['time/step']:.2f}s ({row['perf/tokens_per_s']:.0f} tok/s)")
    return " ".join(parts)


# ----------------------------------------------------------------------------- plumbing


def resolve_base_model(cfg: Config, log: Logger) -> Path:
    if cfg.model.path == "default":
        from dcmdp.pretrain import ensure_base_model

        log("base model: the default tiny Qwen3 warm-started on arithmetic (cached after the first run)")
        return Path(ensure_base_model(cache_dir=cfg.model.cache_dir))
    try:
        return resolve_model(cfg.model.path, cache_dir=cfg.model.cache_dir)
    except ValueError as exc:  # neither a model directory nor a named model
        raise ConfigError(f"model.path: {exc}") from None


class _TensorBoard:
    def __init__(self, run_dir: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.w = SummaryWriter(str(run_dir / "tensorboard"))

    def write(self, row: dict[str, Any]) -> None:
        for k, v in row.items():
            if isinstance(v, int | float) and k not in ("step",):
                self.w.add_scalar(k, v, row["step"])
        self.w.flush()

    def close(self) -> None:
        self.w.close()


class _Wandb:
    def __init__(self, cfg: Config, run_dir: Path) -> None:
        import wandb  # type: ignore[import-not-found]

        self.run = wandb.init(project=cfg.run.wandb_project, dir=str(run_dir), config=cfg.to_dict())

    def write(self, row: dict[str, Any]) -> None:
        self.run.log({k: v for k, v in row.items() if k != "kind"}, step=row["step"])

    def close(self) -> None:
        self.run.finish()


def open_writers(cfg: Config, run_dir: Path) -> list[Any]:
    writers: list[Any] = []
    if cfg.run.tensorboard:
        try:
            writers.append(_TensorBoard(run_dir))
        except ImportError:
            print("tensorboard is not installed; metrics go to metrics.jsonl only")
    if cfg.run.wandb:
        try:
            writers.append(_Wandb(cfg, run_dir))
        except ImportError:
            print("run.wandb=true but the wandb package is not installed (pip install wandb); skipping it")
    return writers


def emit(metrics_log: MetricsLog, writers: list[Any], row: dict[str, Any]) -> None:
    metrics_log.write(row)
    for w in writers:
        w.write(row)


def final_summary(run_dir: Path, multiplier: Any, uses_multiplier: bool = True) -> dict[str, Any]:
    from dcmdp.checkpoint import read_metrics

    evals = [r for r in read_metrics(run_dir / "metrics.jsonl") if r.get("kind") == "eval"]
    out: dict[str, Any] = {}
    if uses_multiplier:
        out.update(multiplier=multiplier.value, tolerance=multiplier.tolerance)
    if evals and evals[0]["step"] == 0:  # "before" is the evaluation before any training step
        out["accuracy_before"] = evals[0]["eval/accuracy_greedy"]
        out["accuracy_after"] = evals[-1]["eval/accuracy_greedy"]
        if "eval/accuracy_sampled" in evals[0]:
            out["sampled_accuracy_before"] = evals[0]["eval/accuracy_sampled"]
            out["sampled_accuracy_after"] = evals[-1]["eval/accuracy_sampled"]
    return out
