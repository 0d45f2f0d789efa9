"""The operator's only door to the Kubernetes API (besides kopf's own watches).

Credentials come from the official client's configuration loading
(``kubernetes_asyncio.config``): a kubeconfig with any user the client supports
(token, token file, client certificate, ``exec`` plugins such as ``aws eks get-token``
or ``kubelogin``, the OIDC and GCP auth providers), or the in-cluster service
account. :func:`login` returns them as :class:`Credentials`, which kopf's login
handler shares (:mod:`paddler_operator.handlers`).

Requests go through a thin async layer of our own (aiohttp): get, list, delete and
server-side apply of any namespaced kind of a fixed table, status merge patches,
Events. A 401 logs in again (an exec plugin runs again, a rotated token file is
read again) and repeats the request once; a 429 waits out ``Retry-After`` (bounded)
a few times. Errors become :class:`KubeError` with the API server's message, which
ends up in conditions and events verbatim.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import os
import ssl
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from kubernetes_asyncio import client as k8s_client
from kubernetes_asyncio import config as k8s_config

from paddler_operator.objects import Obj, ObjRef

log = logging.getLogger(__name__)

PLURALS: dict[tuple[str, str], str] = {
    ("v1", "ConfigMap"): "configmaps",
    ("v1", "Service"): "services",
    ("v1", "Secret"): "secrets",
    ("v1", "Event"): "events",
    ("apps/v1", "Deployment"): "deployments",
    ("policy/v1", "PodDisruptionBudget"): "poddisruptionbudgets",
    ("autoscaling/v2", "HorizontalPodAutoscaler"): "horizontalpodautoscalers",
    ("keda.sh/v1alpha1", "ScaledObject"): "scaledobjects",
    ("keda.sh/v1alpha1", "TriggerAuthentication"): "triggerauthentications",
    ("paddler.dev/v1alpha1", "LlmPool"): "llmpools",
    ("paddler.dev/v1alpha1", "ModelDeployment"): "modeldeployments",
    ("coordination.k8s.io/v1", "Lease"): "leases",
    ("monitoring.coreos.com/v1", "PodMonitor"): "podmonitors",
    ("networking.k8s.io/v1", "NetworkPolicy"): "networkpolicies",
}
FIELD_MANAGER = "paddler-operator"
REQUEST_TIMEOUT_S = 30.0
IN_CLUSTER_TOKEN_REREAD_S = 60.0
"""The service account's projected token rotates: read its file again this often (and on a 401)."""
SERVICE_ACCOUNT = Path("/var/run/secrets/kubernetes.io/serviceaccount")
MAX_RETRY_AFTER_S = 30.0
"""Longest wait a 429's ``Retry-After`` is honoured for (longer ones are cut to this)."""
MAX_THROTTLED_RETRIES = 3
"""429 answers waited out per request before it fails."""


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
    """No usable credentials (no kubeconfig, not in a pod, or the kubeconfig's user cannot log in)."""


def group_version_path(api_version: str) -> str:
    """The discovery document of ``api_version`` (the kinds it serves)."""
    return "/api/v1" if api_version == "v1" else f"/apis/{api_version}"


def collection_path(api_version: str, kind: str, namespace: str | None) -> str:
    """The collection of ``kind`` in ``namespace``; None: in every namespace (list only)."""
    plural = PLURALS[(api_version, kind)]
    prefix = group_version_path(api_version)
    return f"{prefix}/{plural}" if namespace is None else f"{prefix}/namespaces/{namespace}/{plural}"


def object_path(ref: ObjRef) -> str:
    return f"{collection_path(ref.api_version, ref.kind, ref.namespace)}/{ref.name}"


@dataclass(frozen=True)
class KubeSettings:
    kubeconfig: str | None = None
    """Path of a kubeconfig; None: $KUBECONFIG / ~/.kube/config, else the in-cluster service account."""
    request_timeout: float = REQUEST_TIMEOUT_S
    """Seconds per API request."""


@dataclass(frozen=True)
class Credentials:
    """Where the API server is and how to prove who we are, as the official client loaded them."""

    server: str
    ca_file: str | None = None
    insecure: bool = False
    tls_server_name: str | None = None
    cert_file: str | None = None
    """Client certificate (a temporary file when the kubeconfig or an exec plugin gave it inline)."""
    key_file: str | None = None
    authorization: str | None = None
    """The ``Authorization`` header value (``Bearer ...``, ``Basic ...``), None with a client certificate only."""
    expires_at: dt.datetime | None = None
    """When to log in again before the next request (an exec plugin's token expiry; the service
    account's token file re-read interval); None: only after a 401."""

    def ssl_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=self.ca_file)
        if self.insecure:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        if self.cert_file and self.key_file:
            context.load_cert_chain(self.cert_file, self.key_file)
        return context

    def headers(self) -> dict[str, str]:
        return {"Authorization": self.authorization} if self.authorization else {}

    def expired(self, now: dt.datetime | None = None) -> bool:
        return self.expires_at is not None and (now or dt.datetime.now(dt.UTC)) >= self.expires_at


