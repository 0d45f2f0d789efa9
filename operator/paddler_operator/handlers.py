"""kopf wiring: watch events in, reconcile workers woken. The only module that imports kopf.

Only *event* handlers are used: they need no finalizers and store nothing on the
objects (no kopf annotations), so the operator is purely level-based and a
custom resource can be deleted even while the operator is down. Deletion of what
a resource made is left to Kubernetes' garbage collector (owner references).

With leader election (``--leader-election``, :mod:`paddler_operator.leader`) every
replica runs the watches, but only the leader has reconcile workers; a standby's event
handlers do nothing. A replica that becomes leader makes fresh workers and lists every
LlmPool and ModelDeployment it watches: the events it ignored as a standby are not
replayed, the objects are read as they are now. One that stops leading stops its workers
before anything else.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from typing import Any

import kopf

from paddler_operator.balancer_client import BalancerClient, BalancerClientSettings
from paddler_operator.crd_models import API_VERSION, GROUP, VERSION
from paddler_operator.kube import KubeApi, KubeConfigError, KubeError, KubeSettings, login
from paddler_operator.leader import LeaderElector
from paddler_operator.plan import MANAGED_BY
from paddler_operator.reconcile import Reconciler
from paddler_operator.settings import OperatorSettings
from paddler_operator.workers import Key, Kind, Workers

log = logging.getLogger(__name__)

OWNED = {"app.kubernetes.io/managed-by": MANAGED_BY}


@dataclass
class _Runtime:
    settings: OperatorSettings
    kube: KubeApi | None = None
    balancers: BalancerClient | None = None
    workers: Workers[Reconciler] | None = None
    """The reconcile workers; None while this replica is a standby."""
    elector: LeaderElector | None = None
    seeding: asyncio.Task[None] | None = None
    """A new leader's listing of what it watches (:func:`_seed`)."""


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


def _workers() -> Workers[Reconciler] | None:
    """The reconcile workers; None on a standby, whose events change nothing (a new leader lists)."""
    if _runtime is None:
        raise kopf.PermanentError("operator not started")
    return _runtime.workers


async def _lead() -> None:
    """This replica became leader: fresh workers (nothing kept from an earlier term), and every
    watched object listed, so each one is reconciled from what it says now."""
    runtime = _runtime
    if runtime is None or runtime.kube is None or runtime.balancers is None:
        raise RuntimeError("operator not started")
    workers = Workers(Reconciler(runtime.kube, runtime.balancers, runtime.settings))
    runtime.workers = workers
    runtime.seeding = asyncio.create_task(_seed(runtime.kube, runtime.settings, workers), name="leader lists objects")


async def _step_down() -> None:
    """This replica stopped leading (lost the lease, or is stopping): no reconcile from here on."""
    if _runtime is None:
        return
    seeding, _runtime.seeding = _runtime.seeding, None
    workers, _runtime.workers = _runtime.workers, None
    if seeding is not None:
        seeding.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await seeding
    if workers is not None:
        await workers.stop()


async def _seed(kube: KubeApi, settings: OperatorSettings, workers: Workers[Reconciler]) -> None:
    """A worker for every LlmPool and ModelDeployment in the watched namespaces (each reconciles at
    once). Events keep touching ``workers`` meanwhile: what the list misses, they bring."""
    failures = 0
    while True:
        try:
            found = await _watched_objects(kube, settings)
            break
        except KubeError as err:
            failures += 1
            log.warning("leader listing failed err=%s", err)
            await asyncio.sleep(settings.retry_delay(failures))
    for key, generation in found:
        workers.touch(key, generation)
    log.info("leader reconciles objects=%d", len(found))


async def _watched_objects(kube: KubeApi, settings: OperatorSettings) -> list[tuple[Key, int | None]]:
    """(key, generation) of every LlmPool and ModelDeployment this operator watches."""
    scopes: list[str | None] = [None] if settings.all_namespaces else list(settings.namespaces)
    found: list[tuple[Key, int | None]] = []
    kinds: tuple[Kind, ...] = ("LlmPool", "ModelDeployment")
    for kind in kinds:
        for namespace in scopes:
            for obj in await kube.list(API_VERSION, kind, namespace):
                meta = obj["metadata"]
                generation = meta.get("generation")
                found.append(((kind, meta["namespace"], meta["name"]), int(generation) if generation else None))
    return found


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
    _runtime.balancers = BalancerClient(BalancerClientSettings(request_timeout=ours.balancer_timeout))
    election = ours.leader_election
    if election is None:
        _runtime.kube = KubeApi(KubeSettings(kubeconfig=ours.kubeconfig))
        _runtime.workers = Workers(Reconciler(_runtime.kube, _runtime.balancers, ours))
    else:
        # The Lease has its own client: renewals never queue behind reconcile traffic.
        lease_kube = KubeApi(KubeSettings(kubeconfig=ours.kubeconfig, request_timeout=election.renew_deadline))
        elector = _runtime.elector = LeaderElector(lease_kube, election, _lead, _step_down)
        # Reconcile writes go out only while the lease is held, by the clock at the moment of the write.
        _runtime.kube = KubeApi(KubeSettings(kubeconfig=ours.kubeconfig), may_write=elector.holds_lease)
    log.info(
        "paddler operator started namespaces=%s balancer_url_template=%s resync=%.1fs leader_election=%s",
        "*" if ours.all_namespaces else ",".join(ours.namespaces),
        ours.balancer_url_template,
        ours.resync_interval,
        f"lease={_runtime.elector.lease} identity={election.identity}" if _runtime.elector and election else "off",
    )
    if _runtime.elector is not None:
        _runtime.elector.start()


@kopf.on.cleanup()
async def cleanup(**_: Any) -> None:
    if _runtime is None:
        return
    if _runtime.elector is not None:
        await _runtime.elector.stop()  # a leader stops its workers, then releases the lease
        await _runtime.elector.kube.close()
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
    if workers is None:
        return
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
    if workers is None:
        return
    key: Key = ("ModelDeployment", namespace, name)
    pool = (body.get("spec", {}).get("poolRef") or {}).get("name")
    if event["type"] == "DELETED":
        await workers.forget(key)
        if _workers() is not workers:  # stepped down meanwhile: the balancer is no longer ours to call
            return
        await workers.reconciler.forget_model_deployment(namespace, name, pool)
    elif not workers.touch(key, _generation(body)):
        return
    if pool:
        workers.wake(("LlmPool", namespace, pool))  # its modelDeployments count


def _wake_owner(event: kopf.RawEvent, body: kopf.Body, namespace: str | None) -> None:
    workers = _workers()
    if event["type"] is None or namespace is None or workers is None:  # initial listing: workers resync anyway
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
            workers.wake((kind, namespace, ref["name"]))


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
