"""`dcmdp train`: run the default job, or any config file with overrides."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import yaml

from dcmdp.config import RESUME_CHANGEABLE, Change, Config, ConfigError, load_config, load_resume_config

RESUME_HELP = (
    "continue the run in run.out_dir (e.g. `dcmdp train --resume run.out_dir=runs/x`) from its last "
    "checkpoint. Its saved run.out_dir/config.yaml is the base; --config FILE and section.field=value "
    "overrides apply on top, and each changed field is printed. Only these may change: "
    + ", ".join(RESUME_CHANGEABLE)
    + " (raise run.steps to extend a run); any other change is refused. A finished run says so and exits."
)


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "train",
        help="train with DCMDP (no arguments: the default tiny-model job, about 10 minutes on 2 CPU cores)",
        description="Settings come from the defaults, then --config FILE, then section.field=value overrides, "
        "e.g. `dcmdp train loss.type=grpo engine.type=transformers run.steps=20`. With --resume, the "
        "run's saved config.yaml takes the place of the defaults.",
    )
    p.add_argument("overrides", nargs="*", metavar="section.field=value")
    p.add_argument("--config", default=None, help="YAML config file (see configs/)")
    p.add_argument("--resume", action="store_true", help=RESUME_HELP)
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.set_defaults(func=run)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


def _resolve(args: argparse.Namespace) -> tuple[Config, list[Change]]:
    if args.resume:
        return load_resume_config(args.config, args.overrides)
    return load_config(args.config, args.overrides), []


def run(args: argparse.Namespace) -> int:
    try:
        cfg, changes = _resolve(args)
    except ConfigError as exc:
        print(f"config error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except yaml.YAMLError as exc:  # a config file or an override value that is not valid YAML
        print(f"config error: not valid YAML: {_one_line(exc)}", file=sys.stderr)
        return 2
    if args.print_config:
        from dcmdp.config import dump_config

        print(dump_config(cfg))
        return 0
    if args.resume:
        how = "changed on the command line:" if changes else "(no changes)"
        print(f"resume {cfg.run.out_dir} with its saved config.yaml {how}")
        for change in changes:
            print(f"  {change}")
    from dcmdp.checkpoint import CheckpointError
    from dcmdp.rollout.pipeline import RolloutWorkerError
    from dcmdp.sync_check import SyncCheckError
    from dcmdp.trainer import DivergenceError, engine_label, train

    try:
        summary = train(cfg, resume=args.resume)
    except ConfigError as exc:  # found before any model is loaded: task data, a resume past the end
        print(f"config error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except DivergenceError as exc:
        print(f"training stopped: {exc}. The last good checkpoint is kept in {cfg.run.out_dir}/checkpoints.")
        return 3
    except FileExistsError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    except CheckpointError as exc:
        print(f"resume failed: {exc}", file=sys.stderr)
        return 2
    except (RolloutWorkerError, SyncCheckError) as exc:
        print(f"training stopped: {exc}", file=sys.stderr)
        return 4
    except KeyboardInterrupt:
        print(
            f"interrupted; the rollout worker is stopped and the last checkpoint is kept in "
            f"{cfg.run.out_dir}/checkpoints (continue with --resume)",
            file=sys.stderr,
        )
        return 130
    if summary.get("finished"):
        return 0  # an already finished run: train() said so, and nothing ran
    print(json.dumps(summary, indent=2))
    if "accuracy_before" in summary:
        print(
            f"deployment-engine ({engine_label(cfg)}) greedy accuracy: "
            f"{summary['accuracy_before']:.3f} -> {summary['accuracy_after']:.3f}"
        )
    return 0
