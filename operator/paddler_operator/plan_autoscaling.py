"""Pure planning of autoscaling: HPA, KEDA triggers and ScaledObject, the load the
balancers report, and the builtin scaler's decision."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from paddler_operator.balancer_views import AgentView
from paddler_operator.crd_model_deployment import AutoscalingMode, AutoscalingSpec, KedaTrigger, ModelDeploymentSpec
from paddler_operator.crd_pool import LlmPoolSpec
from paddler_operator.objects import Obj, ObjRef
from paddler_operator.plan import (
    Owner,
    agent_name,
    management_service_name,
    management_token_ref,
    object_meta,
)


def _busy_slots_milli(autoscaling: AutoscalingSpec, slots: int) -> int:
    """Average busy slots per agent pod that the autoscaler keeps, in thousandths."""
    return max(1, slots * autoscaling.target_slot_utilization * 10)  # slots * percent / 100 * 1000


def busy_slots_target(autoscaling: AutoscalingSpec, slots: int) -> str:
    """:func:`_busy_slots_milli` as a quantity (HPA)."""
    milli = _busy_slots_milli(autoscaling, slots)
    return f"{milli}m" if milli % 1000 else str(milli // 1000)


def busy_slots_threshold(autoscaling: AutoscalingSpec, slots: int) -> str:
    """The same target as :func:`busy_slots_target` as a plain decimal (KEDA reads its triggers'
    thresholds as floats: ``3.2``, not ``3200m``)."""
    return f"{_busy_slots_milli(autoscaling, slots) / 1000:g}"


def hpa_min_replicas(a: AutoscalingSpec, scale_to_zero: bool) -> int:
    """The HPA's ``minReplicas``: ``autoscaling.minReplicas``, but at least 1 where the cluster's
    HPA cannot scale to zero (no ``HPAScaleToZero`` gate: the API server rejects 0)."""
    return a.min_replicas if scale_to_zero else max(1, a.min_replicas)


def hpa_wakes(a: AutoscalingSpec, scale_to_zero: bool, replicas_now: int | None, buffered: int) -> bool:
    """Should the operator set the agent Deployment of an HPA-mode group to 1 replica?

    Only where the HPA cannot do 0 -> 1 itself (no ``HPAScaleToZero``): an HPA whose target sits
    at 0 replicas does nothing ("scaling is disabled"), so a buffered request would wait for ever.
    The operator performs that one step and nothing else; the HPA does 1 <-> N."""
    return (
        not scale_to_zero
        and a.mode == AutoscalingMode.HPA
        and a.min_replicas == 0
        and replicas_now == 0
        and buffered > 0
    )


def hpa_gate_probe(namespace: str) -> Obj:
    """An HPA with ``minReplicas: 0``, for a dry-run create: accepted only where the cluster has
    the ``HPAScaleToZero`` feature gate."""
    return {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": {"name": "paddler-scale-to-zero-probe", "namespace": namespace},
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "paddler-probe"},
            "minReplicas": 0,
            "maxReplicas": 1,
            "metrics": [
                {
                    "type": "External",
                    "external": {
                        "metric": {"name": "paddler_requests_buffered"},
                        "target": {"type": "AverageValue", "averageValue": "1"},
                    },
                }
            ],
        },
    }


def horizontal_pod_autoscaler(
    owner: Owner, name: str, labels: dict[str, str], a: AutoscalingSpec, slots: int, scale_to_zero: bool = True
) -> Obj:
    group = {"matchLabels": {"model_group": owner.name}}
    return {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": object_meta(owner, name, labels),
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": name},
            "minReplicas": hpa_min_replicas(a, scale_to_zero),
            "maxReplicas": a.max_replicas,
            "metrics": [
                {
                    "type": "External",
                    "external": {
                        "metric": {"name": "paddler_requests_buffered", "selector": group},
                        "target": {"type": "AverageValue", "averageValue": str(a.target_buffered_requests)},
                    },
                },
                {
                    "type": "External",
                    "external": {
                        "metric": {"name": "paddler_slots_processing", "selector": group},
                        "target": {"type": "AverageValue", "averageValue": busy_slots_target(a, slots)},
                    },
                },
            ],
            "behavior": {"scaleDown": {"stabilizationWindowSeconds": min(a.scale_down_delay_seconds, 3600)}},
        },
    }


def trigger_authentication(owner: Owner, name: str, labels: dict[str, str], token_ref: tuple[str, str]) -> Obj:
    """KEDA reads the buffered-request gauge with the pool's management token."""
    return {
        "apiVersion": "keda.sh/v1alpha1",
        "kind": "TriggerAuthentication",
        "metadata": object_meta(owner, name, labels),
        "spec": {"secretTargetRef": [{"parameter": "token", "name": token_ref[0], "key": token_ref[1]}]},
    }


