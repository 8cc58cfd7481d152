"""`dcmdp probe`: measure the train-inference discrepancy of one or more engine settings.

For each setting (engine type, dtype, optional quantization) the probe samples completions with
that engine, recomputes their log-probs with the trainer (Transformers, float32 by default) under
the same temperature / top-k / top-p processing, and reports every measure of
``dcmdp.algo.discrepancy.discrepancy_metrics`` side by side, plus throughput and sample counts.

    dcmdp probe --model tiny-qwen3 --setting transformers:float32 --setting transformers:float32:int4
    dcmdp probe --model PATH --engine vllm --dtype bfloat16 --json

Engines are built and closed one at a time, so at most one engine and the trainer are in memory.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from dcmdp.engines.base import (
    DTYPES,
    ENGINE_QUANTIZATIONS,
    EngineSpec,
    SamplingSettings,
    UnsupportedQuantizationError,
    engine_names,
    make_engine,
)

# Text prompts for models without the dcmdp character tokenizer (a task registry comes later).
GENERIC_PROMPTS = (
    "What is 17 + 25? Answer with a number.",
    "Write one sentence about the sea.",
    "List three prime numbers.",
    "Translate 'good morning' into French.",
    "Explain in one sentence why the sky is blue.",
    "Complete the sequence: 2, 4, 8, 16,",
    "Name a famous mathematician.",
    "What is the capital of Italy?",
)
# Quantization names each engine type accepts; None = the engine checks them itself.


@dataclass(frozen=True)
class ProbeSetting:
    """One column of the probe: which engine, at which dtype, with which quantization."""

    engine: str
    dtype: str
    quantization: str | None = None
    fp32_modules: tuple[str, ...] = ()  # module groups the engine keeps in float32 (the remedy)

    def engine_spec(self, model_path: Path, seed: int, device: str, **extra: Any) -> EngineSpec:
        """The engine this setting names, for ``model_path`` (``extra``: further EngineSpec fields)."""
        return EngineSpec(
            type=self.engine,
            model=str(model_path),
            dtype=self.dtype,
            quantization=self.quantization,
            seed=seed,
            device=device,
            fp32_modules=self.fp32_modules,
            **extra,
        )

    @property
    def label(self) -> str:
        base = ":".join([self.engine, self.dtype] + ([self.quantization] if self.quantization else []))
        return base + ("@" + "+".join(self.fp32_modules) if self.fp32_modules else "")


def parse_setting(text: str) -> ProbeSetting:
    """Parse ``engine:dtype[:quantization][@group+group]`` (e.g. ``vllm:bfloat16``,
    ``transformers:float32:int4``, ``transformers:bfloat16@lm_head+norms``: the groups after ``@``
    kept in float32, see ``engine.fp32_modules``)."""
    head, _, kept = text.partition("@")
    parts = head.split(":")
    if len(parts) not in (2, 3) or not all(parts) or ("@" in text and not kept):
        raise ValueError(
            f"setting {text!r} must look like engine:dtype[:quantization][@group+group], e.g. vllm:bfloat16 "
            "or transformers:bfloat16@lm_head+norms"
        )
    engine, dtype = parts[0], parts[1]
    quant = parts[2] if len(parts) == 3 and parts[2].lower() != "none" else None
    return make_setting(engine, dtype, quant, tuple(kept.split("+")) if kept else ())


def make_setting(
    engine: str, dtype: str, quantization: str | None, fp32_modules: tuple[str, ...] = ()
) -> ProbeSetting:
    from dcmdp.engines.precision import check_group_labels, fp32_modules_problem

    fp32_modules = check_group_labels(fp32_modules)
    problem = fp32_modules_problem(engine, fp32_modules)
    if problem:
        raise ValueError(problem)
    if engine not in engine_names():
        raise ValueError(f"engine {engine!r} is unknown; valid: {', '.join(engine_names())}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is unknown; valid: {', '.join(DTYPES)}")
    allowed = ENGINE_QUANTIZATIONS.get(engine)
    if quantization is not None and allowed is not None and quantization not in allowed:
        raise ValueError(
            f"quantization {quantization!r} is unknown for engine {engine}; valid: {', '.join(allowed)} or none"
        )
    return ProbeSetting(engine, dtype, quantization, fp32_modules)


def make_prompts(tokenizer: Any, num_prompts: int, seed: int) -> list[list[int]]:
    """Task-like prompts as token ids.

    With the dcmdp character tokenizer: arithmetic strings such as ``"12+35="`` from a seeded RNG.
    Otherwise the ``GENERIC_PROMPTS`` cycled, through the chat template when the tokenizer has one.
    """
    from dcmdp.models import char_vocab

    if tokenizer.get_vocab() == char_vocab():
        rng = random.Random(seed)
        texts = [f"{rng.randint(0, 99)}+{rng.randint(0, 99)}=" for _ in range(num_prompts)]
        return [tokenizer.encode(t, add_special_tokens=False) for t in texts]
    texts = [GENERIC_PROMPTS[i % len(GENERIC_PROMPTS)] for i in range(num_prompts)]
    if getattr(tokenizer, "chat_template", None):
        texts = [
            tokenizer.apply_chat_template(
                [{"role": "user", "content": t}], tokenize=False, add_generation_prompt=True
            )
            for t in texts
        ]
    return [tokenizer.encode(t, add_special_tokens=False) for t in texts]


@dataclass
class SettingResult:
    setting: str
    engine: str
    dtype: str
    quantization: str | None
    fp32_modules: list[str]  # module groups the engine kept in float32
    samples: int  # completions kept after validation
    tokens: int  # response tokens generated (kept samples)
    tokens_per_s: float  # response tokens / seconds in engine.generate
    load_s: float  # seconds to build the engine (before the warm-up call)
    dropped: dict[str, int]  # samples the engine returned but validation rejected, by reason
    # Tokens the engine sampled that the trainer's processed distribution gives probability 0
    # (top-k / top-p kept sets differ); left out of the metrics, which would be infinite.
    trainer_zero_prob_tokens: int
    metrics: dict[str, float]
    # --breakdown: the gap by trainer token probability, entropy and position (dcmdp.breakdown)
    breakdown: list[dict[str, Any]] = dataclasses.field(default_factory=list)


def probe_setting(
    setting: ProbeSetting,
    model_path: Path,
    trainer: Any,
    prompts: list[list[int]],
    sampling: SamplingSettings,
    samples: int,
    seed: int,
    pad_id: int | None,
    max_model_len: int,
    device: str,
    breakdown: bool = False,
) -> SettingResult:
    """Sample with one engine setting, recompute with the trainer, and measure the discrepancy."""
    from dcmdp.algo.discrepancy import discrepancy_metrics
    from dcmdp.breakdown import gap_breakdown, trainer_token_stats
    from dcmdp.rollout import build_token_batch

    spec = setting.engine_spec(model_path, seed, device, max_model_len=max_model_len)
    t0 = time.perf_counter()
    engine = make_engine(spec)
    load_s = time.perf_counter() - t0
    try:
        # A short warm-up call first, so tokens/s measures steady-state sampling, not first-call
        # set-up (vLLM's first call, kernel selection); its samples are discarded.
        engine.generate(prompts[:1], dataclasses.replace(sampling, max_tokens=2), n=1, seed=seed)
        result = engine.generate(prompts, sampling, n=samples, seed=seed)
    finally:
        engine.close()
        del engine
        gc.collect()
    gen_s = result.timings.get("generate", float("nan"))
    metrics: dict[str, float] = {}
    zero_prob = 0
    bins: list[dict[str, Any]] = []
    if result.completions:
        batch = build_token_batch(prompts, result.completions, pad_id)
        logp_BT, entropy_BT = trainer_token_stats(trainer, batch, sampling, micro_batch=16)
        if breakdown:
            bins = [
                asdict(b)
                for b in gap_breakdown(logp_BT, batch.engine_logp_BT, entropy_BT, batch.response_mask_BT)
            ]
        mask_BT = batch.response_mask_BT & torch.isfinite(logp_BT)
        zero_prob = int((batch.response_mask_BT & ~torch.isfinite(logp_BT)).sum())
        if bool(mask_BT.any()):
            raw = discrepancy_metrics(logp_BT, batch.engine_logp_BT, mask_BT)
            metrics = {k: float(v) for k, v in raw.items()}
    return SettingResult(
        setting=setting.label,
        engine=setting.engine,
        dtype=setting.dtype,
        quantization=setting.quantization,
        fp32_modules=list(setting.fp32_modules),
        samples=len(result.completions),
        tokens=result.num_tokens,
        tokens_per_s=result.num_tokens / gen_s if gen_s > 0 else float("nan"),
        load_s=load_s,
        dropped=dict(result.dropped),
        trainer_zero_prob_tokens=zero_prob,
        metrics=metrics,
        breakdown=bins,
    )


def _fmt(x: float) -> str:
    if isinstance(x, float) and not math.isfinite(x):
        return "nan" if math.isnan(x) else str(x)
    if x == int(x) and abs(x) < 1e9:
        return str(int(x))
    return f"{x:.4g}"


def format_table(results: list[SettingResult]) -> str:
    """Rows = measures, columns = settings, aligned."""
    names: list[str] = []
    for r in results:
        names += [k for k in r.metrics if k not in names]
    rows: list[tuple[str, list[str]]] = [
        ("samples", [str(r.samples) for r in results]),
        ("dropped", [str(sum(r.dropped.values())) for r in results]),
        ("response tokens", [str(r.tokens) for r in results]),
        ("tokens/s", [f"{r.tokens_per_s:.1f}" for r in results]),
        ("engine load s", [f"{r.load_s:.2f}" for r in results]),
        ("trainer p=0 tokens", [str(r.trainer_zero_prob_tokens) for r in results]),
    ]
    rows += [(n, [_fmt(r.metrics[n]) if n in r.metrics else "-" for r in results]) for n in names]
    header = ("measure", [r.setting for r in results])
    width0 = max(len(name) for name, _ in [header, *rows])
    widths = [max(len(header[1][j]), *(len(cells[j]) for _, cells in rows)) for j in range(len(results))]

    def line(name: str, cells: list[str]) -> str:
        return "  ".join([name.ljust(width0)] + [c.rjust(w) for c, w in zip(cells, widths)])

    out = [line(*header), "  ".join(["-" * width0] + ["-" * w for w in widths])]
    out += [line(name, cells) for name, cells in rows]
    return "\n".join(out)


def _json_safe(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_json_safe(v) for v in x]
    return x


def run(args: argparse.Namespace) -> int:
    from dcmdp.engines.hf_engine import TORCH_DTYPES
    from dcmdp.models import eos_token_ids, load_model, load_tokenizer, resolve_device, resolve_model

    try:
        if args.setting:
            settings = [parse_setting(s) for s in args.setting]
        else:
            settings = [make_setting(args.engine, args.dtype, args.quantization)]
        if args.trainer_dtype not in DTYPES:
            raise ValueError(f"--trainer-dtype {args.trainer_dtype!r} is unknown; valid: {', '.join(DTYPES)}")
        sampling = SamplingSettings(
            temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, max_tokens=args.max_tokens
        )
        if args.prompts < 1 or args.samples < 1:
            raise ValueError("--prompts and --samples must be >= 1")
        if args.max_model_len <= args.max_tokens:
            raise ValueError(
                f"--max-model-len ({args.max_model_len}) must exceed --max-tokens ({args.max_tokens})"
            )
        if args.plot and not (args.attribute or args.breakdown):
            raise ValueError("--plot needs --attribute or --breakdown (the plain probe has no chart)")
        if args.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"--device {args.device!r} is unknown; valid: auto, cpu, cuda")
        if args.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda but no CUDA device is visible (use auto or cpu)")
        model_path = resolve_model(args.model)
    except ValueError as exc:
        print(f"dcmdp probe: error: {exc}", file=sys.stderr)
        return 2

    tokenizer = load_tokenizer(model_path)
    stop = eos_token_ids(model_path, tokenizer)  # all the model's EOS ids, as the trainer
    sampling = dataclasses.replace(sampling, stop_token_ids=stop)
    if args.task:
        from dcmdp.tasks import make_task

        try:
            problems = make_task(args.task, **args.task_options).problems(
                "eval", args.prompts, seed=args.seed
            )
        except (ValueError, TypeError, KeyError) as exc:
            print(f"dcmdp probe: error: --task {args.task}: {exc}", file=sys.stderr)
            return 2
        prompts = [tokenizer.encode(p.prompt, add_special_tokens=False) for p in problems]
    else:
        prompts = make_prompts(tokenizer, args.prompts, args.seed)
    pad_id = tokenizer.pad_token_id  # None: build_token_batch pads with 0
    device = resolve_device(args.device)
    trainer = load_model(model_path, dtype=TORCH_DTYPES[args.trainer_dtype], device=device).eval()
    if args.attribute:
        return run_attribute(args, settings, model_path, trainer, prompts, sampling, pad_id)

    results = []
    for setting in settings:
        if not args.json:
            print(f"probing {setting.label} ...", file=sys.stderr)
        try:
            result = probe_setting(
                setting,
                model_path,
                trainer,
                prompts,
                sampling,
                args.samples,
                args.seed,
                pad_id,
                args.max_model_len,
                args.device,
                breakdown=args.breakdown,
            )
        except UnsupportedQuantizationError as exc:  # no kernel for it on this CPU
            print(f"dcmdp probe: error: {setting.label}: {exc}", file=sys.stderr)
            return 2
        results.append(result)

    if args.json:
        payload = {
            "model": str(model_path),
            "trainer_dtype": args.trainer_dtype,
            "prompts": len(prompts),
            "samples_per_prompt": args.samples,
            "sampling": asdict(sampling),
            "settings": [asdict(r) for r in results],
        }
        print(json.dumps(_json_safe(payload), indent=2), file=getattr(args, "data_out", None))
    else:
        print(
            f"model {model_path}  trainer {args.trainer_dtype}  {len(prompts)} prompts x {args.samples} samples  "
            f"T={sampling.temperature} top_k={sampling.top_k} top_p={sampling.top_p} max_tokens={sampling.max_tokens}"
        )
        print(format_table(results))
        if args.breakdown:
            from dcmdp.breakdown import GapBin, format_breakdown

            for r in results:
                print(f"\ngap of {r.setting} by the trainer's token probability, entropy and position")
                print(format_breakdown([GapBin(**b) for b in r.breakdown]))
    if args.breakdown and args.plot:
        from dcmdp.breakdown import GapBin, plot_breakdown

        plot_breakdown({r.setting: [GapBin(**b) for b in r.breakdown] for r in results}, args.plot)
        print(f"plot: {args.plot}", file=sys.stderr)
    return 0


def run_attribute(
    args: argparse.Namespace,
    settings: list[ProbeSetting],
    model_path: Any,
    trainer: torch.nn.Module,
    prompts: list[list[int]],
    sampling: SamplingSettings,
    pad_id: int | None,
) -> int:
    """``--attribute``: the setting applied to one module group at a time (dcmdp.attribution)."""
    from dcmdp.attribution import DTYPE_MODES, WEIGHT_MODES, attribute, format_attribution, plot_attribution
    from dcmdp.engines.base import EngineSpec, make_engine
    from dcmdp.rollout.batch import build_token_batch

    if len(settings) != 1 or settings[0].engine != "transformers" or settings[0].fp32_modules:
        print(
            "dcmdp probe: error: --attribute takes one transformers setting without @groups", file=sys.stderr
        )
        return 2
    setting = settings[0]
    mode = setting.quantization or setting.dtype
    if setting.quantization is not None and setting.dtype != "float32":
        print(
            "dcmdp probe: error: --attribute: a quantization at --dtype float32 (one cause at a time)",
            file=sys.stderr,
        )
        return 2
    if mode not in WEIGHT_MODES + DTYPE_MODES or args.trainer_dtype != "float32":
        print(
            f"dcmdp probe: error: --attribute needs a float32 trainer and one of {', '.join(WEIGHT_MODES + DTYPE_MODES)} "
            f"(got {mode})",
            file=sys.stderr,
        )
        return 2
    reference = make_engine(
        EngineSpec(type="transformers", model=str(model_path), dtype="float32", seed=args.seed)
    )
    result = reference.generate(prompts, sampling, n=args.samples, seed=args.seed)
    reference.close()
    batch = build_token_batch(prompts, result.completions, pad_id)
    full, rows = attribute(trainer, batch, mode, per_layer=args.per_layer, only=args.only)
    print(
        f"model {model_path}  setting transformers {mode}{' on ' + args.only if args.only else ''}  "
        f"{len(prompts)} prompts x {args.samples} samples (sampled by the float32 model, T={sampling.temperature})"
    )
    print(format_attribution(full, rows))
    if args.plot:
        plot_attribution(
            full, rows, args.plot, f"{model_path.name if hasattr(model_path, 'name') else model_path}: {mode}"
        )
        print(f"plot: {args.plot}")
    return 0


def _yaml_mapping(text: str) -> dict[str, Any]:
    import yaml

    value = yaml.safe_load(text)
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(
            f"expected a YAML mapping such as '{{digits: [4, 6]}}', got {text!r}"
        )
    return value


def add_parser(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "probe",
        help="measure engine-vs-trainer discrepancy for one or more engine settings",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", required=True, help="local HF model directory or a named model")
    p.add_argument("--engine", default="vllm", help=f"engine type ({', '.join(engine_names())})")
    p.add_argument("--dtype", default="bfloat16", help=f"engine dtype ({', '.join(DTYPES)})")
    p.add_argument("--quantization", default=None, help="engine quantization (engine-specific name)")
    p.add_argument(
        "--setting",
        action="append",
        default=[],
        metavar="ENGINE:DTYPE[:QUANT][@GROUPS]",
        help="a setting to probe (repeatable); when given, --engine/--dtype/--quantization are ignored. "
        "Append @lm_head+norms (any groups of engine.fp32_modules) to keep those modules in float32",
    )
    p.add_argument("--prompts", type=int, default=8, help="number of prompts")
    p.add_argument(
        "--task",
        default=None,
        help="take the prompts from this task's eval split (e.g. long_addition) instead of the built-in ones",
    )
    p.add_argument(
        "--task-options",
        type=_yaml_mapping,
        default={},
        metavar="YAML",
        help="with --task: its options, e.g. '{digits: [4, 6]}'",
    )
    p.add_argument("--samples", type=int, default=4, help="completions per prompt")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--top-p", type=float, default=1.0, help="1.0 = off")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--trainer-dtype", default="float32", help=f"trainer recompute dtype ({', '.join(DTYPES)})"
    )
    p.add_argument("--max-model-len", type=int, default=256, help="engine context length (vLLM)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument(
        "--attribute",
        action="store_true",
        help="apply the (transformers) setting to one module group at a time and rank the groups' shares",
    )
    p.add_argument(
        "--per-layer", action="store_true", help="with --attribute: attention / mlp / router per layer"
    )
    p.add_argument(
        "--only",
        default=None,
        metavar="REGEX",
        help="with --attribute: apply the setting only to matching names",
    )
    p.add_argument(
        "--breakdown",
        action="store_true",
        help="also split each setting's gap by the trainer's token probability, the next-token entropy "
        "and the position in the response",
    )
    p.add_argument(
        "--plot", default=None, metavar="PNG", help="with --attribute or --breakdown: also write a bar chart"
    )
    p.set_defaults(func=run)
    return p
