"""Subprocess entry for the kill-and-resume test: `dcmdp train` with the test task registered and
each step slowed down, so the test can SIGKILL it at a chosen point."""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import dcmdp.trainer as trainer
import test_trainer  # noqa: F401  (registers the "has_one" task)
from dcmdp.cli import main

_real_step = trainer.train_step


def _slow_step(*args, **kwargs):  # type: ignore[no-untyped-def]
    row = _real_step(*args, **kwargs)
    time.sleep(0.4)
    return row


trainer.train_step = _slow_step

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
