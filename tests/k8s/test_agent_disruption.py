"""What a ModelDeployment's agents tell Kubernetes, on a real API server and controller-manager
(pods scheduled on kwok nodes, no kubelet): the agents' PodDisruptionBudget, the probes on the
agent's health port, ``minReadySeconds`` and the grace period that covers the drain, and the
budget's garbage collection with its ModelDeployment."""

from __future__ import annotations

from typing import Any

import pytest

from tests.kubectl import wait_until

from .test_operator_cluster import (  # noqa: F401 - crds and operators are fixtures
    POOL,
    TIMEOUT,
    Operators,
    crds,
    get,
    operators,
    wait_object,
)

pytestmark = pytest.mark.k8s

MODEL = """
apiVersion: paddler.dev/v1alpha1
kind: ModelDeployment
metadata: {name: m}
spec:
  poolRef: {name: p}
  model: {localPath: /models/smollm2.gguf}
  replicas: 2
  startupTimeoutSeconds: 900
  rollout: {minReadySeconds: 12, drainTimeoutSeconds: 45}
  disruption: {maxUnavailable: "50%"}
"""


def agent_container(deployment: Any) -> Any:
    return next(c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == "agent")


@pytest.fixture
def agents(operators: Operators, k8s_namespace: str) -> tuple[Any, Any]:  # noqa: F811
    """The agent Deployment and the agents' PodDisruptionBudget, once the operator made them."""
    cluster, ns = operators.cluster, k8s_namespace
    operators.start(ns)
    cluster.apply(POOL + "---" + MODEL, namespace=ns)
    return wait_object(cluster, ns, "deployment/m-agent"), wait_object(cluster, ns, "poddisruptionbudget/m-agent")


def test_a_model_deployment_gets_a_disruption_budget_over_its_agent_pods(agents: tuple[Any, Any]) -> None:
    deployment, pdb = agents
    assert pdb["spec"]["maxUnavailable"] == "50%"
    assert pdb["spec"]["selector"] == deployment["spec"]["selector"]
    assert pdb["spec"]["unhealthyPodEvictionPolicy"] == "AlwaysAllow"
    assert pdb["metadata"]["ownerReferences"][0]["kind"] == "ModelDeployment"


def test_the_disruption_controller_keeps_all_but_max_unavailable_agents(
    operators: Operators,  # noqa: F811
    k8s_namespace: str,
) -> None:
    """The controller-manager's disruption controller finds the 2 pods the budget selects and
    keeps 1 healthy (maxUnavailable 50 %): the budget means what it says on a real cluster."""
    cluster, ns = operators.cluster, k8s_namespace
    operators.start(ns)
    cluster.apply(POOL + "---" + MODEL, namespace=ns)

    def counted() -> Any:
        pdb = get(cluster, ns, "poddisruptionbudget/m-agent")
        status = (pdb or {}).get("status") or {}
        return status if status.get("expectedPods") == 2 else None

    status = wait_until(counted, timeout=TIMEOUT, what="the disruption controller counts 2 agent pods")
    assert status["desiredHealthy"] == 1


def test_agent_pods_are_probed_on_the_agents_health_port(agents: tuple[Any, Any]) -> None:
    container = agent_container(agents[0])
    assert container["ports"] == [{"name": "health", "containerPort": 8086, "protocol": "TCP"}]
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/live"
    assert container["startupProbe"]["httpGet"]["path"] == "/started"
    assert container["startupProbe"]["failureThreshold"] * container["startupProbe"]["periodSeconds"] == 900


def test_agent_deployment_waits_min_ready_seconds_and_pods_get_the_drain_plus_slack(agents: tuple[Any, Any]) -> None:
    deployment = agents[0]
    args = agent_container(deployment)["args"]
    assert deployment["spec"]["minReadySeconds"] == 12
    assert args[args.index("--drain-timeout") + 1] == "45s"
    assert deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == 55


def test_the_disruption_budget_goes_with_its_model_deployment(
    agents: tuple[Any, Any],
    operators: Operators,  # noqa: F811
    k8s_namespace: str,
) -> None:
    cluster, ns = operators.cluster, k8s_namespace

    cluster.kubectl_run("-n", ns, "delete", "md/m", "--wait=true", timeout=90)

    wait_until(lambda: get(cluster, ns, "poddisruptionbudget/m-agent") is None, timeout=TIMEOUT, what="agent PDB GC")
