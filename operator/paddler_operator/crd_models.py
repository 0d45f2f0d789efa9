"""The custom resources ``LlmPool`` and ``ModelDeployment`` (paddler.dev/v1alpha1).

These pydantic models are the single source of truth: the operator parses
custom resources with them, and ``python -m paddler_operator.gen_crds``
generates the CRD OpenAPI schemas in ``crds/`` (and the Helm chart) from them.
Field names are camelCase on the wire (Kubernetes convention) and snake_case in
Python. Every field has a default, except ``ModelDeployment.spec.poolRef`` and
``ModelDeployment.spec.model``: ``spec: {}`` is a valid ``LlmPool``.

Rules that the API server must enforce beyond types (exactly one model source,
``minReplicas <= maxReplicas``) are CEL ``x-kubernetes-validations`` attached
with ``json_schema_extra`` and mirrored by pydantic validators, so the operator
never trusts what the API server may not have checked (e.g. an older CRD).
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic.alias_generators import to_camel

from paddler_core.desired_state import (
    BalancerDesiredState,
    ChatTemplate,
    HuggingFaceModelReference,
    InferenceParameters,
    ModelSource,
    UrlModelReference,
)
from paddler_core.model_access import AllowEntry

GROUP = "paddler.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"

DEFAULT_BALANCER_IMAGE = "ghcr.io/paddler-k8s/balancer:0.1.0"
DEFAULT_AGENT_IMAGE = "ghcr.io/paddler-k8s/agent:0.1.0"
DEFAULT_LLAMA_SERVER_IMAGE = "ghcr.io/paddler-k8s/llama-server:0.1.0"
LLAMA_SERVER_PORT = 8080

MANAGEMENT_PORT = 8060
INFERENCE_PORT = 8061
ADMIN_PANEL_PORT = 8062
AGENT_HEALTH_PORT = 8086
"""The agent container's health doors (``--health-addr``): ``/ready``, ``/live``, ``/started``."""

DURATION_PATTERN = r"^[0-9]+(\.[0-9]+)?(ms|s|m|h)?$"
"""A duration as the balancer's flags read it: ``10s``, ``500ms``, ``2m``; a bare number is milliseconds."""

Quantity = int | str
"""A Kubernetes resource quantity (``500m``, ``2Gi``, ``4``): int-or-string in the schema."""


class _Spec(BaseModel):
    """camelCase on the wire, snake_case in Python; unknown fields rejected."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True)


class ImagePullPolicy(StrEnum):
    ALWAYS = "Always"
    IF_NOT_PRESENT = "IfNotPresent"
    NEVER = "Never"


class ServiceType(StrEnum):
    CLUSTER_IP = "ClusterIP"
    NODE_PORT = "NodePort"
    LOAD_BALANCER = "LoadBalancer"


class ResourceRequirements(_Spec):
    """Container resources, as in a Pod spec (quantities: 500m, 2Gi)."""

    requests: dict[str, Quantity] = Field(default_factory=dict, description="Resources reserved (cpu, memory, ...).")
    limits: dict[str, Quantity] = Field(default_factory=dict, description="Resources not to exceed.")

    def to_kube(self, extra_limits: dict[str, Quantity] | None = None) -> dict[str, Any]:
        limits = {**self.limits, **(extra_limits or {})}
        out: dict[str, Any] = {}
        if self.requests:
            out["requests"] = dict(self.requests)
        if limits:
            out["limits"] = limits
        return out


class SecretKeyRef(_Spec):
    name: Annotated[str, Field(min_length=1, description="Secret in the pool's namespace.")]
    key: str = Field(default="api-key", description="Key inside the Secret that holds the API key.")


class ServiceSpec(_Spec):
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


class AdminPanelSpec(_Spec):
    """The balancer's web admin panel."""

    enabled: bool = Field(default=False, description="Serve the web admin panel on the inference Service.")


class ManagementAuthSpec(_Spec):
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
            "Secret (in the pool's namespace) holding the token under secretKey. Default: "
            "<pool>-management-token, which the operator creates with a random token and deletes with the pool."
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


class BalancerSpec(_Spec):
    """The pool's balancer: pods (replicas, all active) that buffer requests and route them to agent slots."""

    image: str = Field(default=DEFAULT_BALANCER_IMAGE, description="Balancer image (runs `paddler balancer`).")
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
        str, Field(pattern=DURATION_PATTERN, description="Longest wait in the buffer (duration: 10s, 500ms).")
    ] = "10s"
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