def kubeconfig_paths(explicit: str | None) -> list[Path]:
    """The kubeconfig files to merge: ``explicit``, else $KUBECONFIG, else ~/.kube/config if it exists."""
    if explicit:
        return [Path(explicit).expanduser()]
    env = os.environ.get("KUBECONFIG")
    if env:
        return [Path(p).expanduser() for p in env.split(os.pathsep) if p]
    default = Path("~/.kube/config").expanduser()
    return [default] if default.exists() else []


def _credentials(configuration: k8s_client.Configuration, expires_at: dt.datetime | None) -> Credentials:
    token = configuration.api_key.get("BearerToken")
    if token and " " not in token:  # the client stores the scheme with the token; be lenient
        token = f"Bearer {token}"
    return Credentials(
        server=str(configuration.host).rstrip("/"),
        ca_file=configuration.ssl_ca_cert or None,
        insecure=not configuration.verify_ssl,
        tls_server_name=configuration.tls_server_name or None,
        cert_file=configuration.cert_file or None,
        key_file=configuration.key_file or None,
        authorization=token or None,
        expires_at=expires_at,
    )


async def login(kubeconfig: str | None = None, service_account: Path = SERVICE_ACCOUNT) -> Credentials:
    """Load credentials afresh (runs a kubeconfig's exec plugin; reads token files again).
    Without a kubeconfig: the pod's service account (``service_account``: its mounted folder)."""
    configuration = k8s_client.Configuration()
    paths = kubeconfig_paths(kubeconfig)
    try:
        if paths:
            loader = await k8s_config.load_kube_config(
                config_file=os.pathsep.join(str(p) for p in paths),
                client_configuration=configuration,
                persist_config=False,
            )
            expiry: dt.datetime | None = getattr(loader, "exec_plugin_expiry", None)
            if expiry is not None and expiry.tzinfo is None:
                expiry = expiry.replace(tzinfo=dt.UTC)
            return _credentials(configuration, expiry)
        k8s_config.load_incluster_config(  # type: ignore[no-untyped-call]  # typed package, untyped function
            client_configuration=configuration,
            try_refresh_token=False,
            token_filename=str(service_account / "token"),
            cert_filename=str(service_account / "ca.crt"),
        )
    except (k8s_config.ConfigException, OSError, KeyError, ValueError) as err:
        where = ", ".join(map(str, paths)) if paths else "in-cluster service account"
        raise KubeConfigError(f"cannot log in to Kubernetes ({where}): {type(err).__name__}: {err}") from err
    reread = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=IN_CLUSTER_TOKEN_REREAD_S)
    return _credentials(configuration, reread)


def _retry_after(value: str | None) -> float:
    """Seconds a 429 asks us to wait (``Retry-After``: seconds or an HTTP date), within bounds."""
    if value:
        try:
            seconds = float(value)
        except ValueError:
            try:
                when = dt.datetime.strptime(value, "%a, %d %b %Y %H:%M:%S GMT").replace(tzinfo=dt.UTC)
            except ValueError:
                seconds = 1.0
            else:
                seconds = (when - dt.datetime.now(dt.UTC)).total_seconds()
    else:
        seconds = 1.0
    return min(max(seconds, 0.0), MAX_RETRY_AFTER_S)


Login = Callable[[], Awaitable[Credentials]]


