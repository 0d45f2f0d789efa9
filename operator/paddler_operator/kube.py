"""The operator's only door to the Kubernetes API (besides kopf's own watches).

A small generic async client (aiohttp): get, create, JSON-merge-patch, delete and
list any namespaced kind of a fixed table, patch the status subresource, post
Events. Errors become :class:`KubeError` with the API server's message, which
ends up in conditions and events verbatim.

It reads credentials itself (kubeconfig: token or client certificate; in-cluster:
the service account's rotating token), so the operator image does not need the
``kubernetes`` package (about 75 MB of generated code); kopf logs in the same way.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import logging
import os
import ssl
import tempfile
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from paddler_operator.plan import Obj, ObjRef

log = logging.getLogger(__name__)

PLURALS: dict[tuple[str, str], str] = {
    ("v1", "ConfigMap"): "configmaps",
    ("v1", "Service"): "services",
    ("v1", "Secret"): "secrets",
    ("v1", "Event"): "events",
    ("apps/v1", "Deployment"): "deployments",
    ("autoscaling/v2", "HorizontalPodAutoscaler"): "horizontalpodautoscalers",
    ("keda.sh/v1alpha1", "ScaledObject"): "scaledobjects",
    ("keda.sh/v1alpha1", "TriggerAuthentication"): "triggerauthentications",
    ("paddler.dev/v1alpha1", "LlmPool"): "llmpools",
    ("paddler.dev/v1alpha1", "ModelDeployment"): "modeldeployments",
}
FIELD_MANAGER = "paddler-operator"
REQUEST_TIMEOUT_S = 30.0
SERVICE_ACCOUNT = Path("/var/run/secrets/kubernetes.io/serviceaccount")


class KubeError(Exception):
    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(f"{status} {reason}: {message}")
        self.status = status
        self.reason = reason
        self.message = message

    @property
    def not_found(self) -> bool:
        return self.status == 404


class KubeConfigError(Exception):
    """No usable credentials (no kubeconfig, not in a pod, or an unsupported auth method)."""


def collection_path(api_version: str, kind: str, namespace: str) -> str:
    plural = PLURALS[(api_version, kind)]
    prefix = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
    return f"{prefix}/namespaces/{namespace}/{plural}"


def object_path(ref: ObjRef) -> str:
    return f"{collection_path(ref.api_version, ref.kind, ref.namespace)}/{ref.name}"


@dataclass(frozen=True)
class KubeSettings:
    kubeconfig: str | None = None
    """Path of a kubeconfig; None: $KUBECONFIG / ~/.kube/config, else the in-cluster service account."""
    request_timeout: float = REQUEST_TIMEOUT_S
    """Seconds per API request."""


@dataclass(frozen=True)
class Connection:
    server: str
    ssl_context: ssl.SSLContext
    token: str | None = None
    token_file: Path | None = None
    """Re-read on every request: projected service-account tokens rotate."""

    def headers(self) -> dict[str, str]:
        token = self.token_file.read_text().strip() if self.token_file is not None else self.token
        return {"Authorization": f"Bearer {token}"} if token else {}


def _kubeconfig_paths(explicit: str | None) -> list[Path]:
    if explicit:
        return [Path(explicit).expanduser()]
    env = os.environ.get("KUBECONFIG")
    if env:
        return [Path(p).expanduser() for p in env.split(os.pathsep) if p]
    default = Path("~/.kube/config").expanduser()
    return [default] if default.exists() else []


def _path(base: Path, value: str) -> str:
    """Relative paths in a kubeconfig are relative to the file."""
    path = Path(value).expanduser()
    return str(path if path.is_absolute() else base / path)


def connection_from_kubeconfig(paths: list[Path]) -> Connection:
    current: str | None = None
    contexts: dict[str, Any] = {}
    clusters: dict[str, Any] = {}
    users: dict[str, Any] = {}
    base = paths[0].parent
    for path in paths:
        config = yaml.safe_load(path.read_text()) or {}
        current = current or config.get("current-context")
        for section, into in (("contexts", contexts), ("clusters", clusters), ("users", users)):
            for item in config.get(section) or []:
                into.setdefault(item["name"], item.get(section[:-1]) or {})
    if current is None or current not in contexts:
        raise KubeConfigError(f"no current-context in {', '.join(map(str, paths))}")
    context = contexts[current]
    cluster, user = clusters[context["cluster"]], users.get(context.get("user", ""), {})
    if "exec" in user or "auth-provider" in user:
        raise KubeConfigError("kubeconfig exec/auth-provider plugins are not supported; use a token or certificate")
    ssl_context = ssl.create_default_context()
    if cluster.get("certificate-authority-data"):
        ssl_context.load_verify_locations(cadata=base64.b64decode(cluster["certificate-authority-data"]).decode())
    elif cluster.get("certificate-authority"):
        ssl_context.load_verify_locations(cafile=_path(base, cluster["certificate-authority"]))
    if cluster.get("insecure-skip-tls-verify"):
        ssl_context.check_hostname = False
        ssl_context.verify_mode = ssl.CERT_NONE
    if user.get("client-certificate-data") and user.get("client-key-data"):
        with tempfile.TemporaryDirectory(prefix="paddler-kube-") as tmp:
            cert, key = Path(tmp) / "tls.crt", Path(tmp) / "tls.key"
            cert.write_bytes(base64.b64decode(user["client-certificate-data"]))
            key.write_bytes(base64.b64decode(user["client-key-data"]))
            key.chmod(0o600)
            ssl_context.load_cert_chain(str(cert), str(key))
    elif user.get("client-certificate") and user.get("client-key"):
        ssl_context.load_cert_chain(_path(base, user["client-certificate"]), _path(base, user["client-key"]))
    token = user.get("token")
    token_file = Path(_path(base, user["tokenFile"])) if user.get("tokenFile") else None
    return Connection(server=cluster["server"].rstrip("/"), ssl_context=ssl_context, token=token, token_file=token_file)


def connection_in_cluster(root: Path = SERVICE_ACCOUNT) -> Connection:
    host, port = os.environ.get("KUBERNETES_SERVICE_HOST"), os.environ.get("KUBERNETES_SERVICE_PORT", "443")
    if not host or not (root / "token").exists():
        raise KubeConfigError("no kubeconfig ($KUBECONFIG, ~/.kube/config) and not running in a pod")
    ssl_context = ssl.create_default_context(cafile=str(root / "ca.crt"))
    server = f"https://[{host}]:{port}" if ":" in host else f"https://{host}:{port}"
    return Connection(server=server, ssl_context=ssl_context, token_file=root / "token")


def load_connection(kubeconfig: str | None = None) -> Connection:
    paths = _kubeconfig_paths(kubeconfig)
    if paths:
        return connection_from_kubeconfig(paths)
    return connection_in_cluster()


class KubeApi:
    """Generic async calls to the Kubernetes API."""

    def __init__(self, settings: KubeSettings | None = None, connection: Connection | None = None) -> None:
        self.settings = settings or KubeSettings()
        self.connection = connection or load_connection(self.settings.kubeconfig)
        self._session: aiohttp.ClientSession | None = None

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=self.connection.ssl_context),
                timeout=aiohttp.ClientTimeout(total=self.settings.request_timeout),
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _run(
        self,
        method: str,
        path: str,
        body: Any = None,
        query: list[tuple[str, str]] | None = None,
        content_type: str = "application/json",
    ) -> Any:
        headers = {"Accept": "application/json", **self.connection.headers()}
        data = None
        if body is not None:
            headers["Content-Type"] = content_type
            data = json.dumps(body)
        url = self.connection.server + path
        try:
            async with self._http().request(method, url, params=query or None, data=data, headers=headers) as resp:
                text = await resp.text()
                status_code = resp.status
                reason_phrase = resp.reason or ""
        except (aiohttp.ClientError, TimeoutError) as err:
            raise KubeError(0, "Unreachable", f"{method} {path}: {type(err).__name__}: {err}") from err
        if not 200 <= status_code < 300:
            try:
                status = json.loads(text)
                reason, message = status.get("reason", ""), status.get("message", text)
            except ValueError:
                reason, message = reason_phrase, text
            raise KubeError(status_code, reason, message)
        return json.loads(text) if text else None

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

    async def dry_run_create(self, obj: Obj) -> None:
        """Ask the API server to validate ``obj`` as a create, storing nothing (``dryRun=All``)."""
        ref = ObjRef.of(obj)
        await self._run(
            "POST",
            collection_path(ref.api_version, ref.kind, ref.namespace),
            body=obj,
            query=[("fieldManager", FIELD_MANAGER), ("dryRun", "All")],
        )

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