class Toleration(_Spec):
    """A Pod toleration."""

    key: str | None = Field(default=None, description="Taint key; empty with Exists matches every taint.")
    operator: Literal["Exists", "Equal"] | None = Field(default=None, description="Exists or Equal (default).")
    value: str | None = Field(default=None, description="Taint value (operator Equal).")
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(
        default=None, description="Taint effect to match; empty matches all."
    )
    toleration_seconds: int | None = Field(default=None, description="NoExecute: how long the pod stays (s).")

    def to_kube(self) -> dict[str, Any]:
        return self.model_dump(by_alias=True, exclude_none=True)


class PvcRef(_Spec):
    claim_name: Annotated[str, Field(min_length=1, description="A PersistentVolumeClaim in the pool's namespace.")]


class HostPathRef(_Spec):
    path: Annotated[str, Field(pattern=r"^/", description="A directory on the node (created if missing).")]


_ONE_CACHE_RULE = "!(has(self.persistentVolumeClaim) && has(self.hostPath))"
_ONE_CACHE_MESSAGE = "set at most one of persistentVolumeClaim, hostPath"


class ModelCacheSpec(_Spec):
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


class AgentDefaults(_Spec):
    """Agent pod defaults for every ModelDeployment of the pool."""

    image: str = Field(default=DEFAULT_AGENT_IMAGE, description="Agent image (runs `paddler agent`, llama.cpp).")
    image_pull_policy: ImagePullPolicy = Field(default=ImagePullPolicy.IF_NOT_PRESENT, description="Pull policy.")
    slots_per_agent: Annotated[int, Field(ge=1, le=256, description="Concurrent sequences per agent pod.")] = 4
    resources: ResourceRequirements = Field(
        default_factory=lambda: ResourceRequirements(requests={"cpu": "1", "memory": "1Gi"})
    )
    gpus: Annotated[int, Field(ge=0, description="GPUs per agent pod (added to limits).")] = 0
    gpu_resource_name: str = Field(default="nvidia.com/gpu", description="Extended resource name of a GPU.")
    node_selector: dict[str, str] = Field(default_factory=dict, description="Node labels agent pods require.")
    tolerations: list[Toleration] = Field(default_factory=list, description="Taints agent pods tolerate.")
    model_cache: ModelCacheSpec = Field(default_factory=ModelCacheSpec, description="Downloaded models' volume.")


class ModelAccessSpec(_Spec):
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


class LlmPoolSpec(_Spec):
    balancer: BalancerSpec = Field(default_factory=BalancerSpec, description="The pool's balancer.")
    agent: AgentDefaults = Field(default_factory=AgentDefaults, description="Defaults of every agent pod.")
    model_access: ModelAccessSpec = Field(default_factory=ModelAccessSpec, description="Allowed model sources.")


class PoolRef(_Spec):
    """A reference to an LlmPool."""

    name: Annotated[str, Field(min_length=1, description="An LlmPool in the same namespace.")]


class HuggingFaceSource(_Spec):
    """A GGUF file in a Hugging Face model repository."""

    repo_id: Annotated[str, Field(min_length=1, description="Repository, e.g. org/model-GGUF.")]
    filename: Annotated[str, Field(min_length=1, description="The GGUF file inside the repository.")]
    revision: str = Field(default="main", description="Branch, tag or commit.")


_ONE_SOURCE_RULE = "[has(self.huggingFace), has(self.url), has(self.localPath)].filter(x, x).size() == 1"
_ONE_SOURCE_MESSAGE = "exactly one of huggingFace, url, localPath must be set"


class ModelSourceSpec(_Spec):
    """Where agents get the GGUF file: exactly one of huggingFace, url, localPath."""

    model_config = ConfigDict(
        json_schema_extra={"x-kubernetes-validations": [{"rule": _ONE_SOURCE_RULE, "message": _ONE_SOURCE_MESSAGE}]}
    )

    hugging_face: HuggingFaceSource | None = None
    url: Annotated[str | None, Field(pattern=r"^(https?|file)://", description="Download URL of the GGUF.")] = None
    sha256: Annotated[str | None, Field(pattern=r"^[0-9a-f]{64}$", description="Checksum of the url download.")] = None
    local_path: Annotated[str | None, Field(min_length=1, description="A path that exists inside agent pods.")] = None

    @model_validator(mode="after")
    def _exactly_one(self) -> ModelSourceSpec:
        if sum(x is not None for x in (self.hugging_face, self.url, self.local_path)) != 1:
            raise ValueError(_ONE_SOURCE_MESSAGE)
        return self

    def to_core(self) -> ModelSource:
        if self.hugging_face is not None:
            hf = self.hugging_face
            return ModelSource(
                kind="HuggingFace",
                huggingface=HuggingFaceModelReference(repo_id=hf.repo_id, filename=hf.filename, revision=hf.revision),
            )
        if self.url is not None:
            return ModelSource(kind="Url", url=UrlModelReference(url=self.url, sha256=self.sha256))
        assert self.local_path is not None
        return ModelSource.local(self.local_path)


