"""Pod settings (``spec.balancer.pod``, ``spec.agent.pod`` of an LlmPool, ``spec.pod`` of a
ModelDeployment): what real clusters need on the pods the operator renders (env and Secrets,
pull secrets, scheduling, extra volumes, security contexts), and a strategic merge patch of
the pod template for everything else.

The big Kubernetes types (affinity, volumes, security contexts, ...) are free-form objects
(``x-kubernetes-preserve-unknown-fields``): copying their schemas would freeze one Kubernetes
version into the CRD; the API server validates them when it creates the pods. What is cheap to
type is typed (an env item needs ``name``, a volume ``name``, a mount ``name`` and ``mountPath``).

Merge rule (:meth:`PodSettings.overlay`): a ModelDeployment's field replaces the pool's
``agent.pod`` field, except ``labels``, ``annotations`` and ``nodeSelector`` (merged by key) and
``env`` (merged by name). Rendering: :func:`apply_pod_settings`.
"""

from __future__ import annotations

import copy
from collections.abc import Collection, Mapping
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, ConfigDict, Field, WithJsonSchema, field_validator, model_validator

from paddler_operator.crd_models import CrdSpec
from paddler_operator.objects import Obj
from paddler_operator.strategic_merge import check_patch, strategic_merge

RESERVED_LABELS = (
    "paddler.dev/pool",
    "paddler.dev/component",
    "paddler.dev/model-deployment",
    "app.kubernetes.io/name",
    "app.kubernetes.io/instance",
    "app.kubernetes.io/managed-by",
    "app.kubernetes.io/part-of",
)
"""Labels the operator puts on its pods: Deployments, Services, PodDisruptionBudgets (and the
monitoring and network objects) select pods by them, so pod settings may not set them."""
_RESERVED_LABELS_RULE = " && ".join(f"!('{key}' in self)" for key in RESERVED_LABELS)
"""One map lookup per key (not ``self.all(...)`` over the keys): cheap in the API server's CEL cost budget."""
_RESERVED_LABELS_MESSAGE = (
    "labels may not set the operator's own labels (" + ", ".join(RESERVED_LABELS) + "): its Deployments, "
    "Services and PodDisruptionBudgets select pods by them"
)


