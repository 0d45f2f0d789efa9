"""Desired state that the balancer pushes to agents (Paddler 4.x JSON shapes).

The JSON shapes follow Rust serde's externally tagged enums, exactly as the
`paddler-client` package reads and writes them:

* model source: ``"None"`` | ``{"HuggingFace": {...}}`` | ``{"LocalToAgent": "/p"}`` |
  ``{"Url": {"url": "..."}}``
* normalisation: ``"None"`` | ``"L2"`` | ``{"RmsNorm": {"epsilon": 1e-6}}``
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_serializer, model_validator

DEFAULT_MODEL_GROUP = "default"


class _Strict(BaseModel):
    # Finite floats only: ``1e999`` parses as inf, which JSON cannot carry back.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


# Upper bounds of the inference parameters. The balancer rejects a desired state
# beyond them (400) and the agent refuses one (an issue), so no value can make an
# agent allocate until the kernel kills it.
MAX_CONTEXT_SIZE = 1 << 20
"""Tokens of context (1,048,576; the largest context of current GGUF models)."""
MAX_BATCH_SIZE = 1 << 16
"""Tokens per llama_decode call (n_batch, embedding_batch_size)."""
MAX_IMAGE_SIDE = 16384
MAX_GPU_LAYERS = 100_000
"""``n_gpu_layers`` larger than a model's layer count means "all"; any such value works."""
MAX_TOP_K = 1 << 20
MAX_PENALTY_LAST_N = MAX_CONTEXT_SIZE
MAX_PENALTY_REPEAT = 100.0
MAX_STOP_SEQUENCES = 64
MAX_STOP_LENGTH = 1024
SEED_RANGE = (-(1 << 63), (1 << 64) - 1)
StopSequence = Annotated[str, Field(max_length=MAX_STOP_LENGTH)]


class KvCacheDtype(StrEnum):
    F32 = "F32"
    F16 = "F16"
    BF16 = "BF16"
    Q8_0 = "Q8_0"
    Q4_0 = "Q4_0"
    Q4_1 = "Q4_1"
    IQ4_NL = "IQ4_NL"
    Q5_0 = "Q5_0"
    Q5_1 = "Q5_1"


class PoolingType(StrEnum):
    UNSPECIFIED = "Unspecified"
    NONE = "None"
    MEAN = "Mean"
    CLS = "Cls"
    LAST = "Last"
    RANK = "Rank"


class HuggingFaceModelReference(_Strict):
    repo_id: Annotated[str, Field(min_length=1)]
    filename: Annotated[str, Field(min_length=1)]
    revision: str = "main"


class UrlModelReference(_Strict):
    url: Annotated[str, Field(pattern=r"^(https?|file)://")]
    sha256: Annotated[str | None, Field(pattern=r"^[0-9a-f]{64}$")] = None
    """Optional checksum; a download that does not match becomes an agent issue."""


class ModelSource(BaseModel):
    """Where an agent gets its GGUF file. Exactly one variant is set."""

    model_config = ConfigDict(frozen=True)

    kind: Literal["None", "HuggingFace", "LocalToAgent", "Url"] = "None"
    huggingface: HuggingFaceModelReference | None = None
    local_path: str | None = None
    url: UrlModelReference | None = None

    @model_validator(mode="before")
    @classmethod
    def _from_serde(cls, data: Any) -> Any:
        if isinstance(data, ModelSource):
            return data
        if data == "None" or data is None:
            return {"kind": "None"}
        if isinstance(data, dict):
            if "kind" in data:
                return data
            if len(data) != 1:
                raise ValueError('model must be "None" or an object with exactly one of HuggingFace, LocalToAgent, Url')
            ((key, value),) = data.items()
            if key == "HuggingFace":
                return {"kind": key, "huggingface": value}
            if key == "LocalToAgent":
                if not isinstance(value, str) or not value:
                    raise ValueError("LocalToAgent must be a non-empty path string")
                return {"kind": key, "local_path": value}
            if key == "Url":
                return {"kind": key, "url": value}
            raise ValueError(f"unknown model source {key!r}; expected HuggingFace, LocalToAgent or Url")
        raise ValueError(f"invalid model source: {data!r}")

    @model_serializer
    def _to_serde(self) -> str | dict[str, Any]:
        if self.kind == "HuggingFace" and self.huggingface is not None:
            return {"HuggingFace": self.huggingface.model_dump()}
        if self.kind == "LocalToAgent" and self.local_path is not None:
            return {"LocalToAgent": self.local_path}
        if self.kind == "Url" and self.url is not None:
            return {"Url": self.url.model_dump(exclude_none=True)}
        return "None"

    @classmethod
    def none(cls) -> ModelSource:
        return cls(kind="None")

    @classmethod
    def local(cls, path: str) -> ModelSource:
        return cls(kind="LocalToAgent", local_path=path)

    @property
    def is_none(self) -> bool:
        return self.kind == "None"

    def describe(self) -> str:
        """A short human label, e.g. for logs and printer columns."""
        if self.kind == "HuggingFace" and self.huggingface is not None:
            return f"{self.huggingface.repo_id}/{self.huggingface.filename}"
        if self.kind == "LocalToAgent" and self.local_path is not None:
            return self.local_path
        if self.kind == "Url" and self.url is not None:
            return self.url.url
        return "none"