INFERENCE_PARAMETER_DOCS = {
    "nBatch": "Tokens per llama.cpp batch.",
    "contextSize": "Context window per agent (tokens), shared by its slots.",
    "embeddingBatchSize": "Inputs per embedding batch.",
    "enableEmbeddings": "Serve embeddings (the context is created with embeddings on).",
    "imageResizeToFit": "Largest image side (pixels) for multimodal models.",
    "kCacheDtype": "Data type of the K cache.",
    "vCacheDtype": "Data type of the V cache.",
    "minP": "Min-p sampling.",
    "nGpuLayers": "Layers offloaded to the GPU (0: CPU only).",
    "penaltyFrequency": "Frequency penalty.",
    "penaltyLastN": "Tokens the repeat penalties look back at (-1: the context).",
    "penaltyPresence": "Presence penalty.",
    "penaltyRepeat": "Repeat penalty.",
    "poolingType": "Embedding pooling.",
    "temperature": "Sampling temperature (0: greedy).",
    "topK": "Top-k sampling.",
    "topP": "Top-p (nucleus) sampling.",
}


def _describe_inference_parameters(schema: dict[str, Any]) -> None:
    for name, prop in schema.get("properties", {}).items():
        if name in INFERENCE_PARAMETER_DOCS:
            prop["description"] = INFERENCE_PARAMETER_DOCS[name]


class InferenceParametersSpec(InferenceParameters):
    """The model group's engine and sampling parameters (Paddler's defaults), camelCase."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        frozen=True,
        json_schema_extra=_describe_inference_parameters,
    )

    def to_core(self) -> InferenceParameters:
        return InferenceParameters.model_validate(self.model_dump())


class AutoscalingMode(StrEnum):
    NONE = "None"
    HPA = "HPA"
    KEDA = "KEDA"
    BUILTIN = "Builtin"


class KedaTrigger(StrEnum):
    METRICS_API = "metricsApi"
    """KEDA's metrics-api scaler reads the balancer's JSON (no Prometheus needed)."""
    PROMETHEUS = "prometheus"
    """KEDA's prometheus scaler queries a Prometheus that scrapes the balancer's /metrics."""


DEFAULT_PROMETHEUS_SERVER_ADDRESS = "http://prometheus.monitoring.svc:9090"


class KedaSpec(_Spec):
    """How KEDA reads the buffered-request gauge (``autoscaling.mode: KEDA``)."""

    trigger: KedaTrigger = Field(
        default=KedaTrigger.METRICS_API,
        description=(
            "metricsApi: the balancer's /api/v1/model_groups (per group); prometheus: "
            "sum(paddler_requests_buffered{model_group,namespace}) from prometheusServerAddress."
        ),
    )
    prometheus_server_address: str = Field(
        default=DEFAULT_PROMETHEUS_SERVER_ADDRESS,
        min_length=1,
        description="Prometheus base URL for the prometheus trigger (its series carry a namespace label).",
    )
    polling_interval_seconds: Annotated[
        int, Field(ge=1, description="How often KEDA reads the trigger: the 0 -> 1 step waits at most this long.")
    ] = 5


class AutoscalingSpec(_Spec):
    """Scale agent pods on buffered requests and busy slots."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    # has(): the CRD's own default ({}) is checked before nested defaults apply.
                    "rule": "!has(self.minReplicas) || !has(self.maxReplicas) || self.minReplicas <= self.maxReplicas",
                    "message": "minReplicas must be <= maxReplicas",
                }
            ]
        }
    )

    mode: AutoscalingMode = Field(
        default=AutoscalingMode.NONE, description="None: spec.replicas; HPA, KEDA or the operator's Builtin scaler."
    )
    min_replicas: Annotated[int, Field(ge=0, description="0 scales to zero; buffered requests wake it.")] = 1
    max_replicas: Annotated[int, Field(ge=1, description="Most agent pods.")] = 4
    target_buffered_requests: Annotated[
        int, Field(ge=1, description="Buffered requests per agent pod that trigger one more pod.")
    ] = 1
    target_slot_utilization: Annotated[
        int, Field(ge=1, le=100, description="Busy slots / total slots (percent) to keep below.")
    ] = 80
    scale_down_delay_seconds: Annotated[int, Field(ge=0, description="Idle time before scaling down (s).")] = 300
    keda: KedaSpec = Field(default_factory=KedaSpec, description="KEDA's trigger (mode KEDA only).")

    @model_validator(mode="after")
    def _bounds(self) -> AutoscalingSpec:
        if self.min_replicas > self.max_replicas:
            raise ValueError("minReplicas must be <= maxReplicas")
        return self


