"""Pure planning of an LlmPool: the balancer's Deployment, Services, PDB and args."""

from __future__ import annotations

import json
from collections.abc import Mapping

from paddler_operator.crd_models import (
    ADMIN_PANEL_PORT,
    DEFAULT_IMAGES,
    INFERENCE_PORT,
    MANAGEMENT_PORT,
    Images,
    resolve_image,
)
from paddler_operator.crd_pod import apply_pod_settings
from paddler_operator.crd_pool import LlmPoolSpec
from paddler_operator.objects import Obj, ObjRef
from paddler_operator.plan import (
    COMPONENT_LABEL,
    CONFIG_HASH_ANNOTATION,
    POOL_LABEL,
    TERMINATION_SLACK_SECONDS,
    Owner,
    balancer_name,
    balancer_pdb_name,
    component_labels,
    config_hash,
    container_security,
    inference_service_name,
    management_addr,
    management_service_name,
    management_token_env,
    object_meta,
    peers_service_name,
    pod_security,
    spread_over_nodes,
)
from paddler_operator.plan_monitoring import ManagementReaders, plan_readers

# --- LlmPool -------------------------------------------------------------------------


DRAIN_DELAY_SECONDS = 5
"""Seconds a stopping balancer keeps serving with readiness off (``--drain-delay``), so that
endpoints and kube-proxy stop sending it new connections before it stops accepting."""


def balancer_grace_seconds(spec: LlmPoolSpec) -> int:
    """The balancer pod's ``terminationGracePeriodSeconds``: drain delay + drain timeout + slack."""
    return DRAIN_DELAY_SECONDS + spec.balancer.drain_timeout_seconds + TERMINATION_SLACK_SECONDS


def balancer_args(spec: LlmPoolSpec, pool: str = "", namespace: str = "") -> list[str]:
    """``paddler balancer``'s flags; with ``pool`` and ``namespace``, its peers (every replica of the pool)."""
    b = spec.balancer
    args = [
        "--log-level",
        b.log_level,
        "balancer",
        "--management-addr",
        f"0.0.0.0:{MANAGEMENT_PORT}",
        "--inference-addr",
        f"0.0.0.0:{INFERENCE_PORT}",
        "--max-buffered-requests",
        str(b.max_buffered_requests),
        "--buffered-request-timeout",
        b.buffered_request_timeout,
        "--inference-item-timeout",
        b.inference_item_timeout,
        "--drain-delay",
        f"{DRAIN_DELAY_SECONDS}s",  # the balancer reads a bare number as milliseconds
        "--drain-timeout",
        f"{b.drain_timeout_seconds}s",
        "--routing",
        b.routing.flag(),
    ]
    if pool:
        args += ["--peer-management-addr", management_addr(pool, namespace, spec)]
    if b.admin_panel.enabled:
        args += ["--web-admin-panel-addr", f"0.0.0.0:{ADMIN_PANEL_PORT}"]
    for origin in b.cors_allowed_origins:
        args += ["--inference-cors-allowed-host", origin]
    for entry in spec.model_access.url_allow:
        args += ["--model-url-allow", entry]
    return args


def plan_pool(owner: Owner, spec: LlmPoolSpec, images: Images = DEFAULT_IMAGES) -> list[Obj]:
    """ConfigMap, balancer Deployment, inference, management and peers Services of a
    pool (and its PodDisruptionBudget from two replicas on). ``images``: the operator's, for
    an unset ``balancer.image``."""
    pool = owner.name
    labels = component_labels(owner, pool, "balancer", "paddler-balancer")
    selector = {POOL_LABEL: pool, COMPONENT_LABEL: "balancer"}
    config = balancer_config(owner, spec)
    config_map: Obj = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": object_meta(owner, balancer_name(pool), labels),
        "data": config,
    }
    objects = [
        config_map,
        balancer_deployment(owner, spec, labels, selector, config, images),
        *balancer_services(owner, spec, labels, selector),
    ]
    if spec.balancer.replicas >= 2:
        objects.append(balancer_pdb(owner, labels, selector))
    return objects


def balancer_config(owner: Owner, spec: LlmPoolSpec) -> dict[str, str]:
    """The pool's ConfigMap data. Only the balancer's settings: an agent-side change must not
    restart the balancer (its pod template carries this data's hash), which would drop every
    agent and buffered request. ``pod`` is left out: it reaches the pod template itself, and a pool
    written before it existed keeps its hash (no restart on an operator upgrade)."""
    pool, b = owner.name, spec.balancer
    settings = b.model_dump(mode="json", by_alias=True, exclude_none=True, exclude={"pod"})
    return {
        "balancer.json": json.dumps(settings, sort_keys=True),
        "management-addr": management_addr(pool, owner.namespace, spec),
        "inference-url": f"http://{inference_service_name(pool)}.{owner.namespace}.svc:{b.service.inference_port}",
    }


