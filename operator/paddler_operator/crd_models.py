"""The custom resources ``LlmPool`` and ``ModelDeployment`` (paddler.dev/v1alpha1): what
both share (API group, ports, images, the spec base, statuses). Each kind's spec is in
:mod:`~paddler_operator.crd_pool` and :mod:`~paddler_operator.crd_model_deployment`.

These pydantic models are the single source of truth: the operator parses
custom resources with them, and ``python -m paddler_operator.gen_crds``
generates the CRD OpenAPI schemas in ``crds/`` (and the Helm chart) from them.
Field names are camelCase on the wire (Kubernetes convention) and snake_case in
Python. Every field has a default, except ``ModelDeployment.spec.poolRef`` and
``ModelDeployment.spec.model``: ``spec: {}`` is a valid ``LlmPool``.

Parsing is tolerant: a field the operator does not know (a CRD newer than the operator)
is ignored, so an upgrade of the CRDs before the operator never stops reconciling. The
schemas stay closed all the same: the API server prunes fields the installed CRD does not
declare (``gen_crds`` emits no ``additionalProperties`` for a closed model either way).

Images are not in the schema's defaults (the API server would store a default on create,
and pools would keep it across operator upgrades): an unset image is the operator's
(:class:`Images`, from its ``--*-image`` flags); see :func:`resolve_image`.

Rules that the API server must enforce beyond types (exactly one model source,
``minReplicas <= maxReplicas``) are CEL ``x-kubernetes-validations`` attached
with ``json_schema_extra`` and mirrored by pydantic validators, so the operator
never trusts what the API server may not have checked (e.g. an older CRD).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

GROUP = "paddler.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"

DEFAULT_BALANCER_IMAGE = "ghcr.io/paddler-k8s/balancer:0.2.0"
DEFAULT_AGENT_IMAGE = "ghcr.io/paddler-k8s/agent:0.2.0"
DEFAULT_LLAMA_SERVER_IMAGE = "ghcr.io/paddler-k8s/llama-server:0.2.0"
PREVIOUS_SCHEMA_DEFAULT_IMAGES = (
    "ghcr.io/paddler-k8s/balancer:0.1.0",
    "ghcr.io/paddler-k8s/agent:0.1.0",
    "ghcr.io/paddler-k8s/llama-server:0.1.0",
)
"""Images that CRDs up to 0.1.0 wrote into every new object as schema defaults: the API server
stored them, so such an image in a spec means "unset", not a user's choice (see :func:`resolve_image`)."""
IMAGE_FIELD_NOTE = (
    "Unset: the operator's image (its --{flag} flag), which follows operator upgrades. "
    "An image that an older CRD stored as its default (ghcr.io/paddler-k8s/*:0.1.0) counts as unset."
)
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


@dataclass(frozen=True)
class Images:
    """The operator's images, used where a spec leaves ``image`` unset (``--balancer-image``,
    ``--agent-image``, ``--llama-server-image``, ``--image-registry``)."""

    balancer: str = DEFAULT_BALANCER_IMAGE
    agent: str = DEFAULT_AGENT_IMAGE
    llama_server: str = DEFAULT_LLAMA_SERVER_IMAGE

    def with_registry(self, registry: str | None) -> Images:
        """The built-in default images moved to ``registry`` (a host[:port], optionally with a path);
        an image the operator was given by flag keeps its registry."""
        if not registry:
            return self
        return Images(
            balancer=_moved(self.balancer, DEFAULT_BALANCER_IMAGE, registry),
            agent=_moved(self.agent, DEFAULT_AGENT_IMAGE, registry),
            llama_server=_moved(self.llama_server, DEFAULT_LLAMA_SERVER_IMAGE, registry),
        )


DEFAULT_IMAGES = Images()
"""The built-in images (the operator's flags' defaults)."""


def _moved(image: str, builtin: str, registry: str) -> str:
    if image != builtin:
        return image
    return f"{registry.rstrip('/')}/{builtin.split('/', 1)[1]}"


def resolve_image(written: str | None, operator_default: str) -> str:
    """The image a container runs: the spec's as written, else the operator's. An image equal to
    a previous schema default counts as unset: pools created under the old CRD follow the operator."""
    if written is None or written in PREVIOUS_SCHEMA_DEFAULT_IMAGES:
        return operator_default
    return written


class CrdSpec(BaseModel):
    """camelCase on the wire, snake_case in Python; unknown fields ignored (a CRD newer than the
    operator must not stop reconciling; the API server already prunes fields its CRD lacks)."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore", frozen=True)


class ImagePullPolicy(StrEnum):
    ALWAYS = "Always"
    IF_NOT_PRESENT = "IfNotPresent"
    NEVER = "Never"


class ServiceType(StrEnum):
    CLUSTER_IP = "ClusterIP"
    NODE_PORT = "NodePort"
    LOAD_BALANCER = "LoadBalancer"


class ResourceRequirements(CrdSpec):
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


class SecretKeyRef(CrdSpec):
    name: Annotated[str, Field(min_length=1, description="Secret in the pool's namespace.")]
    key: str = Field(default="api-key", description="Key inside the Secret that holds the API key.")


# --- status -----------------------------------------------------------------------


class Condition(CrdSpec):
    """A Kubernetes-style condition (Ready, Progressing, Degraded)."""

    type: str
    status: Literal["True", "False", "Unknown"]
    reason: str = ""
    message: str = ""
    last_transition_time: str | None = None
    observed_generation: int | None = None


class _StatusBase(CrdSpec):
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