class RolloutSpec(_Spec):
    """Rolling updates: of the agent Deployment (pod template changes) and of the model group on the
    balancer (model, inference parameters or chat template changes: agents switch a few at a time)."""

    max_unavailable: Quantity = Field(
        default=1,
        description=(
            "Agents that stop serving at once during a rollout (int or %): pods of the agent Deployment, and "
            "agents switching to a new model on the balancer while the others keep serving the old one."
        ),
    )
    max_surge: Quantity = Field(default=0, description="Extra agent pods during a rollout (0 for scarce GPUs).")
    min_ready_seconds: Annotated[
        int,
        Field(
            ge=0,
            description=(
                "Seconds a new agent pod must stay Ready (linked to a balancer, model loaded, slots) before it "
                "counts as available (the Deployment's minReadySeconds): a pod-template rollout replaces the next "
                "agents only after that."
            ),
        ),
    ] = 5
    drain_timeout_seconds: Annotated[
        int,
        Field(
            ge=0,
            description=(
                "Longest time (s) a stopping agent pod finishes its in-flight requests (the agent's "
                "--drain-timeout); the pod's termination grace period is this plus 10 s."
            ),
        ),
    ] = 60


class DisruptionSpec(_Spec):
    """Voluntary disruptions of agent pods (node drains, evictions): a PodDisruptionBudget ``<name>-agent``."""

    max_unavailable: Quantity = Field(
        default=1,
        description=(
            "Agent pods that may be unavailable at once (int or %) while evictions go on; a pod that is not "
            "Ready counts as unavailable, so a drain waits for replaced agents to load their model. 0 blocks "
            "every eviction of this deployment's agents."
        ),
    )


class EngineKind(StrEnum):
    LLAMA = "llama"
    """The agent's built-in llama.cpp engine (the agent image)."""
    LLAMA_SERVER = "llamaServer"
    """llama.cpp's own llama-server in a container beside the agent, in the same pod."""


class LlamaServerSpec(_Spec):
    """The llama-server container of each agent pod (``engine: llamaServer``).

    The operator starts it with ``--host 127.0.0.1 --port PORT --parallel SLOTS``, the
    model (``--model``, ``--hf-repo``/``--hf-file`` or ``--model-url``), ``--ctx-size``,
    ``--batch-size``, ``--n-gpu-layers`` and embeddings from the inference parameters,
    then ``args``. The agent container beside it forwards to it and needs no llama.cpp.
    """

    image: str = Field(default=DEFAULT_LLAMA_SERVER_IMAGE, description="Image whose entrypoint is llama-server.")
    image_pull_policy: ImagePullPolicy = Field(default=ImagePullPolicy.IF_NOT_PRESENT, description="Pull policy.")
    args: list[str] = Field(
        default_factory=list, description="Extra llama-server flags, after the ones the operator sets."
    )
    port: Annotated[int, Field(ge=1, le=65535, description="Port llama-server listens on (pod loopback only).")] = (
        LLAMA_SERVER_PORT
    )
    resources: ResourceRequirements | None = Field(
        default=None, description="The server container's resources (default: the agent resources)."
    )
    gpus: Annotated[
        int | None, Field(ge=0, description="GPUs on the server container (default: the pool's agent.gpus).")
    ] = None


