"""Pure planning of a ModelDeployment's agents: container, probes, the llama-server
sidecar, pod spec, PDB, and the whole set of objects with its autoscaler."""

from __future__ import annotations

import math
from dataclasses import dataclass

from paddler_core.desired_state import BalancerDesiredState, PoolingType
from paddler_operator.crd_model_deployment import AutoscalingMode, EngineKind, ModelDeploymentSpec, ModelSourceSpec
from paddler_operator.crd_models import AGENT_HEALTH_PORT, DEFAULT_IMAGES, Images, ResourceRequirements, resolve_image
from paddler_operator.crd_pod import PodSettings, apply_pod_settings
from paddler_operator.crd_pool import LlmPoolSpec
from paddler_operator.objects import Obj, ObjRef
from paddler_operator.plan import (
    COMPONENT_LABEL,
    MD_LABEL,
    MODEL_CACHE_VOLUME,
    TERMINATION_SLACK_SECONDS,
    Owner,
    agent_name,
    component_labels,
    container_security,
    management_addr,
    management_token_env,
    object_meta,
    pod_security,
    spread_over_nodes,
)
from paddler_operator.plan_autoscaling import (
    autoscaler_objects,
)

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


def llama_server_container(md: ModelDeploymentSpec, pool: LlmPoolSpec, images: Images = DEFAULT_IMAGES) -> Obj:
    server = md.llama_server
    base: ResourceRequirements = server.resources or md.resources or pool.agent.resources
    gpus = server.gpus if server.gpus is not None else pool.agent.gpus
    extra: dict[str, int | str] | None = {pool.agent.gpu_resource_name: gpus} if gpus else None
    cache = pool.agent.model_cache
    return {
        "name": LLAMA_SERVER_CONTAINER,
        "image": resolve_image(server.image, images.llama_server),
        "imagePullPolicy": server.image_pull_policy.value,
        "args": llama_server_args(md, pool),
        "env": [
            {"name": "HOME", "value": "/tmp"},
            {"name": "LLAMA_CACHE", "value": f"{cache.mount_path}/llama-server"},
        ],
        "resources": base.to_kube(extra),
        "securityContext": container_security(),
        "volumeMounts": [
            {"name": MODEL_CACHE_VOLUME, "mountPath": cache.mount_path},
            {"name": "tmp", "mountPath": "/tmp"},
        ],
    }


def agent_container(owner: Owner, md: ModelDeploymentSpec, pool: LlmPoolSpec, images: Images = DEFAULT_IMAGES) -> Obj:
    """The agent container, for every engine: ``paddler agent`` with its health port and probes."""
    pool_name = md.pool_ref.name
    cache = pool.agent.model_cache
    container: Obj = {
        "name": "agent",
        "image": resolve_image(pool.agent.image, images.agent),
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
        "securityContext": container_security(),
        "volumeMounts": [
            {"name": MODEL_CACHE_VOLUME, "mountPath": cache.mount_path},
            {"name": "tmp", "mountPath": "/tmp"},
        ],
    }
    if md.engine == EngineKind.LLAMA_SERVER:
        # The agent forwards to llama-server on the pod's loopback; it needs no llama.cpp,
        # so it runs from the (small) balancer image, which has the same `paddler` command.
        container["image"] = resolve_image(pool.balancer.image, images.balancer)
        container["imagePullPolicy"] = pool.balancer.image_pull_policy.value
        container["args"] += [
            "--engine",
            "llama-server",
            "--llama-server-url",
            f"http://127.0.0.1:{md.llama_server.port}",
        ]
        container["resources"] = AGENT_BESIDE_SERVER_RESOURCES.to_kube()
    return container


def llama_server_sidecar(md: ModelDeploymentSpec, pool: LlmPoolSpec, images: Images = DEFAULT_IMAGES) -> Obj:
    """llama-server as a native sidecar (an init container with ``restartPolicy: Always``): it starts
    before the agent, is restarted if it exits, and is stopped only after the agent container has
    exited, so it serves the agent's requests for the whole drain. No probes of its own: it listens
    on the pod's loopback, out of the kubelet's reach; the agent's ``/ready`` asks its ``/health``."""
    return {**llama_server_container(md, pool, images), "restartPolicy": "Always"}


