"""Atomic checkpoints and crash-safe metrics logs.

A checkpoint is a directory ``checkpoints/step_000010`` holding the model in Hugging Face format
(loadable by vLLM and Transformers), ``trainer_state.pt`` (optimizer, scheduler, multiplier,
random states, step; read back with ``torch.load(weights_only=True)``) and a ``COMPLETE`` marker.
It is written under a ``.tmp`` name and renamed only once complete, so a SIGKILL at any moment
leaves either the previous checkpoint or the new one, never a half-written directory that is
taken for a checkpoint. The metrics log is append-only JSONL; on resume, rows written after the
checkpoint's step are dropped (those steps run again), so no row is lost or duplicated.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

COMPLETE = "COMPLETE"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def random_states() -> dict[str, Any]:
    np_state: Any = np.random.get_state()
    py_state: Any = random.getstate()
    return {
        "python": list(py_state[1]),
        "python_pos": py_state[2],
        "numpy_keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
        "numpy_pos": int(np_state[2]),
        "torch": torch.get_rng_state(),
    }


def set_random_states(state: dict[str, Any]) -> None:
    random.setstate((3, tuple(int(x) for x in state["python"]), state["python_pos"]))
    keys = state["numpy_keys"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, int(state["numpy_pos"]), 0, 0.0))
    torch.set_rng_state(state["torch"])


def save_checkpoint(
    run_dir: Path, step: int, model: Any, tokenizer: Any, trainer_state: dict[str, Any], keep: int = 2
) -> Path:
    """Write ``checkpoints/step_{step:06d}`` atomically and prune older ones (keeping ``keep``)."""
    root = run_dir / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:06d}"
    tmp = root / f"step_{step:06d}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    torch.save(trainer_state, tmp / "trainer_state.pt")
    (tmp / COMPLETE).write_text(str(step))
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    _fsync_dir(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    if keep > 0:
        for old in list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


#: A checkpoint folder's name; anything else under checkpoints/ (a half-written ``.tmp`` folder, one
#: a user renamed to set it aside) is not a checkpoint.
STEP_DIR = re.compile(r"step_\d+")


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first. Half-written ``.tmp`` folders are ignored, as is any
    folder whose name is not ``step_`` and digits."""
    root = run_dir / "checkpoints"
    if not root.exists():
        return []
    done = [
        p for p in root.iterdir() if STEP_DIR.fullmatch(p.name) and p.is_dir() and (p / COMPLETE).exists()
    ]
    return sorted(done, key=lambda p: int(p.name.split("_")[1]))


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


class CheckpointError(RuntimeError):
    """A checkpoint marked complete that cannot be read back (a file damaged after it was written)."""


def unreadable(ckpt: Path, why: str) -> CheckpointError:
    """The error for ``ckpt`` that cannot be read: what failed, and which checkpoint a resume
    would take instead once that folder is moved away."""
    earlier = [p for p in list_checkpoints(ckpt.parent.parent) if p != ckpt]
    fallback = f"from {earlier[-1].name}" if earlier else "from step 0 (no earlier checkpoint is kept)"
    return CheckpointError(
        f"checkpoint {ckpt} cannot be read ({why}); move that folder out of {ckpt.parent} (or delete "
        f"it) and resume again to continue {fallback}"
    )


def load_failure(what: str, exc: BaseException) -> str:
    """One line on why ``what`` failed to load: the exception's first line, except torch's
    weights-only refusal, whose advice to load with ``weights_only=False`` is not repeated."""
    text = str(exc)
    if text.startswith("Weights only load failed"):
        return f"{what}: holds objects that a weights-only load refuses (not written by dcmdp, or tampered)"
    return f"{what}: {type(exc).__name__}: {text.splitlines()[0][:200] if text else ''}"


#: The entries ``trainer_state.pt`` holds (written by the trainer at each checkpoint).
TRAINER_STATE_KEYS = ("optimizer", "scheduler", "multiplier", "generator", "random", "step")


def load_trainer_state(ckpt: Path) -> dict[str, Any]:
    """``ckpt``'s ``trainer_state.pt``; a file that will not load, or lacks an entry, raises
    :class:`CheckpointError` naming the checkpoint a resume would fall back to."""
    try:
        # weights_only=True: a tampered checkpoint cannot run code on load.
        state = torch.load(ckpt / "trainer_state.pt", weights_only=True)
    except Exception as exc:  # torch raises several types for a torn or foreign file
        raise unreadable(ckpt, load_failure("trainer_state.pt", exc)) from exc
    if not isinstance(state, dict):
        raise unreadable(ckpt, f"trainer_state.pt holds a {type(state).__name__}, not the trainer's state")
    missing = [k for k in TRAINER_STATE_KEYS if k not in state]
    if missing:
        raise unreadable(ckpt, f"trainer_state.pt lacks {', '.join(missing)}")
    return state


class MetricsLog:
    """Append-only JSONL log of metrics rows; each row carries ``step`` and ``kind``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)

    def truncate_after(self, step: int) -> int:
        """Drop rows with step > ``step`` (and a torn last line); returns rows dropped."""
        if not self.path.exists():
            return 0
        kept, dropped = [], 0
        for line in self.path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                dropped += 1  # a line torn by a kill mid-write
                continue
            if row.get("step", 0) > step:
                dropped += 1
            else:
                kept.append(line)
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(k + "\n" for k in kept))
        os.replace(tmp, self.path)
        return dropped

    def write(self, row: dict[str, Any]) -> None:
        with open(self.path, "a") as fh:
            fh.write(json.dumps(row, allow_nan=True) + "\n")
            fh.flush()
            os.fsync(fh.fileno())


def read_metrics(path: Path) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    if not path.exists():
        return rows
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows
