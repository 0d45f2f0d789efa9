"""Pure planning: custom resource specs -> the Kubernetes objects that should exist.

Nothing here does I/O or reads a clock; every function is a value in, value out,
tested with tables in ``tests/unit/test_operator_plan.py``. The reconciler
(:mod:`paddler_operator.reconcile`) observes, calls these, and applies the
result through :mod:`paddler_operator.kube` (server-side apply).
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from paddler_core.desired_state import BalancerDesiredState, PoolingType
from paddler_operator.balancer_views import AgentView, BalancerSnapshot
from paddler_operator.crd_models import (
    ADMIN_PANEL_PORT,
    AGENT_HEALTH_PORT,
    API_VERSION,
    INFERENCE_PORT,
    MANAGEMENT_PORT,
    AutoscalingMode,
    AutoscalingSpec,
    Condition,
    EngineKind,
    KedaTrigger,
    LlmPoolSpec,
    LlmPoolStatus,
    ModelDeploymentSpec,
    ModelDeploymentStatus,
    ModelSourceSpec,
    ResourceRequirements,
)
from paddler_operator.objects import Obj, ObjRef

MANAGED_BY = "paddler-operator"
OWNER_HEADER_KIND = "ModelDeployment"
"""Owner (``X-Paddler-Owner``) of a model group: ``ModelDeployment/<namespace>/<name>``."""
CONFIG_HASH_ANNOTATION = "paddler.dev/config-hash"
POOL_LABEL = "paddler.dev/pool"
COMPONENT_LABEL = "paddler.dev/component"
MD_LABEL = "paddler.dev/model-deployment"
RUN_AS_USER = 10001
MODEL_CACHE_VOLUME = "models"

# --- identities -----------------------------------------------------------------


@dataclass(frozen=True)
class Owner:
    """The custom resource that owns what a plan creates."""

    kind: Literal["LlmPool", "ModelDeployment"]
    namespace: str
    name: str
    uid: str
    generation: int = 1

    def reference(self) -> Obj:
        return {
            "apiVersion": API_VERSION,
            "kind": self.kind,
            "name": self.name,
            "uid": self.uid,
            "controller": True,
            "blockOwnerDeletion": True,
        }


def balancer_name(pool: str) -> str:
    return f"{pool}-balancer"


def inference_service_name(pool: str) -> str:
    return f"{pool}-inference"


def management_service_name(pool: str) -> str:
    """The management Service with a cluster IP: one ready balancer replica per connection (humans,
    KEDA, Prometheus)."""
    return f"{pool}-management"


def peers_service_name(pool: str) -> str:
    """The headless management Service: its DNS name resolves to every balancer replica's pod
    address, starting ones included (agents, the balancers' peers and the operator dial them all)."""
    return f"{pool}-management-peers"


def balancer_pdb_name(pool: str) -> str:
    return f"{pool}-balancer"


def agent_name(md: str) -> str:
    return f"{md}-agent"


def management_addr(pool: str, namespace: str, spec: LlmPoolSpec) -> str:
    """Where agents (and the balancers' peers) dial every balancer replica: the headless Service's
    name at the container port (a headless Service maps no ports: its addresses are the pods')."""
    return f"{peers_service_name(pool)}.{namespace}.svc:{MANAGEMENT_PORT}"


def balancer_url(template: str, pool: str, namespace: str, spec: LlmPoolSpec | None) -> str:
    """The operator's URL for a pool's balancers, from a template with ``{pool}``, ``{namespace}``,
    ``{service}`` and ``{port}`` fields: ``{service}`` is the headless Service and ``{port}`` the
    balancer container's management port, so the URL's host resolves to every replica."""
    return template.format(pool=pool, namespace=namespace, service=peers_service_name(pool), port=MANAGEMENT_PORT)


def metrics_url(template: str, pool: str, namespace: str, spec: LlmPoolSpec | None) -> str:
    """The same template for a reader that wants one answer for the whole pool (KEDA's metrics-api
    trigger, with ``scope=pool``): ``{service}`` is the cluster-IP management Service (ready replicas
    only) at its port."""
    port = spec.balancer.service.management_port if spec is not None else MANAGEMENT_PORT
    return template.format(pool=pool, namespace=namespace, service=management_service_name(pool), port=port)


MANAGEMENT_TOKEN_ENV = "PADDLER_MANAGEMENT_TOKEN"


def management_secret_name(pool: str) -> str:
    """The Secret the operator creates per pool to hold its management token."""
    return f"{pool}-management-token"


def management_token_ref(pool: str, spec: LlmPoolSpec) -> tuple[str, str] | None:
    """(Secret name, key) of the pool's management token; None when the pool turned it off."""
    auth = spec.balancer.management_auth
    if not auth.enabled:
        return None
    return auth.secret_name or management_secret_name(pool), auth.secret_key


def management_token_env(pool: str, spec: LlmPoolSpec) -> list[Obj]:
    ref = management_token_ref(pool, spec)
    if ref is None:
        return []
    return [{"name": MANAGEMENT_TOKEN_ENV, "valueFrom": {"secretKeyRef": {"name": ref[0], "key": ref[1]}}}]


def management_secret(owner: Owner, spec: LlmPoolSpec, token: str) -> Obj:
    """The pool's generated token Secret (only when the pool names no Secret of its own).
    Created once with a random token; never patched, so the token stays stable."""
    name, key = management_secret_name(owner.name), spec.balancer.management_auth.secret_key
    labels = _labels(owner, owner.name, "balancer", "paddler-balancer")
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": _meta(owner, name, labels),
        "type": "Opaque",
        "data": {key: base64.b64encode(token.encode()).decode()},
    }


def owner_header(namespace: str, name: str) -> str:
    """``X-Paddler-Owner`` value of a ModelDeployment's model group."""
    return f"{OWNER_HEADER_KIND}/{namespace}/{name}"


def owned_by_model_deployment(owner: str | None, namespace: str) -> str | None:
    """The name of the ModelDeployment of ``namespace`` that an owner header value names, else None."""
    kind, _, rest = (owner or "").partition("/")
    ns, _, name = rest.partition("/")
    if kind != OWNER_HEADER_KIND or ns != namespace or not name or "/" in name:
        return None
    return name


# --- shared pieces -------------------------------------------------------------------


def _labels(owner: Owner, pool: str, component: str, app: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": app,
        "app.kubernetes.io/instance": owner.name,
        "app.kubernetes.io/managed-by": MANAGED_BY,
        "app.kubernetes.io/part-of": "paddler",
        POOL_LABEL: pool,
        COMPONENT_LABEL: component,
    }


def _meta(owner: Owner, name: str, labels: dict[str, str], annotations: dict[str, str] | None = None) -> Obj:
    meta: Obj = {
        "name": name,
        "namespace": owner.namespace,
        "labels": labels,
        "ownerReferences": [owner.reference()],
    }
    if annotations:
        meta["annotations"] = annotations
    return meta


def _container_security() -> Obj:
    return {
        "runAsNonRoot": True,
        "runAsUser": RUN_AS_USER,
        "runAsGroup": RUN_AS_USER,
        "readOnlyRootFilesystem": True,
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
    }


def _pod_security() -> Obj:
    return {"runAsNonRoot": True, "fsGroup": RUN_AS_USER, "seccompProfile": {"type": "RuntimeDefault"}}


def config_hash(data: Mapping[str, str]) -> str:
    return hashlib.sha256(json.dumps(dict(data), sort_keys=True).encode()).hexdigest()[:16]


# --- LlmPool -------------------------------------------------------------------------


DRAIN_DELAY_SECONDS = 5
"""Seconds a stopping balancer keeps serving with readiness off (``--drain-delay``), so that
endpoints and kube-proxy stop sending it new connections before it stops accepting."""
TERMINATION_SLACK_SECONDS = 10
"""Seconds of the pod's grace period beyond drain delay + drain timeout, before the SIGKILL."""


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


