"""``ModelDeployment`` (paddler.dev/v1alpha1): the model, its inference parameters,
autoscaling, rollout, disruption and engine, and the whole object (spec + status).
Conventions: :mod:`paddler_operator.crd_models`.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic.alias_generators import to_camel

from paddler_core.desired_state import (
    BalancerDesiredState,
    ChatTemplate,
    HuggingFaceModelReference,
    InferenceParameters,
    ModelSource,
    UrlModelReference,
)
from paddler_operator.crd_models import (
    IMAGE_FIELD_NOTE,
    LLAMA_SERVER_PORT,
    CrdSpec,
    ImagePullPolicy,
    ModelDeploymentStatus,
    Quantity,
    ResourceRequirements,
)
from paddler_operator.crd_pod import PodSettings


class PoolRef(CrdSpec):
    """A reference to an LlmPool."""

    name: Annotated[str, Field(min_length=1, description="An LlmPool in the same namespace.")]


class HuggingFaceSource(CrdSpec):
    """A GGUF file in a Hugging Face model repository."""

    repo_id: Annotated[str, Field(min_length=1, description="Repository, e.g. org/model-GGUF.")]
    filename: Annotated[str, Field(min_length=1, description="The GGUF file inside the repository.")]
    revision: str = Field(default="main", description="Branch, tag or commit.")


_ONE_SOURCE_RULE = "[has(self.huggingFace), has(self.url), has(self.localPath)].filter(x, x).size() == 1"
_ONE_SOURCE_MESSAGE = "exactly one of huggingFace, url, localPath must be set"


class ModelSourceSpec(CrdSpec):
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
        extra="ignore",
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


class KedaSpec(CrdSpec):
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


class AutoscalingSpec(CrdSpec):
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


class RolloutSpec(CrdSpec):
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


class DisruptionSpec(CrdSpec):
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


class LlamaServerSpec(CrdSpec):
    """The llama-server container of each agent pod (``engine: llamaServer``).

    The operator starts it with ``--host 127.0.0.1 --port PORT --parallel SLOTS``, the
    model (``--model``, ``--hf-repo``/``--hf-file`` or ``--model-url``), ``--ctx-size``,
    ``--batch-size``, ``--n-gpu-layers`` and embeddings from the inference parameters,
    then ``args``. The agent container beside it forwards to it and needs no llama.cpp.
    """

    image: str | None = Field(
        default=None,
        min_length=1,
        description="Image whose entrypoint is llama-server. " + IMAGE_FIELD_NOTE.format(flag="llama-server-image"),
    )
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


class ModelDeploymentSpec(CrdSpec):
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
    pod: PodSettings = Field(
        default_factory=PodSettings,
        description="Fields of this deployment's agent pods, over the pool's agent.pod: a field set here "
        "replaces the pool's, except labels, annotations, nodeSelector (merged by key) and env (merged by name).",
    )

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


class ModelDeployment(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    spec: ModelDeploymentSpec
    status: ModelDeploymentStatus = Field(default_factory=ModelDeploymentStatus)
