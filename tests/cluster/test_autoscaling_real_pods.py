"""HPA and KEDA waking real agent pods from zero on the two real nodes, out to two pods
under load and back to zero (the Builtin scaler's run is in test_two_nodes.py).

What each mode needs beside the operator runs as the cluster's add-ons would, here as
host processes of the project's scripts against this cluster's API server: HPA reads
`paddler_requests_buffered` / `paddler_slots_processing` through prometheus-adapter (the
chart's rules) from Debian's Prometheus scraping the pool's management Service; KEDA's
operator and metrics server (scripts/k8s/keda-up.sh) read the balancer's JSON by its
Service name (metricsApi trigger, with the pool's token through the
TriggerAuthentication the operator writes; `KEDA_DNS` gives the host processes the
cluster's DNS) or the same Prometheus (prometheus trigger). Prometheus scrapes without a
token, so the pools of the Prometheus modes run with `managementAuth.enabled: false`.
One external-metrics APIService at a time: each mode brings its own up and down.

Each scenario: a ModelDeployment at 0 pods, one streamed request from the client pod
(time to first token from zero printed), then four streams (twice one agent's slots)
until two Ready pods run, one on each node, then idle until the mode takes it back to 0;
no request may fail on the way.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import yaml

from tests.kubectl import wait_until

from .clients import client_pod, wait_for_client
from .conftest import MODEL_IMAGE, MODEL_PATH, NODE_NAMES, REPO, STATE, Cluster
from .namespaces import scenario_namespace
from .test_inference_in_cluster import ready_condition
from .test_two_nodes import TwoNodePool, failures, zero_to_n_to_zero

pytestmark = pytest.mark.cluster

POOL = "az"
GROUP = "scaled"
SCALE_DOWN_DELAY_S = 15
CLUSTER_DNS = "10.96.0.10"
"""CoreDNS of scripts/k8s/node-up.sh."""
METRICS = STATE / "metrics"


def script(cluster: Cluster, name: str, *args: str, env: dict[str, str] | None = None) -> str:
    """Run scripts/k8s/<name> against this cluster; its stdout."""
    full = {**cluster.env, "PADDLER_K8S_DIR": str(STATE), **(env or {})}
    proc = subprocess.run(
        ["bash", str(REPO / "scripts" / "k8s" / name), *args],
        capture_output=True, text=True, env=full, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, f"{name} {' '.join(args)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def adapter_config(cluster: Cluster) -> str:
    """prometheus-adapter's rules as the chart renders them (what users install)."""
    out = subprocess.run(
        # --kube-version: a helm built without its release ldflags (scripts/k8s/build.sh) takes
        # Kubernetes 1.20 by default, older than the chart's kubeVersion.
        [str(cluster.helm), "template", "rel", str(REPO / "charts" / "paddler"), "--set",
         "prometheusAdapterRules.enabled=true", "--kube-version", "1.34.0",
         "--show-only", "templates/prometheus-adapter-rules.yaml"],
        capture_output=True, text=True, timeout=120, check=True,
    ).stdout  # fmt: skip
    text: str = yaml.safe_load(out)["data"]["config.yaml"]
    path = METRICS / "prometheus-adapter-rules.yaml"
    path.write_text(text)
    return str(path)


@contextmanager
def scaler(cluster: Cluster, mode: str) -> Iterator[str | None]:
    """The mode's add-ons, up for the scenario and down after it; yields Prometheus's URL if any."""
    prometheus: str | None = None
    if mode in ("HPA", "KEDA-prometheus"):
        METRICS.mkdir(parents=True, exist_ok=True)
        prometheus = script(cluster, "prometheus.sh", "up", str(METRICS)).strip().splitlines()[-1]
    try:
        if mode == "HPA":
            env = {"PROMETHEUS_URL": prometheus or "", "ADAPTER_CONFIG": adapter_config(cluster)}
            script(cluster, "prometheus-adapter.sh", "up", str(METRICS), env=env)
        else:
            script(cluster, "keda-up.sh", env={"KEDA_DNS": CLUSTER_DNS} if mode == "KEDA" else None)
        try:
            yield prometheus
        finally:
            if mode == "HPA":
                script(cluster, "prometheus-adapter.sh", "down", str(METRICS))
            else:
                script(cluster, "keda-down.sh")
    finally:
        if prometheus is not None:
            script(cluster, "prometheus.sh", "down", str(METRICS))