def plan_pool(owner: Owner, spec: LlmPoolSpec) -> list[Obj]:
    """ConfigMap, balancer Deployment, inference and management Services of a pool."""
    pool = owner.name
    b = spec.balancer
    labels = _labels(owner, pool, "balancer", "paddler-balancer")
    selector = {POOL_LABEL: pool, COMPONENT_LABEL: "balancer"}
    config = {
        # Only the balancer's settings: an agent-side change must not restart the balancer
        # (its pod template carries this data's hash), which would drop every agent and buffered request.
        "balancer.json": json.dumps(
            spec.balancer.model_dump(mode="json", by_alias=True, exclude_none=True), sort_keys=True
        ),
        "management-addr": management_addr(pool, owner.namespace, spec),
        "inference-url": (f"http://{inference_service_name(pool)}.{owner.namespace}.svc:{b.service.inference_port}"),
    }
    config_map: Obj = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _meta(owner, balancer_name(pool), labels),
        "data": config,
    }
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
    container: Obj = {
        "name": "balancer",
        "image": b.image,
        "imagePullPolicy": b.image_pull_policy.value,
        "command": ["paddler"],
        "args": balancer_args(spec, pool, owner.namespace),
        "env": env,
        "ports": ports,
        # /ready answers 503 while the replica drains: Services stop sending it requests at once.
        "readinessProbe": {"httpGet": {"path": "/ready", "port": "management"}, **timing},
        "livenessProbe": {"httpGet": {"path": "/health", "port": "management"}, **timing, "failureThreshold": 6},
        "resources": b.resources.to_kube(),
        "securityContext": _container_security(),
        "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],
    }
    deployment: Obj = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _meta(owner, balancer_name(pool), labels),
        "spec": {
            "replicas": b.replicas,
            "selector": {"matchLabels": selector},
            # A new replica is Ready (agents connected to it) before an old one drains away.
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
            "template": {
                "metadata": {"labels": labels, "annotations": {CONFIG_HASH_ANNOTATION: config_hash(config)}},
                "spec": {
                    "securityContext": _pod_security(),
                    "automountServiceAccountToken": False,
                    "terminationGracePeriodSeconds": balancer_grace_seconds(spec),
                    "topologySpreadConstraints": spread_over_nodes(selector),
                    "containers": [container],
                    "volumes": [{"name": "tmp", "emptyDir": {}}],
                },
            },
        },
    }
    inference_ports = [
        {"name": "inference", "port": b.service.inference_port, "targetPort": "inference", "protocol": "TCP"}
    ]
    if b.admin_panel.enabled:
        inference_ports.append(
            {"name": "admin", "port": b.service.admin_panel_port, "targetPort": "admin", "protocol": "TCP"}
        )
    inference_service: Obj = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(owner, inference_service_name(pool), labels, dict(b.service.annotations) or None),
        "spec": {"type": b.service.type.value, "selector": selector, "ports": inference_ports},
    }
    management_service: Obj = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(owner, management_service_name(pool), labels),
        "spec": {
            "type": "ClusterIP",
            "selector": selector,
            "ports": [
                {
                    "name": "management",
                    "port": b.service.management_port,
                    "targetPort": "management",
                    "protocol": "TCP",
                }
            ],
        },
    }
    peers_service: Obj = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(owner, peers_service_name(pool), labels),
        "spec": {
            "clusterIP": "None",
            # Agents join a starting replica before it turns Ready (Ready waits for them).
            "publishNotReadyAddresses": True,
            "selector": selector,
            "ports": [{"name": "management", "port": MANAGEMENT_PORT, "targetPort": "management", "protocol": "TCP"}],
        },
    }
    objects = [config_map, deployment, inference_service, management_service, peers_service]
    if b.replicas >= 2:
        objects.append(balancer_pdb(owner, labels, selector))
    return objects


def balancer_pdb(owner: Owner, labels: dict[str, str], selector: dict[str, str]) -> Obj:
    """Voluntary evictions (node drains) take one balancer replica at a time."""
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": _meta(owner, balancer_pdb_name(owner.name), labels),
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": selector}},
    }


def pool_absent(owner: Owner, spec: LlmPoolSpec) -> list[ObjRef]:
    """Objects of a pool that must not exist: the balancer's PodDisruptionBudget below 2 replicas
    (with one replica it would block every node drain)."""
    if spec.balancer.replicas >= 2:
        return []
    return [ObjRef("policy/v1", "PodDisruptionBudget", owner.namespace, balancer_pdb_name(owner.name))]


# --- ModelDeployment -------------------------------------------------------------------


@dataclass(frozen=True)
class MdPlan:
    objects: list[Obj]
    """Objects that must exist with (at least) these fields."""
    absent: list[ObjRef]
    """Objects of ours that must not exist (e.g. an HPA after autoscaling.mode changed)."""
    desired_state: BalancerDesiredState
    replicas: int | None
    """Agent replicas the operator sets; None when an HPA/KEDA owns the count."""
    slots_per_agent: int


def slots_per_agent(md: ModelDeploymentSpec, pool: LlmPoolSpec) -> int:
    return md.slots_per_agent if md.slots_per_agent is not None else pool.agent.slots_per_agent


def agent_args(owner: Owner, md: ModelDeploymentSpec, pool: LlmPoolSpec, log_level: str) -> list[str]:
    access: list[str] = []
    for entry in pool.model_access.url_allow:
        access += ["--model-url-allow", entry]
    for root in pool.model_access.local_roots:
        access += ["--model-local-root", root]
    return [
        "--log-level",
        log_level,
        "agent",
        "--management-addr",
        management_addr(md.pool_ref.name, owner.namespace, pool),
        "--slots",
        str(slots_per_agent(md, pool)),
        "--model-group",
        owner.name,
        "--name",
        "$(POD_NAME)",
        "--model-cache-dir",
        pool.agent.model_cache.mount_path,
        "--health-addr",
        f"0.0.0.0:{AGENT_HEALTH_PORT}",
        "--drain-timeout",
        f"{md.rollout.drain_timeout_seconds}s",  # the agent reads a bare number as milliseconds
        *access,
    ]


