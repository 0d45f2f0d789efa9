"""Pure planning of who reads a pool's management port: its PodMonitor and NetworkPolicy (issue 20).

The balancer's ``/metrics`` sits behind the pool's management token. Where the Prometheus
operator is installed (``monitoring.coreos.com/v1`` served; the reconciler asks once), each
LlmPool gets a PodMonitor that scrapes every balancer replica with that token, named by the
Secret the pods use (the Prometheus operator reads it; the paddler operator never does).

With ``--network-policy on`` each pool also gets a NetworkPolicy on its balancer pods: the
management port only from the pool's agents, its other balancer replicas (peers), the
operator's pods and the monitoring namespaces; the inference (and admin panel) port from
anywhere, as without one.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from paddler_operator.crd_models import ADMIN_PANEL_PORT, INFERENCE_PORT, MANAGEMENT_PORT
from paddler_operator.crd_pool import LlmPoolSpec
from paddler_operator.objects import Obj, ObjRef
from paddler_operator.plan import (
    COMPONENT_LABEL,
    POOL_LABEL,
    Owner,
    balancer_name,
    component_labels,
    management_token_ref,
    object_meta,
)

POD_MONITOR_API = ("monitoring.coreos.com/v1", "PodMonitor")
NETWORK_POLICY_API = ("networking.k8s.io/v1", "NetworkPolicy")
NAMESPACE_NAME_LABEL = "kubernetes.io/metadata.name"
"""Set by the API server on every namespace (Kubernetes 1.21+): selects one namespace by name."""

Labels = tuple[tuple[str, str], ...]


class Presence(Enum):
    """Whether one of a pool's optional objects should exist."""

    WANTED = "wanted"
    """Rendered and applied."""
    UNWANTED = "unwanted"
    """Turned off: deleted if the pool has one."""
    UNSERVED = "unserved"
    """The cluster does not serve its kind: neither written nor looked for."""


@dataclass(frozen=True)
class ManagementReaders:
    """The operator's choices (settings, and what the cluster serves) for a pool's readers."""

    pod_monitor: Presence = Presence.UNSERVED
    pod_monitor_labels: Labels = ()
    """Extra labels on each PodMonitor (a Prometheus' ``podMonitorSelector``, e.g. ``release``)."""
    network_policy: Presence = Presence.UNWANTED
    operator_namespace: str | None = None
    """The operator's namespace (NetworkPolicy: its pods may call the management port)."""
    operator_pod_labels: Labels = ()
    """Labels of the operator's pods; none: every pod of its namespace."""
    monitoring_namespaces: tuple[str, ...] = ("monitoring",)
    """Namespaces whose pods may read the management port (Prometheus; KEDA's metrics-api trigger)."""


def balancer_selector(pool: str) -> dict[str, str]:
    return {POOL_LABEL: pool, COMPONENT_LABEL: "balancer"}


def pod_monitor(owner: Owner, spec: LlmPoolSpec, extra_labels: Labels = ()) -> Obj:
    """Prometheus scrapes ``/metrics`` of every balancer replica (each counts its own requests)
    on the management port, with the pool's token from the Secret its pods use."""
    pool = owner.name
    labels = {**component_labels(owner, pool, "balancer", "paddler-balancer"), **dict(extra_labels)}
    endpoint: Obj = {"port": "management", "path": "/metrics", "scheme": "http"}
    ref = management_token_ref(pool, spec)
    if ref is not None:
        endpoint["authorization"] = {"type": "Bearer", "credentials": {"name": ref[0], "key": ref[1]}}
    api_version, kind = POD_MONITOR_API
    return {
        "apiVersion": api_version,
        "kind": kind,
        "metadata": object_meta(owner, balancer_name(pool), labels),
        "spec": {"selector": {"matchLabels": balancer_selector(pool)}, "podMetricsEndpoints": [endpoint]},
    }


def management_readers(pool: str, readers: ManagementReaders) -> list[Obj]:
    """NetworkPolicy peers that may reach the management port."""
    peers: list[Obj] = [
        {"podSelector": {"matchLabels": {POOL_LABEL: pool, COMPONENT_LABEL: "agent"}}},
        {"podSelector": {"matchLabels": balancer_selector(pool)}},
    ]
    if readers.operator_namespace:
        peers.append(
            {
                "namespaceSelector": {"matchLabels": {NAMESPACE_NAME_LABEL: readers.operator_namespace}},
                "podSelector": {"matchLabels": dict(readers.operator_pod_labels)},
            }
        )
    peers += [
        {"namespaceSelector": {"matchLabels": {NAMESPACE_NAME_LABEL: ns}}} for ns in readers.monitoring_namespaces
    ]
    return peers


def network_policy(owner: Owner, spec: LlmPoolSpec, readers: ManagementReaders) -> Obj:
    """Ingress to the pool's balancer pods: the management port from :func:`management_readers`
    only, the inference (and admin panel) port from anywhere. Kubelet probes come from the node,
    which NetworkPolicy implementations let through."""
    pool = owner.name
    open_ports = [{"port": INFERENCE_PORT, "protocol": "TCP"}]
    if spec.balancer.admin_panel.enabled:
        open_ports.append({"port": ADMIN_PANEL_PORT, "protocol": "TCP"})
    api_version, kind = NETWORK_POLICY_API
    return {
        "apiVersion": api_version,
        "kind": kind,
        "metadata": object_meta(
            owner, balancer_name(pool), component_labels(owner, pool, "balancer", "paddler-balancer")
        ),
        "spec": {
            "podSelector": {"matchLabels": balancer_selector(pool)},
            "policyTypes": ["Ingress"],
            "ingress": [
                {"ports": open_ports},
                {
                    "from": management_readers(pool, readers),
                    "ports": [{"port": MANAGEMENT_PORT, "protocol": "TCP"}],
                },
            ],
        },
    }


def plan_readers(owner: Owner, spec: LlmPoolSpec, readers: ManagementReaders) -> tuple[list[Obj], list[ObjRef]]:
    """The pool's PodMonitor and NetworkPolicy as chosen, and those that must not exist."""
    objects: list[Obj] = []
    absent: list[ObjRef] = []
    name = balancer_name(owner.name)
    if readers.pod_monitor == Presence.WANTED:
        objects.append(pod_monitor(owner, spec, readers.pod_monitor_labels))
    if readers.network_policy == Presence.WANTED:
        objects.append(network_policy(owner, spec, readers))
    for presence, (api_version, kind) in (
        (readers.pod_monitor, POD_MONITOR_API),
        (readers.network_policy, NETWORK_POLICY_API),
    ):
        if presence == Presence.UNWANTED:
            absent.append(ObjRef(api_version, kind, owner.namespace, name))
    return objects, absent
