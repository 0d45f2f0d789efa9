"""Import graphs, checked on the source: every package's is acyclic, and the balancer's
layers import only downward.

Every ``import`` counts, also one inside a function or under ``TYPE_CHECKING``: a
function-local import hides a circle from the interpreter, not from the design. An
edge goes from a module to the module it names (``from a import b`` is ``a.b`` when
that is a module, else ``a``); the package ``__init__`` that Python also runs on the
way is not an edge of its own.

The balancer's layers, top to bottom (a module imports its own layer or one below):

========== ====================================================================
app        ``app``: the composition root (factories, ``serve``); nothing imports it
handlers   ``inference_api``, ``management_api``, ``agent_socket`` (the agents'
           WebSocket), ``admin_panel``, ``openai.api``, ``openai.responses_api``
keys       ``keys``: the ``AppKey`` the factories set and the handlers read
relay      ``relay``, ``openai.stream`` (the SSE encoder ``relay.forward`` uses)
service    ``service`` (``Balancer``: generation, embeddings, desired state)
dispatcher ``dispatcher`` (leases, buffer), ``rollout`` (rolling model swaps)
routing    ``routing`` (filters, scorers, picker)
agents     ``agents`` (controllers, the pool)
base       what the layers share and that imports none of them: ``streams``,
           ``settings``, ``metrics``, ``state_store``, ``http_util``, ``peers``,
           ``agent_claims``, the OpenAI layer's pure modules (``openai.errors``,
           ``events``, ``mapping``, ``model_groups``, ``output``,
           ``request_models``, ``responses_output``, ``responses_request``) and the
           package ``__init__`` files
========== ====================================================================

A new module must be placed in the table (an unplaced one fails).
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Mapping
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SOURCE_ROOTS = {
    ROOT / "core": "paddler_core",
    ROOT / "agent": "paddler_agent",
    ROOT / "balancer": "paddler_balancer",
    ROOT / "operator": "paddler_operator",
    ROOT / "cli": "paddler_cli",
}
"""Each component's folder and the top-level package in it."""
PACKAGES = {
    "core": "paddler_core",
    "agent": "paddler_agent",
    "balancer": "paddler_balancer",
    "operator": "paddler_operator",
    "cli": "paddler_cli",
    "openai": "paddler_balancer.openai",
}
"""Each package whose import graph must be acyclic."""

BALANCER = "paddler_balancer"
LAYERS: tuple[tuple[str, frozenset[str]], ...] = (
    ("app", frozenset({"app"})),
    (
        "handlers",
        frozenset(
            {"inference_api", "management_api", "agent_socket", "admin_panel", "openai.api", "openai.responses_api"}
        ),
    ),
    ("keys", frozenset({"keys"})),
    ("relay", frozenset({"relay", "openai.stream"})),
    ("service", frozenset({"service"})),
    ("dispatcher", frozenset({"dispatcher", "rollout"})),
    ("routing", frozenset({"routing"})),
    ("agents", frozenset({"agents"})),
    (
        "base",
        frozenset(
            {
                "",
                "streams",
                "settings",
                "metrics",
                "state_store",
                "http_util",
                "peers",
                "agent_claims",
                "openai",
                "openai.errors",
                "openai.events",
                "openai.mapping",
                "openai.model_groups",
                "openai.output",
                "openai.request_models",
                "openai.responses_output",
                "openai.responses_request",
            }
        ),
    ),
)
"""The balancer's layers, top first; module names relative to ``paddler_balancer``
(``""`` is its ``__init__``)."""

Graph = Mapping[str, frozenset[str]]


