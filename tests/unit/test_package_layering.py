"""Every package's layering, checked on the source (the imports of every module):

* layers import downward: ``core`` ← ``balancer``, ``agent``, ``operator`` ← ``cli``;
* ``core`` does no I/O;
* each outside system is reached from one place.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = {
    "core": "paddler_core",
    "balancer": "paddler_balancer",
    "agent": "paddler_agent",
    "operator": "paddler_operator",
    "cli": "paddler_cli",
}
MAY_IMPORT = {
    "core": set(),
    "balancer": {"core"},
    "agent": {"core"},
    "operator": {"core"},
    "cli": {"core", "balancer", "agent", "operator"},
}
"""Which sibling packages each package may import (its own is always allowed)."""

IO_MODULES = {
    "asyncio", "aiohttp", "socket", "ssl", "subprocess", "os", "pathlib", "shutil", "threading",
    "multiprocessing", "signal", "time", "logging", "tempfile", "urllib.request", "http", "select",
}  # fmt: skip
"""Standard and third-party modules whose import means I/O (or a clock) in ``core``."""

EDGES = {
    "llama_cpp": "agent/paddler_agent/llama/",
    "numpy": "agent/paddler_agent/llama/",
    "kopf": "operator/paddler_operator/handlers.py",
    "kubernetes_asyncio": "operator/paddler_operator/kube.py",
    "prometheus_client": "balancer/paddler_balancer/metrics.py",
    "huggingface_hub": "agent/paddler_agent/model_hub.py",
    "PIL": "agent/paddler_agent/images.py",
    "jinja2": "agent/paddler_agent/chat_template.py",
    "jsonschema": "core/paddler_core/tool_schema.py",
    "referencing": "core/paddler_core/tool_schema.py",
    "jsonschema_specifications": "core/paddler_core/tool_schema.py",
    "re2": "core/paddler_core/tool_schema.py",
    "textual": "cli/paddler_cli/dashboard_app.py",
}
"""Each outside library and the one module (or subpackage, ending in ``/``) that may import it."""


def modules() -> list[Path]:
    return sorted(p.relative_to(ROOT) for package in PACKAGES for p in (ROOT / package).rglob("*.py"))


def imported(path: Path) -> set[str]:
    """Absolute module names ``path`` imports (relative imports stay inside its package)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse((ROOT / path).read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def top(name: str) -> str:
    return name.split(".")[0]


@pytest.mark.parametrize("path", modules(), ids=str)
def test_imports_only_downward(path: Path) -> None:
    package = path.parts[0]
    siblings = {
        p for p, top_name in PACKAGES.items() if p != package and any(top(n) == top_name for n in imported(path))
    }
    assert siblings <= MAY_IMPORT[package], f"{path} imports {sorted(siblings - MAY_IMPORT[package])}"


@pytest.mark.parametrize("path", [p for p in modules() if p.parts[0] == "core"], ids=str)
def test_core_does_no_io(path: Path) -> None:
    io = {n for n in imported(path) if n in IO_MODULES or top(n) in IO_MODULES}
    assert not io, f"{path} imports {sorted(io)}"


@pytest.mark.parametrize("library", sorted(EDGES))
def test_each_outside_library_is_imported_from_one_place(library: str) -> None:
    importers = {str(p) for p in modules() if any(top(n) == library for n in imported(p))}
    allowed = EDGES[library]
    outside = {p for p in importers if not (p.startswith(allowed) if allowed.endswith("/") else p == allowed)}
    assert importers, f"nothing imports {library}: the table is stale"
    assert not outside, f"{library} imported outside {allowed}: {sorted(outside)}"
