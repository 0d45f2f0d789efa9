"""Agent-issue variants come from one enum (paddler_core.agent_issues), never a literal."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from paddler_core.agent_issues import AgentIssueVariant

AGENT = Path(__file__).resolve().parents[2] / "agent" / "paddler_agent"


def _literal_variants(path: Path) -> list[str]:
    """``variant="X"`` keywords and ``AgentIssue("X")`` / ``ModelSourceError("X", …)`` calls."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if not isinstance(node, ast.Call):
            continue
        for keyword in node.keywords:
            if keyword.arg == "variant" and isinstance(keyword.value, ast.Constant):
                found.append(f"{path.name}:{node.lineno} variant={keyword.value.value!r}")
        name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
        first = node.args[0] if node.args else None
        if name in {"AgentIssue", "ModelSourceError", "_fail", "_server_down"} and isinstance(first, ast.Constant):
            found.append(f"{path.name}:{node.lineno} {name}({first.value!r})")
    return found


def test_no_agent_module_spells_an_issue_variant_as_a_literal() -> None:
    found = [hit for path in sorted(AGENT.rglob("*.py")) for hit in _literal_variants(path)]
    assert found == []


def test_variants_are_unique_pascal_case_names() -> None:
    values = [v.value for v in AgentIssueVariant]
    assert len(values) == len(set(values))
    assert all(re.fullmatch(r"(?:[A-Z][a-z0-9]*)+", v) for v in values), values