def buffered_query(group: str, namespace: str) -> str:
    """PromQL of the prometheus trigger: this group's buffered requests in this namespace only."""
    return f'sum(paddler_requests_buffered{{model_group="{group}",namespace="{namespace}"}})'


def busy_query(group: str, namespace: str) -> str:
    """PromQL of the second prometheus trigger: this group's busy slots (each replica's own requests, summed)."""
    return f'sum(paddler_slots_processing{{model_group="{group}",namespace="{namespace}"}})'


def keda_triggers(owner: Owner, a: AutoscalingSpec, slots: int, balancer_base_url: str, auth: str | None) -> list[Obj]:
    """The ScaledObject's two triggers (``autoscaling.keda.trigger``), the same pair of metrics as mode HPA:

    * the group's buffered requests: active (0 -> 1) as soon as one request waits, one agent per
      ``targetBufferedRequests``;
    * the group's busy slots: active while any slot serves, one agent per ``slots x targetSlotUtilization``.

    KEDA scales to the larger of the two and to zero only when both are idle for ``cooldownPeriod``: on
    buffered requests alone, a group whose agents keep up (nothing waits) would be scaled in under load.
    ``auth``: the TriggerAuthentication holding the balancer's management token, if any."""
    buffered_target, busy_target = str(a.target_buffered_requests), busy_slots_threshold(a, slots)
    if a.keda.trigger == KedaTrigger.PROMETHEUS:
        return [
            _prometheus_trigger(a, buffered_query(owner.name, owner.namespace), buffered_target),
            _prometheus_trigger(a, busy_query(owner.name, owner.namespace), busy_target),
        ]
    # The balancer's own JSON: no Prometheus needed. scope=pool: the replica that answers sums the
    # group's buffered requests over its peers, and reports the group's busy slots.
    url = f"{balancer_base_url}/api/v1/buffered_requests?model_group={owner.name}&scope=pool"
    return [
        _metrics_api_trigger(url, "buffered_requests_current", buffered_target, auth),
        _metrics_api_trigger(url, "slots_processing", busy_target, auth),
    ]


def _prometheus_trigger(a: AutoscalingSpec, query: str, threshold: str) -> Obj:
    return {
        "type": "prometheus",
        "metadata": {
            "serverAddress": a.keda.prometheus_server_address,
            "query": query,
            "threshold": threshold,
            "activationThreshold": "0",
            "ignoreNullValues": "true",  # no series yet (nothing scraped): 0, not an error
        },
    }


def _metrics_api_trigger(url: str, value_location: str, target: str, auth: str | None) -> Obj:
    trigger: Obj = {
        "type": "metrics-api",
        "metadata": {
            "url": url,
            "valueLocation": value_location,
            "targetValue": target,
            "activationTargetValue": "0",
        },
    }
    if auth is not None:
        trigger["metadata"]["authMode"] = "bearer"
        trigger["authenticationRef"] = {"name": auth}
    return trigger


def scaled_object(
    owner: Owner,
    name: str,
    labels: dict[str, str],
    a: AutoscalingSpec,
    slots: int,
    balancer_base_url: str,
    with_token: bool,
) -> Obj:
    triggers = keda_triggers(owner, a, slots, balancer_base_url, name if with_token else None)
    return {
        "apiVersion": "keda.sh/v1alpha1",
        "kind": "ScaledObject",
        "metadata": object_meta(owner, name, labels),
        "spec": {
            "scaleTargetRef": {"name": name},
            "minReplicaCount": a.min_replicas,
            "maxReplicaCount": a.max_replicas,
            # KEDA scales 1 -> 0 after cooldownPeriod without activity; its HPA (1 <-> N)
            # waits as long before removing agents, like mode HPA.
            "cooldownPeriod": a.scale_down_delay_seconds,
            "pollingInterval": a.keda.polling_interval_seconds,
            "advanced": {
                "horizontalPodAutoscalerConfig": {
                    "behavior": {"scaleDown": {"stabilizationWindowSeconds": min(a.scale_down_delay_seconds, 3600)}}
                }
            },
            "triggers": triggers,
        },
    }