class InferenceParameters(_Strict):
    """Engine and sampling parameters of a model group (Paddler's defaults)."""

    n_batch: Annotated[int, Field(ge=1, le=MAX_BATCH_SIZE)] = 2048
    context_size: Annotated[int, Field(ge=16, le=MAX_CONTEXT_SIZE)] = 8192
    embedding_batch_size: Annotated[int, Field(ge=1, le=MAX_BATCH_SIZE)] = 256
    enable_embeddings: bool = False
    image_resize_to_fit: Annotated[int, Field(ge=1, le=MAX_IMAGE_SIDE)] = 1024
    k_cache_dtype: KvCacheDtype = KvCacheDtype.Q8_0
    v_cache_dtype: KvCacheDtype = KvCacheDtype.Q8_0
    min_p: Annotated[float, Field(ge=0.0, le=1.0)] = 0.05
    n_gpu_layers: Annotated[int, Field(ge=0, le=MAX_GPU_LAYERS)] = 0
    penalty_frequency: Annotated[float, Field(ge=-2.0, le=2.0)] = 0.0
    penalty_last_n: Annotated[int, Field(ge=-1, le=MAX_PENALTY_LAST_N)] = -1
    penalty_presence: Annotated[float, Field(ge=-2.0, le=2.0)] = 0.8
    penalty_repeat: Annotated[float, Field(ge=0.0, le=MAX_PENALTY_REPEAT)] = 1.1
    pooling_type: PoolingType = PoolingType.LAST
    temperature: Annotated[float, Field(ge=0.0, le=100.0)] = 0.8
    top_k: Annotated[int, Field(ge=0, le=MAX_TOP_K)] = 80
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] = 0.8


class SamplingOverrides(_Strict):
    """Per-request overrides of the group's sampling parameters.

    Paddler ignores per-request sampling; we carry it on the wire so the OpenAI
    API can honour ``temperature``, ``top_p``, ``seed`` and friends.
    """

    temperature: Annotated[float | None, Field(ge=0.0, le=100.0)] = None
    top_k: Annotated[int | None, Field(ge=0, le=MAX_TOP_K)] = None
    top_p: Annotated[float | None, Field(gt=0.0, le=1.0)] = None
    min_p: Annotated[float | None, Field(ge=0.0, le=1.0)] = None
    penalty_repeat: Annotated[float | None, Field(ge=0.0, le=MAX_PENALTY_REPEAT)] = None
    penalty_presence: Annotated[float | None, Field(ge=-2.0, le=2.0)] = None
    penalty_frequency: Annotated[float | None, Field(ge=-2.0, le=2.0)] = None
    penalty_last_n: Annotated[int | None, Field(ge=-1, le=MAX_PENALTY_LAST_N)] = None
    seed: Annotated[int | None, Field(ge=SEED_RANGE[0], le=SEED_RANGE[1])] = None
    stop: Annotated[list[StopSequence] | None, Field(max_length=MAX_STOP_SEQUENCES)] = None

    def apply(self, base: InferenceParameters) -> InferenceParameters:
        """The group's parameters with this request's overrides on top."""
        changes = {k: v for k, v in self.model_dump(exclude_none=True).items() if k in InferenceParameters.model_fields}
        return base.model_copy(update=changes) if changes else base


class ChatTemplate(_Strict):
    content: str


