"""Command-line entry point: `dcmdp train | pretrain | probe | eval | report`.

Each subcommand lives in its own module, which exposes ``add_parser(subparsers)`` registering
its arguments and a ``func`` default that runs it and returns an exit code.

Engines are quiet by default (their logs go to stderr, below ERROR only with ``--engine-logs``
or ``DCMDP_ENGINE_LOGS=1``). A subcommand run with ``--json`` gets ``args.data_out``: the real
stdout, which then carries its JSON document and nothing else (see ``dcmdp.cli_io``).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from dcmdp.cli_io import configure_engine_logs, data_stdout

# Subcommand -> module. Modules are imported lazily so `dcmdp --help` stays fast.
COMMANDS = {
    "train": "dcmdp.train_cli",
    "pretrain": "dcmdp.pretrain",
    "probe": "dcmdp.probe",
    "eval": "dcmdp.evaluate",
    "report": "dcmdp.report",
}


def _env_defaults() -> None:
    # vLLM in-process (no engine-core subprocess), a small CPU KV cache, and in-memory weight
    # push through collective_rpc (which pickles a function). Users may override each.
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # --engine-logs may stand anywhere on the line (before or after the subcommand).
    engine_logs = "--engine-logs" in argv or os.environ.get("DCMDP_ENGINE_LOGS", "") not in ("", "0")
    argv = [a for a in argv if a != "--engine-logs"]
    _env_defaults()
    configure_engine_logs(verbose=engine_logs)
    parser = argparse.ArgumentParser(
        prog="dcmdp",
        description="Discrepancy-constrained RL for LLMs.",
        epilog="--engine-logs (anywhere on the line, or DCMDP_ENGINE_LOGS=1): show the engines' own "
        "INFO/WARNING logs (on stderr); by default only their errors are shown.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    wanted = argv[0] if argv and argv[0] in COMMANDS else None
    for name, module in COMMANDS.items():
        if wanted is not None and name != wanted:
            sub.add_parser(name)
            continue
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise
            p = sub.add_parser(name, help="(not yet available)")
            p.set_defaults(func=lambda _a, n=name: print(f"dcmdp {n}: not yet available") or 1)
            continue
        mod.add_parser(sub)
    args = parser.parse_args(argv)
    from dcmdp.engines.base import UnsupportedQuantizationError  # after the env (torch reads it)

    try:
        if getattr(args, "json", False):
            with data_stdout() as out:
                args.data_out = out
                return int(args.func(args) or 0)
        args.data_out = sys.stdout
        return int(args.func(args) or 0)
    except UnsupportedQuantizationError as exc:  # a setting this machine has no kernel for
        print(f"dcmdp {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
