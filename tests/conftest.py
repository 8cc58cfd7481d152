"""Shared fixtures: tiny models built once per test session (no downloads)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

# vLLM reads these at import time: in-process engine, a small CPU KV cache, and permission to pass
# a function through collective_rpc (the in-memory weight push). Exported values win.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# On a small machine shared with other jobs, two OpenMP threads spin against each other and
# tiny-model steps slow down 10-40x (vLLM and Transformers alike); one thread is steady.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-initialised tiny Qwen3 (untied embeddings) saved in HF format."""
    from dcmdp.models import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-qwen3")


@pytest.fixture(scope="session")
def tiny_moe_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-initialised tiny Qwen3-MoE (4 experts, top-2) saved in HF format."""
    from dcmdp.models import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-qwen3-moe", moe=True)


# ----------------------------------------------------------------------------- CI: no silent skips
# `make test` installs every engine and integration (vLLM, llama.cpp, TRL, verl) and runs the
# suite with DCMDP_REQUIRE_ENGINES=1. There a skipped test means a broken install, not a missing
# optional extra, so the run fails and lists each skip with its reason. Skips whose reason starts
# with one of ALLOWED_SKIP_PREFIXES stay allowed: a processor that lacks a kernel's instructions
# (e.g. vLLM's int8 MoE needs AMX tiles) is not an install problem. Tests marked ``slow`` or
# ``vllm`` must not be deselected either. A plain `pytest` (the variable unset) may still skip on a partial install.
REQUIRE_ENGINES_ENV = "DCMDP_REQUIRE_ENGINES"
ALLOWED_SKIP_PREFIXES = ("CPU capability:", "hardware:")
# (node id, reason) of every skip or deselection the variable forbids, in this session
_FORBIDDEN: list[tuple[str, str]] = []


def engines_required() -> bool:
    return os.environ.get(REQUIRE_ENGINES_ENV, "") not in ("", "0")


def _skip_reason(report: pytest.CollectReport | pytest.TestReport) -> str:
    longrepr = report.longrepr
    reason = longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)
    return reason.removeprefix("Skipped: ")


def _record_skip(report: pytest.CollectReport | pytest.TestReport) -> None:
    if not engines_required() or not report.skipped or hasattr(report, "wasxfail"):
        return
    reason = _skip_reason(report)
    if not reason.startswith(ALLOWED_SKIP_PREFIXES):
        _FORBIDDEN.append((report.nodeid, reason))


def pytest_configure(config: pytest.Config) -> None:
    _FORBIDDEN.clear()


def pytest_collectreport(report: pytest.CollectReport) -> None:
    _record_skip(report)  # a module-level pytest.importorskip skips a whole file while collecting


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    _record_skip(report)  # pytest.skip / importorskip / skipif in a test, a fixture or a marker


def pytest_deselected(items: list[pytest.Item]) -> None:
    if engines_required():
        _FORBIDDEN.extend(
            (item.nodeid, f"a test marked {marker} was deselected")
            for item in items
            for marker in ("slow", "vllm")  # the slow runs and the real-engine tests
            if item.get_closest_marker(marker) is not None
        )


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    # also when every test was skipped at collection (pytest's own status 5, "no tests ran")
    if _FORBIDDEN and exitstatus in (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED):
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    if not _FORBIDDEN:
        return
    terminalreporter.section(f"{REQUIRE_ENGINES_ENV}=1: tests that did not run", sep="=", red=True)
    allowed = " or ".join(repr(p) for p in ALLOWED_SKIP_PREFIXES)
    terminalreporter.write_line(
        f"{len(_FORBIDDEN)} test(s) skipped or deselected. `make test` installs every engine and "
        f"integration, so this is a broken install; only skip reasons starting with {allowed} "
        "are allowed. The run fails."
    )
    for nodeid, reason in _FORBIDDEN:
        terminalreporter.write_line(f"SKIPPED {nodeid}: {reason}", red=True)
