"""The README's five-minute tour stays true: every `dcmdp` command in it parses, every `dcmdp
train` line resolves to a valid config, it probes the warm-started model (not a random one), and
nothing it writes lands in the repository root."""

from __future__ import annotations

import argparse
import re
import shlex
from pathlib import Path

import pytest

from dcmdp.cli import COMMANDS
from dcmdp.config import load_config

ROOT = Path(__file__).resolve().parents[1]


def tour_commands() -> list[list[str]]:
    text = (ROOT / "README.md").read_text()
    tour = text[text.index("## A five-minute tour") :]
    block = tour[tour.index("```bash") + len("```bash") : tour.index("```", tour.index("```bash") + 7)]
    block = block.replace("\\\n", " ")
    commands = []
    for line in block.splitlines():
        line = line.split("#", 1)[0].split("|", 1)[0].strip()
        if line.startswith(("dcmdp ", "python ")):
            commands.append(shlex.split(line))
    return commands


def parser_for(command: str) -> argparse.ArgumentParser:
    import importlib

    root = argparse.ArgumentParser(prog="dcmdp")
    sub = root.add_subparsers(dest="command")
    importlib.import_module(COMMANDS[command]).add_parser(sub)
    return root


COMMANDS_IN_TOUR = tour_commands()


def test_the_tour_has_its_commands() -> None:
    names = [c[1] for c in COMMANDS_IN_TOUR if c[0] == "dcmdp"]
    assert {"pretrain", "probe", "train", "eval", "report"} <= set(names)


@pytest.mark.parametrize("argv", [c for c in COMMANDS_IN_TOUR if c[0] == "dcmdp"], ids=" ".join)
def test_every_dcmdp_command_parses(argv: list[str]) -> None:
    args = parser_for(argv[1]).parse_args(argv[1:])
    if argv[1] == "train":
        cfg = load_config(args.config and str(ROOT / args.config), args.overrides)
        # runs go under runs/, never the repository root
        assert Path(cfg.run.out_dir).parts[0] == "runs", cfg.run.out_dir
    if argv[1] == "probe":
        # the warm-started model, not a random one (the MoE model only for --attribute)
        assert args.model == "default" or (args.attribute and args.model == "tiny-qwen3-moe"), args.model
    if argv[1] == "report":
        assert Path(args.out).parts[0] == "runs", args.out


def test_tour_scripts_exist_and_write_under_runs() -> None:
    scripts = [c[1] for c in COMMANDS_IN_TOUR if c[0] == "python"]
    assert scripts and all((ROOT / s).exists() for s in scripts)
    gpu = (ROOT / "benchmarks" / "gpu_bench.py").read_text()
    assert re.search(r'"--out", default="runs/', gpu)