class BalancerDesiredState(BaseModel):
    """What every agent of one model group should serve (Paddler's JSON)."""

    model_config = ConfigDict(extra="forbid")

    chat_template_override: ChatTemplate | None = None
    inference_parameters: InferenceParameters = Field(default_factory=InferenceParameters)
    model: ModelSource = Field(default_factory=ModelSource.none)
    multimodal_projection: ModelSource = Field(default_factory=ModelSource.none)
    use_chat_template_override: bool = False

    def to_json_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def state_revision(state: BalancerDesiredState) -> str:
    """A short content hash of ``state``: equal states have equal revisions.

    The balancer sends it with ``set_desired_state``; the agent reports it back as
    ``applied_state_revision`` once it has finished applying that state."""
    canonical = json.dumps(state.to_json_dict(), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


class StateOffer(StrEnum):
    """What an agent does with a ``set_desired_state`` (see :func:`judge_state_offer`)."""

    APPLY = "Apply"
    """Newer and different: apply it (download, load or swap)."""
    ADOPT_VERSION = "AdoptVersion"
    """Newer but the same content: take its version, reload nothing."""
    IGNORE_OLDER = "IgnoreOlder"
    """Not newer than what the agent holds (a replica restarted empty or with a stale
    state file): ignore it, keep serving."""


def next_state_version(stored: int | None, now_ms: int) -> int:
    """The version a balancer stamps on a state that differs from its stored one:
    milliseconds since the epoch, and always above the stored version. Versions only
    grow, so a replica with an older state can never make agents go back to it; and a
    state written later, on whichever replica, wins."""
    return max((stored or 0) + 1, now_ms)


def judge_state_offer(
    held: BalancerDesiredState | None,
    held_version: int | None,
    offered: BalancerDesiredState,
    offered_version: int | None,
) -> StateOffer:
    """Pure: the agent's decision on a desired state offered by one balancer replica.

    ``offered_version`` None is a balancer that stamps no versions (older releases): the
    content alone decides, as before versions existed. An agent that holds nothing takes
    any state. Equal versions of different content (two replicas written in the same
    millisecond) are ordered by revision, the same way on every agent."""
    if held is None:
        return StateOffer.APPLY
    if offered_version is not None and held_version is not None:
        if offered_version < held_version:
            return StateOffer.IGNORE_OLDER
        if offered_version == held_version:
            # Two replicas stamped different states in the same millisecond: every agent
            # keeps the one with the larger revision, so the pool never splits between them.
            if offered == held or state_revision(offered) <= state_revision(held):
                return StateOffer.IGNORE_OLDER
            return StateOffer.APPLY
    if offered == held:
        return StateOffer.ADOPT_VERSION
    return StateOffer.APPLY


_MAX_UNAVAILABLE = re.compile(r"^\s*(\d+)\s*(%)?\s*$")


@dataclass(frozen=True)
class MaxUnavailable:
    """How many agents of a model group may stop serving at once while a new desired
    state rolls over them: a count (``2``) or a share of the group (``25%``, rounded
    down, as Kubernetes does). At least one agent always switches, or nothing would."""

    value: int
    percent: bool = False

    @classmethod
    def parse(cls, text: str | int) -> MaxUnavailable:
        match = _MAX_UNAVAILABLE.match(str(text))
        if match is None:
            raise ValueError(f"invalid max unavailable {text!r}; use a count (1, 2) or a percentage (25%)")
        value, percent = int(match.group(1)), match.group(2) is not None
        if percent and value > 100:
            raise ValueError(f"invalid max unavailable {text!r}; a percentage is at most 100%")
        return cls(value, percent)

    def count(self, agents: int) -> int:
        """Agents that may switch at once in a group of ``agents``."""
        allowed = agents * self.value // 100 if self.percent else self.value
        return max(1, allowed)

    def __str__(self) -> str:
        return f"{self.value}%" if self.percent else str(self.value)


class EmbeddingNormalizationMethod(BaseModel):
    model_config = ConfigDict(frozen=True, allow_inf_nan=False)

    kind: Literal["None", "L2", "RmsNorm"] = "None"
    epsilon: Annotated[float | None, Field(ge=0.0, le=1.0)] = None

    @model_validator(mode="before")
    @classmethod
    def _from_serde(cls, data: Any) -> Any:
        if isinstance(data, EmbeddingNormalizationMethod):
            return data
        if data == {}:  # constructed without arguments: the default, "None"
            return data
        if data in ("None", "L2"):
            return {"kind": data}
        if isinstance(data, dict):
            if "kind" in data:
                return data
            inner = data.get("RmsNorm")
            if isinstance(inner, dict) and isinstance(inner.get("epsilon"), int | float):
                return {"kind": "RmsNorm", "epsilon": inner["epsilon"]}
        raise ValueError('normalization_method must be "None", "L2" or {"RmsNorm": {"epsilon": x}}')

    @model_validator(mode="after")
    def _rms_norm_has_epsilon(self) -> EmbeddingNormalizationMethod:
        if self.kind == "RmsNorm" and self.epsilon is None:
            raise ValueError('RmsNorm needs an epsilon: {"RmsNorm": {"epsilon": x}}')
        return self

    @model_serializer
    def _to_serde(self) -> str | dict[str, Any]:
        if self.kind == "RmsNorm":
            return {"RmsNorm": {"epsilon": self.epsilon}}
        return self.kind
