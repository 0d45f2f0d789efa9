"""Tables for a pool of several balancer replicas: the objects the plan makes for them
(headless Service, PodDisruptionBudget, rolling drain), the pool-wide view combined from
each replica's snapshot (paddler_operator.balancer_views), and the status it gives."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from paddler_cli.main import build_parser
from paddler_operator import plan, plan_pool, plan_status
from paddler_operator.balancer_views import (
    AgentView,
    BalancerSnapshot,
    ReplicaRead,
    RolloutView,
    combine_rollouts,
    combine_snapshots,
)
from paddler_operator.crd_pool import LlmPoolSpec
from paddler_operator.objects import ObjRef
from paddler_operator.plan import Owner

POOL = Owner(kind="LlmPool", namespace="ns", name="p", uid="pool-uid", generation=3)
SELECTOR = {"paddler.dev/pool": "p", "paddler.dev/component": "balancer"}
PDB_REF = ObjRef("policy/v1", "PodDisruptionBudget", "ns", "p-balancer")


def pool_spec(**balancer: Any) -> LlmPoolSpec:
    return LlmPoolSpec.model_validate({"balancer": balancer})


def objects(**balancer: Any) -> dict[str, dict[str, Any]]:
    return {f"{o['kind']}/{o['metadata']['name']}": o for o in plan_pool.plan_pool(POOL, pool_spec(**balancer))}


def pod(**balancer: Any) -> dict[str, Any]:
    spec: dict[str, Any] = objects(**balancer)["Deployment/p-balancer"]["spec"]["template"]["spec"]
    return spec


# --- spec --------------------------------------------------------------------------------


@pytest.mark.parametrize(("replicas", "valid"), [(0, True), (1, True), (2, True), (7, True), (-1, False)])
def test_balancer_replicas_have_no_upper_bound(replicas: int, valid: bool) -> None:
    try:
        pool_spec(replicas=replicas)
    except ValidationError:
        assert not valid
    else:
        assert valid


@pytest.mark.parametrize(("timeout", "valid"), [(0, True), (50, True), (600, True), (-1, False)])
def test_drain_timeout_is_not_negative(timeout: int, valid: bool) -> None:
    try:
        pool_spec(drainTimeoutSeconds=timeout)
    except ValidationError:
        assert not valid
    else:
        assert valid


# --- objects -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("replicas", "has_pdb", "absent"),
    [(0, False, [PDB_REF]), (1, False, [PDB_REF]), (2, True, []), (5, True, [])],
)
def test_pod_disruption_budget_only_from_two_replicas(replicas: int, has_pdb: bool, absent: list[ObjRef]) -> None:
    assert ("PodDisruptionBudget/p-balancer" in objects(replicas=replicas)) == has_pdb
    assert plan_pool.pool_absent(POOL, pool_spec(replicas=replicas)) == absent


def test_pod_disruption_budget_lets_one_replica_go_at_a_time() -> None:
    pdb = objects(replicas=2)["PodDisruptionBudget/p-balancer"]
    assert pdb["spec"] == {"maxUnavailable": 1, "selector": {"matchLabels": SELECTOR}}
    assert pdb["metadata"]["ownerReferences"][0]["uid"] == "pool-uid"


@pytest.mark.parametrize(
    ("balancer", "path", "value"),
    [
        ({}, ("strategy",), {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}}),
        ({"replicas": 3}, ("replicas",), 3),
        ({}, ("template", "spec", "terminationGracePeriodSeconds"), 65),
        ({"drainTimeoutSeconds": 0}, ("template", "spec", "terminationGracePeriodSeconds"), 15),
        ({"drainTimeoutSeconds": 120}, ("template", "spec", "terminationGracePeriodSeconds"), 135),
        (
            {},
            ("template", "spec", "topologySpreadConstraints"),
            [
                {
                    "maxSkew": 1,
                    "topologyKey": "kubernetes.io/hostname",
                    "whenUnsatisfiable": "ScheduleAnyway",
                    "labelSelector": {"matchLabels": SELECTOR},
                    "matchLabelKeys": ["pod-template-hash"],
                }
            ],
        ),
    ],
)
def test_balancer_deployment_for_replicas(balancer: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    node: Any = objects(**balancer)["Deployment/p-balancer"]["spec"]
    for key in path:
        node = node[key]
    assert node == value


def test_balancer_knows_its_pod_name() -> None:
    env = pod()["containers"][0]["env"]
    assert {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}} in env


@pytest.mark.parametrize(
    ("probe", "path"),
    [("readinessProbe", "/ready"), ("livenessProbe", "/health")],
)
def test_balancer_probes(probe: str, path: str) -> None:
    assert pod()["containers"][0][probe]["httpGet"] == {"path": path, "port": "management"}


@pytest.mark.parametrize(
    ("balancer", "port"),
    [({}, 8060), ({"service": {"managementPort": 9000}}, 8060)],
)
def test_headless_peers_service(balancer: dict[str, Any], port: int) -> None:
    svc = objects(**balancer)["Service/p-management-peers"]["spec"]
    assert (svc["clusterIP"], svc["publishNotReadyAddresses"], svc["selector"]) == ("None", True, SELECTOR)
    assert [(p["port"], p["targetPort"]) for p in svc["ports"]] == [(port, "management")]


def test_cluster_ip_management_service_stays_for_humans() -> None:
    svc = objects(service={"managementPort": 9000})["Service/p-management"]["spec"]
    assert (svc["type"], svc["ports"][0]["port"]) == ("ClusterIP", 9000)


@pytest.mark.parametrize(
    ("template", "operator_url", "metrics_url"),
    [
        (
            "http://{service}.{namespace}.svc:{port}",
            "http://p-management-peers.ns.svc:8060",
            "http://p-management.ns.svc:9000",
        ),
        ("http://127.0.0.1:4321", "http://127.0.0.1:4321", "http://127.0.0.1:4321"),
        ("http://{pool}.{namespace}:{port}", "http://p.ns:8060", "http://p.ns:9000"),
    ],
)
def test_operator_reaches_every_replica_keda_one_service(template: str, operator_url: str, metrics_url: str) -> None:
    spec = pool_spec(service={"managementPort": 9000})
    assert plan.balancer_url(template, "p", "ns", spec) == operator_url
    assert plan.metrics_url(template, "p", "ns", spec) == metrics_url


# --- combining replicas' snapshots ---------------------------------------------------------


def agent(id_: str, in_flight: int = 0, state: str = "Applied", group: str = "m") -> AgentView:
    return AgentView(id=id_, name=id_, model_group=group, slots_total=4, slots_in_flight=in_flight, state=state)


def snap(**kw: Any) -> BalancerSnapshot:
    return BalancerSnapshot(**kw)


S1 = {"model": {"LocalToAgent": "/a.gguf"}}
S2 = {"model": {"LocalToAgent": "/b.gguf"}}


@pytest.mark.parametrize(
    ("reads", "field", "value"),
    [
        # buffered requests: each replica buffers its own, the pool's are their sum
        ([ReplicaRead("a", snap(buffered_total=2)), ReplicaRead("b", snap(buffered_total=3))], "buffered_total", 5),
        (
            [
                ReplicaRead("a", snap(buffered_by_group={"m": 1})),
                ReplicaRead("b", snap(buffered_by_group={"m": 2, "n": 1})),
            ],
            "buffered_by_group",
            {"m": 3, "n": 1},
        ),
        # an unreachable replica adds nothing and is named
        (
            [ReplicaRead("a", snap(buffered_total=2)), ReplicaRead("b", None, "refused")],
            "buffered_total",
            2,
        ),
        ([ReplicaRead("b", None, "refused"), ReplicaRead("a", snap())], "unreachable", {"b": "refused"}),
        ([ReplicaRead("b", snap()), ReplicaRead("a", snap())], "replicas", ("a", "b")),
        # agents: one per id (each is connected to every replica), in-flight summed
        (
            [
                ReplicaRead("a", snap(agents=(agent("x", 1), agent("y")))),
                ReplicaRead("b", snap(agents=(agent("x", 2),))),
            ],
            "agents",
            (agent("x", 3), agent("y")),
        ),
        # the first replica by URL describes the agent
        (
            [
                ReplicaRead("b", snap(agents=(agent("x", state="Downloading"),))),
                ReplicaRead("a", snap(agents=(agent("x"),))),
            ],
            "agents",
            (agent("x"),),
        ),
        # desired state: only what every replica holds alike (else it is pushed again)
        ([ReplicaRead("a", snap(group_states={"m": S1})), ReplicaRead("b", snap(group_states={"m": S1}))],
         "group_states", {"m": S1}),
        ([ReplicaRead("a", snap(group_states={"m": S1})), ReplicaRead("b", snap(group_states={"m": S2}))],
         "group_states", {}),
        ([ReplicaRead("a", snap(group_states={"m": S1})), ReplicaRead("b", snap())], "group_states", {}),
        ([ReplicaRead("a", snap(group_states={"m": S1})), ReplicaRead("b", None, "down")], "group_states", {"m": S1}),
        # owners: every group any replica knows (orphans are removed wherever they are)
        (
            [
                ReplicaRead("a", snap(group_owners={"m": None})),
                ReplicaRead("b", snap(group_owners={"m": "ModelDeployment/ns/m", "old": "ModelDeployment/ns/old"})),
            ],
            "group_owners",
            {"m": "ModelDeployment/ns/m", "old": "ModelDeployment/ns/old"},
        ),
    ],
)  # fmt: skip
def test_combine_snapshots(reads: list[ReplicaRead], field: str, value: Any) -> None:
    combined = combine_snapshots(reads)
    assert combined is not None
    assert getattr(combined, field) == value


def test_combine_snapshots_of_no_answer_is_none() -> None:
    assert combine_snapshots([ReplicaRead("a", None, "refused"), ReplicaRead("b", None, "timeout")]) is None


@pytest.mark.parametrize(
    ("rollouts", "phase", "applied"),
    [
        ([], None, None),
        ([{"phase": "Complete", "applied": 2}], "Complete", 2),
        ([{"phase": "Complete", "applied": 2}, {"phase": "Progressing", "applied": 1}], "Progressing", 1),
        ([{"phase": "Progressing", "applied": 1}, {"phase": "Failed", "applied": 1}], "Failed", 1),
        ([{"phase": "Progressing", "applied": 2}, {"phase": "Progressing", "applied": 1}], "Progressing", 1),
    ],
)
def test_combine_rollouts_shows_the_least_advanced_replica(
    rollouts: list[dict[str, Any]], phase: str | None, applied: int | None
) -> None:
    combined = combine_rollouts([RolloutView.model_validate(r) for r in rollouts])
    assert (combined.phase if combined else None) == phase
    assert (combined.applied if combined else None) == applied


@pytest.mark.parametrize(
    ("unreachable", "replicas", "partial"),
    [
        ({}, ("a", "b"), None),
        ({"c": "refused"}, ("a", "b"), "1 of 3 balancer replicas unreachable: c: refused"),
        ({"d": "x", "c": "y"}, ("a",), "2 of 3 balancer replicas unreachable: c: y; d: x"),
    ],
)
def test_partial_names_the_replicas_missed(
    unreachable: dict[str, str], replicas: tuple[str, ...], partial: str | None
) -> None:
    assert snap(replicas=replicas, unreachable=unreachable).partial == partial


# --- status ------------------------------------------------------------------------------


def pool_status(spec: LlmPoolSpec, snapshot: BalancerSnapshot | None, ready: int, errors: list[str]) -> Any:
    return plan_status.pool_status(
        spec,
        generation=1,
        snapshot=snapshot,
        balancer_error=None if snapshot else "down",
        apply_errors=errors,
        model_deployments=0,
        inference_url="i",
        management_url="m",
        previous=[],
        now="2026-01-01T00:00:00Z",
        balancers_ready=ready,
    )


PARTIAL = snap(replicas=("a",), unreachable={"b": "refused"})


@pytest.mark.parametrize(
    ("replicas", "snapshot", "ready", "errors", "balancers", "ready_cond", "degraded"),
    [
        (2, snap(replicas=("a", "b")), 2, [], "2/2", ("True", "BalancerReady"), ("False", "AsExpected")),
        (3, snap(replicas=("a", "b")), 1, [], "1/3", ("True", "BalancerReady"), ("False", "AsExpected")),
        (2, PARTIAL, 2, [], "2/2", ("True", "BalancerReady"), ("True", "BalancerReplicasUnreachable")),
        (2, PARTIAL, 2, ["Service x: no"], "2/2", ("True", "BalancerReady"), ("True", "ApplyFailed")),
        (2, None, 0, [], "0/2", ("False", "BalancerUnreachable"), ("False", "AsExpected")),
        (0, None, 0, [], "0/0", ("False", "Stopped"), ("False", "AsExpected")),
    ],
)
def test_pool_status_shows_balancer_replicas(
    replicas: int,
    snapshot: BalancerSnapshot | None,
    ready: int,
    errors: list[str],
    balancers: str,
    ready_cond: tuple[str, str],
    degraded: tuple[str, str],
) -> None:
    status = pool_status(pool_spec(replicas=replicas), snapshot, ready, errors)
    conditions = {c.type: (c.status, c.reason) for c in status.conditions}
    assert (status.balancers, status.balancer_replicas, status.balancer_ready_replicas) == (balancers, replicas, ready)
    assert (conditions["Ready"], conditions["Degraded"]) == (ready_cond, degraded)


def test_pool_status_counts_the_replicas_reached() -> None:
    assert pool_status(pool_spec(replicas=2), PARTIAL, 2, []).balancer_replicas_reached == 1


def test_partial_pass_degrades_a_model_deployment() -> None:
    from paddler_operator.crd_model_deployment import ModelDeploymentSpec

    md = ModelDeploymentSpec.model_validate({"poolRef": {"name": "p"}, "model": {"localPath": "/m.gguf"}})
    status = plan_status.model_deployment_status(
        "m",
        md,
        generation=1,
        pool_found=True,
        desired_replicas=0,
        snapshot=PARTIAL,
        balancer_error=None,
        desired_state_error=None,
        apply_errors=[],
        previous=[],
        now="2026-01-01T00:00:00Z",
    )
    degraded = next(c for c in status.conditions if c.type == "Degraded")
    assert (degraded.status, degraded.reason) == ("True", "BalancerReplicasUnreachable")
    assert "b: refused" in degraded.message


@pytest.mark.parametrize(
    ("routing", "flag"), [({}, "prefix"), ({"routing": "prefix"}, "prefix"), ({"routing": "leastBusy"}, "least-busy")]
)
def test_the_pools_routing_reaches_every_balancer_replica_as_its_flag(routing: dict[str, Any], flag: str) -> None:
    container = objects(**routing)["Deployment/p-balancer"]["spec"]["template"]["spec"]["containers"][0]
    args = build_parser().parse_args(container["args"])
    assert str(args.routing) == flag


def test_an_unknown_routing_is_rejected_by_the_schema() -> None:
    with pytest.raises(ValidationError, match="routing"):
        LlmPoolSpec.model_validate({"balancer": {"routing": "random"}})
