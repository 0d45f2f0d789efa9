"""Tables for who reads a pool's management port (issue 20): its PodMonitor and NetworkPolicy
(paddler_operator.plan_monitoring), wired into the pool's plan, and the discovery that
decides whether PodMonitors are served."""

from __future__ import annotations

from typing import Any

import pytest

from paddler_operator import plan, plan_pool
from paddler_operator.crd_pool import LlmPoolSpec
from paddler_operator.kube import KubeApi, KubeError, collection_path
from paddler_operator.plan import Owner
from paddler_operator.plan_monitoring import (
    NETWORK_POLICY_API,
    POD_MONITOR_API,
    ManagementReaders,
    Presence,
    network_policy,
    plan_readers,
    pod_monitor,
)

POOL = Owner(kind="LlmPool", namespace="ns", name="p", uid="pool-uid", generation=3)
SECRET = "p-management-0123456789"
BALANCERS = {"paddler.dev/pool": "p", "paddler.dev/component": "balancer"}


def spec(**balancer: Any) -> LlmPoolSpec:
    return plan.with_token_secret(LlmPoolSpec.model_validate({"balancer": balancer}), SECRET)


def test_pod_monitor_scrapes_every_balancer_with_the_pools_token() -> None:
    monitor = pod_monitor(POOL, spec(), (("release", "kube-prometheus-stack"),))
    assert (monitor["apiVersion"], monitor["kind"]) == POD_MONITOR_API
    assert monitor["metadata"]["name"] == "p-balancer"
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert monitor["metadata"]["ownerReferences"] == [POOL.reference()]
    assert monitor["spec"]["selector"] == {"matchLabels": BALANCERS}
    assert monitor["spec"]["podMetricsEndpoints"] == [
        {
            "port": "management",
            "path": "/metrics",
            "scheme": "http",
            "authorization": {"type": "Bearer", "credentials": {"name": SECRET, "key": "management-token"}},
        }
    ]


def test_pod_monitor_of_a_pool_with_its_own_secret_or_no_token() -> None:
    own = pod_monitor(POOL, spec(managementAuth={"secretName": "mine", "secretKey": "t"}))
    off = pod_monitor(POOL, spec(managementAuth={"enabled": False}))
    assert own["spec"]["podMetricsEndpoints"][0]["authorization"]["credentials"] == {"name": "mine", "key": "t"}
    assert "authorization" not in off["spec"]["podMetricsEndpoints"][0]


def test_network_policy_closes_only_the_management_port() -> None:
    readers = ManagementReaders(
        network_policy=Presence.WANTED,
        operator_namespace="paddler-system",
        operator_pod_labels=(("app.kubernetes.io/name", "paddler-operator"),),
        monitoring_namespaces=("monitoring", "keda"),
    )
    policy = network_policy(POOL, spec(), readers)
    assert (policy["apiVersion"], policy["kind"]) == NETWORK_POLICY_API
    assert policy["spec"]["podSelector"] == {"matchLabels": BALANCERS}
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    open_rule, management_rule = policy["spec"]["ingress"]
    assert open_rule == {"ports": [{"port": 8061, "protocol": "TCP"}]}  # inference: from anywhere
    assert management_rule["ports"] == [{"port": 8060, "protocol": "TCP"}]
    assert management_rule["from"] == [
        {"podSelector": {"matchLabels": {"paddler.dev/pool": "p", "paddler.dev/component": "agent"}}},
        {"podSelector": {"matchLabels": BALANCERS}},  # peers
        {
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "paddler-system"}},
            "podSelector": {"matchLabels": {"app.kubernetes.io/name": "paddler-operator"}},
        },
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}},
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "keda"}}},
    ]
    with_panel = network_policy(POOL, spec(adminPanel={"enabled": True}), readers)
    assert with_panel["spec"]["ingress"][0]["ports"] == [
        {"port": 8061, "protocol": "TCP"},
        {"port": 8062, "protocol": "TCP"},
    ]


@pytest.mark.parametrize(
    ("pod_monitor_presence", "network_policy_presence", "kinds", "absent"),
    [
        (Presence.UNSERVED, Presence.UNWANTED, [], ["NetworkPolicy"]),
        (Presence.WANTED, Presence.UNWANTED, ["PodMonitor"], ["NetworkPolicy"]),
        (Presence.UNWANTED, Presence.WANTED, ["NetworkPolicy"], ["PodMonitor"]),
        (Presence.WANTED, Presence.WANTED, ["PodMonitor", "NetworkPolicy"], []),
    ],
)
def test_readers_as_chosen(
    pod_monitor_presence: Presence, network_policy_presence: Presence, kinds: list[str], absent: list[str]
) -> None:
    readers = ManagementReaders(
        pod_monitor=pod_monitor_presence, network_policy=network_policy_presence, operator_namespace="ops"
    )
    objects, gone = plan_readers(POOL, spec(), readers)
    assert [o["kind"] for o in objects] == kinds
    assert [(r.kind, r.namespace, r.name) for r in gone] == [(k, "ns", "p-balancer") for k in absent]


def test_the_pools_plan_carries_its_readers() -> None:
    readers = ManagementReaders(pod_monitor=Presence.WANTED, network_policy=Presence.UNWANTED)
    objects, absent = plan_pool.pool_plan(POOL, spec(), readers)
    assert objects[: len(plan_pool.plan_pool(POOL, spec()))] == plan_pool.plan_pool(POOL, spec())
    assert objects[-1]["kind"] == "PodMonitor"
    assert [r.kind for r in absent] == ["PodDisruptionBudget", "NetworkPolicy"]


@pytest.mark.parametrize(
    ("api", "path"),
    [
        (POD_MONITOR_API, "/apis/monitoring.coreos.com/v1/namespaces/ns/podmonitors"),
        (NETWORK_POLICY_API, "/apis/networking.k8s.io/v1/namespaces/ns/networkpolicies"),
    ],
)
def test_reader_kinds_have_api_paths(api: tuple[str, str], path: str) -> None:
    assert collection_path(api[0], api[1], "ns") == path


class Discovery(KubeApi):
    """KubeApi whose requests answer from a table: the discovery document or an error."""

    def __init__(self, answer: Any) -> None:
        super().__init__()
        self.answer = answer
        self.paths: list[str] = []

    async def _run(self, method: str, path: str, *args: Any, **kwargs: Any) -> Any:
        self.paths.append(f"{method} {path}")
        if isinstance(self.answer, KubeError):
            raise self.answer
        return self.answer


@pytest.mark.parametrize(
    ("answer", "served"),
    [
        ({"resources": [{"name": "podmonitors", "kind": "PodMonitor"}]}, True),
        ({"resources": [{"name": "podmonitors/status", "kind": "PodMonitor"}]}, False),
        ({"resources": [{"name": "servicemonitors", "kind": "ServiceMonitor"}]}, False),
        (KubeError(404, "NotFound", "the server could not find the requested resource"), False),
    ],
)
async def test_discovery_says_whether_a_kind_is_served(answer: Any, served: bool) -> None:
    api = Discovery(answer)
    assert await api.serves(*POD_MONITOR_API) is served
    assert api.paths == ["GET /apis/monitoring.coreos.com/v1"]


async def test_discovery_that_fails_otherwise_is_an_error() -> None:
    with pytest.raises(KubeError):
        await Discovery(KubeError(503, "ServiceUnavailable", "later")).serves(*POD_MONITOR_API)