class KubeApi:
    """Generic async calls to the Kubernetes API."""

    def __init__(
        self,
        settings: KubeSettings | None = None,
        login_with: Login | None = None,
        may_write: Callable[[], bool] | None = None,
    ) -> None:
        self.settings = settings or KubeSettings()
        self._may_write = may_write
        """Asked before every request that is not a GET; False refuses it unsent (a replica whose
        leader lease ran out, e.g. after the process was paused, must not write)."""
        self._login: Login = login_with or (lambda: login(self.settings.kubeconfig))
        self._credentials: Credentials | None = None
        self._session: aiohttp.ClientSession | None = None
        self._login_lock = asyncio.Lock()
        self.logins = 0
        """How many times credentials were loaded (the first time included)."""

    async def credentials(self, stale: Credentials | None = None) -> Credentials:
        """The current credentials; logs in when there are none, they expired, or they are ``stale``
        (a request with them got a 401). Concurrent callers share one login."""
        async with self._login_lock:
            current = self._credentials
            if current is None or current is stale or current.expired():
                fresh = await self._login()
                self.logins += 1
                if self._session is not None:
                    await self._session.close()
                    self._session = None
                self._credentials = current = fresh
            return current

    def _http(self, credentials: Credentials) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=credentials.ssl_context()),
                timeout=aiohttp.ClientTimeout(total=self.settings.request_timeout),
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _send(
        self,
        credentials: Credentials,
        method: str,
        path: str,
        data: str | None,
        query: list[tuple[str, str]] | None,
        content_type: str,
    ) -> tuple[int, str, str, str | None]:
        headers = {"Accept": "application/json", **credentials.headers()}
        if data is not None:
            headers["Content-Type"] = content_type
        extra: dict[str, Any] = {}
        if credentials.tls_server_name:
            extra["server_hostname"] = credentials.tls_server_name
        try:
            async with self._http(credentials).request(
                method, credentials.server + path, params=query or None, data=data, headers=headers, **extra
            ) as resp:
                return resp.status, resp.reason or "", await resp.text(), resp.headers.get("Retry-After")
        except (aiohttp.ClientError, TimeoutError, ssl.SSLError, OSError) as err:
            raise KubeError(0, "Unreachable", f"{method} {path}: {type(err).__name__}: {err}") from err

    async def _run(
        self,
        method: str,
        path: str,
        body: Any = None,
        query: list[tuple[str, str]] | None = None,
        content_type: str = "application/json",
    ) -> Any:
        if method != "GET" and self._may_write is not None and not self._may_write():
            raise KubeError(0, "NotLeader", f"{method} {path}: this replica does not hold the leader lease")
        data = json.dumps(body) if body is not None else None
        try:
            credentials = await self.credentials()
        except KubeConfigError as err:
            raise KubeError(401, "Unauthorized", str(err)) from err
        relogged = False
        throttled = 0
        while True:
            status_code, reason_phrase, text, retry_after = await self._send(
                credentials, method, path, data, query, content_type
            )
            if status_code == 401 and not relogged:
                relogged = True
                log.info("401 from the API server: logging in again")
                try:
                    credentials = await self.credentials(stale=credentials)
                except KubeConfigError as err:
                    raise KubeError(401, "Unauthorized", str(err)) from err
                continue
            if status_code == 429 and throttled < MAX_THROTTLED_RETRIES:
                throttled += 1
                delay = _retry_after(retry_after)
                log.info("429 from the API server: retrying %s %s in %.1fs", method, path, delay)
                await asyncio.sleep(delay)
                continue
            break
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

    async def list(
        self, api_version: str, kind: str, namespace: str | None, label_selector: str | None = None
    ) -> list[Obj]:
        """Objects of ``kind`` in ``namespace`` (None: in every namespace)."""
        query = [("labelSelector", label_selector)] if label_selector else []
        body = await self._run("GET", collection_path(api_version, kind, namespace), query=query)
        items: list[Obj] = body.get("items", [])
        for item in items:  # list items carry no apiVersion/kind
            item.setdefault("apiVersion", api_version)
            item.setdefault("kind", kind)
        return items

    async def serves(self, api_version: str, kind: str) -> bool:
        """Does the API server serve ``kind`` of ``api_version`` (e.g. a CRD that is installed)?
        Discovery, which every authenticated user may read (``system:discovery``): no RBAC rule."""
        try:
            found = await self._run("GET", group_version_path(api_version))
        except KubeError as err:
            if err.not_found:
                return False
            raise
        resources = (found or {}).get("resources") or []
        return any(r.get("kind") == kind and "/" not in str(r.get("name", "")) for r in resources)

    async def create(self, obj: Obj) -> Obj:
        ref = ObjRef.of(obj)
        created: Obj = await self._run(
            "POST",
            collection_path(ref.api_version, ref.kind, ref.namespace),
            body=obj,
            query=[("fieldManager", FIELD_MANAGER)],
        )
        return created

    async def apply(self, obj: Obj) -> Obj:
        """Server-side apply: the object carries (at least) what ``obj`` says, created if absent.
        Fields this manager set before and ``obj`` no longer has are removed; a conflict with
        another manager is resolved in our favour (``force``)."""
        applied: Obj = await self._run(
            "PATCH",
            object_path(ObjRef.of(obj)),
            body=obj,
            query=[("fieldManager", FIELD_MANAGER), ("force", "true")],
            content_type="application/apply-patch+yaml",  # JSON is YAML
        )
        return applied

    async def replace(self, obj: Obj) -> Obj:
        """PUT the whole object. With ``metadata.resourceVersion`` set, the API server refuses
        (409 Conflict) if anyone wrote it since that version: compare-and-swap (the Lease)."""
        replaced: Obj = await self._run(
            "PUT", object_path(ObjRef.of(obj)), body=obj, query=[("fieldManager", FIELD_MANAGER)]
        )
        return replaced

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
