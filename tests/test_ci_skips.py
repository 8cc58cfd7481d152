"""`make test` fails when a real-engine test is skipped (tests/conftest.py, DCMDP_REQUIRE_ENGINES).

Each case runs pytest in a subprocess on a tiny test tree that carries a copy of this suite's
conftest.py, and checks the exit status and the listed skips.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent

CASES = """
import pytest

def test_passes():
    pass

def test_cpu_capability():
    pytest.skip("CPU capability: this processor lacks AMX tiles")

def test_missing_engine():
    pytest.importorskip("dcmdp_no_such_engine", reason="fake engine not installed")

@pytest.fixture
def engine():
    pytest.skip("engine fixture could not start")

def test_skipped_in_fixture(engine):
    pass

@pytest.mark.skipif(True, reason="marker says no")
def test_skipif_marker():
    pass

@pytest.mark.xfail(reason="known bug", strict=True)
def test_xfail_is_not_a_skip():
    assert False
"""

SLOW = """
import pytest

def test_fast():
    pass

@pytest.mark.slow
def test_slow():
    pass
"""

MODULE_SKIP = """
import pytest

pytest.importorskip("dcmdp_no_such_module", reason="optional extra missing at import")

def test_never_collected():
    pass
"""


def run_pytest(tmp_path: Path, files: dict[str, str], *args: str, require: str | None) -> tuple[int, str]:
    shutil.copy(TESTS / "conftest.py", tmp_path / "conftest.py")
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    (tmp_path / "pytest.ini").write_text("[pytest]\nmarkers =\n    slow: slow\n")
    env = {k: v for k, v in os.environ.items() if k != "DCMDP_REQUIRE_ENGINES"}
    if require is not None:
        env["DCMDP_REQUIRE_ENGINES"] = require
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-ra", "-p", "no:cacheprovider", *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    return proc.returncode, proc.stdout + proc.stderr


def test_without_the_variable_skips_pass(tmp_path: Path) -> None:
    rc, out = run_pytest(tmp_path, {"test_cases.py": CASES, "test_mod.py": MODULE_SKIP}, require=None)
    assert rc == 0, out
    assert "tests that did not run" not in out


def test_with_the_variable_a_skip_fails_the_run_and_is_listed(tmp_path: Path) -> None:
    rc, out = run_pytest(tmp_path, {"test_cases.py": CASES, "test_mod.py": MODULE_SKIP}, require="1")
    assert rc == 1, out
    section = out[out.index("DCMDP_REQUIRE_ENGINES=1: tests that did not run") :]
    section = section[: section.index("short test summary info")]
    listed = re.findall(r"^SKIPPED (\S+): (.*)$", section, flags=re.M)
    assert sorted(listed) == [
        ("test_cases.py::test_missing_engine", "fake engine not installed"),
        ("test_cases.py::test_skipif_marker", "marker says no"),
        ("test_cases.py::test_skipped_in_fixture", "engine fixture could not start"),
        ("test_mod.py", "optional extra missing at import"),
    ], section
    assert "4 test(s) skipped or deselected" in section
    # the hardware skip is allowed and the xfail is no skip
    assert "test_cpu_capability" not in section and "xfail_is_not" not in section


def test_module_level_importorskip_alone_fails(tmp_path: Path) -> None:
    rc, out = run_pytest(tmp_path, {"test_mod.py": MODULE_SKIP}, require="1")
    assert rc == 1, out
    assert "SKIPPED test_mod.py: optional extra missing at import" in out


def test_allowed_hardware_skip_passes(tmp_path: Path) -> None:
    rc, out = run_pytest(
        tmp_path, {"test_cases.py": CASES}, "-k", "passes or cpu_capability or xfail", require="1"
    )
    assert rc == 0, out
    assert "1 passed, 1 skipped" in out and "1 xfailed" in out


@pytest.mark.parametrize("value", ["0", ""])
def test_variable_off_values(tmp_path: Path, value: str) -> None:
    rc, out = run_pytest(tmp_path, {"test_mod.py": MODULE_SKIP}, require=value)
    assert rc == 5, out  # pytest's own "no tests ran"; nothing added


def test_deselecting_slow_tests_fails(tmp_path: Path) -> None:
    rc, out = run_pytest(tmp_path, {"test_slow.py": SLOW}, "-m", "not slow", require="1")
    assert rc == 1, out
    assert "SKIPPED test_slow.py::test_slow: a test marked slow was deselected" in out
    rc, out = run_pytest(tmp_path, {"test_slow.py": SLOW}, "-m", "not slow", require=None)
    assert rc == 0, out
    rc, out = run_pytest(tmp_path, {"test_slow.py": SLOW}, require="1")
    assert rc == 0 and "2 passed" in out, out


def test_make_test_requires_engines_and_runs_slow_tests() -> None:
    """`make test` (target unit) sets the variable, and nothing deselects the slow tests."""
    makefile = (REPO / "Makefile").read_text()
    unit = re.search(r"^unit:.*\n((?:\t.*\n)+)", makefile, flags=re.M)
    assert unit is not None, "the Makefile has no unit target"
    recipe = unit.group(1)
    assert "DCMDP_REQUIRE_ENGINES=1" in recipe and "pytest" in recipe
    assert not re.search(r"pytest.*\s(-m|-k|--deselect)\b", recipe), recipe
    assert "$(LLAMA_STAMP)" in unit.group(0) and "$(INTEG_STAMP)" in unit.group(0)
    pyproject = (REPO / "pyproject.toml").read_text()
    addopts = re.search(r"^addopts\s*=\s*(.*)$", pyproject, flags=re.M)
    assert addopts is None or not re.search(r"(^|\W)(-m|-k|--deselect)\b", addopts.group(1)), addopts