def _free_schema(**required: str) -> dict[str, Any]:
    """A free-form Kubernetes object in the schema (``x-kubernetes-preserve-unknown-fields``), with
    the ``required`` string fields (name -> description) typed."""
    schema: dict[str, Any] = {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
    if required:
        schema["required"] = list(required)
        schema["properties"] = {name: {"type": "string", "description": text} for name, text in required.items()}
    return schema


def _requires(*names: str) -> AfterValidator:
    """The operator's side of a free-form object's ``required`` (an older CRD may not have checked it)."""

    def check(value: dict[str, Any]) -> dict[str, Any]:
        for name in names:
            if not isinstance(value.get(name), str) or not value[name]:
                raise ValueError(f"{name} is required")
        return value

    return AfterValidator(check)


FreeObject = Annotated[dict[str, Any], WithJsonSchema(_free_schema())]
Volume = Annotated[
    dict[str, Any],
    WithJsonSchema(_free_schema(name="Volume name, unique in the pod (what a volumeMount names).")),
    _requires("name"),
]
VolumeMount = Annotated[
    dict[str, Any],
    WithJsonSchema(_free_schema(name="A volume of the pod.", mountPath="Where the container sees it.")),
    _requires("name", "mountPath"),
]


_ONE_ENV_SOURCE_RULE = "!(has(self.value) && has(self.valueFrom))"
_ONE_ENV_SOURCE_MESSAGE = "set at most one of value, valueFrom"


class EnvVar(CrdSpec):
    """An environment variable, as in a container spec."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [{"rule": _ONE_ENV_SOURCE_RULE, "message": _ONE_ENV_SOURCE_MESSAGE}]
        }
    )

    name: Annotated[str, Field(min_length=1, description="Variable name.")]
    value: str | None = Field(default=None, description="Its value ($(VAR) references expand as in a Pod).")
    value_from: FreeObject | None = Field(
        default=None, description="secretKeyRef, configMapKeyRef, fieldRef or resourceFieldRef, as in a Pod."
    )

    @model_validator(mode="after")
    def _one_source(self) -> EnvVar:
        if self.value is not None and self.value_from is not None:
            raise ValueError(_ONE_ENV_SOURCE_MESSAGE)
        return self

    def to_kube(self) -> dict[str, Any]:
        return self.model_dump(by_alias=True, exclude_none=True)


class LocalObjectReference(CrdSpec):
    """An object in the same namespace, by name."""

    name: Annotated[str, Field(min_length=1, description="Its name.")]


class Toleration(CrdSpec):
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


_MAIN = "the main containers (balancer pods: balancer; agent pods: agent and llama-server)"


class PodSettings(CrdSpec):
    """Pod fields the operator passes through to the pods it renders. A ModelDeployment's value
    replaces the pool's agent.pod value, except labels, annotations, nodeSelector (merged by key)
    and env (merged by name); podTemplatePatch is applied last."""

    env: list[EnvVar] | None = Field(
        default=None,
        description=f"Environment of {_MAIN} (HF_TOKEN from a Secret, HTTPS_PROXY, ...); a variable of the "
        "operator's with the same name is replaced. A ModelDeployment's env merges into the pool's by name.",
    )
    env_from: list[FreeObject] | None = Field(
        default=None, description=f"envFrom of {_MAIN}: secretRef / configMapRef sources, as in a Pod."
    )
    image_pull_secrets: list[LocalObjectReference] | None = Field(
        default=None, description="Secrets to pull the pod's images with (a private registry)."
    )
    priority_class_name: str | None = Field(default=None, description="The pod's PriorityClass.")
    node_selector: dict[str, str] | None = Field(
        default=None,
        description="Node labels the pod requires; merged by key over agent.nodeSelector and the pool's value.",
    )
    tolerations: list[Toleration] | None = Field(
        default=None, description="Taints the pod tolerates (replaces agent.tolerations when set)."
    )
    affinity: FreeObject | None = Field(default=None, description="The pod's affinity, as in a Pod.")
    topology_spread_constraints: list[FreeObject] | None = Field(
        default=None,
        description="Replaces the operator's spread (at most one more pod of a Deployment on any node, "
        "ScheduleAnyway); [] turns it off.",
    )
    runtime_class_name: str | None = Field(default=None, description="The pod's RuntimeClass (e.g. nvidia).")
    labels: dict[str, str] | None = Field(
        default=None,
        description="Pod labels, merged by key with the pool's. The operator's own labels are refused.",
        json_schema_extra={
            "x-kubernetes-validations": [{"rule": _RESERVED_LABELS_RULE, "message": _RESERVED_LABELS_MESSAGE}]
        },
    )
    annotations: dict[str, str] | None = Field(
        default=None, description="Pod annotations, merged by key with the pool's."
    )
    volumes: list[Volume] | None = Field(
        default=None,
        description="Extra pod volumes, as in a Pod; one named like the operator's (models, tmp) replaces it.",
    )
    volume_mounts: list[VolumeMount] | None = Field(
        default=None, description=f"Extra mounts of {_MAIN}; one at the operator's mountPath replaces it."
    )
    pod_security_context: FreeObject | None = Field(
        default=None,
        description="Replaces the operator's pod securityContext (runAsNonRoot, fsGroup 10001, seccomp "
        "RuntimeDefault) as a whole: e.g. {runAsNonRoot: true} lets OpenShift's restricted policy pick the uid.",
    )
    security_context: FreeObject | None = Field(
        default=None,
        description=f"Replaces the securityContext of {_MAIN} as a whole (the operator's: uid/gid 10001, "
        "read-only root, no privilege escalation, no capabilities); leave runAsUser out on OpenShift.",
    )
    pod_template_patch: FreeObject | None = Field(
        default=None,
        description="A strategic merge patch of the pod template ({metadata, spec}), applied last: the "
        "escape hatch for any other pod field (null deletes a key; lists merge by their Kubernetes key, e.g. "
        "containers by name; $patch: delete / replace). The operator's labels are set again after it.",
    )

    @field_validator("labels")
    @classmethod
    def _no_reserved_labels(cls, labels: dict[str, str] | None) -> dict[str, str] | None:
        if labels and any(key in labels for key in RESERVED_LABELS):
            raise ValueError(_RESERVED_LABELS_MESSAGE)
        return labels

    @field_validator("pod_template_patch")
    @classmethod
    def _patch_applies(cls, patch: dict[str, Any] | None) -> dict[str, Any] | None:
        if patch is not None:
            check_patch(patch)
        return patch

    def overlay(self, override: PodSettings) -> PodSettings:
        """These settings (a pool's) with a ModelDeployment's ``override`` on top."""
        values: dict[str, Any] = {}
        for name in type(self).model_fields:
            mine, theirs = getattr(self, name), getattr(override, name)
            if theirs is None:
                continue
            if name in ("labels", "annotations", "node_selector") and mine:
                theirs = {**mine, **theirs}
            elif name == "env" and mine:
                theirs = list({env.name: env for env in [*mine, *theirs]}.values())
            values[name] = theirs
        return self.model_copy(update=values)


def apply_pod_settings(template: Obj, settings: PodSettings, main: Collection[str]) -> Obj:
    """A pod template (``{metadata, spec}``) with ``settings`` applied; ``main`` names the
    containers that get env, envFrom, volumeMounts and securityContext."""
    out = copy.deepcopy(template)
    operator_labels = dict(out["metadata"]["labels"])
    meta, spec = out["metadata"], out["spec"]
    meta["labels"] = {**(settings.labels or {}), **operator_labels}
    annotations = {**(settings.annotations or {}), **meta.get("annotations", {})}
    if annotations:
        meta["annotations"] = annotations
    spec.update(_pod_fields(settings, spec))
    for container in [*spec.get("initContainers", []), *spec["containers"]]:
        if container["name"] in main:
            container.update(_container_fields(settings, container))
    if settings.pod_template_patch:
        out = strategic_merge(out, settings.pod_template_patch)
        out.setdefault("metadata", {})
        out["metadata"]["labels"] = {**(out["metadata"].get("labels") or {}), **operator_labels}
    return out


def _pod_fields(settings: PodSettings, spec: Mapping[str, Any]) -> Obj:
    fields: Obj = {}
    plain = {
        "priorityClassName": settings.priority_class_name,
        "runtimeClassName": settings.runtime_class_name,
        "affinity": settings.affinity,
        "topologySpreadConstraints": settings.topology_spread_constraints,
        "securityContext": settings.pod_security_context,
    }
    fields.update({key: copy.deepcopy(value) for key, value in plain.items() if value is not None})
    if settings.image_pull_secrets is not None:
        fields["imagePullSecrets"] = [{"name": ref.name} for ref in settings.image_pull_secrets]
    if settings.tolerations is not None:
        fields["tolerations"] = [t.to_kube() for t in settings.tolerations]
    if settings.node_selector:
        fields["nodeSelector"] = {**spec.get("nodeSelector", {}), **settings.node_selector}
    if settings.volumes:
        fields["volumes"] = _replace_by_key(spec.get("volumes", []), settings.volumes, "name")
    return fields


def _container_fields(settings: PodSettings, container: Mapping[str, Any]) -> Obj:
    fields: Obj = {}
    if settings.env:
        fields["env"] = _replace_by_key(container.get("env", []), [e.to_kube() for e in settings.env], "name")
    if settings.env_from:
        fields["envFrom"] = [*container.get("envFrom", []), *copy.deepcopy(settings.env_from)]
    if settings.volume_mounts:
        fields["volumeMounts"] = _replace_by_key(container.get("volumeMounts", []), settings.volume_mounts, "mountPath")
    if settings.security_context is not None:
        fields["securityContext"] = copy.deepcopy(settings.security_context)
    return fields


def _replace_by_key(original: list[Obj], items: list[Obj], key: str) -> list[Obj]:
    """``original`` with each item of ``items`` in place of the one with its ``key`` (replaced whole:
    a user's volume ``models`` on a PVC must not keep the operator's emptyDir), new ones last."""
    new = {item[key]: copy.deepcopy(item) for item in items}
    kept = [new.pop(have[key]) if have.get(key) in new else copy.deepcopy(have) for have in original]
    return [*kept, *new.values()]
