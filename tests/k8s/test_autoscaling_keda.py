"""KEDA owns 0 <-> 1 <-> N of a ``mode: KEDA`` ModelDeployment, on the real control plane.

KEDA's operator and metrics apiserver run as host processes (``scripts/k8s/keda-up.sh``,
built from the Go module proxy by ``keda-build.sh``), the metrics apiserver registered
as the APIService ``v1beta1.external.metrics.k8s.io``. The paddler operator and a real
``paddler balancer`` run as processes too; a simulated agent of the group is started
as each of KEDA's (kwok) pods comes up. The tests read KEDA's own objects — the
ScaledObject's status, the external metrics API it serves, the HPA it made and that
HPA's ``status.currentMetrics`` — so the decisions shown come from KEDA reading the
balancer's metric, not from the paddler operator (which never writes ``replicas`` in
this mode).
"""

from __future__ import annotations

import json
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import pytest

from paddler_operator.objects import quantity_value
from tests.harness import Balancer, Processes
from tests.kubectl import wait_until

from .conftest import COLD_BUILD_TIMEOUT_S, SCRIPTS, K8sCluster
from .metrics_pipeline import Prometheus, prometheus, prometheus_targets  # noqa: F401 - fixtures
from .test_autoscaling_hpa import Requests
from .test_operator_cluster import (  # noqa: F401 - crds and operators are fixtures
    MODEL,
    POOL,
    TIMEOUT,
    Operators,
    crds,
    get,
    operators,
    wait_object,
)

pytestmark = pytest.mark.k8s

SCALED_OBJECT = "scaledobject/m-agent"
KEDA_HPA = "hpa/keda-hpa-m-agent"
DEPLOYMENT = "deployment/m-agent"


@pytest.fixture(scope="module")
def keda(crds: K8sCluster) -> Iterator[K8sCluster]:  # noqa: F811
    """KEDA on the control plane for this module; its APIService removed afterwards (the
    prometheus-adapter tier registers the same name)."""
    up = subprocess.run(
        ["bash", str(SCRIPTS / "keda-up.sh")], capture_output=True, text=True, timeout=COLD_BUILD_TIMEOUT_S
    )
    if up.returncode != 0:
        pytest.fail(f"scripts/k8s/keda-up.sh failed:\n{up.stdout[-4000:]}\n{up.stderr[-4000:]}")
    try:
        yield crds
    finally:
        down = subprocess.run(["bash", str(SCRIPTS / "keda-down.sh")], capture_output=True, text=True, timeout=120)
        assert down.returncode == 0, f"scripts/k8s/keda-down.sh failed:\n{down.stdout}\n{down.stderr}"


def keda_model(*, delay: int, max_replicas: int = 3, prometheus_url: str | None = None) -> str:
    trigger = "metricsApi" if prometheus_url is None else f"prometheus, prometheusServerAddress: '{prometheus_url}'"
    autoscaling = (
        f"  autoscaling:\n    mode: KEDA\n    minReplicas: 0\n    maxReplicas: {max_replicas}\n"
        f"    scaleDownDelaySeconds: {delay}\n    keda: {{trigger: {trigger}, pollingIntervalSeconds: 1}}\n"
    )
    return POOL + "---" + MODEL.replace("  model:", autoscaling + "  model:")


def replicas(cluster: K8sCluster, ns: str) -> int | None:
    deployment = get(cluster, ns, DEPLOYMENT)
    return None if deployment is None else deployment["spec"].get("replicas")


def wait_replicas(cluster: K8sCluster, ns: str, want: int, timeout: float = TIMEOUT) -> float:
    """Seconds until the agent Deployment has ``want`` replicas (polled every 0.1 s)."""
    t0 = time.monotonic()
    wait_until(lambda: replicas(cluster, ns) == want, timeout=timeout, what=f"replicas == {want}", interval=0.1)
    return time.monotonic() - t0


def so_status(obj: Any, type_: str) -> str | None:
    for c in ((obj or {}).get("status") or {}).get("conditions") or []:
        if c["type"] == type_:
            return str(c["status"])
    return None


def ready_scaled_object(cluster: K8sCluster, ns: str) -> Any:
    """KEDA accepted the ScaledObject (its scaler built, its HPA made) and scaled the idle group to 0."""
    so = wait_object(cluster, ns, SCALED_OBJECT, lambda o: so_status(o, "Ready") == "True")
    wait_replicas(cluster, ns, 0)
    return so


