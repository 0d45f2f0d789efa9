"""The act step of a reconcile pass: what the plan decided, written to the cluster.

:class:`ObjectWriter` applies the objects a custom resource should own (server-side
apply: the API server writes only what differs), deletes the ones it must not own,
patches the resource's status when it changed, and records Events for what changed
(objects created, updated or deleted; ``Ready`` moving, ``Degraded`` turning True).

Like :mod:`paddler_operator.reconcile`, which observes and decides, it never imports
kopf and talks to Kubernetes only through :class:`~paddler_operator.kube.KubeApi`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from paddler_operator.crd_models import Condition
from paddler_operator.kube import KubeApi, KubeError
from paddler_operator.objects import Obj, ObjRef, status_patch
from paddler_operator.resource_reads import controller_uid, custom_resource_ref, find_condition, resource_version_of
from paddler_operator.workers import Kind

log = logging.getLogger(__name__)

WARNING_REASONS = frozenset({"BalancerUnreachable", "PoolNotFound", "InvalidSpec", "RolloutFailed"})
"""Ready=False reasons that deserve a Warning event (the rest are normal progress)."""


class ObjectWriter:
    def __init__(self, kube: KubeApi) -> None:
        self.kube = kube

    async def apply(
        self,
        owner_obj: Obj,
        desired: Sequence[Obj],
        absent: Sequence[ObjRef] = (),
        read: Mapping[ObjRef, Obj | None] | None = None,
    ) -> list[str]:
        """Server-side apply what should exist (the API server writes only what differs), delete what
        must not exist; returns error messages. ``read``: objects this pass has read already (not
        read again)."""
        errors: list[str] = []
        for want in desired:
            error = await self._apply_one(owner_obj, want, read or {})
            errors += [error] if error else []
        for ref in absent:
            error = await self._delete_one(owner_obj, ref)
            errors += [error] if error else []
        return errors

    async def _apply_one(self, owner_obj: Obj, want: Obj, read: Mapping[ObjRef, Obj | None]) -> str | None:
        """Apply one desired object unless another controller owns it; returns an error message."""
        ref = ObjRef.of(want)
        owner_name = owner_obj["metadata"]["name"]
        try:
            have = read[ref] if ref in read else await self.kube.get(ref)
            controller = controller_uid(have) if have is not None else None
            if controller is not None and controller != owner_obj["metadata"]["uid"]:
                return f"{ref} exists and is controlled by another object (uid {controller})"
            applied = await self.kube.apply(want)
            if have is None:
                log.info("created object=%s owner=%s", ref, owner_name)
                await self.kube.event(owner_obj, "Normal", "Created", f"Created {ref.kind} {ref.name}")
            elif resource_version_of(applied) != resource_version_of(have):
                log.info("updated object=%s owner=%s", ref, owner_name)
                await self.kube.event(owner_obj, "Normal", "Updated", f"Updated {ref.kind} {ref.name}")
        except KubeError as err:
            log.warning("apply failed object=%s err=%s", ref, err)
            message = err.message
            if err.status == 404:  # the collection itself is missing: a CRD that is not installed
                message = f"{ref.api_version} {ref.kind} is not served by this cluster (is its CRD installed?)"
            return f"{ref.kind} {ref.name}: {message}"
        return None

    async def _delete_one(self, owner_obj: Obj, ref: ObjRef) -> str | None:
        """Delete an object the owner must not have (only if it controls it); returns an error message."""
        uid = owner_obj["metadata"]["uid"]
        try:
            have = await self.kube.get(ref)
            if have is not None and controller_uid(have) == uid and await self.kube.delete(ref):
                log.info("deleted object=%s", ref)
                await self.kube.event(owner_obj, "Normal", "Deleted", f"Deleted {ref.kind} {ref.name}")
        except KubeError as err:
            if err.status not in (403, 404):  # kind not installed (e.g. KEDA) or not allowed
                return f"{ref.kind} {ref.name}: {err.message}"
        return None

    async def write_status(
        self, obj: Obj, kind: Kind, status: Mapping[str, Any], previous_conditions: Sequence[Condition]
    ) -> None:
        """Patch the resource's status when it changed (dropping keys no longer set), then the
        Events of its conditions' changes. A resource deleted meanwhile is left alone."""
        ref = custom_resource_ref(kind, obj["metadata"]["namespace"], obj["metadata"]["name"])
        new = dict(status)
        previous = obj.get("status") or {}
        if status_patch(obj.get("status"), new) is not None:
            # A merge patch keeps keys it does not mention: drop the ones no longer set.
            patch = {**{k: None for k in previous if k not in new}, **new}
            try:
                await self.kube.patch_status(ref, patch)
            except KubeError as err:
                if not err.not_found:
                    raise
                return
        await self._condition_events(obj, previous_conditions, [Condition.model_validate(c) for c in new["conditions"]])

    async def _condition_events(self, obj: Obj, before: Sequence[Condition], after: Sequence[Condition]) -> None:
        """An Event when Ready changes (a warning for what needs a human) or Degraded turns True."""
        meta = obj["metadata"]
        old, new = find_condition(before, "Ready"), find_condition(after, "Ready")
        if new is not None and (old is None or (old.status, old.reason) != (new.status, new.reason)):
            kind = "Warning" if new.reason in WARNING_REASONS else "Normal"
            await self.kube.event(obj, kind, new.reason, new.message or new.reason)
            log.info(
                "condition object=%s/%s Ready=%s reason=%s message=%s",
                meta["namespace"], meta["name"], new.status, new.reason, new.message,
            )  # fmt: skip
        old, new = find_condition(before, "Degraded"), find_condition(after, "Degraded")
        if (
            new is not None
            and new.status == "True"
            and (old is None or (old.status, old.reason) != ("True", new.reason))
        ):
            await self.kube.event(obj, "Warning", new.reason, new.message or new.reason)
            log.warning("degraded object=%s/%s reason=%s message=%s", meta["namespace"], meta["name"], new.reason,
                        new.message)  # fmt: skip