AGENT_PROBE_PERIOD_SECONDS = 10
"""Period of the agent's liveness and startup probes (the startup probe's failureThreshold is
``startupTimeoutSeconds`` over this)."""


def agent_grace_seconds(md: ModelDeploymentSpec) -> int:
    """The agent pod's ``terminationGracePeriodSeconds``: the agent's drain timeout + slack (for an
    ``engine: llamaServer`` pod, the slack is also when the server sidecar stops, after the agent)."""
    return md.rollout.drain_timeout_seconds + TERMINATION_SLACK_SECONDS


def agent_probes(md: ModelDeploymentSpec) -> Obj:
    """The agent container's probes on its health port, for every engine (paddler_agent.health).

    Readiness: ``/ready`` (linked to a balancer, desired state applied, slots, not stopping; with
    ``engine: llamaServer`` also llama-server's ``/health``, asked by the agent on the pod's loopback,
    which the kubelet's own probes cannot reach). Liveness: ``/live`` (the decode loop turns). Startup:
    ``/started`` (the first desired state applied, or failed with an issue), for up to
    ``startupTimeoutSeconds``; the kubelet runs no liveness probe before it passes."""
    period = AGENT_PROBE_PERIOD_SECONDS
    return {
        "readinessProbe": {
            "httpGet": {"path": "/ready", "port": "health"},
            "periodSeconds": 5,
            "timeoutSeconds": 3,
            "failureThreshold": 2,
        },
        "livenessProbe": {
            "httpGet": {"path": "/live", "port": "health"},
            "periodSeconds": period,
            "timeoutSeconds": 5,
            "failureThreshold": 3,
        },
        "startupProbe": {
            "httpGet": {"path": "/started", "port": "health"},
            "periodSeconds": period,
            "timeoutSeconds": 5,
            "failureThreshold": math.ceil(md.startup_timeout_seconds / period),
        },
    }


def agent_resources(md: ModelDeploymentSpec, pool: LlmPoolSpec) -> Obj:
    base: ResourceRequirements = md.resources if md.resources is not None else pool.agent.resources
    extra: dict[str, int | str] | None = {pool.agent.gpu_resource_name: pool.agent.gpus} if pool.agent.gpus else None
    return base.to_kube(extra)


LLAMA_SERVER_CONTAINER = "llama-server"
AGENT_BESIDE_SERVER_RESOURCES = ResourceRequirements(
    requests={"cpu": "100m", "memory": "128Mi"}, limits={"memory": "512Mi"}
)
"""The agent container of an ``engine: llamaServer`` pod: it only forwards HTTP."""
_POOLING_FLAGS = {
    PoolingType.NONE: "none",
    PoolingType.MEAN: "mean",
    PoolingType.CLS: "cls",
    PoolingType.LAST: "last",
    PoolingType.RANK: "rank",
}


def llama_server_model_args(model: ModelSourceSpec) -> list[str]:
    """The model flags of llama-server for a model source (downloads go to LLAMA_CACHE)."""
    if model.local_path is not None:
        return ["--model", model.local_path]
    if model.hugging_face is not None:
        return ["--hf-repo", model.hugging_face.repo_id, "--hf-file", model.hugging_face.filename]
    assert model.url is not None
    return ["--model-url", model.url]


def llama_server_args(md: ModelDeploymentSpec, pool: LlmPoolSpec) -> list[str]:
    """llama-server's flags: loopback only, one slot per agent slot, the model and the
    engine parameters of the inference parameters, then the spec's own ``args``."""
    params = md.inference_parameters
    args = [
        "--host",
        "127.0.0.1",
        "--port",
        str(md.llama_server.port),
        "--parallel",
        str(slots_per_agent(md, pool)),
        *llama_server_model_args(md.model),
        "--ctx-size",
        str(params.context_size),
        "--batch-size",
        str(params.n_batch),
        "--n-gpu-layers",
        str(params.n_gpu_layers),
    ]
    if params.enable_embeddings:
        args.append("--embeddings")
        if params.pooling_type in _POOLING_FLAGS:
            args += ["--pooling", _POOLING_FLAGS[params.pooling_type]]
    return [*args, *md.llama_server.args]


def llama_server_container(md: ModelDeploymentSpec, pool: LlmPoolSpec) -> Obj:
    server = md.llama_server
    base: ResourceRequirements = server.resources or md.resources or pool.agent.resources
    gpus = server.gpus if server.gpus is not None else pool.agent.gpus
    extra: dict[str, int | str] | None = {pool.agent.gpu_resource_name: gpus} if gpus else None
    cache = pool.agent.model_cache
    return {
        "name": LLAMA_SERVER_CONTAINER,
        "image": server.image,
        "imagePullPolicy": server.image_pull_policy.value,
        "args": llama_server_args(md, pool),
        "env": [
            {"name": "HOME", "value": "/tmp"},
            {"name": "LLAMA_CACHE", "value": f"{cache.mount_path}/llama-server"},
        ],
        "resources": base.to_kube(extra),
        "securityContext": _container_security(),
        "volumeMounts": [
            {"name": MODEL_CACHE_VOLUME, "mountPath": cache.mount_path},
            {"name": "tmp", "mountPath": "/tmp"},
        ],
    }


