"""A full run fails when a tier ran no test.

A tier is a folder directly under the test root that holds ``test_*.py`` files
(unit, integration, engine, k8s, cluster, browser, …). When pytest runs its
``testpaths`` (``make test``: no path given), every tier must have run at least one
test: a tier whose tests were all skipped, deselected or never collected (a lost
``__init__.py``, a marker expression left in the environment) would otherwise pass
the run in silence. Runs given explicit paths are left alone: they choose their tiers.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest


def tiers(root: Path) -> set[str]:
    """The folders directly under ``root`` that hold a test module somewhere below."""
    return {d.name for d in root.iterdir() if d.is_dir() and next(d.rglob("test_*.py"), None) is not None}


class TierGuard:
    """Counts the tests that ran in each tier and fails the session where one ran none."""

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self.ran: Counter[str] = Counter()

    def _tier(self, path: Path) -> str | None:
        try:
            relative = path.resolve().relative_to(self.root)
        except ValueError:
            return None
        return relative.parts[0] if len(relative.parts) > 1 else None

    @pytest.hookimpl
    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        ran = report.when == "call" or (report.when == "setup" and report.failed)
        if not ran:
            return
        tier = self._tier(Path(report.fspath))
        if tier is not None:
            self.ran[tier] += 1

    @pytest.hookimpl(trylast=True)
    def pytest_sessionfinish(self, session: pytest.Session, exitstatus: int) -> None:
        config = session.config
        if config.args_source != pytest.Config.ArgsSource.TESTPATHS or config.option.collectonly:
            return
        if exitstatus != pytest.ExitCode.OK:
            return  # already failing (or stopped early with -x): the failure says more
        empty = sorted(tiers(self.root) - set(self.ran))
        if not empty:
            return
        reporter = config.pluginmanager.get_plugin("terminalreporter")
        message = f"tier(s) that ran no test: {', '.join(empty)} (a full run must run every tier)"
        if reporter is not None:
            reporter.write_line(message, red=True, bold=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