def agent_pod_spec(owner: Owner, md: ModelDeploymentSpec, pool: LlmPoolSpec, images: Images = DEFAULT_IMAGES) -> Obj:
    selector = {MD_LABEL: owner.name, COMPONENT_LABEL: "agent"}
    pod_spec: Obj = {
        "securityContext": pod_security(),
        "automountServiceAccountToken": False,
        # An agent finishes its in-flight requests (drainTimeoutSeconds) before it exits.
        "terminationGracePeriodSeconds": agent_grace_seconds(md),
        "topologySpreadConstraints": spread_over_nodes(selector),
        "containers": [agent_container(owner, md, pool, images)],
        "volumes": [pool.agent.model_cache.volume(), {"name": "tmp", "emptyDir": {}}],
    }
    if md.engine == EngineKind.LLAMA_SERVER:
        pod_spec["initContainers"] = [llama_server_sidecar(md, pool, images)]
    if pool.agent.node_selector:
        pod_spec["nodeSelector"] = dict(pool.agent.node_selector)
    if pool.agent.tolerations:
        pod_spec["tolerations"] = [t.to_kube() for t in pool.agent.tolerations]
    return pod_spec


AGENT_POD_MAIN_CONTAINERS = ("agent", LLAMA_SERVER_CONTAINER)
"""The containers of an agent pod that get the pod settings' env, envFrom, volumeMounts and
securityContext: llama-server too, since it downloads (``--hf-repo``: HF_TOKEN, HTTPS_PROXY) and
reads (``localPath`` on an extra volume) the model itself."""


def agent_pod_settings(md: ModelDeploymentSpec, pool: LlmPoolSpec) -> PodSettings:
    """The pool's ``agent.pod`` with the ModelDeployment's ``pod`` over it (:meth:`PodSettings.overlay`)."""
    return pool.agent.pod.overlay(md.pod)


def agent_pdb(owner: Owner, md: ModelDeploymentSpec, labels: dict[str, str], selector: dict[str, str]) -> Obj:
    """Voluntary evictions (node drains) take at most ``disruption.maxUnavailable`` agents at a time. The
    maxUnavailable form allows evictions at 0 replicas and whatever count an autoscaler sets; an agent that
    is not Ready may always be evicted (``AlwaysAllow``): it serves nothing, and a group of agents that
    cannot load their model must not block a node drain."""
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": object_meta(owner, agent_name(owner.name), labels),
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
    images: Images = DEFAULT_IMAGES,
) -> MdPlan:
    """Agent Deployment, its PodDisruptionBudget (+ HPA or ScaledObject) of a ModelDeployment, and its
    desired state.

    ``builtin_replicas`` is the Builtin scaler's answer (see :func:`builtin_scale`);
    it is used only when ``autoscaling.mode`` is ``Builtin``. ``balancer_url`` is where
    KEDA's metrics-api trigger reads the pool's management API (:func:`metrics_url` of the
    operator's ``--balancer-url-template``; default: the cluster-IP management Service).
    ``hpa_scale_to_zero``: the cluster's HPA accepts ``minReplicas: 0`` (see
    :func:`hpa_min_replicas`). ``images``: the operator's, for unset ``image`` fields.
    """
    labels = {**component_labels(owner, md.pool_ref.name, "agent", "paddler-agent"), MD_LABEL: owner.name}
    selector = {MD_LABEL: owner.name, COMPONENT_LABEL: "agent"}
    replicas = agent_replicas(md, builtin_replicas)
    spa = slots_per_agent(md, pool)
    scaler_objects, absent = autoscaler_objects(owner, md, pool, labels, spa, balancer_url, hpa_scale_to_zero)
    return MdPlan(
        objects=[
            agent_deployment(owner, md, pool, labels, selector, replicas, images),
            *scaler_objects,
            agent_pdb(owner, md, labels, selector),
        ],
        absent=absent,
        desired_state=md.desired_state(),
        replicas=replicas,
        slots_per_agent=spa,
    )


def agent_replicas(md: ModelDeploymentSpec, builtin_replicas: int | None) -> int | None:
    """The agent Deployment's ``replicas``: the spec's, the Builtin scaler's answer within its
    bounds, or None where HPA or KEDA owns the field."""
    mode = md.autoscaling.mode
    if mode == AutoscalingMode.NONE:
        return md.replicas
    if mode == AutoscalingMode.BUILTIN:
        low, high = md.autoscaling.min_replicas, md.autoscaling.max_replicas
        return min(high, max(low, builtin_replicas if builtin_replicas is not None else low))
    return None


def agent_deployment(
    owner: Owner,
    md: ModelDeploymentSpec,
    pool: LlmPoolSpec,
    labels: dict[str, str],
    selector: dict[str, str],
    replicas: int | None,
    images: Images = DEFAULT_IMAGES,
) -> Obj:
    template = {"metadata": {"labels": labels}, "spec": agent_pod_spec(owner, md, pool, images)}
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
        "template": apply_pod_settings(template, agent_pod_settings(md, pool), main=AGENT_POD_MAIN_CONTAINERS),
    }
    if replicas is not None:
        deployment_spec = {"replicas": replicas, **deployment_spec}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": object_meta(owner, agent_name(owner.name), labels),
        "spec": deployment_spec,
    }


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