def agent_container(owner: Owner, md: ModelDeploymentSpec, pool: LlmPoolSpec) -> Obj:
    """The agent container, for every engine: ``paddler agent`` with its health port and probes."""
    pool_name = md.pool_ref.name
    cache = pool.agent.model_cache
    container: Obj = {
        "name": "agent",
        "image": pool.agent.image,
        "imagePullPolicy": pool.agent.image_pull_policy.value,
        "command": ["paddler"],
        "args": agent_args(owner, md, pool, pool.balancer.log_level),
        "env": [
            {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            {"name": "PYTHONUNBUFFERED", "value": "1"},
            {"name": "HOME", "value": "/tmp"},
            {"name": "HF_HOME", "value": f"{cache.mount_path}/huggingface"},
            *management_token_env(pool_name, pool),
        ],
        "ports": [{"name": "health", "containerPort": AGENT_HEALTH_PORT, "protocol": "TCP"}],
        **agent_probes(md),
        "resources": agent_resources(md, pool),
        "securityContext": _container_security(),
        "volumeMounts": [
            {"name": MODEL_CACHE_VOLUME, "mountPath": cache.mount_path},
            {"name": "tmp", "mountPath": "/tmp"},
        ],
    }
    if md.engine == EngineKind.LLAMA_SERVER:
        # The agent forwards to llama-server on the pod's loopback; it needs no llama.cpp,
        # so it runs from the (small) balancer image, which has the same `paddler` command.
        container["image"] = pool.balancer.image
        container["imagePullPolicy"] = pool.balancer.image_pull_policy.value
        container["args"] += [
            "--engine",
            "llama-server",
            "--llama-server-url",
            f"http://127.0.0.1:{md.llama_server.port}",
        ]
        container["resources"] = AGENT_BESIDE_SERVER_RESOURCES.to_kube()
    return container


def llama_server_sidecar(md: ModelDeploymentSpec, pool: LlmPoolSpec) -> Obj:
    """llama-server as a native sidecar (an init container with ``restartPolicy: Always``): it starts
    before the agent, is restarted if it exits, and is stopped only after the agent container has
    exited, so it serves the agent's requests for the whole drain. No probes of its own: it listens
    on the pod's loopback, out of the kubelet's reach; the agent's ``/ready`` asks its ``/health``."""
    return {**llama_server_container(md, pool), "restartPolicy": "Always"}


def spread_over_nodes(selector: dict[str, str]) -> list[Obj]:
    """Pods of one Deployment spread over the nodes (at most one more on any node than on another)
    when the scheduler can, never left Pending for it (``ScheduleAnyway``: one node still runs them
    all). ``pod-template-hash`` counts each revision apart, so a rollout's new pods spread too."""
    return [
        {
            "maxSkew": 1,
            "topologyKey": "kubernetes.io/hostname",
            "whenUnsatisfiable": "ScheduleAnyway",
            "labelSelector": {"matchLabels": selector},
            "matchLabelKeys": ["pod-template-hash"],
        }
    ]


def agent_pod_spec(owner: Owner, md: ModelDeploymentSpec, pool: LlmPoolSpec) -> Obj:
    selector = {MD_LABEL: owner.name, COMPONENT_LABEL: "agent"}
    pod_spec: Obj = {
        "securityContext": _pod_security(),
        "automountServiceAccountToken": False,
        # An agent finishes its in-flight requests (drainTimeoutSeconds) before it exits.
        "terminationGracePeriodSeconds": agent_grace_seconds(md),
        "topologySpreadConstraints": spread_over_nodes(selector),
        "containers": [agent_container(owner, md, pool)],
        "volumes": [pool.agent.model_cache.volume(), {"name": "tmp", "emptyDir": {}}],
    }
    if md.engine == EngineKind.LLAMA_SERVER:
        pod_spec["initContainers"] = [llama_server_sidecar(md, pool)]
    if pool.agent.node_selector:
        pod_spec["nodeSelector"] = dict(pool.agent.node_selector)
    if pool.agent.tolerations:
        pod_spec["tolerations"] = [t.to_kube() for t in pool.agent.tolerations]
    return pod_spec


def agent_pdb(owner: Owner, md: ModelDeploymentSpec, labels: dict[str, str], selector: dict[str, str]) -> Obj:
    """Voluntary evictions (node drains) take at most ``disruption.maxUnavailable`` agents at a time. The
    maxUnavailable form allows evictions at 0 replicas and whatever count an autoscaler sets; an agent that
    is not Ready may always be evicted (``AlwaysAllow``): it serves nothing, and a group of agents that
    cannot load their model must not block a node drain."""
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": _meta(owner, agent_name(owner.name), labels),
        "spec": {
            "maxUnavailable": md.disruption.max_unavailable,
            "selector": {"matchLabels": selector},
            "unhealthyPodEvictionPolicy": "AlwaysAllow",
        },
    }