class ModelDeploymentSpec(_Spec):
    pool_ref: PoolRef = Field(description="The LlmPool whose balancer serves this model.")
    model: ModelSourceSpec
    engine: EngineKind = Field(
        default=EngineKind.LLAMA,
        description="llama: the agent's built-in llama.cpp; llamaServer: a llama-server container beside the agent.",
    )
    llama_server: LlamaServerSpec = Field(
        default_factory=LlamaServerSpec, description="The llama-server container (engine: llamaServer)."
    )
    inference_parameters: InferenceParametersSpec = Field(
        default_factory=InferenceParametersSpec, description="Engine and sampling parameters of the model group."
    )
    chat_template: str | None = Field(default=None, description="Jinja chat template that overrides the GGUF's.")
    multimodal_projection: ModelSourceSpec | None = Field(
        default=None,
        description="Multimodal projector GGUF (mmproj) that lets the model take images; same sources as model.",
    )
    replicas: Annotated[int, Field(ge=0, description="Agent pods (when autoscaling.mode is None).")] = 1
    slots_per_agent: Annotated[int | None, Field(ge=1, le=256, description="Overrides the pool's default.")] = None
    resources: ResourceRequirements | None = Field(default=None, description="Overrides the pool's agent resources.")
    autoscaling: AutoscalingSpec = Field(default_factory=AutoscalingSpec, description="Agent pod autoscaling.")
    rollout: RolloutSpec = Field(default_factory=RolloutSpec, description="Rolling updates of the agent pods.")
    disruption: DisruptionSpec = Field(
        default_factory=DisruptionSpec, description="Evictions of agent pods (the PodDisruptionBudget)."
    )
    startup_timeout_seconds: Annotated[
        int,
        Field(
            ge=10,
            description=(
                "Longest time (s) an agent pod may take from its start to the end of its first desired-state "
                "application (model downloaded and loaded, or failed with an issue) before the kubelet restarts "
                "it (the agent's startup probe). Raise it for large models on slow links."
            ),
        ),
    ] = 600

    def desired_state(self) -> BalancerDesiredState:
        """What the balancer pushes to this deployment's agents (its model group)."""
        return BalancerDesiredState(
            model=self.model.to_core(),
            inference_parameters=self.inference_parameters.to_core(),
            chat_template_override=ChatTemplate(content=self.chat_template) if self.chat_template else None,
            use_chat_template_override=self.chat_template is not None,
            multimodal_projection=(
                self.multimodal_projection.to_core() if self.multimodal_projection is not None else ModelSource.none()
            ),
        )


# --- status -----------------------------------------------------------------------


class Condition(_Spec):
    """A Kubernetes-style condition (Ready, Progressing, Degraded)."""

    type: str
    status: Literal["True", "False", "Unknown"]
    reason: str = ""
    message: str = ""
    last_transition_time: str | None = None
    observed_generation: int | None = None


class _StatusBase(_Spec):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore", frozen=True)

    observed_generation: int | None = None
    conditions: Annotated[
        list[Condition],
        Field(json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]}),
    ] = Field(default_factory=list)
    ready_agents: int = 0
    agents: int = 0
    slots_free: int = 0
    slots_total: int = 0
    slots: str = Field(default="0/0", description="Free/total slots, for printer columns.")
    buffered_requests: int = 0


class LlmPoolStatus(_StatusBase):
    inference_url: str | None = None
    management_url: str | None = None
    model_deployments: int = 0
    balancer_replicas: int = Field(default=0, description="Balancer pods asked for (spec.balancer.replicas).")
    balancer_ready_replicas: int = Field(default=0, description="Balancer pods Ready (the Deployment's count).")
    balancers: str = Field(default="0/0", description="Ready/desired balancer pods, for printer columns.")
    balancer_replicas_reached: int = Field(
        default=0, description="Balancer replicas whose management API answered the operator's last pass."
    )


class ModelDeploymentStatus(_StatusBase):
    replicas: int = Field(default=0, description="Agent pods the operator asks for.")
    agents_summary: str = Field(default="0/0", description="Ready agents / desired replicas.")
    model: str | None = Field(default=None, description="The model source, in short.")
    desired_state_applied: bool = False
    pool: str | None = Field(default=None, description="The pool whose balancer holds this model group's state.")
    low_demand_since: str | None = Field(
        default=None,
        description=(
            "Builtin autoscaler: since when (RFC 3339) fewer agents would do; kept here so that an operator "
            "restart does not restart the scale-down delay."
        ),
    )


class LlmPool(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    spec: LlmPoolSpec = Field(default_factory=LlmPoolSpec)
    status: LlmPoolStatus = Field(default_factory=LlmPoolStatus)


class ModelDeployment(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    spec: ModelDeploymentSpec
    status: ModelDeploymentStatus = Field(default_factory=ModelDeploymentStatus)
