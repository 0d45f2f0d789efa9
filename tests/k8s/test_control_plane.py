"""The local control plane behaves like a real cluster where tests rely on it:
Deployments become ReplicaSets and Pods (controller-manager), pods are
scheduled on kwok's fake nodes and reach Running, and HPAs with
``minReplicas: 0`` are accepted (``HPAScaleToZero`` feature gate)."""

from __future__ import annotations

from typing import Any

import pytest

from tests.kubectl import wait_until

from .conftest import K8sCluster

pytestmark = pytest.mark.k8s

DEPLOYMENT = """
apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
spec:
  replicas: 3
  selector:
    matchLabels: {app: web}
  template:
    metadata:
      labels: {app: web}
    spec:
      containers:
      - name: web
        image: registry.invalid/web:1
"""


def test_deployment_creates_replicaset_and_running_pods(k8s_cluster: K8sCluster, k8s_namespace: str) -> None:
    ns = k8s_namespace
    k8s_cluster.apply(DEPLOYMENT, namespace=ns)
    deployment = k8s_cluster.get_json("-n", ns, "deployment", "web")

    def owned_replicaset() -> dict[str, Any] | None:
        for rs in k8s_cluster.get_json("-n", ns, "replicasets")["items"]:
            owners = rs["metadata"].get("ownerReferences", [])
            if any(o["uid"] == deployment["metadata"]["uid"] for o in owners):
                return rs  # type: ignore[no-any-return]
        return None

    rs = wait_until(owned_replicaset, timeout=60, what="ReplicaSet owned by the Deployment")
    assert rs["spec"]["replicas"] == 3

    def pods() -> list[dict[str, Any]] | None:
        items: list[dict[str, Any]] = k8s_cluster.get_json("-n", ns, "pods", "-l", "app=web")["items"]
        return items if len(items) == 3 else None

    created = wait_until(pods, timeout=60, what="3 pods created by the ReplicaSet")
    for pod in created:
        assert pod["metadata"]["ownerReferences"][0]["uid"] == rs["metadata"]["uid"]

    nodes = k8s_cluster.get_json("nodes", "-l", "type=kwok")["items"]
    assert nodes, "no kwok fake nodes: scripts/k8s/up.sh starts them; see .k8s/logs/kwok.log"

    def running() -> list[dict[str, Any]] | None:
        items = pods() or []
        ok = [p for p in items if p.get("status", {}).get("phase") == "Running"]
        return items if len(ok) == 3 else None

    running_pods = wait_until(running, timeout=90, what="3 pods Running on fake nodes")
    assert {p["spec"]["nodeName"] for p in running_pods} <= {n["metadata"]["name"] for n in nodes}

    def deployment_available() -> bool:
        status = k8s_cluster.get_json("-n", ns, "deployment", "web").get("status", {})
        return bool(status.get("availableReplicas") == 3)

    wait_until(deployment_available, timeout=60, what="Deployment availableReplicas == 3")


HPA_ZERO = """
apiVersion: autoscaling/v2
kind: HorizontalPodAutoscaler
metadata:
  name: web
spec:
  scaleTargetRef: {apiVersion: apps/v1, kind: Deployment, name: web}
  minReplicas: 0
  maxReplicas: 4
  metrics:
  - type: External
    external:
      metric: {name: paddler_buffered_requests}
      target: {type: AverageValue, averageValue: "1"}
"""

HPA_ZERO_CPU_ONLY = """
apiVersion: autoscaling/v2
kind: HorizontalPodAutoscaler
metadata:
  name: cpu-only
spec:
  scaleTargetRef: {apiVersion: apps/v1, kind: Deployment, name: web}
  minReplicas: 0
  maxReplicas: 4
  metrics:
  - type: Resource
    resource:
      name: cpu
      target: {type: Utilization, averageUtilization: 50}
"""


def test_hpa_min_replicas_zero_is_accepted(k8s_cluster: K8sCluster, k8s_namespace: str) -> None:
    ns = k8s_namespace
    k8s_cluster.apply(DEPLOYMENT, namespace=ns)
    k8s_cluster.apply(HPA_ZERO, namespace=ns)
    hpa = k8s_cluster.get_json("-n", ns, "hpa", "web")
    assert hpa["spec"]["minReplicas"] == 0

    # Without an Object or External metric, 0 is still refused: the gate
    # relaxes validation only where scaling up from zero can work.
    proc = k8s_cluster.kubectl_run("-n", ns, "apply", "-f", "-", input=HPA_ZERO_CPU_ONLY, check=False)
    assert proc.returncode != 0
    assert "zero" in proc.stderr
