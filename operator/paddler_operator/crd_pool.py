"""``LlmPool`` (paddler.dev/v1alpha1): the pool's balancer, agent defaults and allowed
model sources, and the whole object (spec + status). Conventions: :mod:`paddler_operator.crd_models`.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from paddler_core.model_access import AllowEntry
from paddler_operator.crd_models import (
    ADMIN_PANEL_PORT,
    DURATION_PATTERN,
    IMAGE_FIELD_NOTE,
    INFERENCE_PORT,
    MANAGEMENT_PORT,
    CrdSpec,
    ImagePullPolicy,
    LlmPoolStatus,
    Quantity,
    ResourceRequirements,
    SecretKeyRef,
    ServiceType,
)
from paddler_operator.crd_pod import PodSettings, Toleration


class ServiceSpec(CrdSpec):
    """The pool's Services."""

    type: ServiceType = Field(default=ServiceType.CLUSTER_IP, description="Type of the inference Service.")
    inference_port: Annotated[
        int, Field(ge=1, le=65535, description="Port of the native and OpenAI APIs on the inference Service.")
    ] = INFERENCE_PORT
    management_port: Annotated[
        int, Field(ge=1, le=65535, description="Port of the management API (agents, operator) on its Service.")
    ] = MANAGEMENT_PORT
    admin_panel_port: Annotated[
        int, Field(ge=1, le=65535, description="Port of the web admin panel on the inference Service.")
    ] = ADMIN_PANEL_PORT
    annotations: dict[str, str] = Field(default_factory=dict, description="Annotations of the inference Service.")


class AdminPanelSpec(CrdSpec):
    """The balancer's web admin panel."""

    enabled: bool = Field(default=False, description="Serve the web admin panel on the inference Service.")


class ManagementAuthSpec(CrdSpec):
    """The management token: required on the balancer's management port (agent sockets,
    desired state, agents, streams, metrics); sent by the pool's agents and the operator."""

    enabled: bool = Field(
        default=True,
        description="Require the token. Off leaves the management port open to anyone who reaches the Service.",
    )
    secret_name: str | None = Field(
        default=None,
        min_length=1,
        description=(
            "Secret (in the pool's namespace) holding the token under secretKey; the operator reads it by "
            "this name only (grant it: the chart's rbac.readableSecrets). Default: <pool>-management-<hash>, "
            "which the operator creates with a token it derives from its key and the pool's uid (it never "
            "reads it back), owned by the pool."
        ),
    )
    secret_key: Annotated[str, Field(min_length=1, description="Key inside the Secret.")] = "management-token"


class RoutingPolicy(StrEnum):
    """How the balancer picks an agent for a request (``paddler balancer --routing``)."""

    PREFIX = "prefix"
    """The agent that holds the request's prefix (its conversation), new prefixes spread by a
    consistent hash bounded by load; the same choice on every balancer replica."""
    LEAST_BUSY = "leastBusy"
    """The agent with the most free slots (Paddler 4.1's rule)."""

    def flag(self) -> str:
        """The balancer's ``--routing`` value."""
        return "prefix" if self is RoutingPolicy.PREFIX else "least-busy"


