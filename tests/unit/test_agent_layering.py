"""The agent's layering, checked on the source: llama.cpp is reached through exactly two
modules, the engine and its multimodal projector."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("core", "balancer", "agent", "operator", "cli")
ALLOWED = {Path("agent/paddler_agent/llama_engine.py"), Path("agent/paddler_agent/multimodal.py")}


def _imports_llama_cpp(path: Path) -> bool:
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import) and any(a.name.split(".")[0] == "llama_cpp" for a in node.names):
            return True
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "llama_cpp":
            return True
    return False


def test_only_the_engine_and_the_multimodal_module_import_llama_cpp() -> None:
    found = {
        path.relative_to(ROOT)
        for package in PACKAGES
        for path in (ROOT / package).rglob("*.py")
        if _imports_llama_cpp(path)
    }
    assert found == ALLOWED
