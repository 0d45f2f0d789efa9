"""HPA mode through a real metrics pipeline: balancer /metrics -> Prometheus -> prometheus-adapter
(external.metrics.k8s.io, the chart's rules) -> the kube-controller-manager's HPA controller.

The balancer and the agents are real local processes; an agent process is started when the HPA
has set the replicas that would bring its pod up (kwok pods run nothing), as in
``test_operator_cluster.py::test_builtin_autoscaler_wakes_from_zero_and_goes_back``. The control
plane runs the HPA controller every second (scripts/k8s/up.sh) with ``HPAScaleToZero`` on; the
operator's ``--hpa-scale-to-zero off`` stands in for a cluster without the gate.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from tests.harness import Balancer, Processes
from tests.kubectl import wait_until

from .conftest import K8sCluster
from .metrics_pipeline import (  # noqa: F401 (fixtures)
    MetricsAdapter,
    Prometheus,
    metrics_adapter,
    prometheus,
    prometheus_targets,
    wait_for_external,
)
from .test_operator_cluster import (  # noqa: F401 - crds and operators are fixtures
    MODEL,
    POOL,
    OperatorProcess,
    Operators,
    crds,
    get,
    operators,
    wait_object,
)

pytestmark = pytest.mark.k8s

TIMEOUT = 60.0
SELECTOR = "model_group=m"
SLOW_AGENT = ("--model-group", "m", "--simulated-tokens-per-second", "10")


def hpa_model(min_replicas: int, max_replicas: int = 3, delay: int = 3) -> str:
    autoscaling = (
        f"  autoscaling: {{mode: HPA, minReplicas: {min_replicas}, maxReplicas: {max_replicas}, "
        f"scaleDownDelaySeconds: {delay}}}\n  model:"
    )
    return MODEL.replace("  model:", autoscaling)


@dataclass
class Requests:
    """Chat completions sent to the balancer, each on its own thread; answers kept."""

    balancer: Balancer
    statuses: list[int | str] = field(default_factory=list)
    threads: list[threading.Thread] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def send(self, max_tokens: int = 5) -> None:
        def call() -> None:
            body = json.dumps(
                {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": max_tokens}
            ).encode()
            request = urllib.request.Request(
                f"{self.balancer.inference_url}/v1/chat/completions",
                data=body,
                headers={"Content-Type": "application/json"},
            )
            status: int | str
            try:
                with urllib.request.urlopen(request, timeout=90) as resp:
                    resp.read()
                    status = resp.status
            except Exception as err:  # the test asserts on it
                status = f"{type(err).__name__}: {err}"
            with self._lock:
                self.statuses.append(status)

        thread = threading.Thread(target=call, daemon=True)
        thread.start()
        self.threads.append(thread)

    def join(self, timeout: float = 90) -> list[int | str]:
        deadline = time.monotonic() + timeout
        for thread in self.threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        with self._lock:
            return list(self.statuses)


@dataclass
class Group:
    """One HPA-mode ModelDeployment `m` of pool `p` in a fresh namespace, its balancer scraped."""

    cluster: K8sCluster
    ns: str
    balancer: Balancer
    paddler: Processes
    operator: OperatorProcess
    requests: Requests

    def replicas(self) -> int:
        return int(get(self.cluster, self.ns, "deployment/m-agent")["spec"].get("replicas", 0))

    def wait_replicas(self, check: Callable[[int], bool], what: str, timeout: float = TIMEOUT) -> int:
        seen: list[int] = []

        def probe() -> bool:
            seen.append(self.replicas())
            return check(seen[-1])

        wait_until(probe, timeout=timeout, what=f"{what} (replicas seen: {sorted(set(seen))})")
        return seen[-1]

    def hpa(self) -> Any:
        return get(self.cluster, self.ns, "hpa/m-agent")

    def agent(self, name: str) -> None:
        """The pod of one more replica comes up: a real agent process of group m connects."""
        self.paddler.agent(self.balancer, slots=1, name=name, extra=SLOW_AGENT)

    def rescales(self) -> list[str]:
        events = get(self.cluster, self.ns, "events", "--field-selector", "involvedObject.kind=HorizontalPodAutoscaler")
        return [e["message"] for e in events["items"] if e["reason"] == "SuccessfulRescale"]

    def operator_owns_replicas(self) -> bool:
        """Has the operator ever written the agent Deployment's spec.replicas (managedFields)?"""
        meta = get(self.cluster, self.ns, "deployment/m-agent")["metadata"]
        return any(
            "f:replicas" in ((f.get("fieldsV1") or {}).get("f:spec") or {})
            for f in meta.get("managedFields") or []
            if f.get("manager") == "paddler-operator"
        )