class BalancerSpec(CrdSpec):
    """The pool's balancer: pods (replicas, all active) that buffer requests and route them to agent slots."""

    image: str | None = Field(
        default=None,
        min_length=1,
        description="Balancer image (runs `paddler balancer`). " + IMAGE_FIELD_NOTE.format(flag="balancer-image"),
    )
    image_pull_policy: ImagePullPolicy = Field(default=ImagePullPolicy.IF_NOT_PRESENT, description="Pull policy.")
    replicas: Annotated[
        int,
        Field(
            ge=0,
            description=(
                "Balancer pods, all active (0 stops the pool). Every agent connects to every replica; 2 or more "
                "let the pool survive the loss of a balancer pod (a PodDisruptionBudget keeps all but one up)."
            ),
        ),
    ] = 1
    drain_timeout_seconds: Annotated[
        int,
        Field(
            ge=0,
            description=(
                "Longest time (s) a stopping balancer pod finishes its streams and buffered requests "
                "(--drain-timeout); the pod's termination grace period is this plus the drain delay plus 10 s."
            ),
        ),
    ] = 50
    max_buffered_requests: Annotated[
        int, Field(ge=0, description="Requests held while no slot is free (count); 0 disables buffering.")
    ] = 30
    buffered_request_timeout: Annotated[
        str,
        Field(
            pattern=DURATION_PATTERN,
            description=(
                "Longest wait in the buffer (duration: 120s, 500ms); 504 after. Longer than Paddler's 10s: a "
                "request that wakes a group from zero waits for the autoscaler, a pod and a model load."
            ),
        ),
    ] = "120s"
    inference_item_timeout: Annotated[
        str, Field(pattern=DURATION_PATTERN, description="Longest wait for the next token (duration).")
    ] = "30s"
    routing: RoutingPolicy = Field(
        default=RoutingPolicy.PREFIX,
        description="prefix: a conversation's turns go to the agent caching it (load-capped); "
        "leastBusy: the agent with the most free slots (Paddler 4.1).",
    )
    service: ServiceSpec = Field(default_factory=ServiceSpec, description="The inference and management Services.")
    admin_panel: AdminPanelSpec = Field(default_factory=AdminPanelSpec, description="The web admin panel.")
    resources: ResourceRequirements = Field(
        default_factory=lambda: ResourceRequirements(requests={"cpu": "100m", "memory": "128Mi"})
    )
    auth_secret_ref: SecretKeyRef | None = Field(
        default=None, description="Require this API key (Bearer) on the inference APIs."
    )
    management_auth: ManagementAuthSpec = Field(
        default_factory=ManagementAuthSpec, description="Token on the management port (on by default)."
    )
    cors_allowed_origins: list[Annotated[str, Field(pattern=r"^(\*|https?://[^/\s]+/?)$")]] = Field(
        default_factory=list,
        description="Browser origins (scheme://host[:port]) allowed to call the inference API.",
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        default="INFO", description="Log level of the balancer and of the agents."
    )
    pod: PodSettings = Field(
        default_factory=PodSettings,
        description="Fields of the balancer pods: env, pull secrets, scheduling, volumes, security contexts, "
        "and a strategic merge patch of the pod template.",
    )


class PvcRef(CrdSpec):
    claim_name: Annotated[str, Field(min_length=1, description="A PersistentVolumeClaim in the pool's namespace.")]


class HostPathRef(CrdSpec):
    path: Annotated[str, Field(pattern=r"^/", description="A directory on the node (created if missing).")]


_ONE_CACHE_RULE = "!(has(self.persistentVolumeClaim) && has(self.hostPath))"
_ONE_CACHE_MESSAGE = "set at most one of persistentVolumeClaim, hostPath"


class ModelCacheSpec(CrdSpec):
    """Where agents keep downloaded models. An emptyDir (the default) lives as long as its pod: an
    agent woken from zero downloads again. A persistentVolumeClaim (ReadWriteMany when agents run on
    several nodes) or a hostPath (one cache per node) survives the pod, so a woken agent only loads."""

    model_config = ConfigDict(
        json_schema_extra={"x-kubernetes-validations": [{"rule": _ONE_CACHE_RULE, "message": _ONE_CACHE_MESSAGE}]}
    )

    mount_path: str = Field(default="/var/cache/paddler/models", description="Where agents see the cache.")
    size_limit: Quantity | None = Field(default="20Gi", description="emptyDir size limit (quantity).")
    persistent_volume_claim: PvcRef | None = Field(
        default=None, description="Use this PVC instead of an emptyDir: downloads survive the pods."
    )
    host_path: HostPathRef | None = Field(
        default=None,
        description=(
            "Use this node directory instead of an emptyDir: downloads survive the pods on that node "
            "(hostPath volumes need a namespace that Pod Security admission allows them in)."
        ),
    )

    @model_validator(mode="after")
    def _one_volume(self) -> ModelCacheSpec:
        if self.persistent_volume_claim is not None and self.host_path is not None:
            raise ValueError(_ONE_CACHE_MESSAGE)
        return self

    def volume(self) -> dict[str, Any]:
        if self.persistent_volume_claim is not None:
            return {"name": "models", "persistentVolumeClaim": {"claimName": self.persistent_volume_claim.claim_name}}
        if self.host_path is not None:
            return {"name": "models", "hostPath": {"path": self.host_path.path, "type": "DirectoryOrCreate"}}
        empty: dict[str, Any] = {}
        if self.size_limit is not None:
            empty["sizeLimit"] = self.size_limit
        return {"name": "models", "emptyDir": empty}


