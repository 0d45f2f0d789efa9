"""Pure reads of what a reconcile pass gets from the API server and the balancers: the
owner, conditions and timestamps of a custom resource, a pool's members, the rollout
that belongs to a desired state, and how closely to watch a ModelDeployment.
"""

from __future__ import annotations

import contextlib
import datetime as dt
from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import ValidationError

from paddler_core.desired_state import BalancerDesiredState, MaxUnavailable, state_revision
from paddler_operator.balancer_views import BalancerSnapshot, RolloutView
from paddler_operator.crd_model_deployment import AutoscalingMode, ModelDeploymentSpec
from paddler_operator.crd_models import API_VERSION, Condition
from paddler_operator.objects import Obj, ObjRef
from paddler_operator.plan import Owner
from paddler_operator.workers import Kind

TIMESTAMP_FORMAT = "%Y-%m-%dT%H:%M:%SZ"


def utc_now_text() -> str:
    return dt.datetime.now(dt.UTC).strftime(TIMESTAMP_FORMAT)


def format_timestamp(seconds: float) -> str:
    return dt.datetime.fromtimestamp(seconds, dt.UTC).strftime(TIMESTAMP_FORMAT)


def parse_timestamp(text: Any) -> float | None:
    if not isinstance(text, str):
        return None
    try:
        return dt.datetime.strptime(text, TIMESTAMP_FORMAT).replace(tzinfo=dt.UTC).timestamp()
    except ValueError:
        return None


def max_unavailable_text(value: int | str) -> str:
    """The balancer's spelling of ``rollout.maxUnavailable`` (it refuses what does not parse)."""
    try:
        return str(MaxUnavailable.parse(value))
    except ValueError:
        return str(value)


def custom_resource_ref(kind: Kind, namespace: str, name: str) -> ObjRef:
    return ObjRef(API_VERSION, kind, namespace, name)


def owner_of(obj: Mapping[str, Any]) -> Owner:
    meta = obj["metadata"]
    return Owner(
        kind=obj["kind"],
        namespace=meta["namespace"],
        name=meta["name"],
        uid=meta["uid"],
        generation=int(meta.get("generation") or 1),
    )


def conditions_of(obj: Mapping[str, Any]) -> list[Condition]:
    out = []
    for raw in (obj.get("status") or {}).get("conditions") or []:
        with contextlib.suppress(ValidationError):
            out.append(Condition.model_validate(raw))
    return out


def find_condition(conditions: Sequence[Condition], type_: str) -> Condition | None:
    return next((c for c in conditions if c.type == type_), None)


def validation_message(err: ValidationError) -> str:
    return "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'spec'}: {e['msg']}" for e in err.errors())


def resource_version_of(obj: Mapping[str, Any]) -> str | None:
    version = (obj.get("metadata") or {}).get("resourceVersion")
    return str(version) if version is not None else None


def pool_members(model_deployments: Sequence[Obj], pool: str) -> list[str]:
    """Names of the ModelDeployments that name ``pool``."""
    return sorted(
        i["metadata"]["name"]
        for i in model_deployments
        if ((i.get("spec") or {}).get("poolRef") or {}).get("name") == pool
    )


def controller_uid(obj: Mapping[str, Any]) -> str | None:
    for ref in obj.get("metadata", {}).get("ownerReferences") or []:
        if ref.get("controller"):
            return str(ref.get("uid"))
    return None


def rollout_of(snapshot: BalancerSnapshot | None, group: str, desired: BalancerDesiredState) -> RolloutView | None:
    """The balancer's rollout of ``desired`` in ``group``; None for none, or for a rollout of
    some other state (e.g. one set by hand)."""
    rollout = snapshot.group_rollouts.get(group) if snapshot is not None else None
    if rollout is not None and rollout.revision != state_revision(desired):
        return None
    return rollout


def watched_closely(spec: ModelDeploymentSpec, rollout: RolloutView | None, hpa_gate: bool) -> bool:
    """Builtin scaling and a running rollout are polled (status shows their progress); so is
    an HPA-mode group that only the operator can wake (no HPAScaleToZero)."""
    a = spec.autoscaling
    return (
        a.mode == AutoscalingMode.BUILTIN
        or (rollout is not None and rollout.progressing)
        or (a.mode == AutoscalingMode.HPA and not hpa_gate and a.min_replicas == 0)
    )
