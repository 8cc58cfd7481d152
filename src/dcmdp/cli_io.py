"""Terminal output of the CLI: quiet engines by default, and a stdout that holds only data.

Engines write to the process's file descriptors directly (vLLM's logger holds ``sys.stdout``,
C++ kernels print to fd 1 and 2), so redirecting ``sys.stdout`` is not enough for a command that
promises JSON on stdout. ``data_stdout()`` points fd 1 at stderr for the duration of the command
and hands back a stream on the real stdout for the one JSON document.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import warnings
from collections.abc import Iterator
from typing import TextIO

# Environment that keeps engines quiet; `--engine-logs` (or DCMDP_ENGINE_LOGS=1) keeps their
# own defaults. Values the user exported win either way.
QUIET_ENV = {
    "VLLM_LOGGING_LEVEL": "ERROR",  # vLLM's INFO/WARNING lines (55-158 per command before)
    "TORCH_CPP_LOG_LEVEL": "ERROR",  # c10 warnings such as "NUMA binding: Using MEMBIND policy"
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
}
# Python warnings emitted by third-party code on import that say nothing about the user's run.
_NOISY_WARNINGS = (
    (FutureWarning, r".*torch\.distributed\.reduce_op.*"),
    (UserWarning, r".*TypedStorage is deprecated.*"),
)


def configure_engine_logs(verbose: bool) -> None:
    """Engine logs go to stderr always; below ERROR they are shown only when ``verbose``."""
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
    if verbose:
        os.environ.setdefault("DCMDP_LLAMACPP_VERBOSE", "1")  # llama.cpp's own log callback
        return
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    for category, message in _NOISY_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    # Logged while vLLM is still being imported, before its level setting applies.
    logging.getLogger("vllm.triton_utils.importing").setLevel(logging.ERROR)


@contextlib.contextmanager
def data_stdout() -> Iterator[TextIO]:
    """Send everything written to fd 1 to stderr; yield a stream on the real stdout.

    Use it around a whole command whose stdout must be machine-readable (``--json``): engine
    logs, progress bars and stray prints land on stderr, the yielded stream carries the data.
    """
    try:
        on_fd1 = sys.stdout.fileno() == 1
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is an OSError
        on_fd1 = False
    if not on_fd1:  # stdout already replaced in-process (a test's capture, a notebook)
        yield sys.stdout
        return
    sys.stdout.flush()
    sys.stderr.flush()
    saved_fd = os.dup(1)
    real = os.fdopen(os.dup(saved_fd), "w", encoding="utf-8")
    saved_sys = sys.stdout
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    try:
        yield real
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
        sys.stdout = saved_sys
        os.dup2(saved_fd, 1)
        os.close(saved_fd)
        real.flush()
        real.close()