class AgentDefaults(CrdSpec):
    """Agent pod defaults for every ModelDeployment of the pool."""

    image: str | None = Field(
        default=None,
        min_length=1,
        description="Agent image (runs `paddler agent`, llama.cpp). " + IMAGE_FIELD_NOTE.format(flag="agent-image"),
    )
    image_pull_policy: ImagePullPolicy = Field(default=ImagePullPolicy.IF_NOT_PRESENT, description="Pull policy.")
    slots_per_agent: Annotated[int, Field(ge=1, le=256, description="Concurrent sequences per agent pod.")] = 4
    resources: ResourceRequirements = Field(
        default_factory=lambda: ResourceRequirements(requests={"cpu": "1", "memory": "1Gi"})
    )
    gpus: Annotated[int, Field(ge=0, description="GPUs per agent pod (added to limits).")] = 0
    gpu_resource_name: str = Field(default="nvidia.com/gpu", description="Extended resource name of a GPU.")
    node_selector: dict[str, str] = Field(
        default_factory=dict, description="Node labels agent pods require (pod.nodeSelector merges over it)."
    )
    tolerations: list[Toleration] = Field(
        default_factory=list, description="Taints agent pods tolerate (pod.tolerations replaces it when set)."
    )
    model_cache: ModelCacheSpec = Field(default_factory=ModelCacheSpec, description="Downloaded models' volume.")
    pod: PodSettings = Field(
        default_factory=PodSettings,
        description="Fields of every agent pod of the pool (env such as HF_TOKEN, pull secrets, scheduling, "
        "volumes, security contexts, a pod template patch). A ModelDeployment's spec.pod replaces a field, "
        "except labels, annotations, nodeSelector (merged by key) and env (merged by name).",
    )


class ModelAccessSpec(CrdSpec):
    """Which model sources the pool's balancer accepts and its agents load."""

    url_allow: list[str] = Field(
        default_factory=list,
        description=(
            "Model URL prefixes (https://, http://host:port/path, https://*.example.com); empty: any https URL. "
            "Loopback, link-local and metadata addresses only when an entry names the host."
        ),
    )
    local_roots: list[str] = Field(
        default_factory=list,
        description="Folders LocalToAgent paths must lie in (on the agent); empty: any path.",
    )

    @field_validator("url_allow")
    @classmethod
    def _entries_parse(cls, entries: list[str]) -> list[str]:
        for entry in entries:
            AllowEntry.parse(entry)  # a bad entry is an InvalidSpec, not a crash-looping balancer
        return entries

    @field_validator("local_roots")
    @classmethod
    def _roots_absolute(cls, roots: list[str]) -> list[str]:
        for root in roots:
            if not root.startswith("/"):
                raise ValueError(f"local root {root!r} must be an absolute path")
        return roots


class LlmPoolSpec(CrdSpec):
    balancer: BalancerSpec = Field(default_factory=BalancerSpec, description="The pool's balancer.")
    agent: AgentDefaults = Field(default_factory=AgentDefaults, description="Defaults of every agent pod.")
    model_access: ModelAccessSpec = Field(default_factory=ModelAccessSpec, description="Allowed model sources.")


class LlmPool(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    spec: LlmPoolSpec = Field(default_factory=LlmPoolSpec)
    status: LlmPoolStatus = Field(default_factory=LlmPoolStatus)
