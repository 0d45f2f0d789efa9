"""Log calls carry their data in the message (``event key=value``): the project's log
format (``%(asctime)s %(levelname)s %(name)s %(message)s``) never prints ``extra=``, so
data passed there is lost. Checked on the source of every package."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("core", "agent", "balancer", "operator", "cli")
LOG_METHODS = frozenset({"debug", "info", "warning", "warn", "error", "exception", "critical", "fatal", "log"})


def calls_with_extra(source: str) -> list[int]:
    """Line numbers of the ``<anything>.<log method>(..., extra=...)`` calls in ``source``."""
    return sorted(
        node.lineno
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr in LOG_METHODS
        and any(keyword.arg == "extra" for keyword in node.keywords)
    )


SOURCES = [
    ('log.info("model cached", extra={"path": p})', [1]),
    ('logger.warning("retry", extra=fields)', [1]),
    ('logging.getLogger(__name__).error("x", exc_info=True, extra={})', [1]),
    ('log.log(20, "x", extra={"a": 1})', [1]),
    ('def f():\n    if x:\n        self.log.debug("x", extra={})\n', [3]),
    ('log.info("model cached path=%s", p)', []),
    ('model_config = ConfigDict(extra="forbid")', []),
    ('Field(json_schema_extra={"a": 1})', []),
]


@pytest.mark.parametrize(("source", "lines"), SOURCES)
def test_finds_every_log_call_with_extra(source: str, lines: list[int]) -> None:
    assert calls_with_extra(source) == lines


def test_no_log_call_passes_extra() -> None:
    found = [
        f"{path.relative_to(ROOT)}:{line}"
        for package in PACKAGES
        for path in sorted((ROOT / package).rglob("*.py"))
        for line in calls_with_extra(path.read_text())
    ]
    assert found == []