def external_metric(cluster: K8sCluster, ns: str, metric: str) -> Decimal:
    """The value KEDA's metrics apiserver serves, through kube-apiserver's aggregator."""
    selector = urllib.parse.quote("scaledobject.keda.sh/name=m-agent")
    raw = cluster.kubectl_run(
        "get", "--raw", f"/apis/external.metrics.k8s.io/v1beta1/namespaces/{ns}/{metric}?labelSelector={selector}"
    ).stdout
    value = quantity_value(json.loads(raw)["items"][0]["value"])
    assert value is not None, raw
    return value


def wake_from_zero_and_answer(
    cluster: K8sCluster, ns: str, paddler: Processes, balancer: Balancer, metric: str, trigger: str
) -> Any:
    """One request to the group at zero: buffered (no agent), KEDA reads 1 through its trigger
    and activates (replicas 1), the agent of that pod comes up, the request is answered.
    Returns the active ScaledObject."""
    requests = Requests(balancer)
    t0 = time.monotonic()
    requests.send()  # no agent: the balancer buffers it; KEDA's next poll sees 1 and activates
    try:
        wait_replicas(cluster, ns, 1)
        print(f"\nKEDA {trigger}: request buffered -> replicas 1 in {time.monotonic() - t0:.2f}s")
        active = wait_object(cluster, ns, SCALED_OBJECT, lambda o: so_status(o, "Active") == "True")
        assert external_metric(cluster, ns, metric) == 1  # what KEDA read through its trigger
        paddler.agent(balancer, slots=2, name="agent-0", extra=("--model-group", "m"))  # the pod comes up
    finally:
        statuses = requests.join()
    assert statuses == [200]
    return active


def test_metrics_api_trigger_wakes_the_group_from_zero_answers_the_request_and_returns_to_zero(
    keda: K8sCluster,
    operators: Operators,  # noqa: F811
    k8s_namespace: str,
    paddler: Processes,
) -> None:
    cluster, ns = keda, k8s_namespace
    balancer = paddler.balancer("--buffered-request-timeout", "60s")
    operators.start(ns, balancer_url=balancer.management_url)
    cluster.apply(keda_model(delay=5), namespace=ns)
    so = ready_scaled_object(cluster, ns)
    trigger = so["spec"]["triggers"][0]
    assert trigger["type"] == "metrics-api"
    assert trigger["metadata"]["url"] == f"{balancer.management_url}/api/v1/buffered_requests?model_group=m&scope=pool"
    metric = so["status"]["externalMetricNames"][0]
    assert external_metric(cluster, ns, metric) == 0

    active = wake_from_zero_and_answer(cluster, ns, paddler, balancer, metric, "metrics-api")
    assert active["status"]["lastActiveTime"]

    # Idle for the cooldown (scaleDownDelaySeconds): KEDA takes the group back to 0.
    t1 = time.monotonic()
    wait_replicas(cluster, ns, 0)
    print(f"KEDA metrics-api: answered -> replicas 0 in {time.monotonic() - t1:.2f}s (cooldown 5s)")
    assert so_status(get(cluster, ns, SCALED_OBJECT), "Active") == "False"


def test_prometheus_trigger_wakes_the_group_from_zero_and_answers_the_request(
    keda: K8sCluster,
    operators: Operators,  # noqa: F811
    k8s_namespace: str,
    paddler: Processes,
    prometheus_targets: Prometheus,  # noqa: F811
) -> None:
    cluster, ns = keda, k8s_namespace
    balancer = paddler.balancer("--buffered-request-timeout", "60s")
    # Prometheus scrapes the balancer's /metrics (every second), its series labelled with the namespace.
    prometheus_targets.scrape(f"keda-{ns}", balancer.management_addr, namespace=ns)
    operators.start(ns, balancer_url=balancer.management_url)
    cluster.apply(keda_model(delay=5, prometheus_url=prometheus_targets.url), namespace=ns)
    query = f'sum(paddler_requests_buffered{{model_group="m",namespace="{ns}"}})'
    prometheus_targets.wait_for_series(query)
    so = ready_scaled_object(cluster, ns)
    trigger = so["spec"]["triggers"][0]
    assert (trigger["type"], trigger["metadata"]["query"]) == ("prometheus", query)
    assert trigger["metadata"]["serverAddress"] == prometheus_targets.url
    metric = so["status"]["externalMetricNames"][0]

    wake_from_zero_and_answer(cluster, ns, paddler, balancer, metric, "prometheus")
    wait_replicas(cluster, ns, 0)