def balancer_container(owner: Owner, spec: LlmPoolSpec, images: Images = DEFAULT_IMAGES) -> Obj:
    pool, b = owner.name, spec.balancer
    env: list[Obj] = [
        # --replica-name (the balancer's default): says which replica answers, in logs and peer sums.
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
        *management_token_env(pool, spec),
    ]
    if b.auth_secret_ref is not None:
        env.append(
            {
                "name": "PADDLER_API_KEY",
                "valueFrom": {"secretKeyRef": {"name": b.auth_secret_ref.name, "key": b.auth_secret_ref.key}},
            }
        )
    ports = [
        {"name": "management", "containerPort": MANAGEMENT_PORT, "protocol": "TCP"},
        {"name": "inference", "containerPort": INFERENCE_PORT, "protocol": "TCP"},
    ]
    if b.admin_panel.enabled:
        ports.append({"name": "admin", "containerPort": ADMIN_PANEL_PORT, "protocol": "TCP"})
    timing = {"periodSeconds": 5, "timeoutSeconds": 2}
    return {
        "name": "balancer",
        "image": resolve_image(b.image, images.balancer),
        "imagePullPolicy": b.image_pull_policy.value,
        "command": ["paddler"],
        "args": balancer_args(spec, pool, owner.namespace),
        "env": env,
        "ports": ports,
        # /ready answers 503 while the replica drains: Services stop sending it requests at once.
        "readinessProbe": {"httpGet": {"path": "/ready", "port": "management"}, **timing},
        "livenessProbe": {"httpGet": {"path": "/health", "port": "management"}, **timing, "failureThreshold": 6},
        "resources": b.resources.to_kube(),
        "securityContext": container_security(),
        "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],
    }


def balancer_deployment(
    owner: Owner,
    spec: LlmPoolSpec,
    labels: dict[str, str],
    selector: dict[str, str],
    config: Mapping[str, str],
    images: Images = DEFAULT_IMAGES,
) -> Obj:
    template = {
        "metadata": {"labels": labels, "annotations": {CONFIG_HASH_ANNOTATION: config_hash(config)}},
        "spec": {
            "securityContext": pod_security(),
            "automountServiceAccountToken": False,
            "terminationGracePeriodSeconds": balancer_grace_seconds(spec),
            "topologySpreadConstraints": spread_over_nodes(selector),
            "containers": [balancer_container(owner, spec, images)],
            "volumes": [{"name": "tmp", "emptyDir": {}}],
        },
    }
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": object_meta(owner, balancer_name(owner.name), labels),
        "spec": {
            "replicas": spec.balancer.replicas,
            "selector": {"matchLabels": selector},
            # A new replica is Ready (agents connected to it) before an old one drains away.
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
            "template": apply_pod_settings(template, spec.balancer.pod, main=("balancer",)),
        },
    }


def balancer_services(owner: Owner, spec: LlmPoolSpec, labels: dict[str, str], selector: dict[str, str]) -> list[Obj]:
    """Inference (clients; the admin panel beside it), management (the operator, dashboards)
    and the headless peers Service (agents dial every replica)."""
    pool, b = owner.name, spec.balancer
    inference_ports = [
        {"name": "inference", "port": b.service.inference_port, "targetPort": "inference", "protocol": "TCP"}
    ]
    if b.admin_panel.enabled:
        inference_ports.append(
            {"name": "admin", "port": b.service.admin_panel_port, "targetPort": "admin", "protocol": "TCP"}
        )
    management_port = {
        "name": "management",
        "port": b.service.management_port,
        "targetPort": "management",
        "protocol": "TCP",
    }
    peers_port = {"name": "management", "port": MANAGEMENT_PORT, "targetPort": "management", "protocol": "TCP"}
    return [
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": object_meta(owner, inference_service_name(pool), labels, dict(b.service.annotations) or None),
            "spec": {"type": b.service.type.value, "selector": selector, "ports": inference_ports},
        },
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": object_meta(owner, management_service_name(pool), labels),
            "spec": {"type": "ClusterIP", "selector": selector, "ports": [management_port]},
        },
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": object_meta(owner, peers_service_name(pool), labels),
            # Agents join a starting replica before it turns Ready (Ready waits for them).
            "spec": {
                "clusterIP": "None",
                "publishNotReadyAddresses": True,
                "selector": selector,
                "ports": [peers_port],
            },
        },
    ]


def balancer_pdb(owner: Owner, labels: dict[str, str], selector: dict[str, str]) -> Obj:
    """Voluntary evictions (node drains) take one balancer replica at a time."""
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": object_meta(owner, balancer_pdb_name(owner.name), labels),
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": selector}},
    }


def pool_absent(owner: Owner, spec: LlmPoolSpec) -> list[ObjRef]:
    """Objects of a pool that must not exist: the balancer's PodDisruptionBudget below 2 replicas
    (with one replica it would block every node drain)."""
    if spec.balancer.replicas >= 2:
        return []
    return [ObjRef("policy/v1", "PodDisruptionBudget", owner.namespace, balancer_pdb_name(owner.name))]


def pool_plan(
    owner: Owner, spec: LlmPoolSpec, readers: ManagementReaders, images: Images = DEFAULT_IMAGES
) -> tuple[list[Obj], list[ObjRef]]:
    """Everything a pool owns (:func:`plan_pool`, and its PodMonitor and NetworkPolicy as
    ``readers`` chooses), and what it must not own (:func:`pool_absent`, those turned off)."""
    watched, unwatched = plan_readers(owner, spec, readers)
    return [*plan_pool(owner, spec, images), *watched], [*pool_absent(owner, spec), *unwatched]
