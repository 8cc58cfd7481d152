"""`dcmdp train`: run the default job, or any config file with overrides."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from dcmdp.config import ConfigError, load_config


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "train",
        help="train with DCMDP (no arguments: the default tiny-model job, about 10 minutes on 2 CPU cores)",
        description="Settings come from the defaults, then --config FILE, then section.field=value overrides, "
        "e.g. `dcmdp train loss.type=grpo engine.type=transformers run.steps=20`.",
    )
    p.add_argument("overrides", nargs="*", metavar="section.field=value")
    p.add_argument("--config", default=None, help="YAML config file (see configs/)")
    p.add_argument(
        "--resume", action="store_true", help="continue the run in run.out_dir from its last checkpoint"
    )
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    if args.print_config:
        from dcmdp.config import dump_config

        print(dump_config(cfg))
        return 0
    from dcmdp.trainer import DivergenceError, train

    try:
        summary = train(cfg, resume=args.resume)
    except DivergenceError as exc:
        print(f"training stopped: {exc}. The last good checkpoint is kept in {cfg.run.out_dir}/checkpoints.")
        return 3
    except FileExistsError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2))
    if "accuracy_before" in summary:
        print(
            f"deployment-engine ({cfg.engine.type} {cfg.engine.dtype}) greedy accuracy: "
            f"{summary['accuracy_before']:.3f} -> {summary['accuracy_after']:.3f}"
        )
    return 0