def test_keda_hpa_grows_the_group_under_sustained_buffered_load(
    keda: K8sCluster,
    operators: Operators,  # noqa: F811
    k8s_namespace: str,
    paddler: Processes,
) -> None:
    cluster, ns = keda, k8s_namespace
    balancer = paddler.balancer("--buffered-request-timeout", "120s")
    operators.start(ns, balancer_url=balancer.management_url)
    cluster.apply(keda_model(delay=300), namespace=ns)
    so = ready_scaled_object(cluster, ns)
    metric = so["status"]["externalMetricNames"][0]

    # One slot per agent and slow answers (20 tokens at 4 tokens/s): 4 requests keep 3 buffered.
    slow = ("--model-group", "m", "--simulated-tokens-per-second", "4", "--simulated-max-tokens", "20")
    requests = Requests(balancer)
    started: set[int] = set()

    def start_agents_for_pods() -> int:
        want = replicas(cluster, ns) or 0
        for i in range(want):
            if i not in started:
                started.add(i)
                paddler.agent(balancer, slots=1, name=f"agent-{i}", extra=slow)
        return want

    try:
        for _ in range(4):
            requests.send(max_tokens=20)
        wait_until(lambda: start_agents_for_pods() >= 1, timeout=TIMEOUT, what="KEDA's 0 -> 1", interval=0.1)

        # KEDA's HPA reads the buffered count through the external metrics API and adds agents.
        # A sync that ran while the Deployment's status still said 0 replicas (just after KEDA's
        # 0 -> 1) divides the metric by zero and reports -9223372036854775808m as the average;
        # its decision is right but its average says nothing, so wait for a sync that has one.
        def grown() -> Any:
            start_agents_for_pods()
            hpa = get(cluster, ns, KEDA_HPA)
            status = (hpa or {}).get("status") or {}
            if status.get("desiredReplicas", 0) < 2 or (status.get("currentReplicas") or 0) < 1:
                return None
            current = next((m["external"] for m in status.get("currentMetrics") or [] if m["type"] == "External"), None)
            average = None if current is None else quantity_value(current["current"].get("averageValue", ""))
            return hpa if average is not None and average >= 0 else None

        hpa = wait_until(grown, timeout=90, what="KEDA's HPA asks for 2+ agents", interval=0.2)
        wait_until(lambda: start_agents_for_pods() >= 2, timeout=TIMEOUT, what="replicas >= 2", interval=0.1)
    finally:
        statuses = requests.join()
    assert statuses == [200] * 4
    spec_metric = hpa["spec"]["metrics"][0]["external"]["metric"]
    assert spec_metric["name"] == metric
    assert spec_metric["selector"]["matchLabels"] == {"scaledobject.keda.sh/name": "m-agent"}
    current = next(m["external"] for m in hpa["status"]["currentMetrics"] if m["type"] == "External")
    assert current["metric"]["name"] == metric
    # Buffered requests per agent above the target (1): what made the HPA grow the group.
    average = quantity_value(current["current"]["averageValue"])
    assert average is not None, current
    assert average > 1, current
    assert hpa["spec"]["maxReplicas"] == 3
    assert hpa["spec"]["minReplicas"] == 1
    assert (replicas(cluster, ns) or 0) >= 2


def test_operator_restart_in_keda_mode_keeps_the_replicas_keda_set(
    keda: K8sCluster,
    operators: Operators,  # noqa: F811
    k8s_namespace: str,
    paddler: Processes,
) -> None:
    cluster, ns = keda, k8s_namespace
    delay = 20
    balancer = paddler.balancer("--buffered-request-timeout", "60s")
    first = operators.start(ns, balancer_url=balancer.management_url)
    cluster.apply(keda_model(delay=delay), namespace=ns)
    ready_scaled_object(cluster, ns)

    requests = Requests(balancer)
    requests.send()
    try:
        wait_replicas(cluster, ns, 1)
        paddler.agent(balancer, slots=2, name="agent-0", extra=("--model-group", "m"))
    finally:
        assert requests.join() == [200]
    generation = get(cluster, ns, SCALED_OBJECT)["metadata"]["generation"]

    # Mid-way through KEDA's cooldown, the paddler operator restarts.
    first.stop()
    assert replicas(cluster, ns) == 1
    second = operators.start(ns, balancer_url=balancer.management_url)
    restarted_at = time.monotonic()
    wait_until(lambda: second.count(f"ModelDeployment/{ns}/m ok="), timeout=TIMEOUT, what="restarted operator's pass")
    assert replicas(cluster, ns) == 1  # not reset (the operator writes no replicas in KEDA mode)
    assert get(cluster, ns, SCALED_OBJECT)["metadata"]["generation"] == generation  # nor rewrote KEDA's spec
    # KEDA keeps its own cooldown (lastActiveTime lives in the ScaledObject's status).
    wait_replicas(cluster, ns, 0)
    # A cooldown started again by the restart would need the full delay from it.
    assert time.monotonic() - restarted_at < delay
