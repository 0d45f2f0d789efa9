"""Tables for what the operator renders so agents tell Kubernetes the truth: the agent's health
port and probes (every engine), the startup window, ``minReadySeconds``, the drain timeout and
grace period, and the agents' PodDisruptionBudget."""

from __future__ import annotations

from typing import Any

import pytest

from paddler_cli.main import build_parser
from paddler_operator import plan_agents
from paddler_operator.crd_model_deployment import ModelDeploymentSpec
from paddler_operator.crd_pool import LlmPoolSpec
from paddler_operator.plan import Owner

MD = Owner(kind="ModelDeployment", namespace="ns", name="m", uid="md-uid", generation=2)
ENGINES = ["llama", "llamaServer"]


def md_spec(**spec: Any) -> ModelDeploymentSpec:
    return ModelDeploymentSpec.model_validate({"poolRef": {"name": "p"}, "model": {"localPath": "/m.gguf"}, **spec})


def objects(**spec: Any) -> dict[str, dict[str, Any]]:
    planned = plan_agents.plan_model_deployment(MD, md_spec(**spec), LlmPoolSpec())
    return {o["kind"]: o for o in planned.objects}


def agent(**spec: Any) -> dict[str, Any]:
    containers = objects(**spec)["Deployment"]["spec"]["template"]["spec"]["containers"]
    found: dict[str, Any] = next(c for c in containers if c["name"] == "agent")
    return found


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize(
    ("probe", "path"),
    [("readinessProbe", "/ready"), ("livenessProbe", "/live"), ("startupProbe", "/started")],
)
def test_every_engine_probes_the_agents_own_health_doors(engine: str, probe: str, path: str) -> None:
    assert agent(engine=engine)[probe]["httpGet"] == {"path": path, "port": "health"}


@pytest.mark.parametrize("engine", ENGINES)
def test_the_health_port_is_the_one_the_agent_listens_on(engine: str) -> None:
    container = agent(engine=engine)
    args = build_parser().parse_args(container["args"])
    assert container["ports"] == [{"name": "health", "containerPort": 8086, "protocol": "TCP"}]
    assert args.health_addr == "0.0.0.0:8086"


@pytest.mark.parametrize(
    ("spec", "failure_threshold"),
    [
        ({}, 60),
        ({"startupTimeoutSeconds": 1800}, 180),
        ({"startupTimeoutSeconds": 45}, 5),
        ({"startupTimeoutSeconds": 10}, 1),
    ],
)
def test_the_startup_probe_waits_for_the_startup_timeout(spec: dict[str, Any], failure_threshold: int) -> None:
    probe = agent(**spec)["startupProbe"]
    assert probe["periodSeconds"] * probe["failureThreshold"] >= md_spec(**spec).startup_timeout_seconds
    assert probe["failureThreshold"] == failure_threshold


def test_startup_timeout_has_a_floor() -> None:
    with pytest.raises(ValueError, match="greater than or equal to 10"):
        md_spec(startupTimeoutSeconds=5)


@pytest.mark.parametrize(("rollout", "seconds"), [({}, 5), ({"minReadySeconds": 30}, 30), ({"minReadySeconds": 0}, 0)])
def test_min_ready_seconds_goes_on_the_agent_deployment(rollout: dict[str, Any], seconds: int) -> None:
    assert objects(rollout=rollout)["Deployment"]["spec"]["minReadySeconds"] == seconds


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize(
    ("rollout", "drain", "grace"),
    [({}, 60.0, 70), ({"drainTimeoutSeconds": 0}, 0.0, 10), ({"drainTimeoutSeconds": 300}, 300.0, 310)],
)
def test_the_agent_drains_for_the_drain_timeout_within_its_grace_period(
    engine: str, rollout: dict[str, Any], drain: float, grace: int
) -> None:
    """The agent reads a bare number as milliseconds: the rendered duration must parse, with the
    agent's own parser, to the seconds the spec means."""
    rendered = objects(engine=engine, rollout=rollout)
    args = build_parser().parse_args(agent(engine=engine, rollout=rollout)["args"])
    assert args.drain_timeout == drain
    assert rendered["Deployment"]["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == grace


@pytest.mark.parametrize(
    ("autoscaling", "disruption", "max_unavailable"),
    [
        ({}, {}, 1),
        ({}, {"maxUnavailable": 2}, 2),
        ({}, {"maxUnavailable": "25%"}, "25%"),
        ({"mode": "KEDA", "minReplicas": 0}, {}, 1),
        ({"mode": "HPA"}, {}, 1),
        ({"mode": "Builtin", "minReplicas": 0}, {}, 1),
    ],
)
def test_every_model_deployment_gets_a_disruption_budget_over_its_agents(
    autoscaling: dict[str, Any], disruption: dict[str, Any], max_unavailable: int | str
) -> None:
    rendered = objects(autoscaling=autoscaling, disruption=disruption)
    pdb = rendered["PodDisruptionBudget"]
    assert pdb["apiVersion"] == "policy/v1"
    assert pdb["metadata"]["name"] == "m-agent"
    assert pdb["spec"]["maxUnavailable"] == max_unavailable
    assert "minAvailable" not in pdb["spec"]
    assert pdb["spec"]["selector"] == rendered["Deployment"]["spec"]["selector"]


def test_the_disruption_budget_is_owned_by_the_model_deployment() -> None:
    pdb = objects()["PodDisruptionBudget"]
    assert pdb["metadata"]["ownerReferences"] == [MD.reference()]


def test_agents_that_are_not_ready_never_block_a_node_drain() -> None:
    assert objects()["PodDisruptionBudget"]["spec"]["unhealthyPodEvictionPolicy"] == "AlwaysAllow"


def test_the_disruption_budget_selects_the_agent_pods() -> None:
    rendered = objects()
    pod_labels = rendered["Deployment"]["spec"]["template"]["metadata"]["labels"]
    selector = rendered["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"]
    assert selector.items() <= pod_labels.items()


@pytest.mark.parametrize("engine", ENGINES)
def test_agent_pods_spread_over_nodes_per_revision_without_ever_staying_pending(engine: str) -> None:
    deployment = objects(engine=engine)["Deployment"]
    (spread,) = deployment["spec"]["template"]["spec"]["topologySpreadConstraints"]
    assert spread == {
        "maxSkew": 1,
        "topologyKey": "kubernetes.io/hostname",
        "whenUnsatisfiable": "ScheduleAnyway",
        "labelSelector": deployment["spec"]["selector"],
        "matchLabelKeys": ["pod-template-hash"],
    }