# --- load, as the balancers report it --------------------------------------------


@dataclass(frozen=True)
class Load:
    agents: int
    ready: int
    slots_total: int
    slots_free: int
    busy: int
    buffered: int


def load_of(agents: Sequence[AgentView], buffered: int) -> Load:
    total = sum(a.slots_total for a in agents)
    busy = sum(min(a.slots_in_flight, a.slots_total) for a in agents)
    return Load(
        agents=len(agents),
        ready=sum(a.ready for a in agents),
        slots_total=total,
        slots_free=max(0, total - busy),
        busy=busy,
        buffered=buffered,
    )


# --- Builtin autoscaler ---------------------------------------------------------------


@dataclass(frozen=True)
class ScaleDecision:
    replicas: int
    low_since: float | None
    """Since when (monotonic seconds) fewer replicas would do; None if not."""
    reason: str


def builtin_scale(
    a: AutoscalingSpec,
    slots: int,
    current: int,
    load: Load | None,
    low_since: float | None,
    now: float,
) -> ScaleDecision:
    """Agent replicas for the Builtin scaler: up at once (0 -> 1 as soon as a request is
    buffered), down only after ``scaleDownDelaySeconds`` of continuously lower demand."""
    low, high = a.min_replicas, a.max_replicas
    current_clamped = min(high, max(low, current))
    if load is None:
        return ScaleDecision(current_clamped, low_since, "no load reading; holding")
    capacity = slots * a.target_slot_utilization / 100.0
    demand = load.busy + load.buffered
    wanted = math.ceil(demand / capacity - 1e-9) if demand else 0
    if load.buffered > 0:
        wanted = max(wanted, 1)
    wanted = min(high, max(low, wanted))
    if wanted >= current_clamped:
        reason = "scale up" if wanted > current else "steady"
        return ScaleDecision(wanted, None, f"{reason}: {demand} busy+buffered, {capacity:g} per agent")
    if low_since is None:
        return ScaleDecision(current_clamped, now, f"demand fits {wanted}; waiting {a.scale_down_delay_seconds}s")
    if now - low_since >= a.scale_down_delay_seconds:
        return ScaleDecision(wanted, None, f"scale down: demand fits {wanted} for {a.scale_down_delay_seconds}s")
    return ScaleDecision(current_clamped, low_since, f"demand fits {wanted}; waiting")


def autoscaler_objects(
    owner: Owner,
    md: ModelDeploymentSpec,
    pool: LlmPoolSpec,
    labels: dict[str, str],
    slots: int,
    balancer_url: str | None,
    hpa_scale_to_zero: bool,
) -> tuple[list[Obj], list[ObjRef]]:
    """The HPA, or KEDA's ScaledObject (and its TriggerAuthentication when the metrics-api
    trigger needs the management token), of a ModelDeployment's mode; and the others, which
    must not exist (a mode changed away from them)."""
    name = agent_name(owner.name)
    mode = md.autoscaling.mode
    hpa_ref = ObjRef("autoscaling/v2", "HorizontalPodAutoscaler", owner.namespace, name)
    keda_ref = ObjRef("keda.sh/v1alpha1", "ScaledObject", owner.namespace, name)
    trigger_auth_ref = ObjRef("keda.sh/v1alpha1", "TriggerAuthentication", owner.namespace, name)
    objects: list[Obj] = []
    absent: list[ObjRef] = []
    if mode == AutoscalingMode.HPA:
        objects.append(horizontal_pod_autoscaler(owner, name, labels, md.autoscaling, slots, hpa_scale_to_zero))
    else:
        absent.append(hpa_ref)
    if mode != AutoscalingMode.KEDA:
        return objects, [*absent, keda_ref, trigger_auth_ref]
    pool_name = md.pool_ref.name
    base = balancer_url or (
        f"http://{management_service_name(pool_name)}.{owner.namespace}.svc:{pool.balancer.service.management_port}"
    )
    token_ref = management_token_ref(pool_name, pool)
    needs_token = token_ref is not None and md.autoscaling.keda.trigger == KedaTrigger.METRICS_API
    objects.append(scaled_object(owner, name, labels, md.autoscaling, slots, base, needs_token))
    if needs_token and token_ref is not None:
        objects.append(trigger_authentication(owner, name, labels, token_ref))
    else:
        absent.append(trigger_auth_ref)
    return objects, absent