def plan_model_deployment(
    owner: Owner,
    md: ModelDeploymentSpec,
    pool: LlmPoolSpec,
    *,
    builtin_replicas: int | None = None,
    balancer_url: str | None = None,
    hpa_scale_to_zero: bool = True,
) -> MdPlan:
    """Agent Deployment, its PodDisruptionBudget (+ HPA or ScaledObject) of a ModelDeployment, and its
    desired state.

    ``builtin_replicas`` is the Builtin scaler's answer (see :func:`builtin_scale`);
    it is used only when ``autoscaling.mode`` is ``Builtin``. ``balancer_url`` is where
    KEDA's metrics-api trigger reads the pool's management API (:func:`metrics_url` of the
    operator's ``--balancer-url-template``; default: the cluster-IP management Service).
    ``hpa_scale_to_zero``: the cluster's HPA accepts ``minReplicas: 0`` (see
    :func:`hpa_min_replicas`).
    """
    pool_name = md.pool_ref.name
    labels = {**_labels(owner, pool_name, "agent", "paddler-agent"), MD_LABEL: owner.name}
    selector = {MD_LABEL: owner.name, COMPONENT_LABEL: "agent"}
    pod_spec = agent_pod_spec(owner, md, pool)

    mode = md.autoscaling.mode
    replicas: int | None
    if mode == AutoscalingMode.NONE:
        replicas = md.replicas
    elif mode == AutoscalingMode.BUILTIN:
        low, high = md.autoscaling.min_replicas, md.autoscaling.max_replicas
        replicas = min(high, max(low, builtin_replicas if builtin_replicas is not None else low))
    else:
        replicas = None
    deployment_spec: Obj = {
        "selector": {"matchLabels": selector},
        # A replaced agent counts as available only once Ready (model loaded) for this long: a
        # pod-template rollout takes the next maxUnavailable agents down only after that.
        "minReadySeconds": md.rollout.min_ready_seconds,
        "strategy": {
            "type": "RollingUpdate",
            "rollingUpdate": {
                "maxUnavailable": md.rollout.max_unavailable,
                "maxSurge": md.rollout.max_surge,
            },
        },
        "template": {"metadata": {"labels": labels}, "spec": pod_spec},
    }
    if replicas is not None:
        deployment_spec = {"replicas": replicas, **deployment_spec}
    name = agent_name(owner.name)
    deployment: Obj = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _meta(owner, name, labels),
        "spec": deployment_spec,
    }
    objects = [deployment]
    hpa_ref = ObjRef("autoscaling/v2", "HorizontalPodAutoscaler", owner.namespace, name)
    keda_ref = ObjRef("keda.sh/v1alpha1", "ScaledObject", owner.namespace, name)
    absent = []
    spa = slots_per_agent(md, pool)
    if mode == AutoscalingMode.HPA:
        objects.append(_hpa(owner, name, labels, md.autoscaling, spa, hpa_scale_to_zero))
    else:
        absent.append(hpa_ref)
    trigger_auth_ref = ObjRef("keda.sh/v1alpha1", "TriggerAuthentication", owner.namespace, name)
    token_ref = management_token_ref(pool_name, pool)
    if mode == AutoscalingMode.KEDA:
        base = balancer_url or (
            f"http://{management_service_name(pool_name)}.{owner.namespace}.svc:{pool.balancer.service.management_port}"
        )
        needs_token = token_ref is not None and md.autoscaling.keda.trigger == KedaTrigger.METRICS_API
        objects.append(_scaled_object(owner, name, labels, md.autoscaling, spa, base, needs_token))
        if needs_token and token_ref is not None:
            objects.append(_trigger_authentication(owner, name, labels, token_ref))
        else:
            absent.append(trigger_auth_ref)
    else:
        absent += [keda_ref, trigger_auth_ref]
    objects.append(agent_pdb(owner, md, labels, selector))
    return MdPlan(
        objects=objects,
        absent=absent,
        desired_state=md.desired_state(),
        replicas=replicas,
        slots_per_agent=spa,
    )