def condition(obj: Any, type_: str) -> tuple[str, str] | None:
    for c in ((obj or {}).get("status") or {}).get("conditions") or []:
        if c["type"] == type_:
            return c["status"], c["reason"]
    return None


def external_current(hpa: Any, metric: str) -> float | None:
    """The value the HPA controller last read for an external metric (status.currentMetrics)."""
    for m in (hpa or {}).get("status", {}).get("currentMetrics") or []:
        if m.get("type") == "External" and m["external"]["metric"]["name"] == metric:
            current = m["external"]["current"]
            text = current.get("averageValue") or current.get("value") or "0"
            return float(text[:-1]) / 1000 if text.endswith("m") else float(text)
    return None


@pytest.fixture
def hpa_group(
    operators: Operators,  # noqa: F811
    k8s_namespace: str,
    paddler: Processes,
    prometheus_targets: Prometheus,  # noqa: F811
    metrics_adapter: MetricsAdapter,  # noqa: F811
    request: pytest.FixtureRequest,
) -> Iterator[Group]:
    """Parametrised indirectly: (minReplicas, operator's --hpa-scale-to-zero)."""
    min_replicas, gate = getattr(request, "param", (0, "on"))
    cluster, ns = operators.cluster, k8s_namespace
    balancer = paddler.balancer("--buffered-request-timeout", "80s")
    prometheus_targets.scrape(ns, balancer.management_addr, namespace=ns)
    operator = operators.start(ns, balancer_url=balancer.management_url, extra_args=("--hpa-scale-to-zero", gate))
    cluster.apply(POOL + "---" + hpa_model(min_replicas), namespace=ns)
    wait_object(cluster, ns, "hpa/m-agent")
    # The series is in Prometheus and the adapter serves it for this namespace and group.
    wait_for_external(metrics_adapter, ns, "paddler_requests_buffered", SELECTOR, at_least=0, timeout=TIMEOUT)
    requests = Requests(balancer)
    try:
        yield Group(cluster, ns, balancer, paddler, operator, requests)
    finally:
        requests.join(timeout=5)


def test_hpa_wakes_a_group_from_zero_on_the_adapters_buffered_metric_and_returns_it_to_zero(
    hpa_group: Group,
) -> None:
    g = hpa_group
    assert g.hpa()["spec"]["minReplicas"] == 0
    # Idle (metrics read 0): the HPA takes the Deployment's initial replica away.
    g.wait_replicas(lambda n: n == 0, "HPA scales the idle group to 0")

    started = time.monotonic()
    g.requests.send()  # no agent: buffered; only the metrics pipeline can wake the group
    g.wait_replicas(lambda n: n == 1, "HPA scales 0 -> 1 on the buffered request")
    wake_s = time.monotonic() - started
    # The decision is the HPA's, from the adapter's reading of the balancer's gauge: it reads
    # 1 buffered request per replica (the request still waits: no agent yet) ...
    wait_until(
        lambda: (external_current(g.hpa(), "paddler_requests_buffered") or 0) >= 1,
        timeout=TIMEOUT,
        what="HPA status.currentMetrics: paddler_requests_buffered >= 1",
    )
    assert any(m.startswith("New size: 1; reason: external metric paddler_requests_buffered") for m in g.rescales()), (
        g.rescales()
    )
    # ... and the operator never wrote the replica count.
    assert not g.operator_owns_replicas()
    assert "hpa wake" not in g.operator.output()

    g.agent("agent-0")  # the pod comes up
    assert g.requests.join() == [200]
    # Idle for scaleDownDelaySeconds (the HPA's scale-down stabilisation window): back to 0.
    g.wait_replicas(lambda n: n == 0, "HPA scales back to 0")
    assert any(m == "New size: 0; reason: All metrics below target" for m in g.rescales()), g.rescales()
    assert not g.operator_owns_replicas()
    print(f"HPA mode: buffered request -> replicas=1 in {wake_s:.1f}s")


