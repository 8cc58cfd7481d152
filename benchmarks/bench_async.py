"""Asynchronous rollouts: steps per minute with run.max_staleness 0, 1 and 2, side by side, and what
padding costs the update on long responses.

    python benchmarks/bench_async.py [--config configs/long_addition.yaml] [--steps 8] [--repeats 2]
                                     [--staleness 0 1 2] [--json PATH] [section.field=value ...]

Each arm is one `dcmdp train` subprocess (the default: the long-response task of issue 13, its
config's engine and batch, evaluation off), run in alternation ``--repeats`` times. The figure is
the median over steps 2..N of ``time/step`` (a step's wall time from asking for its batch to
handing over the new weights; with max_staleness >= 1 that includes waiting for the worker, so it
is the loop's real pace), then the median over repeats. "x vs sync" divides max_staleness 0's step
time by the arm's. The learner runs one torch thread; the worker is pinned to the other core(s).

Padding: one batch sampled by the run's engine is scored forward and backward as the update does
(one micro-batch padded to its longest sequence), then as four micro-batches in sampling order,
then as four micro-batches of similar lengths (sorted, each padded to its own longest). Sorted
against unsorted at the same micro-batch size is what padding costs; one against four is what the
micro-batch size costs (a large logits tensor, B x L x vocabulary, is slow on a CPU cache). The
median time of each over ``--pad-repeats``, and the share of padded positions.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from dcmdp.engines.vllm_engine import cpu_description  # imports no vLLM

REPO = Path(__file__).resolve().parents[1]
ENV = {
    "OMP_NUM_THREADS": "1",
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "VLLM_ALLOW_INSECURE_SERIALIZATION": "1",
    "HF_HUB_OFFLINE": "1",
    "VLLM_LOGGING_LEVEL": "WARNING",
    "TOKENIZERS_PARALLELISM": "false",
}


def run_arm(config: str, staleness: int, steps: int, overrides: list[str]) -> dict[str, Any]:
    """One `dcmdp train` run; the medians of its phases over steps 2..N."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        cmd = [
            sys.executable,
            "-m",
            "dcmdp.cli",
            "train",
            "--config",
            config,
            f"run.max_staleness={staleness}",
            f"run.steps={steps}",
            "run.eval_every=0",
            "run.checkpoint_every=0",
            "run.tensorboard=false",
            "run.threads=1",
            f"run.out_dir={out}",
            *overrides,
        ]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=REPO, env={**os.environ, **ENV}, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            raise RuntimeError(f"max_staleness {staleness} failed:\n{proc.stderr[-3000:]}")
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["kind"] == "train"][1:]
    med = statistics.median
    return {
        "step_s": med(r["time/step"] for r in train),
        "rollout_wait_s": med(r["time/rollout_wait"] for r in train),
        "rollout_s": med(r["time/rollout"] for r in train),
        "update_s": med(r["time/update"] + r["time/recompute"] for r in train),
        "behaviour_s": med(r.get("time/behaviour", 0.0) for r in train),
        "sync_s": med(r["time/sync"] for r in train),
        "tokens": med(r["rollout/tokens"] for r in train),
        "wall_s": wall,
    }


