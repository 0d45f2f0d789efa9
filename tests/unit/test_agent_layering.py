"""The agent's layering, checked on the source: llama.cpp is reached only through the
``paddler_agent.llama`` subpackage."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("core", "balancer", "agent", "operator", "cli")
LLAMA = Path("agent/paddler_agent/llama")


def _imports_llama_cpp(path: Path) -> bool:
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import) and any(a.name.split(".")[0] == "llama_cpp" for a in node.names):
            return True
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "llama_cpp":
            return True
    return False


def test_only_the_llama_subpackage_imports_llama_cpp() -> None:
    importers = [
        path.relative_to(ROOT)
        for package in PACKAGES
        for path in (ROOT / package).rglob("*.py")
        if _imports_llama_cpp(path)
    ]
    assert importers, "no module imports llama_cpp: the check looks in the wrong place"
    assert [path for path in importers if LLAMA not in path.parents] == []