@pytest.mark.parametrize("hpa_group", [(1, "on"), (1, "off")], indirect=True, ids=["gate-on", "gate-off"])
def test_hpa_grows_the_group_under_sustained_buffered_load(hpa_group: Group) -> None:
    g = hpa_group
    g.wait_replicas(lambda n: n == 1, "one agent replica")
    g.agent("agent-0")
    for _ in range(4):
        g.requests.send(max_tokens=50)  # 5 s each on the one slot: three wait in the buffer
    grown = g.wait_replicas(lambda n: n >= 2, "HPA grows the group under buffered load")
    assert grown >= 2
    assert any("reason: external metric paddler_requests_buffered" in m for m in g.rescales()), g.rescales()
    assert (external_current(g.hpa(), "paddler_requests_buffered") or 0) > 0
    g.agent("agent-1")  # the new pods come up and take the buffered requests
    assert g.requests.join() == [200] * 4
    assert not g.operator_owns_replicas()


@pytest.mark.parametrize("hpa_group", [(0, "off")], indirect=True, ids=["gate-off"])
def test_without_scale_to_zero_the_operator_only_wakes_the_group_and_the_hpa_keeps_one(hpa_group: Group) -> None:
    g = hpa_group
    assert g.hpa()["spec"]["minReplicas"] == 1  # what a cluster without HPAScaleToZero accepts
    g.wait_replicas(lambda n: n == 1, "the Deployment's first replica")
    # At 0 replicas (scaled by hand, or parked while its pool was gone) an HPA does nothing.
    g.cluster.kubectl_run("-n", g.ns, "scale", "deployment/m-agent", "--replicas=0")
    wait_until(
        lambda: condition(g.hpa(), "ScalingActive") == ("False", "ScalingDisabled"),
        timeout=TIMEOUT,
        what="HPA: scaling disabled at 0 replicas",
    )
    g.requests.send()
    g.wait_replicas(lambda n: n == 1, "the operator wakes the group 0 -> 1")
    assert g.operator.count("hpa wake md=") == 1, g.operator.output()
    g.agent("agent-0")
    assert g.requests.join() == [200]
    # Idle: the HPA (active again) would go to 0 but holds its minReplicas; the operator does
    # not scale down.
    wait_until(
        lambda: condition(g.hpa(), "ScalingLimited") == ("True", "TooFewReplicas"),
        timeout=TIMEOUT,
        what="HPA: desired replicas limited by minReplicas 1",
    )
    assert g.replicas() == 1
    assert g.operator.count("hpa wake md=") == 1


@pytest.mark.parametrize("hpa_group", [(1, "on")], indirect=True, ids=["gate-on"])
def test_operator_restart_while_the_hpa_has_grown_the_group_keeps_its_replicas(
    hpa_group: Group,
    operators: Operators,  # noqa: F811
) -> None:
    g = hpa_group
    g.wait_replicas(lambda n: n == 1, "one agent replica")
    g.agent("agent-0")
    for _ in range(4):
        g.requests.send(max_tokens=50)
    grown = g.wait_replicas(lambda n: n >= 2, "HPA grows the group under buffered load")
    g.operator.stop()
    second = operators.start(g.ns, balancer_url=g.balancer.management_url, extra_args=("--hpa-scale-to-zero", "on"))
    wait_until(
        lambda: second.count(f"ModelDeployment/{g.ns}/m ok="),
        timeout=TIMEOUT,
        what="the restarted operator's first pass",
    )
    assert g.replicas() >= grown  # not reset to 1 (nor to the Deployment's default)
    assert not g.operator_owns_replicas()
    g.agent("agent-1")
    assert g.requests.join() == [200] * 4


