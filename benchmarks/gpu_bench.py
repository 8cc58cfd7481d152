"""The performance benchmark in one go on a GPU (sized to finish within 8 minutes; not yet run on one).

    python benchmarks/gpu_bench.py [--out runs/gpu_bench.json]     # on a CUDA machine
    python benchmarks/gpu_bench.py --smoke                     # seconds, on CPU: checks the script
    python benchmarks/gpu_bench.py --smoke --dtype bfloat16    # the same at the GPU run's dtype

On the lent GPU machine (Python 3.12, torch 2.11, transformers 5.17, accelerate, safetensors,
tokenizers, pytest; no vLLM, TRL, verl, gguf, matplotlib or tensorboard, nothing installable), do
not install the project (pyproject pins torch 2.13 and Python 3.11); run it from the tree:

    PYTHONPATH=src python3 benchmarks/gpu_bench.py --out "$OUT/gpu_bench.json"

(the script also finds ../src by itself when dcmdp is not importable). Without vLLM the rollout
engine is the Transformers one, and --trl reports itself skipped. Checked on CPU, not on a GPU:
in a Python 3.12 venv with exactly torch 2.11.0 (the PyPI build, CUDA libraries present but no
GPU) and transformers 5.17.0 plus accelerate, safetensors, tokenizers, pyyaml, numpy, pytest and
nothing else, `--smoke` and `--smoke --dtype bfloat16` ran to the end; the only third-party
packages imported were torch, transformers and their own dependencies. tests/test_gpu_bench.py
runs --smoke with vllm, trl, verl, gguf, matplotlib, tensorboard, wandb and llama_cpp blocked, so
an optional import on this path fails `make test`.

What it measures, all in bfloat16 on one device:
  1. a Qwen3 of about 60M parameters (hidden 768, 8 layers, the char tokenizer), random init;
  2. `dcmdp train` for --steps steps of --prompts x --group completions of up to --max-tokens
     tokens (random weights never emit EOS, so every completion is full length), with the vLLM
     engine when vLLM is importable and the Transformers engine otherwise; prints the median
     time of each phase (rollout, log-prob recompute, update, dual step, weight sync), the
     evaluation time and the rollout tokens per second; then the same run with
     run.max_staleness=--async-staleness (default 1: the engine in a rollout worker process that
     samples the next batch while the trainer updates) and the ratio of steps per minute;
  3. the cost of the DCMDP term: `update_policy` with each loss, timed in alternation on the
     same batch (benchmarks/bench_loss_overhead.py), median and ratio to grpo;
  4. with --trl and trl installed: benchmarks/bench_trl.py on the same device (TRL's GRPOTrainer
     against `dcmdp train` on the warm-started tiny model: steps/min and peak memory).
Prints the GPU name beside the figures and writes them all to --out as JSON.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")

# Run from the source tree without installing the project (the GPU machine): find ../src.
if importlib.util.find_spec("dcmdp") is None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch

from dcmdp.models import TinyModelSpec, build_tiny_model, load_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_loss_overhead import print_table, time_losses
from bench_step_time import print_summary, run_job


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name(0)
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def model_spec(smoke: bool) -> TinyModelSpec:
    if smoke:
        return TinyModelSpec(hidden_size=64, num_layers=2, head_dim=16, intermediate_size=192)
    # About 60M parameters: 8 x (attention 4 x 768^2 + MLP 3 x 768 x 2304) + embeddings.
    return TinyModelSpec(
        hidden_size=768,
        num_layers=8,
        num_heads=12,
        num_kv_heads=4,
        head_dim=64,
        intermediate_size=2304,
        max_position_embeddings=512,
    )


def training_run(
    model_dir: Path, out_dir: Path, args: argparse.Namespace, engine: str, max_staleness: int = 0
) -> dict[str, Any]:
    """One `dcmdp train` run (dcmdp loss); per-phase medians over steps 2..N, wall time."""
    overrides = [
        f"run.max_staleness={max_staleness}",
        f"model.path={model_dir}",
        f"model.dtype={args.dtype}",
        f"model.device={args.device}",
        f"engine.type={engine}",
        f"engine.dtype={args.dtype}",
        f"engine.max_model_len={64 + args.max_tokens}",
        "loss.type=dcmdp",
        f"run.steps={args.steps}",
        f"run.prompts_per_step={args.prompts}",
        f"run.group_size={args.group}",
        f"sampling.max_tokens={args.max_tokens}",
        f"run.eval_every={args.steps}",
        f"run.eval_problems={args.prompts}",
        "run.checkpoint_every=0",
        "run.tensorboard=false",
    ]
    summary, wall = run_job(overrides, out_dir)
    return {**summary, "wall_s": wall}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny model, 3 steps, CPU: checks the script")
    ap.add_argument("--steps", type=int, default=None, help="training steps (default 20; smoke 3)")
    ap.add_argument("--prompts", type=int, default=None, help="prompts per step (default 64; smoke 4)")
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=None, help="default 64; smoke 8")
    ap.add_argument("--repeats", type=int, default=None, help="loss-cost repeats (default 9; smoke 2)")
    ap.add_argument("--engine", default="auto", help="auto (vllm when importable) | vllm | transformers")
    ap.add_argument("--trl", action="store_true", help="also run benchmarks/bench_trl.py on the device")
    ap.add_argument(
        "--async-staleness",
        type=int,
        default=1,
        help="also train with run.max_staleness=N (a rollout worker process; 0 = skip)",
    )
    ap.add_argument(
        "--dtype",
        default=None,
        choices=("float32", "bfloat16", "float16"),
        help="model and engine dtype (default bfloat16; smoke float32)",
    )
    ap.add_argument("--out", default="runs/gpu_bench.json")
    args = ap.parse_args()
    args.device = "cpu" if args.smoke else "cuda"
    args.dtype = args.dtype or ("float32" if args.smoke else "bfloat16")
    args.steps = args.steps or (3 if args.smoke else 20)
    args.prompts = args.prompts or (4 if args.smoke else 64)
    args.max_tokens = args.max_tokens or (8 if args.smoke else 64)
    args.repeats = args.repeats or (2 if args.smoke else 9)
    if args.group < 2:
        ap.error("--group must be at least 2 (GRPO groups)")
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device visible; run with --smoke to check the script on CPU", file=sys.stderr)
        return 2
    engine = args.engine
    if engine == "auto":
        engine = "vllm" if importlib.util.find_spec("vllm") is not None and not args.smoke else "transformers"
    if engine == "vllm" and importlib.util.find_spec("vllm") is None:
        print(
            "--engine vllm: vLLM is not installed here; use --engine transformers (or auto)", file=sys.stderr
        )
        return 2

    t_start = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="dcmdp-gpu-bench-"))
    model_dir = build_tiny_model(work / "model", model_spec(args.smoke))
    n_params = sum(p.numel() for p in load_model(model_dir).parameters())
    name = device_name(args.device)
    report: dict[str, Any] = {
        "device": name,
        "torch": torch.__version__,
        "transformers": importlib.metadata.version("transformers"),
        "python": platform.python_version(),
        "params_M": n_params / 1e6,
        "engine": engine,
        "dtype": args.dtype,
        "batch": f"{args.prompts} prompts x {args.group} x {args.max_tokens} tokens",
        "steps": args.steps,
    }
    print(
        f"device: {name} | model {n_params / 1e6:.1f}M params | {report['batch']} | engine {engine} {args.dtype}"
    )

    print("\n[1/3] training run (dcmdp loss)", flush=True)
    run = training_run(model_dir, work / "run", args, engine)
    report["train"] = run
    print_summary(run)
    if args.async_staleness > 0:
        print(
            f"\n[1b/3] the same run with run.max_staleness={args.async_staleness} (rollout worker)",
            flush=True,
        )
        stale = training_run(model_dir, work / "run_async", args, engine, args.async_staleness)
        report["train_async"] = stale
        print_summary(stale)
        ratio = run["time/step"] / stale["time/step"]
        report["async_speedup"] = ratio
        print(f"  asynchronous / synchronous steps per minute: {ratio:.2f}x")

    print("\n[2/3] cost of the DCMDP term (update_policy, alternating, same batch)", flush=True)
    model = load_model(model_dir, dtype=getattr(torch, args.dtype), device=args.device)
    times = time_losses(model, args.prompts, args.group, args.max_tokens, args.repeats)
    print_table(times)
    report["loss_cost"] = {k: statistics.median(v) for k, v in times.items()}
    del model
    if args.device == "cuda":
        report["peak_gpu_mem_GiB"] = torch.cuda.max_memory_allocated() / 2**30

    if args.trl:
        print("\n[3/3] TRL GRPOTrainer against dcmdp train (benchmarks/bench_trl.py)", flush=True)
        if importlib.util.find_spec("trl") is None:
            print("  skipped: trl is not installed (where it can be: pip install -e .[trl])")
        else:
            cmd = [
                sys.executable,
                str(Path(__file__).with_name("bench_trl.py")),
                "--device",
                args.device,
                "--json",
                str(work / "trl.json"),
            ]
            rc = subprocess.call(cmd)
            if rc == 0 and (work / "trl.json").exists():
                report["trl"] = json.loads((work / "trl.json").read_text())
            else:
                print(f"  bench_trl.py exited with {rc}")
    else:
        print("\n[3/3] TRL comparison skipped (pass --trl)")

    report["total_s"] = time.perf_counter() - t_start
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"\ntotal {report['total_s']:.0f} s on {name}; figures written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
