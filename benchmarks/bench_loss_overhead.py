"""Cost of the DCMDP term: one policy update with `dcmdp` against plain `grpo` on the same batches.

    python benchmarks/bench_loss_overhead.py [--model DIR] [--repeats 15]

Builds one fixed rollout batch (prompts x group completions of random tokens with engine
log-probs), then times `dcmdp.trainer.update_policy` for each loss in alternation (so machine
noise hits both alike) and prints the medians and the ratio. The target is under 3% extra for
the DCMDP term itself (`dcmdp+nobound`: the loss with plain AdamW). The DCMDP rows without the
suffix run as by default, with the update bound (`loss.constraint_share_of=update`) at lambda
0.1: a second backward pass and `ShareBoundedAdamW`'s step.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

from dcmdp.config import load_config
from dcmdp.engines.base import Completion, SamplingSettings
from dcmdp.logprobs import build_token_batch, sequence_logprobs
from dcmdp.models import TinyModelSpec, build_tiny_model, load_model
from dcmdp.trainer import loss_settings, make_optimizer, update_policy

#: Loss names; "+nobound" turns the update bound off (loss.constraint_share=0).
LOSSES = ("grpo", "dcmdp", "dcmdp+nobound", "dcmdp_shaping", "dcmdp_hinge", "tis")


def make_batch(prompts: int, group: int, length: int, vocab: int, seed: int = 0):  # type: ignore[no-untyped-def]
    g = torch.Generator().manual_seed(seed)
    prompt_ids = [torch.randint(3, vocab, (6,), generator=g).tolist() for _ in range(prompts)]
    comps = [
        Completion(
            i // group,
            torch.randint(3, vocab, (length,), generator=g).tolist(),
            (-torch.rand(length, generator=g) * 2).tolist(),
            "length",
        )
        for i in range(prompts * group)
    ]
    return build_token_batch(prompt_ids, comps, pad_id=0), torch.randn(prompts * group, generator=g)


def time_losses(
    model: torch.nn.Module,
    prompts: int,
    group: int,
    length: int,
    repeats: int,
    losses: tuple[str, ...] = LOSSES,
) -> dict[str, list[float]]:
    """Seconds per `update_policy` for each loss, timed in alternation after two warm-up rounds."""
    device = next(model.parameters()).device
    batch, adv = make_batch(prompts, group, length, model.config.vocab_size - 30)
    batch, adv = batch.to(device), adv.to(device)
    sampling = SamplingSettings(max_tokens=length)
    with torch.no_grad():
        old = sequence_logprobs(model, batch, sampling)
    times: dict[str, list[float]] = {name: [] for name in losses}
    for r in range(repeats + 2):
        for name in losses:
            loss, _, variant = name.partition("+")
            cfg = load_config(
                overrides=[
                    f"loss.type={loss}",
                    f"run.prompts_per_step={prompts}",
                    f"run.group_size={group}",
                    "optim.lr=1e-6",
                    *(["loss.constraint_share=0"] if variant == "nobound" else []),
                ]
            )
            opt = make_optimizer(cfg, model)
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1.0)
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            update_policy(
                cfg,
                model,
                None,
                opt,
                sched,
                batch,
                old,
                None,
                adv,
                sampling,
                loss_settings(cfg, 0.1, 0.0037),
                torch.Generator().manual_seed(0),
            )
            if device.type == "cuda":
                torch.cuda.synchronize()
            if r >= 2:  # two warm-up rounds
                times[name].append(time.perf_counter() - t0)
    return times


def print_table(times: dict[str, list[float]]) -> None:
    base = statistics.median(times["grpo"])
    print(f"{'loss':16s} {'median s':>10s} {'vs grpo':>9s}")
    for name, values in times.items():
        med = statistics.median(values)
        print(f"{name:16s} {med:10.4f} {100 * (med / base - 1):+8.1f}%")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None, help="HF model dir (default: a fresh tiny Qwen3)")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--length", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--device", default="cpu", help="cpu | cuda")
    ap.add_argument("--dtype", default="float32", help="float32 | bfloat16 (trainer precision)")
    args = ap.parse_args()
    model_dir = args.model or build_tiny_model(tempfile.mkdtemp() + "/tiny", TinyModelSpec())
    model = load_model(model_dir, dtype=getattr(torch, args.dtype), device=args.device)
    times = time_losses(model, args.prompts, args.group, args.length, args.repeats)
    print(
        f"update_policy on {args.prompts}x{args.group} sequences of {args.length} tokens, "
        f"{args.repeats} repeats, {args.device} {args.dtype}, threads={torch.get_num_threads()}"
    )
    print_table(times)


if __name__ == "__main__":
    main()
