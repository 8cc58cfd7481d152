"""Why mismatch does not hurt at this scale: how far it turns the policy gradient, next to noise.

    python experiments/gradient_bias.py [--config FILE] [--model DIR] [--batches 4]
        [--settings vllm:bfloat16 transformers:float32:int8 transformers:float32:fp8
                    transformers:float32:int4 transformers:float32:int3]

For each engine setting, K rollout batches (the default job's shape: 32 prompts x 8 samples of
the default task) are drawn from the engine with the warm-started model, and on each batch two
gradients of the policy surrogate are taken with respect to all weights:

- g_naive: vanilla GRPO on the engine's samples, as if they came from the trainer's policy pi;
- g_is: the same with every token weighted by pi / mu (untruncated token importance sampling),
  the correction that turns samples from the engine mu into an estimate of the on-policy
  gradient.

The figures: cos(g_naive, g_is) and |g_naive - g_is| / |g_is| on the same batch (how much the
mismatch turns and changes the update), next to cos(g_naive of batch k, g_naive of batch k+1)
(how much two equally valid batches disagree: sampling noise). Mismatch can only matter when its
effect is not small next to that noise. Also printed: the spread of the token ratio pi / mu.
Also printed: the gap against response length (the samples split into length quartiles: mean
token probability gap and mean |sequence log ratio| per quartile), to see whether the gap
compounds over long responses. ``--config`` takes the task, sampling and batch shape from a run
config (e.g. configs/long_addition.yaml) instead of the default job's.
Writes docs/results/gradient_bias/summary.json (``--out`` elsewhere). ``--plot PNG`` also draws
the gap and the sequence log ratio against response length, one line per setting;
``--from-summary JSON --plot PNG`` draws it from a summary written before, measuring nothing.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
from pathlib import Path
from typing import Any

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")

import torch

from dcmdp.advantages import grpo_advantages
from dcmdp.config import ConfigError, load_config
from dcmdp.engines.base import make_engine
from dcmdp.logprobs import build_token_batch, sequence_logprobs
from dcmdp.losses import LossInputs, LossSettings, get_policy_loss
from dcmdp.models import load_model, load_tokenizer, resolve_device
from dcmdp.probe import parse_setting
from dcmdp.tasks import make_task
from dcmdp.trainer import resolve_base_model, rollout, sampling_settings

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SETTINGS = [
    "vllm:bfloat16",
    "transformers:float32:int8",
    "transformers:float32:fp8",
    "transformers:float32:int4",
    "transformers:float32:int3",
]


def flat_grad(model: torch.nn.Module, loss: torch.Tensor) -> torch.Tensor:
    """d loss / d weights as one vector; keeps the graph so a second loss can reuse the forward."""
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return torch.cat(
        [(torch.zeros_like(p) if g is None else g).flatten() for p, g in zip(params, grads, strict=True)]
    )


def device_name(device: str) -> str:
    """What the figures were measured on: the GPU's name, or the CPU with its family, model and
    x86 capabilities (the figures differ between CPUs)."""
    if device == "cuda":
        return torch.cuda.get_device_name(0)
    from dcmdp.engines.vllm_engine import cpu_description  # imports no vLLM

    return cpu_description()


def cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=0))


def length_quartiles(lengths: torch.Tensor, gap: torch.Tensor, seq_abs_log_ratio: torch.Tensor) -> list[dict]:
    """Mean token gap and mean |sequence log ratio| of the samples in each response-length quartile."""
    order = torch.argsort(lengths, stable=True)
    rows = []
    for part in torch.tensor_split(order, 4):
        if part.numel() == 0:
            continue
        rows.append(
            {
                "len_min": int(lengths[part].min()),
                "len_max": int(lengths[part].max()),
                "prob_gap_mean": float(gap[part].sum() / lengths[part].sum()),
                "seq_abs_log_ratio_mean": float(seq_abs_log_ratio[part].mean()),
            }
        )
    return rows


def measure(
    setting: str, model_dir: Path, batches: int, seed: int, config: str | None = None, device: str = "cpu"
) -> dict[str, Any]:
    cfg = load_config(config)
    tokenizer = load_tokenizer(model_dir)
    model = load_model(model_dir, device=device)
    task = make_task(cfg.task.name, **cfg.task.options)
    sampling = sampling_settings(cfg, tokenizer.eos_token_id)
    engine = make_engine(parse_setting(setting).engine_spec(model_dir, seed, device))
    naive_fn, is_fn = get_policy_loss("grpo"), get_policy_loss("tis")
    settings = LossSettings(tis_cap=1e9)
    rows: list[dict[str, float]] = []
    grads: list[torch.Tensor] = []
    ratios: list[torch.Tensor] = []
    seq_len, seq_gap, seq_alr = [], [], []
    try:
        engine.load_weights(model.named_parameters())
        for k in range(batches):
            problems = task.problems("train", cfg.run.prompts_per_step, seed=seed * 1000 + k)
            ro = rollout(engine, task, tokenizer, problems, sampling, cfg.run.group_size, seed * 1000 + k)
            batch = build_token_batch(ro.prompts, ro.completions, tokenizer.pad_token_id).to(device)
            adv = grpo_advantages(ro.rewards_N, cfg.run.group_size).unsqueeze(1).to(device)
            logp = sequence_logprobs(model, batch, sampling)  # one forward, both gradients from it
            old = logp.detach()
            inputs = LossInputs(logp, old, batch.engine_logp_BT, adv.expand_as(logp), batch.response_mask_BT)
            g_naive = flat_grad(model, naive_fn(inputs, settings).loss)
            g_is = flat_grad(model, is_fn(inputs, settings).loss)
            mask = batch.response_mask_BT
            ratios.append(torch.exp(old - batch.engine_logp_BT)[mask].cpu())
            zero = torch.zeros((), dtype=old.dtype, device=old.device)
            log_r = torch.where(mask, old - batch.engine_logp_BT, zero)
            seq_len.append(mask.sum(dim=1).cpu())
            seq_gap.append(
                torch.where(mask, (old.exp() - batch.engine_logp_BT.exp()).abs(), zero).sum(dim=1).cpu()
            )
            seq_alr.append(log_r.sum(dim=1).abs().cpu())
            signal = bool(g_is.norm() > 0)  # False when every group's rewards were equal
            rows.append(
                {
                    "cos_naive_is": cos(g_naive, g_is) if signal else float("nan"),
                    "rel_diff": float((g_naive - g_is).norm() / g_is.norm()) if signal else float("nan"),
                    "reward_mean": float(ro.rewards_N.mean()),
                    "signal": signal,
                }
            )
            grads.append(g_naive.cpu())
    finally:
        engine.close()
    r = torch.cat(ratios)
    q = torch.quantile(r.double(), torch.tensor([0.01, 0.5, 0.99], dtype=torch.float64))
    return {
        "setting": setting,
        **gradient_stats(rows, grads),
        "ratio_p01": float(q[0]),
        "ratio_p50": float(q[1]),
        "ratio_p99": float(q[2]),
        "ratio_min": float(r.min()),
        "ratio_max": float(r.max()),
        "tokens": int(r.numel()),
        "by_length": length_quartiles(torch.cat(seq_len), torch.cat(seq_gap), torch.cat(seq_alr)),
        "batches": rows,
    }


def gradient_stats(rows: list[dict[str, Any]], grads: list[torch.Tensor]) -> dict[str, Any]:
    """Medians over the batches that carry a reward signal. A batch whose every group got equal
    rewards has all advantages 0 and so a zero gradient: its cos and relative difference are
    undefined, and its cos to a neighbouring batch would read 0 (orthogonal) when there is nothing
    to compare. Such batches are counted and left out; the noise reference compares consecutive
    batches that both have a signal. NaN where no batch (or no such pair) has one."""
    keep = [i for i, row in enumerate(rows) if row["signal"]]
    noise = [cos(grads[i], grads[j]) for i, j in itertools.pairwise(keep) if j == i + 1]
    nan = float("nan")
    return {
        "cos_naive_is": statistics.median(rows[i]["cos_naive_is"] for i in keep) if keep else nan,
        "rel_diff": statistics.median(rows[i]["rel_diff"] for i in keep) if keep else nan,
        "cos_between_batches": statistics.median(noise) if noise else nan,
        "batches_with_signal": len(keep),
    }


def plot_by_length(results: list[dict[str, Any]], path: Path) -> None:
    """Token gap and mean |sequence log ratio| per response-length quartile, one line per setting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(9.6, 3.6))
    for res in results:
        quartiles = res["by_length"]
        xs = [(q["len_min"] + q["len_max"]) / 2 for q in quartiles]
        left.plot(xs, [q["prob_gap_mean"] for q in quartiles], marker="o", label=res["setting"])
        right.plot(xs, [q["seq_abs_log_ratio_mean"] for q in quartiles], marker="o", label=res["setting"])
    left.set_title("Token probability gap by response length")
    right.set_title("Mean |sequence log ratio| by response length")
    for ax in (left, right):
        ax.set_xlabel("response length, middle of the quartile (tokens)")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=None, help="run config for the task, sampling and batch shape")
    ap.add_argument("--model", default=None, help="HF model dir or named model (default: the config's model)")
    ap.add_argument("--settings", nargs="+", default=DEFAULT_SETTINGS, metavar="engine:dtype[:quant]")
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--device", default="cpu", help="cpu | cuda | auto: where the trainer and the engines run"
    )
    ap.add_argument("--out", default=str(ROOT / "docs" / "results" / "gradient_bias" / "summary.json"))
    ap.add_argument("--plot", default=None, metavar="PNG", help="also plot the gap against response length")
    ap.add_argument("--from-summary", default=None, metavar="JSON", help="plot a summary written before")
    args = ap.parse_args()
    if args.from_summary is not None:
        if args.plot is None:
            ap.error("--from-summary only plots: give --plot PNG")
        summary = Path(args.from_summary)
        if not summary.is_file():
            ap.error(f"--from-summary: no such file {summary}")
        plot_by_length(json.loads(summary.read_text())["results"], Path(args.plot))
        return 0
    if args.batches < 2:
        ap.error("--batches must be at least 2 (the noise reference compares two batches)")
    for text in args.settings:
        parse_setting(text)  # fail before any engine starts
    try:
        device = resolve_device(args.device)  # fails before any engine starts
    except ValueError as err:
        ap.error(f"--device: {err}")
    cfg = load_config(args.config)
    if args.model:  # set as it is, not parsed as YAML: a path may hold any character
        cfg.model.path = args.model
    try:
        model_dir = resolve_base_model(cfg, print)
    except ConfigError as err:
        ap.error(str(err))
    torch.manual_seed(args.seed)
    results = []
    for setting in args.settings:
        res = measure(setting, model_dir, args.batches, args.seed, args.config, device)
        results.append(res)
        print(
            f"{setting:28s} cos(naive, IS) {res['cos_naive_is']:.4f}  |naive-IS|/|IS| {res['rel_diff']:.4f}  "
            f"cos(batch, next batch) {res['cos_between_batches']:.3f}  "
            f"pi/mu p1 {res['ratio_p01']:.3f} p99 {res['ratio_p99']:.3f} max {res['ratio_max']:.2f}  "
            f"(batches with a reward signal: {res['batches_with_signal']} of {args.batches})",
            flush=True,
        )
        for q in res["by_length"]:
            print(
                f"    length {q['len_min']:4d}-{q['len_max']:4d}: token gap {q['prob_gap_mean']:.5f}  "
                f"|seq log ratio| {q['seq_abs_log_ratio_mean']:.3f}",
                flush=True,
            )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "model": str(model_dir),
        "config": args.config,
        "device": device_name(device),
        "results": results,
    }
    out.write_text(json.dumps(record, indent=2))
    print(f"wrote {out}")
    if args.plot is not None:
        plot_by_length(results, Path(args.plot))
    return 0


if __name__ == "__main__":
    sys.exit(main())
