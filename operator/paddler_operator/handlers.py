"""kopf wiring: watch events in, reconcile workers woken. The only module that imports kopf.

Only *event* handlers are used: they need no finalizers and store nothing on the
objects (no kopf annotations), so the operator is purely level-based and a
custom resource can be deleted even while the operator is down. Deletion of what
a resource made is left to Kubernetes' garbage collector (owner references).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import kopf

from paddler_operator.balancer_client import BalancerClient, BalancerClientSettings
from paddler_operator.crd_models import API_VERSION, GROUP, VERSION
from paddler_operator.kube import KubeApi, KubeConfigError, KubeSettings, login
from paddler_operator.plan import MANAGED_BY
from paddler_operator.reconcile import Key, Kind, Reconciler, Workers
from paddler_operator.settings import OperatorSettings

log = logging.getLogger(__name__)

OWNED = {"app.kubernetes.io/managed-by": MANAGED_BY}


@dataclass
class _Runtime:
    settings: OperatorSettings
    kube: KubeApi | None = None
    balancers: BalancerClient | None = None
    workers: Workers | None = None


_runtime: _Runtime | None = None


def configure(settings: OperatorSettings) -> None:
    """Call before ``kopf.run``: the settings the handlers use."""
    global _runtime
    _runtime = _Runtime(settings)


def run(settings: OperatorSettings) -> None:
    """Run the operator until SIGINT/SIGTERM (standalone: no kopf peering objects needed)."""
    configure(settings)
    kopf.run(
        standalone=True,
        clusterwide=settings.all_namespaces,
        namespaces=list(settings.namespaces),
        liveness_endpoint=settings.liveness_endpoint,
    )


def _workers() -> Workers:
    if _runtime is None or _runtime.workers is None:
        raise kopf.PermanentError("operator not started")
    return _runtime.workers


@kopf.on.login()
async def kopf_login(**_: Any) -> kopf.ConnectionInfo:
    """kopf's watches log in with the operator's own credentials (kubeconfig incl. exec plugins,
    or the service account), loaded by the official client; kopf calls this again on a 401."""
    if _runtime is None:
        raise kopf.LoginError("paddler_operator.handlers.configure() was not called")
    try:
        credentials = await login(_runtime.settings.kubeconfig)
    except KubeConfigError as err:
        raise kopf.LoginError(str(err)) from err
    scheme, _space, token = (credentials.authorization or "").partition(" ")
    return kopf.ConnectionInfo(
        server=credentials.server,
        ca_path=credentials.ca_file,
        insecure=credentials.insecure,
        scheme=scheme or None,
        token=token or None,
        certificate_path=credentials.cert_file,
        private_key_path=credentials.key_file,
        expiration=credentials.expires_at,
    )


@kopf.on.startup()
async def startup(settings: kopf.OperatorSettings, **_: Any) -> None:
    if _runtime is None:
        raise RuntimeError("paddler_operator.handlers.configure() was not called")
    # We post our own Events and log our own lines; kopf's per-handler ones would be noise.
    settings.posting.level = logging.WARNING
    logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.networking.request_timeout = 60
    ours = _runtime.settings
    _runtime.kube = KubeApi(KubeSettings(kubeconfig=ours.kubeconfig))
    _runtime.balancers = BalancerClient(BalancerClientSettings(request_timeout=ours.balancer_timeout))
    _runtime.workers = Workers(Reconciler(_runtime.kube, _runtime.balancers, ours))
    log.info(
        "paddler operator started namespaces=%s balancer_url_template=%s resync=%.1fs",
        "*" if ours.all_namespaces else ",".join(ours.namespaces),
        ours.balancer_url_template,
        ours.resync_interval,
    )


@kopf.on.cleanup()
async def cleanup(**_: Any) -> None:
    if _runtime is None:
        return
    if _runtime.workers is not None:
        await _runtime.workers.stop()
    if _runtime.balancers is not None:
        await _runtime.balancers.close()
    if _runtime.kube is not None:
        await _runtime.kube.close()
    log.info("paddler operator stopped")


def _generation(body: kopf.Body) -> int | None:
    gen = body.get("metadata", {}).get("generation")
    return int(gen) if gen is not None else None


@kopf.on.event(GROUP, VERSION, "llmpools")
async def pool_event(event: kopf.RawEvent, body: kopf.Body, namespace: str | None, name: str, **_: Any) -> None:
    if namespace is None:
        return
    workers = _workers()
    key: Key = ("LlmPool", namespace, name)
    if event["type"] == "DELETED":
        await workers.forget(key)
        workers.wake_namespace("ModelDeployment", namespace)
        return
    if workers.touch(key, _generation(body)):
        # A new or changed pool: its ModelDeployments re-plan (slots, images, a pool they waited for).
        workers.wake_namespace("ModelDeployment", namespace)


@kopf.on.event(GROUP, VERSION, "modeldeployments")
async def model_deployment_event(
    event: kopf.RawEvent, body: kopf.Body, namespace: str | None, name: str, **_: Any
) -> None:
    if namespace is None:
        return
    workers = _workers()
    key: Key = ("ModelDeployment", namespace, name)
    pool = (body.get("spec", {}).get("poolRef") or {}).get("name")
    if event["type"] == "DELETED":
        await workers.forget(key)
        await workers.reconciler.forget_model_deployment(namespace, name, pool)
    elif not workers.touch(key, _generation(body)):
        return
    if pool:
        workers.wake(("LlmPool", namespace, pool))  # its modelDeployments count


def _wake_owner(event: kopf.RawEvent, body: kopf.Body, namespace: str | None) -> None:
    if event["type"] is None or namespace is None:  # the initial listing: workers resync anyway
        return
    for ref in body.get("metadata", {}).get("ownerReferences") or []:
        if (
            ref.get("apiVersion") == API_VERSION
            and ref.get("controller")
            and ref.get("kind")
            in (
                "LlmPool",
                "ModelDeployment",
            )
        ):
            kind: Kind = ref["kind"]
            _workers().wake((kind, namespace, ref["name"]))


@kopf.on.event("apps", "v1", "deployments", labels=OWNED)
async def owned_deployment_event(event: kopf.RawEvent, body: kopf.Body, namespace: str | None, **_: Any) -> None:
    if event["type"] == "MODIFIED":
        # Status-only updates (the Deployment controller) are not edits: wake only on a spec change
        # the Deployment controller has not observed yet (ours are no-ops on the next pass).
        status = body.get("status", {})
        if _generation(body) == status.get("observedGeneration"):
            return
    _wake_owner(event, body, namespace)


@kopf.on.event("v1", "services", labels=OWNED)
async def owned_service_event(event: kopf.RawEvent, body: kopf.Body, namespace: str | None, **_: Any) -> None:
    _wake_owner(event, body, namespace)


@kopf.on.event("v1", "configmaps", labels=OWNED)
async def owned_config_map_event(event: kopf.RawEvent, body: kopf.Body, namespace: str | None, **_: Any) -> None:
    _wake_owner(event, body, namespace)
