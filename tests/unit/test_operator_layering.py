"""The operator's layering, checked on the source: one module talks to Kubernetes, one
imports kopf, the plan is pure."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "operator" / "paddler_operator"


def imports(module: str) -> set[str]:
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return found


MODULES = sorted(p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__")


@pytest.mark.parametrize("module", MODULES)
def test_only_handlers_imports_kopf(module: str) -> None:
    uses_kopf = any(name == "kopf" or name.startswith("kopf.") for name in imports(module))
    assert uses_kopf == (module == "handlers"), module


@pytest.mark.parametrize("module", MODULES)
def test_only_kube_reads_kubernetes_credentials(module: str) -> None:
    text = (PACKAGE / f"{module}.py").read_text()
    talks = "serviceaccount" in text or "kubeconfig_paths" in text or "merge-patch+json" in text
    assert talks == (module == "kube"), module


PLANNERS = [m for m in MODULES if m == "plan" or m.startswith("plan_")]


def test_the_plan_is_split_by_what_it_renders() -> None:
    assert PLANNERS == ["plan", "plan_agents", "plan_autoscaling", "plan_monitoring", "plan_pool", "plan_status"]


@pytest.mark.parametrize("module", PLANNERS)
def test_plan_is_pure(module: str) -> None:
    io = {"asyncio", "aiohttp", "time", "datetime", "os", "subprocess", "socket", "random"}
    names = imports(module)
    assert not {n for n in names if n.split(".")[0] in io}
    assert not {n for n in names if n.startswith(("paddler_operator.kube", "paddler_operator.balancer_client"))}


def test_reconcile_reaches_the_world_only_through_its_clients() -> None:
    names = imports("reconcile")
    assert "aiohttp" not in names
    assert "kopf" not in names
    assert "paddler_operator.kube.KubeApi" in names
    assert "paddler_operator.balancer_client.BalancerClient" in names


@pytest.mark.parametrize("module", MODULES)
def test_only_kube_uses_the_kubernetes_client(module: str) -> None:
    uses = any(name.split(".")[0] in ("kubernetes", "kubernetes_asyncio") for name in imports(module))
    assert uses == (module == "kube"), module


@pytest.mark.parametrize("client", ["kube", "balancer_client"])
def test_clients_do_not_import_the_planner(client: str) -> None:
    assert not {n for n in imports(client) if n.startswith(("paddler_operator.plan", "paddler_operator.reconcile"))}