def padding_cost(config: str, overrides: list[str], repeats: int) -> dict[str, float]:
    """Forward + backward of one sampled batch: padded as one micro-batch against four length buckets."""
    import torch

    from dcmdp.config import load_config
    from dcmdp.engines.base import make_engine
    from dcmdp.models import eos_token_ids, load_model, load_tokenizer
    from dcmdp.rollout import SyncRollout, build_token_batch, sequence_logprobs
    from dcmdp.run_setup import engine_spec, resolve_base_model, sampling_settings
    from dcmdp.tasks import make_task

    torch.set_num_threads(1)
    cfg = load_config(config, overrides)
    base = resolve_base_model(cfg, lambda _msg: None)
    tokenizer = load_tokenizer(base)
    sampling = sampling_settings(cfg, eos_token_ids(base, tokenizer))
    engine = make_engine(engine_spec(cfg, base))
    task = make_task(cfg.task.name, **cfg.task.options)
    source = SyncRollout(engine, task, tokenizer, sampling, cfg.run.prompts_per_step, cfg.run.group_size, 0)
    ro = source.next_batch(1)
    source.close()
    model = load_model(base)
    model.train()
    pad = tokenizer.pad_token_id

    def fwd_bwd(groups: list[list[int]]) -> float:
        t0 = time.perf_counter()
        for rows in groups:
            batch = build_token_batch(ro.prompts, [ro.completions[i] for i in rows], pad)
            logp = sequence_logprobs(model, batch, sampling)
            (logp * batch.response_mask_BT).sum().backward()
        model.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    n = len(ro.completions)
    lengths = [len(ro.prompts[c.prompt_index]) + len(c.token_ids) for c in ro.completions]
    order = sorted(range(n), key=lambda i: lengths[i])
    buckets = [order[k * n // 4 : (k + 1) * n // 4] for k in range(4)]
    unsorted = [list(range(n))[k * n // 4 : (k + 1) * n // 4] for k in range(4)]
    one = [list(range(n))]
    fwd_bwd(one)  # warm-up
    padded = statistics.median(fwd_bwd(one) for _ in range(repeats))
    split = statistics.median(fwd_bwd(unsorted) for _ in range(repeats))
    bucketed = statistics.median(fwd_bwd(buckets) for _ in range(repeats))
    real = sum(lengths)
    bucket_positions = sum(max(lengths[i] for i in b) * len(b) for b in buckets)
    unsorted_positions = sum(max(lengths[i] for i in b) * len(b) for b in unsorted)
    return {
        "padded_s": padded,
        "split_s": split,
        "bucketed_s": bucketed,
        "padding_share_split": 1 - real / unsorted_positions,
        "padding_share": 1 - real / (max(lengths) * n),
        "padding_share_bucketed": 1 - real / bucket_positions,
        "lengths_min": float(min(lengths)),
        "lengths_max": float(max(lengths)),
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="configs/long_addition.yaml")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--staleness", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--pad-repeats", type=int, default=3)
    ap.add_argument("--skip-padding", action="store_true")
    ap.add_argument("--only-padding", action="store_true")
    ap.add_argument("--json", default=None)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)
    print(
        f"cpu: {cpu_description()}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}; config {args.config} {' '.join(args.overrides)}",
        flush=True,
    )
    runs: dict[int, list[dict[str, Any]]] = {s: [] for s in args.staleness}
    for r in range(0 if args.only_padding else args.repeats):
        for s in args.staleness:
            res = run_arm(args.config, s, args.steps, args.overrides)
            runs[s].append(res)
            print(
                f"repeat {r + 1} max_staleness {s}: {json.dumps({k: round(v, 3) for k, v in res.items()})}",
                flush=True,
            )
    med = statistics.median
    figures = {s: {k: med(x[k] for x in rs) for k in rs[0]} for s, rs in runs.items() if rs}
    base = figures[args.staleness[0]]["step_s"] if figures else 1.0
    print(
        "\n| max_staleness | median step s | steps/min | x vs sync | rollout wait s | update s | behaviour s |"
    )
    print("|---|---|---|---|---|---|---|")
    for s, f in figures.items():
        print(
            f"| {s} | {f['step_s']:.2f} | {60 / f['step_s']:.1f} | {base / f['step_s']:.2f} | "
            f"{f['rollout_s']:.2f} | {f['rollout_wait_s']:.2f} | {f['update_s']:.2f} | {f['behaviour_s']:.2f} |"
        )
    pad: dict[str, float] = {}
    if not args.skip_padding:
        pad = padding_cost(args.config, args.overrides, args.pad_repeats)
        print(
            f"\nupdate forward+backward of one batch (lengths {pad['lengths_min']:.0f}-{pad['lengths_max']:.0f}): "
            f"one micro-batch {pad['padded_s']:.2f}s ({pad['padding_share']:.0%} padded positions); "
            f"four micro-batches in sampling order {pad['split_s']:.2f}s ({pad['padding_share_split']:.0%} padded); "
            f"four length-sorted micro-batches {pad['bucketed_s']:.2f}s ({pad['padding_share_bucketed']:.0%} padded). "
            f"Padding itself costs {1 - pad['bucketed_s'] / pad['split_s']:.0%} (sorted against unsorted, same sizes)"
        )
    if args.json:
        Path(args.json).write_text(json.dumps({"figures": figures, "runs": runs, "padding": pad}, indent=2))


if __name__ == "__main__":
    main()
