"""Generation speed of the vLLM engine against the Transformers engine, and the cost of a weight sync.

    python benchmarks/bench_engines.py [--model DIR | --hidden-size 128 --layers 4]
                                       [--prompts 64 --samples 4 --max-tokens 32]
                                       [--dtypes float32 bfloat16] [--repeats 3 --sync-repeats 5]

Same model, prompts and sampling for both engines (no stop ids, so every row decodes
``--max-tokens`` tokens). For each dtype both engines are built and warmed up, then timed
generate calls alternate between them (machine noise hits both alike); the figure is the median
of ``--repeats`` calls in generated tokens/s. Weight sync: the median of ``--sync-repeats``
pushes of the float32 trainer's ``named_parameters()``. The Transformers engine is
``dcmdp.engines.hf_engine``; without it, plain ``model.generate`` with the KV cache.
The environment (threads, load average) is printed: on a small shared machine set
``OMP_NUM_THREADS=1`` or both engines slow down erratically.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import tempfile
import time
from collections.abc import Sequence

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")

import torch

from dcmdp.engines.base import EngineSpec, SamplingSettings, make_engine
from dcmdp.models import TinyModelSpec, build_tiny_model, load_model


class PlainHF:
    """Fallback when dcmdp.engines.hf_engine is absent: model.generate with the KV cache."""

    def __init__(self, model_dir: str, dtype: str) -> None:
        self.model = load_model(model_dir, dtype=getattr(torch, dtype)).eval()

    def generate(
        self, prompts: Sequence[Sequence[int]], sampling: SamplingSettings, n: int, seed: int
    ) -> int:
        torch.manual_seed(seed)
        rows = [list(p) for p in prompts for _ in range(n)]
        width = max(len(r) for r in rows)
        ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
        mask = (torch.arange(width)[None, :] >= torch.tensor([width - len(r) for r in rows])[:, None]).long()
        with torch.no_grad():
            out = self.model.generate(
                input_ids=ids,
                attention_mask=mask,
                do_sample=True,
                temperature=sampling.temperature,
                top_k=0,
                max_new_tokens=sampling.max_tokens,
                min_new_tokens=sampling.max_tokens,
                pad_token_id=0,
            )
        return int(out[:, width:].numel())

    def load_weights(self, named: object) -> None:
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, t in named:  # type: ignore[attr-defined]
                params[name].copy_(t)

    def close(self) -> None:
        del self.model


def make_hf(model_dir: str, dtype: str) -> tuple[str, object]:
    try:
        import dcmdp.engines.hf_engine  # noqa: F401
    except ImportError:
        return "hf model.generate", PlainHF(model_dir, dtype)
    return "transformers", make_engine(
        EngineSpec(type="transformers", model=model_dir, dtype=dtype, device="cpu")
    )


def tokens_of(engine: object, prompts: list[list[int]], sampling: SamplingSettings, n: int, seed: int) -> int:
    out = engine.generate(prompts, sampling, n=n, seed=seed)  # type: ignore[attr-defined]
    return out if isinstance(out, int) else out.num_tokens


def sync_seconds(engine: object, trainer: torch.nn.Module) -> float:
    t0 = time.perf_counter()
    engine.load_weights(trainer.named_parameters())  # type: ignore[attr-defined]
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="HF model dir (default: a fresh tiny Qwen3)")
    ap.add_argument("--hidden-size", type=int, default=128, help="of the fresh tiny Qwen3")
    ap.add_argument("--layers", type=int, default=4, help="of the fresh tiny Qwen3")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--sync-repeats", type=int, default=5)
    args = ap.parse_args()

    spec = TinyModelSpec(
        hidden_size=args.hidden_size,
        num_layers=args.layers,
        head_dim=args.hidden_size // 4,
        intermediate_size=3 * args.hidden_size,
    )
    model_dir = str(args.model or build_tiny_model(tempfile.mkdtemp() + "/tiny", spec))
    trainer = load_model(model_dir)
    rng = random.Random(0)
    prompts = [[rng.randrange(3, 100) for _ in range(rng.randrange(4, 13))] for _ in range(args.prompts)]
    sampling = SamplingSettings(temperature=1.0, max_tokens=args.max_tokens)
    n = args.samples
    load = os.getloadavg()
    print(
        f"model {model_dir} ({sum(p.numel() for p in trainer.parameters()) / 1e6:.2f}M params) | "
        f"{args.prompts} prompts x {n} samples x {args.max_tokens} tokens | median of {args.repeats} "
        f"(sync: {args.sync_repeats}) | torch threads {torch.get_num_threads()}, "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, load avg {load[0]:.1f}",
        flush=True,
    )

    rows: list[tuple[str, str, float, float]] = []
    for dtype in args.dtypes:
        vllm = make_engine(EngineSpec(type="vllm", model=model_dir, dtype=dtype))
        hf_name, hf = make_hf(model_dir, dtype)
        engines = {"vllm": vllm, hf_name: hf}
        try:
            for engine in engines.values():  # warm-up: first calls build kernels and caches
                tokens_of(engine, prompts[:8], sampling, n, seed=12345)
            rates: dict[str, list[float]] = {name: [] for name in engines}
            for r in range(args.repeats):
                for name, engine in engines.items():
                    t0 = time.perf_counter()
                    tokens = tokens_of(engine, prompts, sampling, n, seed=r)
                    rates[name].append(tokens / (time.perf_counter() - t0))
            syncs: dict[str, list[float]] = {name: [] for name in engines}
            for _ in range(args.sync_repeats):
                for name, engine in engines.items():
                    syncs[name].append(sync_seconds(engine, trainer))
            for name in engines:
                rows.append((dtype, name, statistics.median(rates[name]), statistics.median(syncs[name])))
                print(f"  {dtype:9s} {name:14s} tokens/s {[round(x) for x in rates[name]]}", flush=True)
        finally:
            for engine in engines.values():
                engine.close()  # type: ignore[attr-defined]

    print()
    print(f"{'dtype':9s}  {'engine':16s}  {'tokens/s':>9s}  {'sync s':>8s}")
    for dtype, name, rate, sync in rows:
        print(f"{dtype:9s}  {name:16s}  {rate:9.0f}  {sync:8.4f}")
    for dtype in args.dtypes:
        by = {name: rate for d, name, rate, _ in rows if d == dtype}
        other = next(name for name in by if name != "vllm")
        print(f"{dtype}: vllm / {other} = {by['vllm'] / by[other]:.1f}x generated tokens/s")


if __name__ == "__main__":
    main()