def parked(owner: Owner) -> tuple[ObjRef, Obj, list[ObjRef]]:
    """What a ModelDeployment whose pool is gone does: its agent Deployment scaled to 0 (agents
    would only retry a balancer that is not there, holding GPUs) and its autoscaler removed,
    until the pool is back and the normal plan applies again. (deployment, patch, absent)"""
    name = agent_name(owner.name)
    return (
        ObjRef("apps/v1", "Deployment", owner.namespace, name),
        {"spec": {"replicas": 0}},
        [
            ObjRef("autoscaling/v2", "HorizontalPodAutoscaler", owner.namespace, name),
            ObjRef("keda.sh/v1alpha1", "ScaledObject", owner.namespace, name),
        ],
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


def _hpa(
    owner: Owner, name: str, labels: dict[str, str], a: AutoscalingSpec, slots: int, scale_to_zero: bool = True
) -> Obj:
    group = {"matchLabels": {"model_group": owner.name}}
    return {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": _meta(owner, name, labels),
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


def _trigger_authentication(owner: Owner, name: str, labels: dict[str, str], token_ref: tuple[str, str]) -> Obj:
    """KEDA reads the buffered-request gauge with the pool's management token."""
    return {
        "apiVersion": "keda.sh/v1alpha1",
        "kind": "TriggerAuthentication",
        "metadata": _meta(owner, name, labels),
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


def _scaled_object(
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
        "metadata": _meta(owner, name, labels),
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


# --- status -------------------------------------------------------------------------


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


REPLICAS_UNREACHABLE = "BalancerReplicasUnreachable"
"""Degraded reason: some balancer replicas answered, others not (a partial pass)."""


def _cond(type_: str, ok: bool, reason: str, message: str = "") -> Condition:
    return Condition(type=type_, status="True" if ok else "False", reason=reason, message=message)


def merge_conditions(
    previous: Sequence[Condition], current: Sequence[Condition], now: str, generation: int
) -> list[Condition]:
    """``current`` with ``lastTransitionTime`` kept from ``previous`` where the status did not change."""
    before = {c.type: c for c in previous}
    out = []
    for c in current:
        old = before.get(c.type)
        since = old.last_transition_time if old is not None and old.status == c.status else None
        out.append(c.model_copy(update={"last_transition_time": since or now, "observed_generation": generation}))
    return out


def pool_status(
    spec: LlmPoolSpec,
    *,
    generation: int,
    snapshot: BalancerSnapshot | None,
    balancer_error: str | None,
    apply_errors: Sequence[str],
    model_deployments: int,
    inference_url: str,
    management_url: str,
    previous: Sequence[Condition],
    now: str,
    balancers_ready: int = 0,
) -> LlmPoolStatus:
    """``balancers_ready``: Ready pods of the balancer Deployment (its status)."""
    load = load_of(snapshot.agents if snapshot else (), snapshot.buffered_total if snapshot else 0)
    partial = snapshot.partial if snapshot is not None else None
    if spec.balancer.replicas == 0:
        ready = _cond("Ready", False, "Stopped", "balancer.replicas is 0")
        progressing = _cond("Progressing", False, "Stopped")
    elif snapshot is None:
        msg = f"balancer management API unreachable: {balancer_error or 'unknown error'}; retrying"
        ready = _cond("Ready", False, "BalancerUnreachable", msg)
        progressing = _cond("Progressing", True, "BalancerUnreachable", msg)
    else:
        msg = (
            f"balancer up ({balancers_ready}/{spec.balancer.replicas} replicas ready): {load.ready} ready agents, "
            f"{load.slots_free}/{load.slots_total} free slots"
        )
        ready = _cond("Ready", True, "BalancerReady", msg)
        progressing = _cond("Progressing", False, "Complete", msg)
    if apply_errors:
        degraded = _cond("Degraded", True, "ApplyFailed", "; ".join(apply_errors))
    elif partial is not None:
        degraded = _cond("Degraded", True, REPLICAS_UNREACHABLE, f"{partial}; counts are partial, retrying")
    else:
        degraded = _cond("Degraded", False, "AsExpected")
    return LlmPoolStatus(
        observed_generation=generation,
        conditions=merge_conditions(previous, [ready, progressing, degraded], now, generation),
        ready_agents=load.ready,
        agents=load.agents,
        slots_free=load.slots_free,
        slots_total=load.slots_total,
        slots=f"{load.slots_free}/{load.slots_total}",
        buffered_requests=load.buffered,
        inference_url=inference_url,
        management_url=management_url,
        model_deployments=model_deployments,
        balancer_replicas=spec.balancer.replicas,
        balancer_ready_replicas=balancers_ready,
        balancers=f"{balancers_ready}/{spec.balancer.replicas}",
        balancer_replicas_reached=len(snapshot.replicas) if snapshot is not None else 0,
    )


def model_deployment_status(
    name: str,
    spec: ModelDeploymentSpec,
    *,
    generation: int,
    pool_found: bool,
    desired_replicas: int,
    snapshot: BalancerSnapshot | None,
    balancer_error: str | None,
    desired_state_error: str | None,
    apply_errors: Sequence[str],
    previous: Sequence[Condition],
    now: str,
    rollout: Mapping[str, Any] | None = None,
    low_demand_since: str | None = None,
) -> ModelDeploymentStatus:
    """``rollout`` is the balancer's rollout of this spec's desired state (None when it
    has none, or one of another state)."""
    agents = snapshot.in_group(name) if snapshot else []
    load = load_of(agents, (snapshot.buffered_by_group.get(name, 0) if snapshot else 0))
    applied = snapshot is not None and desired_state_error is None and name in snapshot.group_states
    problems = list(apply_errors)
    if desired_state_error:
        problems.append(f"balancer refused the desired state: {desired_state_error}")
    stuck = [a for a in agents if a.state in ("Stuck", "AttemptedAndNotAppliable")]
    issues = [f"{a.name or a.id}: {i}" for a in agents for i in a.issues]

    if not pool_found:
        msg = f"LlmPool {spec.pool_ref.name!r} not found in this namespace; waiting for it"
        ready = _cond("Ready", False, "PoolNotFound", msg)
        progressing = _cond("Progressing", False, "PoolNotFound", msg)
    elif snapshot is None:
        msg = f"balancer management API unreachable: {balancer_error or 'unknown error'}; retrying"
        ready = _cond("Ready", False, "BalancerUnreachable", msg)
        progressing = _cond("Progressing", True, "BalancerUnreachable", msg)
    elif rollout is not None and rollout.get("phase") == "Failed":
        msg = (
            f"rollout of {spec.model.to_core().describe()} stopped at {rollout.get('applied')}/{rollout.get('total')} "
            "agents; the others keep serving the previous desired state"
        )
        ready = _cond("Ready", False, "RolloutFailed", msg)
        progressing = _cond("Progressing", False, "RolloutFailed", str(rollout.get("message") or msg))
    elif rollout is not None and rollout.get("phase") == "Progressing":
        msg = (
            f"rolling out {spec.model.to_core().describe()}: {rollout.get('applied')}/{rollout.get('total')} agents "
            f"switched, at most {rollout.get('max_unavailable')} at a time"
        )
        ready = _cond("Ready", False, "RollingOut", msg)
        progressing = _cond("Progressing", True, "RollingOut", msg)
    elif desired_replicas == 0:
        ready = _cond("Ready", True, "ScaledToZero", "0 agent replicas; buffered requests wake the pool")
        progressing = _cond("Progressing", False, "Complete")
    elif applied and load.ready >= desired_replicas:
        msg = f"{load.ready}/{desired_replicas} agents serve {spec.model.to_core().describe()}"
        ready = _cond("Ready", True, "AgentsReady", msg)
        progressing = _cond("Progressing", False, "Complete", msg)
    else:
        msg = f"{load.ready}/{desired_replicas} agents ready"
        if not applied:
            msg += "; desired state not yet on the balancer"
        ready = _cond("Ready", False, "AgentsNotReady", msg)
        progressing = _cond("Progressing", True, "WaitingForAgents", msg)
    partial = snapshot.partial if snapshot is not None else None
    if problems:
        degraded = _cond("Degraded", True, "ApplyFailed", "; ".join(problems))
    elif partial is not None:
        degraded = _cond("Degraded", True, REPLICAS_UNREACHABLE, f"{partial}; counts are partial, retrying")
    elif rollout is not None and rollout.get("phase") == "Failed":
        degraded = _cond("Degraded", True, "RolloutFailed", str(rollout.get("message") or "rollout failed")[:1000])
    elif stuck:
        degraded = _cond(
            "Degraded", True, "ModelNotAppliable", ", ".join(f"{a.name or a.id}: {a.state}" for a in stuck)
        )
    elif issues:
        degraded = _cond("Degraded", True, "AgentIssues", "; ".join(issues)[:1000])
    else:
        degraded = _cond("Degraded", False, "AsExpected")
    return ModelDeploymentStatus(
        observed_generation=generation,
        conditions=merge_conditions(previous, [ready, progressing, degraded], now, generation),
        ready_agents=load.ready,
        agents=load.agents,
        slots_free=load.slots_free,
        slots_total=load.slots_total,
        slots=f"{load.slots_free}/{load.slots_total}",
        buffered_requests=load.buffered,
        replicas=desired_replicas,
        agents_summary=f"{load.ready}/{desired_replicas}",
        model=spec.model.to_core().describe(),
        desired_state_applied=applied,
        low_demand_since=low_demand_since,
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