def put_group(balancer: Balancer, group: str) -> None:
    request = urllib.request.Request(
        f"{balancer.management_url}/api/v1/model_groups/{group}/desired_state",
        data=json.dumps({"model": {"LocalToAgent": f"/models/{group}.gguf"}}).encode(),
        headers={"Content-Type": "application/json"},
        method="PUT",
    )
    with urllib.request.urlopen(request, timeout=10) as resp:
        assert resp.status == 204


def test_adapter_rule_keeps_same_named_groups_of_two_namespaces_apart(
    k8s_cluster: K8sCluster,
    paddler: Processes,
    prometheus_targets: Prometheus,  # noqa: F811
    metrics_adapter: MetricsAdapter,  # noqa: F811
) -> None:
    """Two pools (two balancers, two namespaces), each with a model group `m`: a request buffered
    in one is read by the external metrics API of that namespace only."""
    suffix = uuid.uuid4().hex[:8]
    busy_ns, idle_ns = f"t-busy-{suffix}", f"t-idle-{suffix}"  # labels only: the adapter needs no namespace object
    busy, idle = paddler.balancer("--buffered-request-timeout", "60s"), paddler.balancer()
    for ns, balancer in ((busy_ns, busy), (idle_ns, idle)):
        put_group(balancer, "m")  # the group exists (what the operator's desired state does)
        prometheus_targets.scrape(ns, balancer.management_addr, namespace=ns)
    requests = Requests(busy)
    requests.send()  # no agent anywhere: buffered in busy_ns only
    wait_for_external(metrics_adapter, busy_ns, "paddler_requests_buffered", SELECTOR, at_least=1)
    wait_for_external(metrics_adapter, idle_ns, "paddler_requests_buffered", SELECTOR, at_least=0)
    assert metrics_adapter.external(idle_ns, "paddler_requests_buffered", SELECTOR) == [0.0]
    assert metrics_adapter.external(busy_ns, "paddler_requests_buffered", SELECTOR) == [1.0]
    paddler.agent(busy, slots=1, name="agent-0", extra=("--model-group", "m"))
    assert requests.join(timeout=60) == [200]


def test_adapter_sums_one_groups_buffered_requests_over_its_balancer_replicas(
    k8s_cluster: K8sCluster,
    paddler: Processes,
    prometheus_targets: Prometheus,  # noqa: F811
    metrics_adapter: MetricsAdapter,  # noqa: F811
) -> None:
    """A pool with two balancer replicas: each counts only the requests buffered on itself,
    and the HPA's external metric (the chart's adapter rule, `sum by (model_group)`) reads
    the pool's total. Two requests, one buffered on each replica, read 2."""
    ns = f"t-replicas-{uuid.uuid4().hex[:8]}"
    replicas = [paddler.balancer("--buffered-request-timeout", "60s") for _ in range(2)]
    for index, balancer in enumerate(replicas):
        put_group(balancer, "m")
        prometheus_targets.scrape(f"{ns}-{index}", balancer.management_addr, namespace=ns)
    wait_for_external(metrics_adapter, ns, "paddler_requests_buffered", SELECTOR, at_least=0)
    requests = [Requests(balancer) for balancer in replicas]
    for each in requests:
        each.send()  # no agent: buffered on that replica
    wait_for_external(metrics_adapter, ns, "paddler_requests_buffered", SELECTOR, at_least=2)
    assert metrics_adapter.external(ns, "paddler_requests_buffered", SELECTOR) == [2.0]
    agent_addrs = ("--management-addr", replicas[1].management_addr)
    paddler.agent(replicas[0], slots=2, name="agent-0", extra=("--model-group", "m", *agent_addrs))
    assert [each.join(timeout=60) for each in requests] == [[200], [200]]
