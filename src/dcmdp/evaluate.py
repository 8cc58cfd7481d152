"""Accuracy on a deployment engine, and `dcmdp eval`.

Accuracy is always measured on an engine (the deployment setting), never on the trainer: the
policy users ship is the one the engine samples.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from typing import Any

from dcmdp.engines.base import EngineSpec, RolloutEngine, SamplingSettings, make_engine
from dcmdp.tasks import Problem, Task


def evaluate_accuracy(
    engine: RolloutEngine,
    task: Task,
    tokenizer: Any,
    problems: list[Problem],
    greedy: SamplingSettings,
    sampled: SamplingSettings | None = None,
    seed: int = 0,
) -> dict[str, float]:
    """Greedy accuracy (top_k=1), and the accuracy of one sample per problem when ``sampled``."""
    prompts = [tokenizer.encode(p.prompt, add_special_tokens=False) for p in problems]
    out: dict[str, float] = {"eval/problems": float(len(problems))}
    modes = [("greedy", greedy)] + ([("sampled", sampled)] if sampled is not None else [])
    for name, settings in modes:
        result = engine.generate(prompts, settings, n=1, seed=seed)
        correct = 0.0
        tokens = 0
        for c in result.completions:
            text = tokenizer.decode(c.token_ids, skip_special_tokens=True)
            with contextlib.suppress(Exception):  # a reward error counts as wrong
                correct += float(task.reward(problems[c.prompt_index], text) >= 1.0)
            tokens += len(c.token_ids)
        out[f"eval/accuracy_{name}"] = correct / len(problems)
        out[f"eval/mean_tokens_{name}"] = tokens / max(1, len(result.completions))
        out[f"eval/dropped_{name}"] = float(sum(result.dropped.values()))
    return out


def add_parser(sub: Any) -> None:
    p = sub.add_parser("eval", help="score a checkpoint or model on an engine setting")
    p.add_argument("model", help="checkpoint / HF model directory, or a named model")
    p.add_argument("--engine", default="vllm", help="vllm | transformers | llamacpp")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--quantization", default=None)
    p.add_argument("--task", default="arithmetic")
    p.add_argument("--task-option", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--problems", type=int, default=256)
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=10_000)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=run)


def _setup(args: argparse.Namespace) -> tuple[Any, Task, list[Problem]]:
    """Model path, task and eval problems, checked before any engine starts (``ValueError``)."""
    import yaml

    from dcmdp.engines.base import DTYPES, engine_names
    from dcmdp.models import resolve_model
    from dcmdp.tasks import make_task

    if args.engine not in engine_names():
        raise ValueError(f"--engine {args.engine!r} is unknown; valid engines: {', '.join(engine_names())}")
    if args.dtype not in DTYPES:
        raise ValueError(f"--dtype {args.dtype!r} is unknown; valid dtypes: {', '.join(DTYPES)}")
    for flag, value in (("--problems", args.problems), ("--max-tokens", args.max_tokens)):
        if value < 1:
            raise ValueError(f"{flag} must be >= 1, got {value}")
    if not args.temperature > 0:
        raise ValueError(f"--temperature must be > 0, got {args.temperature}")
    options = {}
    for item in args.task_option:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--task-option {item!r}: expected KEY=VALUE, e.g. --task-option digits=3")
        try:
            options[key] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise ValueError(f"--task-option {item!r}: the value is not valid YAML") from None
    try:
        task = make_task(args.task, **options)
        problems = task.problems("eval", args.problems, seed=args.seed)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"--task {args.task}: {exc}") from None
    return resolve_model(args.model), task, problems


def run(args: argparse.Namespace) -> int:
    from dcmdp.models import eos_token_ids, load_tokenizer

    try:
        path, task, problems = _setup(args)
    except ValueError as exc:  # a mistake on the command line: one line, exit status 2
        print(f"dcmdp eval: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    tokenizer = load_tokenizer(path)
    eos = eos_token_ids(path, tokenizer)  # every EOS id of the model, as in training
    engine = make_engine(
        EngineSpec(type=args.engine, model=str(path), dtype=args.dtype, quantization=args.quantization)
    )
    try:
        result = evaluate_accuracy(
            engine,
            task,
            tokenizer,
            problems,
            SamplingSettings(1.0, 1.0, 1, args.max_tokens, eos),
            SamplingSettings(args.temperature, 1.0, 0, args.max_tokens, eos),
            seed=args.seed,
        )
    finally:
        engine.close()
    if args.json:
        print(json.dumps(result, indent=2), file=getattr(args, "data_out", None))
    else:
        print(f"{path} on {args.engine} {args.dtype} {args.quantization or ''}")
        for k, v in result.items():
            print(f"  {k:28s} {v:.4f}")
    return 0