def manifests(namespace: str, mode: str, prometheus: str | None) -> str:
    auth = "true" if prometheus is None else "false"
    keda = ""
    if mode == "KEDA":
        keda = ", keda: {pollingIntervalSeconds: 1}"
    elif mode == "KEDA-prometheus":
        keda = f", keda: {{trigger: prometheus, prometheusServerAddress: '{prometheus}', pollingIntervalSeconds: 1}}"
    kind = "KEDA" if mode.startswith("KEDA") else mode
    return f"""
apiVersion: paddler.dev/v1alpha1
kind: LlmPool
metadata: {{name: {POOL}, namespace: {namespace}}}
spec:
  balancer:
    bufferedRequestTimeout: 180s
    managementAuth: {{enabled: {auth}}}
    resources: {{requests: {{cpu: 50m, memory: 64Mi}}}}
  agent:
    image: {MODEL_IMAGE}
    slotsPerAgent: 2
    resources: {{requests: {{cpu: 100m, memory: 256Mi}}}}
---
apiVersion: paddler.dev/v1alpha1
kind: ModelDeployment
metadata: {{name: {GROUP}, namespace: {namespace}}}
spec:
  poolRef: {{name: {POOL}}}
  model: {{localPath: {MODEL_PATH}}}
  inferenceParameters: {{contextSize: 1024, temperature: 0}}
  autoscaling:
    {{mode: {kind}, minReplicas: 0, maxReplicas: 2, targetBufferedRequests: 1, targetSlotUtilization: 100,
     scaleDownDelaySeconds: {SCALE_DOWN_DELAY_S}{keda}}}
""" + client_pod(namespace, node=NODE_NAMES[0])


def management_address(cluster: Cluster, namespace: str) -> str:
    service = cluster.get_json("-n", namespace, "service", f"{POOL}-management")
    return f"{service['spec']['clusterIP']}:8060"


@contextmanager
def scaled_pool(cluster: Cluster, mode: str) -> Iterator[TwoNodePool]:
    with scaler(cluster, mode) as prometheus, scenario_namespace(cluster, f"az-{mode.lower()}") as namespace:
        cluster.apply(manifests(namespace, mode, prometheus), namespace)
        wait_until(
            lambda: ready_condition(cluster.get_json("-n", namespace, "lp", POOL)) == "True",
            timeout=300,
            what="the LlmPool Ready (balancer up)",
        )
        if prometheus is not None:
            address = management_address(cluster, namespace)
            script(cluster, "prometheus.sh", "target", str(METRICS), namespace, address, f"namespace={namespace}")
        wait_for_client(cluster, namespace)
        yield TwoNodePool(cluster, namespace, name=POOL, auth=prometheus is None)


@pytest.mark.parametrize("mode", ["HPA", "KEDA", "KEDA-prometheus"])
def test_wakes_a_real_pod_from_zero_scales_out_over_both_nodes_and_back_to_zero(
    cluster: Cluster, release: str, mode: str
) -> None:
    with scaled_pool(cluster, mode) as pool:
        # KEDA takes the first pod away only once its trigger reads the balancer (Ready behind its Service).
        wait_until(lambda: pool.replicas(GROUP) == 0, timeout=360, what=f"{mode}: the group at 0 replicas")
        wait_until(lambda: not pool.agent_pods(GROUP), timeout=120, what=f"{mode}: no agent pod")
        # A request sent before the operator told the balancer of the group would be another's.
        wait_until(lambda: pool.serves(GROUP), timeout=60, what=f"{mode}: the balancer serving the group")
        run = zero_to_n_to_zero(pool, GROUP, mode, SCALE_DOWN_DELAY_S)
    assert run.nodes == sorted(NODE_NAMES)
    assert run.held == 2
    assert run.results
    assert not failures(run.results), failures(run.results)[:5]
