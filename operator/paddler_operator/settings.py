"""Operator settings (``paddler operator`` flags and environment)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum

from paddler_operator.crd_models import DEFAULT_IMAGES, Images

BALANCER_URL_TEMPLATE_ENV = "PADDLER_OPERATOR_BALANCER_URL_TEMPLATE"
DEFAULT_BALANCER_URL_TEMPLATE = "http://{service}.{namespace}.svc:{port}"


class Switch(StrEnum):
    """An optional behaviour: ``auto`` asks the cluster (where that makes sense)."""

    AUTO = "auto"
    ON = "on"
    OFF = "off"


@dataclass(frozen=True)
class OperatorSettings:
    namespaces: tuple[str, ...] = ()
    """Namespaces to watch; empty with ``all_namespaces`` watches the whole cluster."""
    all_namespaces: bool = False
    balancer_url_template: str = DEFAULT_BALANCER_URL_TEMPLATE
    """Management API URL of a pool's balancer; fields ``{pool}``, ``{namespace}``, ``{service}``, ``{port}``.
    Tests point it at a local ``paddler balancer`` (env PADDLER_OPERATOR_BALANCER_URL_TEMPLATE)."""
    resync_interval: float = 10.0
    """Seconds between two full reconciles of one resource when nothing happens (drift repair, status)."""
    retry_min_delay: float = 1.0
    """Seconds before the first retry after a failure (unreachable balancer, API error)."""
    retry_max_delay: float = 30.0
    """Ceiling (seconds) of the exponential retry backoff."""
    builtin_poll_interval: float = 1.0
    """Seconds between load readings of a ModelDeployment scaled by the Builtin autoscaler: how soon a
    request buffered at zero agents wakes the pool (a plain resync would take ``resync_interval``)."""
    balancer_timeout: float = 3.0
    """Seconds for one request to a balancer's management API."""
    kubeconfig: str | None = None
    """kubeconfig path; None: $KUBECONFIG, ~/.kube/config or the in-cluster service account."""
    liveness_endpoint: str | None = None
    """e.g. ``http://0.0.0.0:8080/healthz`` (kopf's liveness probe); None: off."""
    hpa_scale_to_zero: bool | None = None
    """Does the cluster's HPA scale to and from zero (feature gate ``HPAScaleToZero``)? None: ask the
    API server once (a dry-run HPA with ``minReplicas: 0``). Without it, HPA mode writes the HPA with
    ``minReplicas`` at least 1 and the operator itself takes the agent Deployment 0 -> 1 when a request
    is buffered (docs/scaling.md)."""
    images: Images = DEFAULT_IMAGES
    """The images of pods whose spec leaves ``image`` unset (``--balancer-image``, ``--agent-image``,
    ``--llama-server-image``, ``--image-registry``): they follow the operator's version on upgrades."""
    leader_election: LeaderElectionSettings | None = None
    """One active replica among several (a coordination.k8s.io Lease); None: off, this process is active."""
    token_key_file: str | None = None
    """The key every pool's management token is derived from (``--token-key-file``); None: a key
    for this process only (tests). ``paddler operator`` always names one (docs/kubernetes.md)."""
    pod_monitors: Switch = Switch.AUTO
    """A PodMonitor per pool: ``auto`` where the API server serves ``monitoring.coreos.com/v1``
    PodMonitor (asked once)."""
    pod_monitor_labels: tuple[tuple[str, str], ...] = ()
    """Extra labels on each PodMonitor (a Prometheus' ``podMonitorSelector``)."""
    network_policy: Switch = Switch.OFF
    """A NetworkPolicy per pool on its balancers' management port (``on``/``off``)."""
    monitoring_namespaces: tuple[str, ...] = ("monitoring",)
    """Namespaces whose pods the NetworkPolicy lets read the management port."""
    operator_namespace: str | None = None
    """The operator's own namespace (NetworkPolicy; default env POD_NAMESPACE)."""
    operator_pod_labels: tuple[tuple[str, str], ...] = ()
    """Labels of the operator's pods (NetworkPolicy); none: every pod of its namespace."""

    def __post_init__(self) -> None:
        if not self.all_namespaces and not self.namespaces:
            raise ValueError("pass --namespace NS (repeatable) or --all-namespaces")
        if self.all_namespaces and self.namespaces:
            raise ValueError("--namespace and --all-namespaces exclude each other")
        if (
            min(self.resync_interval, self.retry_min_delay, self.builtin_poll_interval) <= 0
            or self.retry_max_delay < self.retry_min_delay
        ):
            raise ValueError("intervals must be > 0 and retry_max_delay >= retry_min_delay")
        try:
            self.balancer_url_template.format(pool="p", namespace="n", service="s", port=1)
        except (KeyError, IndexError, ValueError) as err:
            raise ValueError(f"invalid balancer URL template {self.balancer_url_template!r}: {err}") from None
        if self.network_policy == Switch.AUTO:
            raise ValueError("--network-policy is on or off")
        if self.network_policy == Switch.ON and not self.operator_namespace:
            raise ValueError("--network-policy on needs --operator-namespace (or env POD_NAMESPACE)")

    @staticmethod
    def template_from_env(env: Mapping[str, str] | None = None) -> str:
        env = os.environ if env is None else env
        return env.get(BALANCER_URL_TEMPLATE_ENV) or DEFAULT_BALANCER_URL_TEMPLATE

    def retry_delay(self, failures: int) -> float:
        """Backoff (seconds) after ``failures`` consecutive failures (1, 2, 4, ... capped)."""
        if failures <= 0:
            return 0.0
        return float(min(self.retry_max_delay, self.retry_min_delay * 2 ** min(failures - 1, 30)))


DEFAULT_LEASE_NAME = "paddler-operator"


@dataclass(frozen=True)
class LeaderElectionSettings:
    """Leader election over a ``coordination.k8s.io/v1`` Lease: one replica reconciles, the others wait.

    Safety rests on ``renew_deadline < lease_duration``: a leader that has not renewed for
    ``renew_deadline`` stops reconciling, and nobody else may take the lease before
    ``lease_duration`` has passed since they last saw it change."""

    namespace: str
    """Namespace of the Lease (the operator's own)."""
    identity: str
    """This replica's name in ``holderIdentity`` (the pod name, else host name and process id)."""
    lease_name: str = DEFAULT_LEASE_NAME
    lease_duration: float = 10.0
    """Seconds a lease lives after its last renewal before a standby may take it (whole seconds:
    ``leaseDurationSeconds``). Bounds the takeover after the leader is lost."""
    renew_deadline: float = 7.0
    """Seconds the leader keeps reconciling without a successful renewal; then it stops."""
    retry_period: float = 2.0
    """Seconds between renewals by the leader and between attempts by a standby."""

    def __post_init__(self) -> None:
        if not self.namespace or not self.lease_name or not self.identity:
            raise ValueError("leader election needs a namespace, a lease name and an identity")
        if not 0 < self.retry_period < self.renew_deadline < self.lease_duration:
            raise ValueError("leader election needs 0 < retry_period < renew_deadline < lease_duration")
        if self.lease_duration != int(self.lease_duration):
            raise ValueError("leader election lease_duration is whole seconds (leaseDurationSeconds)")