def module_name(path: Path, source_root: Path) -> str:
    parts = list(path.relative_to(source_root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _absolute(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, node.module] if node.module else base)


def _known(name: str, modules: frozenset[str]) -> str | None:
    """``name`` or its longest prefix that is one of ``modules``."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def imports_of(source: str, module: str, is_package: bool, modules: frozenset[str]) -> frozenset[str]:
    """The modules (of ``modules``) that ``source``, the text of ``module``, imports anywhere."""
    found: set[str | None] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {_known(alias.name, modules) for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(module, is_package, node)
            for alias in node.names:
                full = f"{base}.{alias.name}"
                found.add(full if full in modules else _known(base, modules))
    return frozenset(name for name in found if name is not None and name != module)


def project_graph() -> dict[str, frozenset[str]]:
    """Every module of every package and the project modules it imports."""
    paths = {
        module_name(path, source_root): path
        for source_root, package in SOURCE_ROOTS.items()
        for path in (source_root / package).rglob("*.py")
    }
    modules = frozenset(paths)
    return {
        name: imports_of(path.read_text(), name, path.name == "__init__.py", modules) for name, path in paths.items()
    }


def subgraph(graph: Graph, package: str) -> dict[str, frozenset[str]]:
    """The modules of ``package`` and their imports among themselves."""
    inside = frozenset(m for m in graph if m == package or m.startswith(f"{package}."))
    return {m: graph[m] & inside for m in inside}


def cycles(graph: Graph) -> list[tuple[str, ...]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[tuple[str, ...]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in sorted(graph.get(node, frozenset())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while (member := stack.pop()) != node:
                component.append(member)
            component.append(node)
            if len(component) > 1:
                found.append(tuple(sorted(component)))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(found)


def layer_of(layers: Iterable[tuple[str, frozenset[str]]], package: str) -> dict[str, int]:
    """Each placed module's full name and its layer's height (the bottom layer is 0)."""
    ordered = list(layers)
    return {
        f"{package}.{name}" if name else package: len(ordered) - 1 - position
        for position, (_, names) in enumerate(ordered)
        for name in names
    }


def layer_problems(graph: Graph, layers: Iterable[tuple[str, frozenset[str]]], package: str) -> list[str]:
    """Unplaced modules, placed modules that no longer exist, and upward imports."""
    heights = layer_of(layers, package)
    problems = [f"{m} is in no layer" for m in sorted(set(graph) - set(heights))]
    problems += [f"{m} is in the table but not in the package" for m in sorted(set(heights) - set(graph))]
    for importer in sorted(set(graph) & set(heights)):
        problems += [
            f"{importer} imports {target}, a higher layer"
            for target in sorted(graph[importer])
            if target in heights and heights[target] > heights[importer]
        ]
    return problems


@pytest.mark.parametrize("package", sorted(PACKAGES))
def test_import_graph_is_acyclic(package: str) -> None:
    graph = subgraph(project_graph(), PACKAGES[package])
    assert len(graph) > 1, f"{package}: no modules found, the check looks in the wrong place"
    assert cycles(graph) == []


def test_balancer_imports_only_downward() -> None:
    assert layer_problems(subgraph(project_graph(), BALANCER), LAYERS, BALANCER) == []


def test_nothing_imports_the_balancer_app() -> None:
    graph = project_graph()
    importers = sorted(m for m, targets in graph.items() if f"{BALANCER}.app" in targets)
    assert importers == ["paddler_cli.main"]


IMPORTS = [
    ("import a.b", "x", False, {"a.b"}),
    ("from a import b", "x", False, {"a.b"}),
    ("from a import c", "x", False, {"a"}),
    ("from a.b import f", "x", False, {"a.b"}),
    ("def f():\n    from a import b\n", "x", False, {"a.b"}),
    ("if TYPE_CHECKING:\n    import a\n", "x", False, {"a"}),
    ("from . import b", "a.x", False, {"a.b"}),
    ("from .b import f", "a.x", False, {"a.b"}),
    ("from .b import f", "a", True, {"a.b"}),
    ("import os\nfrom typing import Any", "x", False, set()),
]


@pytest.mark.parametrize(("source", "module", "is_package", "expected"), IMPORTS)
def test_reads_every_import_of_a_module(source: str, module: str, is_package: bool, expected: set[str]) -> None:
    modules = frozenset({"a", "a.b", "a.x", "x"})
    assert imports_of(source, module, is_package, modules) == expected


def edges(text: str) -> dict[str, frozenset[str]]:
    """A synthetic graph: ``"a:b,c b: c:"`` is ``a`` importing ``b`` and ``c``."""
    graph: dict[str, frozenset[str]] = {}
    for entry in text.split():
        module, _, targets = entry.partition(":")
        graph[module] = frozenset(t for t in targets.split(",") if t)
    return graph


CYCLES = [
    ("a:b b:", []),
    ("a:b b:a", [("a", "b")]),
    ("a:b b:c c:a d:a", [("a", "b", "c")]),
    ("a:b b:a c:d d:c", [("a", "b"), ("c", "d")]),
    ("a:b,c b:c c:", []),
]


@pytest.mark.parametrize(("graph", "expected"), CYCLES)
def test_finds_every_cycle(graph: str, expected: list[tuple[str, ...]]) -> None:
    assert cycles(edges(graph)) == expected


def test_a_planted_cycle_through_app_is_reported() -> None:
    planted = dict(subgraph(project_graph(), BALANCER))
    planted[f"{BALANCER}.inference_api"] |= {f"{BALANCER}.app"}
    assert (f"{BALANCER}.app", f"{BALANCER}.inference_api") <= next(iter(cycles(planted)), ())


SMALL = (("top", frozenset({"h"})), ("middle", frozenset({"s"})), ("bottom", frozenset({"a", ""})))
LAYER_CASES = [
    ("p: p.h:p.s p.s:p.a p.a:", []),
    ("p: p.h:p.a p.s:p.s p.a:p", []),
    ("p: p.h: p.s:p.h p.a:", ["p.s imports p.h, a higher layer"]),
    ("p: p.h: p.s: p.a:p.s,p.h", ["p.a imports p.h, a higher layer", "p.a imports p.s, a higher layer"]),
    ("p: p.h: p.s: p.a: p.new:", ["p.new is in no layer"]),
    ("p: p.h: p.a:", ["p.s is in the table but not in the package"]),
]


@pytest.mark.parametrize(("graph", "expected"), LAYER_CASES)
def test_reports_every_upward_import(graph: str, expected: list[str]) -> None:
    assert layer_problems(edges(graph), SMALL, "p") == expected


def test_a_planted_upward_import_is_reported() -> None:
    planted = dict(subgraph(project_graph(), BALANCER))
    planted[f"{BALANCER}.service"] |= {f"{BALANCER}.relay"}
    assert layer_problems(planted, LAYERS, BALANCER) == [f"{BALANCER}.service imports {BALANCER}.relay, a higher layer"]
