"""tests/tier_guard.py: a full run (pytest's testpaths) fails when a tier ran no test."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

CONFTEST = """
from pathlib import Path
from tests.tier_guard import TierGuard

def pytest_configure(config):
    config.pluginmanager.register(TierGuard(Path(__file__).parent), "tier-guard")
"""


def _suite(tmp_path: Path, second_tier: str) -> Path:
    """A project with the tiers ``a`` and ``b`` under ``suite/`` (its testpaths)."""
    (tmp_path / "pytest.ini").write_text("[pytest]\ntestpaths = suite\n")
    suite = tmp_path / "suite"
    (suite / "a").mkdir(parents=True)
    (suite / "b").mkdir()
    (suite / "fixtures").mkdir()  # no test module: not a tier
    (suite / "conftest.py").write_text(CONFTEST)
    (suite / "a" / "test_a.py").write_text("def test_one():\n    assert True\n")
    (suite / "b" / "test_b.py").write_text(second_tier)
    return tmp_path


def _pytest(project: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("PYTEST_ADDOPTS", None)
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize(
    ("second_tier", "args", "code", "message"),
    [
        ("def test_two():\n    assert True\n", (), 0, None),
        ("def test_two():\n    assert True\n", ("-k", "one"), 1, "ran no test: b"),
        ("# no test here\n", (), 1, "ran no test: b"),
        ("def test_two():\n    assert False\n", (), 1, None),  # failing already: no second verdict
        ("def test_two():\n    assert True\n", ("suite/a",), 0, None),
    ],
    ids=["every-tier-ran", "all-deselected", "none-collected", "failed", "explicit-path"],
)
def test_full_run_fails_when_a_tier_ran_no_test(
    tmp_path: Path, second_tier: str, args: tuple[str, ...], code: int, message: str | None
) -> None:
    proc = _pytest(_suite(tmp_path, second_tier), *args)
    assert proc.returncode == code, proc.stdout[-3000:] + proc.stderr[-2000:]
    if message is None:
        assert "ran no test" not in proc.stdout
    else:
        assert message in proc.stdout, proc.stdout[-3000:]
