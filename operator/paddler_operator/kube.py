"""The operator's only door to the Kubernetes API (besides kopf's own watches).

A small generic client over the ``kubernetes`` package's REST machinery: get,
create, JSON-merge-patch, delete and list any namespaced kind of a fixed table,
patch the status subresource, and post Events. Calls are blocking, so the async
methods run them in a worker thread. Errors become :class:`KubeError` with the
API server's message, which ends up in conditions and events verbatim.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from paddler_operator.plan import Obj, ObjRef

log = logging.getLogger(__name__)

PLURALS: dict[tuple[str, str], str] = {
    ("v1", "ConfigMap"): "configmaps",
    ("v1", "Service"): "services",
    ("v1", "Event"): "events",
    ("apps/v1", "Deployment"): "deployments",
    ("autoscaling/v2", "HorizontalPodAutoscaler"): "horizontalpodautoscalers",
    ("keda.sh/v1alpha1", "ScaledObject"): "scaledobjects",
    ("paddler.dev/v1alpha1", "LlmPool"): "llmpools",
    ("paddler.dev/v1alpha1", "ModelDeployment"): "modeldeployments",
}
FIELD_MANAGER = "paddler-operator"
REQUEST_TIMEOUT_S = 30.0


class KubeError(Exception):
    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(f"{status} {reason}: {message}")
        self.status = status
        self.reason = reason
        self.message = message

    @property
    def not_found(self) -> bool:
        return self.status == 404


def collection_path(api_version: str, kind: str, namespace: str) -> str:
    plural = PLURALS[(api_version, kind)]
    prefix = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
    return f"{prefix}/namespaces/{namespace}/{plural}"


def object_path(ref: ObjRef) -> str:
    return f"{collection_path(ref.api_version, ref.kind, ref.namespace)}/{ref.name}"


@dataclass(frozen=True)
class KubeSettings:
    kubeconfig: str | None = None
    """Path of a kubeconfig; None: $KUBECONFIG / ~/.kube/config, or in-cluster when running in a pod."""
    request_timeout: float = REQUEST_TIMEOUT_S
    """Seconds per API request."""


class KubeApi:
    """Generic, thread-offloaded calls to the Kubernetes API."""

    def __init__(self, settings: KubeSettings | None = None) -> None:
        from kubernetes import client, config

        self.settings = settings or KubeSettings()
        configuration = client.Configuration()
        try:
            config.load_kube_config(config_file=self.settings.kubeconfig, client_configuration=configuration)  # type: ignore[no-untyped-call]
        except config.ConfigException:
            config.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
        self._client = client.ApiClient(configuration)

    def close(self) -> None:
        self._client.close()  # type: ignore[no-untyped-call]

    # --- raw ---------------------------------------------------------------------

    def _call(
        self,
        method: str,
        path: str,
        body: Any = None,
        query: list[tuple[str, str]] | None = None,
        content_type: str = "application/json",
    ) -> Any:
        headers = {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = content_type
        m, url, hdrs, data, post = self._client.param_serialize(
            method=method,
            resource_path=path,
            query_params=query or [],
            header_params=headers,
            body=body,
            auth_settings=["BearerToken"],
        )
        resp = self._client.call_api(m, url, header_params=hdrs, body=data, post_params=post,
                                     _request_timeout=self.settings.request_timeout)  # fmt: skip
        raw = resp.read()  # type: ignore[no-untyped-call]
        text = raw.decode() if isinstance(raw, bytes) else str(raw or "")
        if not 200 <= resp.status < 300:
            try:
                status = json.loads(text)
                reason, message = status.get("reason", ""), status.get("message", text)
            except ValueError:
                reason, message = str(resp.reason), text
            raise KubeError(resp.status, reason, message)
        return json.loads(text) if text else None

    async def _run(self, *args: Any, **kwargs: Any) -> Any:
        return await asyncio.to_thread(self._call, *args, **kwargs)

    # --- objects ---------------------------------------------------------------------

    async def get(self, ref: ObjRef) -> Obj | None:
        try:
            found: Obj = await self._run("GET", object_path(ref))
            return found
        except KubeError as err:
            if err.not_found:
                return None
            raise

    async def list(self, api_version: str, kind: str, namespace: str, label_selector: str | None = None) -> list[Obj]:
        query = [("labelSelector", label_selector)] if label_selector else []
        body = await self._run("GET", collection_path(api_version, kind, namespace), query=query)
        items: list[Obj] = body.get("items", [])
        for item in items:  # list items carry no apiVersion/kind
            item.setdefault("apiVersion", api_version)
            item.setdefault("kind", kind)
        return items

    async def create(self, obj: Obj) -> Obj:
        ref = ObjRef.of(obj)
        created: Obj = await self._run(
            "POST",
            collection_path(ref.api_version, ref.kind, ref.namespace),
            body=obj,
            query=[("fieldManager", FIELD_MANAGER)],
        )
        return created

    async def patch(self, ref: ObjRef, patch: Mapping[str, Any]) -> Obj:
        patched: Obj = await self._run(
            "PATCH",
            object_path(ref),
            body=dict(patch),
            query=[("fieldManager", FIELD_MANAGER)],
            content_type="application/merge-patch+json",
        )
        return patched

    async def delete(self, ref: ObjRef) -> bool:
        """True if it was there."""
        try:
            await self._run("DELETE", object_path(ref), body={"propagationPolicy": "Background"})
            return True
        except KubeError as err:
            if err.not_found:
                return False
            raise

    async def patch_status(self, ref: ObjRef, status: Mapping[str, Any]) -> Obj:
        patched: Obj = await self._run(
            "PATCH",
            object_path(ref) + "/status",
            body={"status": dict(status)},
            query=[("fieldManager", FIELD_MANAGER)],
            content_type="application/merge-patch+json",
        )
        return patched

    async def event(self, involved: Mapping[str, Any], type_: str, reason: str, message: str) -> None:
        """Post a core/v1 Event about ``involved`` (best effort: failures are logged)."""
        meta = involved["metadata"]
        now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        event = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"name": f"{meta['name']}.{uuid.uuid4().hex[:12]}", "namespace": meta["namespace"]},
            "involvedObject": {
                "apiVersion": involved["apiVersion"],
                "kind": involved["kind"],
                "name": meta["name"],
                "namespace": meta["namespace"],
                "uid": meta.get("uid"),
                "resourceVersion": meta.get("resourceVersion"),
            },
            "type": type_,
            "reason": reason,
            "message": message[:1024],
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
            "source": {"component": FIELD_MANAGER},
            "reportingComponent": FIELD_MANAGER,
        }
        try:
            await self.create(event)
        except KubeError as err:
            log.warning("event not posted reason=%s err=%s", reason, err)
