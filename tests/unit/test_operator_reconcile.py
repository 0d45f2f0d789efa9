"""Reconciler: observe -> plan -> apply against an in-memory API (FakeKube) and a real
``paddler balancer`` process (plus a simulated agent) where the balancer matters."""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import copy
import itertools
from collections.abc import AsyncIterator, Mapping
from typing import Any

import aiohttp
import pytest

from paddler_operator.balancer_client import BalancerClient, BalancerClientSettings
from paddler_operator.kube import KubeError
from paddler_operator.objects import Obj, ObjRef, differences
from paddler_operator.reconcile import Reconciler
from paddler_operator.settings import OperatorSettings
from paddler_operator.workers import Workers
from tests.harness import Processes
from tests.harness import wait_until as async_wait_until

NS = "ns"
UNREACHABLE = "http://127.0.0.1:9"  # discard port: nothing listens


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = merge_patch(out.get(key), value)
    return out


class FakeKube:
    """Just enough of the API server: objects, generations, server-side defaults, events."""

    def __init__(self) -> None:
        self.objects: dict[ObjRef, Obj] = {}
        self.events: list[tuple[str, str, str]] = []
        self.calls: list[tuple[str, str]] = []
        self.reads: list[tuple[str, str]] = []
        """Every get and list, in order (a steady pass makes as few as it can)."""
        self._uids = itertools.count(1)
        self._versions = itertools.count(1)
        self.hpa_scale_to_zero = True
        """The HPAScaleToZero feature gate: without it an HPA with minReplicas 0 is invalid (422)."""
        self.served: set[tuple[str, str]] = set()
        """(apiVersion, kind) of the optional APIs this cluster serves (e.g. PodMonitor)."""

    def add(self, obj: Obj) -> Obj:
        obj = copy.deepcopy(obj)
        meta = obj.setdefault("metadata", {})
        meta.setdefault("namespace", NS)
        meta["uid"] = f"uid-{next(self._uids)}"
        meta["generation"] = 1
        meta["resourceVersion"] = str(next(self._versions))
        if obj["kind"] == "Deployment":  # a server-side default, as the real API server adds
            for c in obj["spec"]["template"]["spec"]["containers"]:
                c.setdefault("terminationMessagePath", "/dev/termination-log")
        self.objects[ObjRef.of(obj)] = obj
        return obj

    async def serves(self, api_version: str, kind: str) -> bool:
        self.reads.append(("discovery", f"{api_version}/{kind}"))
        return (api_version, kind) in self.served

    async def get(self, ref: ObjRef) -> Obj | None:
        self.reads.append(("get", str(ref)))
        found = self.objects.get(ref)
        return copy.deepcopy(found) if found is not None else None

    async def list(self, api_version: str, kind: str, namespace: str, label_selector: str | None = None) -> list[Obj]:
        self.reads.append(("list", f"{kind}/{namespace}"))
        return [
            copy.deepcopy(o)
            for r, o in self.objects.items()
            if (r.api_version, r.kind, r.namespace) == (api_version, kind, namespace)
        ]

    async def create(self, obj: Obj) -> Obj:
        ref = ObjRef.of(obj)
        self.calls.append(("create", str(ref)))
        if ref in self.objects:
            raise KubeError(409, "AlreadyExists", f"{ref} already exists")
        return self.add(obj)

    async def apply(self, obj: Obj) -> Obj:
        """Server-side apply, roughly: absent -> created; else what ``obj`` says is merged in (lists
        whole) and the object is written only when that changed it. A second controller is refused."""
        ref = ObjRef.of(obj)
        current = self.objects.get(ref)
        if current is None:
            self.calls.append(("create", str(ref)))
            return copy.deepcopy(self.add(obj))
        controllers = {
            r.get("uid")
            for r in (current["metadata"].get("ownerReferences") or []) + (obj["metadata"].get("ownerReferences") or [])
            if r.get("controller")
        }
        if len(controllers) > 1:
            raise KubeError(422, "Invalid", "Only one reference can have Controller set to true")
        wanted = {k: v for k, v in obj.items() if k != "metadata"}
        wanted["metadata"] = {k: v for k, v in obj["metadata"].items() if k not in ("name", "namespace")}
        if not differences(wanted, current):  # it already carries what is applied (defaults kept)
            return copy.deepcopy(current)
        patched = merge_patch(current, wanted)
        self.calls.append(("apply", str(ref)))
        if patched.get("spec") != current.get("spec"):
            patched["metadata"]["generation"] = current["metadata"]["generation"] + 1
        patched["metadata"]["resourceVersion"] = str(next(self._versions))
        self.objects[ref] = patched
        return copy.deepcopy(patched)

    async def dry_run_create(self, obj: Obj) -> None:
        self.calls.append(("dry-run", str(ObjRef.of(obj))))
        if obj["kind"] == "HorizontalPodAutoscaler" and obj["spec"]["minReplicas"] < 1 and not self.hpa_scale_to_zero:
            raise KubeError(422, "Invalid", "spec.minReplicas: Invalid value: 0: must be greater than or equal to 1")

    async def patch(self, ref: ObjRef, patch: Mapping[str, Any]) -> Obj:
        self.calls.append(("patch", str(ref)))
        current = self.objects[ref]
        patched = merge_patch(current, dict(patch))
        if patched.get("spec") != current.get("spec"):
            patched["metadata"]["generation"] = current["metadata"]["generation"] + 1
        patched["metadata"]["resourceVersion"] = str(next(self._versions))
        self.objects[ref] = patched
        return copy.deepcopy(patched)

    async def delete(self, ref: ObjRef) -> bool:
        self.calls.append(("delete", str(ref)))
        return self.objects.pop(ref, None) is not None

    async def patch_status(self, ref: ObjRef, status: Mapping[str, Any]) -> Obj:
        self.calls.append(("status", str(ref)))
        self.objects[ref]["status"] = merge_patch(self.objects[ref].get("status") or {}, dict(status))
        return copy.deepcopy(self.objects[ref])

    async def event(self, involved: Mapping[str, Any], type_: str, reason: str, message: str) -> None:
        self.events.append((type_, reason, message))

    def close(self) -> None:
        pass

    def writes(self) -> builtins.list[tuple[str, str]]:
        return [c for c in self.calls if c[0] != "status"]

    def condition(self, kind: str, name: str, type_: str = "Ready") -> tuple[str, str]:
        obj = self.objects[ObjRef("paddler.dev/v1alpha1", kind, NS, name)]
        for c in obj["status"]["conditions"]:
            if c["type"] == type_:
                return c["status"], c["reason"]
        raise AssertionError(f"no {type_} condition")


def pool(name: str = "p", **spec: Any) -> Obj:
    return {"apiVersion": "paddler.dev/v1alpha1", "kind": "LlmPool", "metadata": {"name": name}, "spec": spec}


def model_deployment(name: str = "m", pool_name: str = "p", **spec: Any) -> Obj:
    return {
        "apiVersion": "paddler.dev/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {"name": name},
        "spec": {"poolRef": {"name": pool_name}, "model": {"localPath": "/models/m.gguf"}, **spec},
    }


def deployment_ref(name: str) -> ObjRef:
    return ObjRef("apps/v1", "Deployment", NS, name)


@pytest.fixture
async def balancers() -> AsyncIterator[BalancerClient]:
    client = BalancerClient(BalancerClientSettings(request_timeout=2.0))
    yield client
    await client.close()


def reconciler(kube: FakeKube, balancers: BalancerClient, url: str = UNREACHABLE) -> Reconciler:
    settings = OperatorSettings(
        namespaces=(NS,), balancer_url_template=url, resync_interval=0.2, retry_min_delay=0.1, retry_max_delay=0.5
    )
    return Reconciler(kube, balancers, settings)  # type: ignore[arg-type]


async def test_pool_objects_are_created_once(balancers: BalancerClient) -> None:
    kube = FakeKube()
    kube.add(pool())
    r = reconciler(kube, balancers)
    outcome = await r.reconcile_pool(NS, "p")
    assert outcome.retry  # the balancer is unreachable: retry with backoff
    (secret,) = [ref for ref in kube.objects if ref.kind == "Secret"]
    assert secret.name.startswith("p-management-")  # the pool's token Secret, named by its uid
    assert sorted(kube.writes()) == [
        ("create", "ConfigMap/ns/p-balancer"),
        ("create", "Deployment/ns/p-balancer"),
        ("create", f"Secret/ns/{secret.name}"),
        ("create", "Service/ns/p-inference"),
        ("create", "Service/ns/p-management"),
        ("create", "Service/ns/p-management-peers"),
    ]
    assert kube.condition("LlmPool", "p") == ("False", "BalancerUnreachable")
    assert kube.condition("LlmPool", "p", "Progressing") == ("True", "BalancerUnreachable")
    kube.calls.clear()
    await r.reconcile_pool(NS, "p")
    assert kube.calls == []  # nothing differs: no write at all, status included
    assert [e[1] for e in kube.events].count("Created") == 6


async def test_drift_is_put_back_and_spec_changes_applied(balancers: BalancerClient) -> None:
    kube = FakeKube()
    kube.add(pool())
    r = reconciler(kube, balancers)
    await r.reconcile_pool(NS, "p")
    deployment = kube.objects[deployment_ref("p-balancer")]
    deployment["spec"]["template"]["spec"]["containers"][0]["args"] = ["hacked"]
    deployment["metadata"]["ownerReferences"] = []
    kube.calls.clear()
    await r.reconcile_pool(NS, "p")
    assert kube.writes() == [("apply", "Deployment/ns/p-balancer")]
    fixed = kube.objects[deployment_ref("p-balancer")]
    assert "balancer" in fixed["spec"]["template"]["spec"]["containers"][0]["args"]
    assert fixed["metadata"]["ownerReferences"][0]["kind"] == "LlmPool"
    assert any(e[1] == "Updated" for e in kube.events)

    # A changed pool spec reaches the agents of its ModelDeployments.
    kube.add(model_deployment())
    await r.reconcile_model_deployment(NS, "m")
    args = kube.objects[deployment_ref("m-agent")]["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--slots") + 1] == "4"
    kube.objects[ObjRef("paddler.dev/v1alpha1", "LlmPool", NS, "p")]["spec"] = {"agent": {"slotsPerAgent": 6}}
    await r.reconcile_model_deployment(NS, "m")
    args = kube.objects[deployment_ref("m-agent")]["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--slots") + 1] == "6"


async def test_object_controlled_by_someone_else_is_left_alone(balancers: BalancerClient) -> None:
    kube = FakeKube()
    kube.add(pool())
    kube.add(
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": "p-balancer", "ownerReferences": [{"controller": True, "uid": "other"}]},
            "data": {},
        }
    )
    r = reconciler(kube, balancers)
    await r.reconcile_pool(NS, "p")
    assert ("apply", "ConfigMap/ns/p-balancer") not in kube.calls
    assert kube.condition("LlmPool", "p", "Degraded") == ("True", "ApplyFailed")


async def test_model_deployment_waits_for_its_pool(balancers: BalancerClient) -> None:
    kube = FakeKube()
    kube.add(model_deployment())
    r = reconciler(kube, balancers)
    outcome = await r.reconcile_model_deployment(NS, "m")
    assert not outcome.ok
    assert not outcome.retry
    assert kube.condition("ModelDeployment", "m") == ("False", "PoolNotFound")
    assert kube.writes() == []
    kube.add(pool())
    await r.reconcile_model_deployment(NS, "m")
    assert ("create", "Deployment/ns/m-agent") in kube.calls
    assert kube.condition("ModelDeployment", "m") == ("False", "BalancerUnreachable")
    assert kube.condition("ModelDeployment", "m", "Progressing") == ("True", "BalancerUnreachable")


async def test_invalid_spec_is_reported_not_crashed(balancers: BalancerClient) -> None:
    kube = FakeKube()
    kube.add(model_deployment(model={"url": "https://x.invalid/a.gguf", "localPath": "/m.gguf"}))  # two sources
    r = reconciler(kube, balancers)
    outcome = await r.reconcile_model_deployment(NS, "m")
    assert not outcome.ok
    assert kube.condition("ModelDeployment", "m") == ("False", "InvalidSpec")


async def test_autoscaling_mode_switch_removes_the_hpa(balancers: BalancerClient) -> None:
    kube = FakeKube()
    kube.add(pool())
    kube.add(model_deployment(autoscaling={"mode": "HPA", "minReplicas": 0}))
    r = reconciler(kube, balancers)
    await r.reconcile_model_deployment(NS, "m")
    hpa = ObjRef("autoscaling/v2", "HorizontalPodAutoscaler", NS, "m-agent")
    assert hpa in kube.objects
    assert "replicas" not in kube.objects[deployment_ref("m-agent")]["spec"]
    kube.objects[ObjRef("paddler.dev/v1alpha1", "ModelDeployment", NS, "m")]["spec"]["autoscaling"] = {"mode": "None"}
    await r.reconcile_model_deployment(NS, "m")
    assert hpa not in kube.objects
    assert kube.objects[deployment_ref("m-agent")]["spec"]["replicas"] == 1


@pytest.mark.parametrize(("gate", "min_replicas"), [(True, 0), (False, 1)])
async def test_hpa_min_replicas_follow_the_clusters_scale_to_zero_gate(
    balancers: BalancerClient, gate: bool, min_replicas: int
) -> None:
    kube = FakeKube()
    kube.hpa_scale_to_zero = gate
    kube.add(pool())
    kube.add(model_deployment(autoscaling={"mode": "HPA", "minReplicas": 0}))
    r = reconciler(kube, balancers)
    await r.reconcile_model_deployment(NS, "m")
    await r.reconcile_model_deployment(NS, "m")
    hpa = kube.objects[ObjRef("autoscaling/v2", "HorizontalPodAutoscaler", NS, "m-agent")]
    assert hpa["spec"]["minReplicas"] == min_replicas
    probes = [c for c in kube.calls if c[0] == "dry-run"]
    assert probes == [("dry-run", f"HorizontalPodAutoscaler/{NS}/paddler-scale-to-zero-probe")]  # asked once


async def test_workers_retry_with_backoff_and_stop(balancers: BalancerClient) -> None:
    kube = FakeKube()
    kube.add(pool())
    workers = Workers(reconciler(kube, balancers))
    assert workers.touch(("LlmPool", NS, "p"), 1)
    assert not workers.touch(("LlmPool", NS, "p"), 1)  # same generation: a status-only event
    await async_wait_until(
        lambda: _true(sum(1 for c in kube.calls if c[0] == "create") == 6), timeout=5, what="objects created"
    )
    await asyncio.sleep(0.3)
    await workers.stop()
    assert workers.keys() == []


async def _true(value: bool) -> bool:
    return value


# --- against a real balancer ---------------------------------------------------------


async def test_desired_state_and_status_from_a_real_balancer(paddler: Processes, balancers: BalancerClient) -> None:
    balancer = paddler.balancer()
    kube = FakeKube()
    kube.add(pool())
    kube.add(model_deployment(inferenceParameters={"temperature": 0.2}))
    r = reconciler(kube, balancers, balancer.management_url)

    assert (await r.reconcile_pool(NS, "p")).ok
    assert kube.condition("LlmPool", "p") == ("True", "BalancerReady")
    await r.reconcile_model_deployment(NS, "m")
    snap = await balancers.snapshot(balancer.management_url)
    assert snap.group_states["m"]["model"] == {"LocalToAgent": "/models/m.gguf"}
    assert snap.group_states["m"]["inference_parameters"]["temperature"] == 0.2
    assert kube.condition("ModelDeployment", "m") == ("False", "AgentsNotReady")
    assert ("Normal", "DesiredStateApplied") in [(e[0], e[1]) for e in kube.events]

    paddler.agent(balancer, slots=3, name="a1", extra=("--model-group", "m"))

    async def md_ready() -> bool:
        await r.reconcile_model_deployment(NS, "m")
        return kube.condition("ModelDeployment", "m") == ("True", "AgentsReady")

    await async_wait_until(md_ready, timeout=15, what="ModelDeployment Ready with a real agent")
    status = kube.objects[ObjRef("paddler.dev/v1alpha1", "ModelDeployment", NS, "m")]["status"]
    assert (status["readyAgents"], status["slots"], status["agentsSummary"]) == (1, "3/3", "1/1")
    assert status["desiredStateApplied"] is True

    # Idempotent: the state is not pushed again when it already matches.
    pushed = [e for e in kube.events if e[1] == "DesiredStateApplied"]
    await r.reconcile_model_deployment(NS, "m")
    assert [e for e in kube.events if e[1] == "DesiredStateApplied"] == pushed

    await r.forget_model_deployment(NS, "m", "p")
    snap = await balancers.snapshot(balancer.management_url)
    assert "m" not in snap.group_states


async def test_owner_header_reaches_the_balancer(paddler: Processes, balancers: BalancerClient) -> None:
    balancer = paddler.balancer()
    kube = FakeKube()
    kube.add(pool())
    kube.add(model_deployment())
    await reconciler(kube, balancers, balancer.management_url).reconcile_model_deployment(NS, "m")
    snap = await balancers.snapshot(balancer.management_url)
    assert snap.group_owners["m"] == "ModelDeployment/ns/m"


async def test_snapshot_reads_a_groups_buffered_requests_from_json(
    paddler: Processes, balancers: BalancerClient
) -> None:
    balancer = paddler.balancer("--buffered-request-timeout", "20s")
    await balancers.put_desired_state(balancer.management_url, "m", {"model": {"LocalToAgent": "/m.gguf"}}, "me")
    chat = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
    session = balancers._http()
    pending = asyncio.create_task(
        session.post(f"{balancer.inference_url}/v1/chat/completions", json=chat, timeout=aiohttp.ClientTimeout(30))
    )
    try:

        async def buffered_in_m() -> bool:
            return (await balancers.snapshot(balancer.management_url, "m")).buffered_by_group == {"m": 1}

        await async_wait_until(buffered_in_m, timeout=10, what="one request of group m buffered")
        snap = await balancers.snapshot(balancer.management_url, "other")
        assert (snap.buffered_by_group, snap.buffered_total, snap.group_owners["m"]) == ({"other": 0}, 1, "me")
    finally:
        pending.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await pending


async def test_status_keys_no_longer_set_are_removed_once(balancers: BalancerClient) -> None:
    kube = FakeKube()
    obj = kube.add(pool())
    obj["status"] = {"stale": 1, "slots": "9/9"}
    r = reconciler(kube, balancers)
    await r.reconcile_pool(NS, "p")
    status = kube.objects[ObjRef("paddler.dev/v1alpha1", "LlmPool", NS, "p")]["status"]
    assert "stale" not in status
    assert status["slots"] == "0/0"
    kube.calls.clear()
    await r.reconcile_pool(NS, "p")
    assert kube.calls == []


async def test_agents_parked_while_the_pool_is_gone(balancers: BalancerClient) -> None:
    kube = FakeKube()
    kube.add(pool())
    kube.add(model_deployment(replicas=2, autoscaling={"mode": "HPA"}))
    r = reconciler(kube, balancers)
    await r.reconcile_model_deployment(NS, "m")
    kube.objects[deployment_ref("m-agent")]["spec"]["replicas"] = 2  # as the HPA would set it
    hpa = ObjRef("autoscaling/v2", "HorizontalPodAutoscaler", NS, "m-agent")
    assert hpa in kube.objects
    del kube.objects[ObjRef("paddler.dev/v1alpha1", "LlmPool", NS, "p")]
    await r.reconcile_model_deployment(NS, "m")
    assert kube.objects[deployment_ref("m-agent")]["spec"]["replicas"] == 0
    assert hpa not in kube.objects
    assert kube.condition("ModelDeployment", "m") == ("False", "PoolNotFound")
    assert ("Normal", "AgentsParked") in [(e[0], e[1]) for e in kube.events]
    kube.calls.clear()
    await r.reconcile_model_deployment(NS, "m")
    assert kube.writes() == []  # parked once
    kube.add(pool())
    await r.reconcile_model_deployment(NS, "m")
    assert hpa in kube.objects


async def test_pool_change_moves_the_model_group(paddler: Processes, balancers: BalancerClient) -> None:
    first, second = paddler.balancer(), paddler.balancer()
    port = {b: b.management_url.rsplit(":", 1)[1] for b in (first, second)}
    kube = FakeKube()
    kube.add(pool(port[first]))  # pool names are the ports: the URL template below maps them
    kube.add(pool(port[second]))
    kube.add(model_deployment(pool_name=port[first]))
    r = reconciler(kube, balancers, "http://127.0.0.1:{pool}")
    await r.reconcile_model_deployment(NS, "m")
    assert "m" in (await balancers.snapshot(first.management_url)).group_states
    md = kube.objects[ObjRef("paddler.dev/v1alpha1", "ModelDeployment", NS, "m")]
    assert md["status"]["pool"] == port[first]
    md["spec"]["poolRef"] = {"name": port[second]}
    await r.reconcile_model_deployment(NS, "m")
    assert "m" not in (await balancers.snapshot(first.management_url)).group_states
    assert "m" in (await balancers.snapshot(second.management_url)).group_states
    assert kube.objects[ObjRef("paddler.dev/v1alpha1", "ModelDeployment", NS, "m")]["status"]["pool"] == port[second]
    assert ("Normal", "PoolChanged") in [(e[0], e[1]) for e in kube.events]


async def test_object_created_meanwhile_is_applied_not_an_error(balancers: BalancerClient) -> None:
    kube = FakeKube()
    kube.add(pool())
    r = reconciler(kube, balancers)
    real_get = kube.get
    hidden = {deployment_ref("p-balancer")}

    async def stale_get(ref: ObjRef) -> Obj | None:  # the first read misses an object that already exists
        if ref in hidden:
            hidden.discard(ref)
            return None
        return await real_get(ref)

    await r.reconcile_pool(NS, "p")
    kube.get = stale_get  # type: ignore[method-assign]
    await r.reconcile_pool(NS, "p")
    assert kube.condition("LlmPool", "p", "Degraded") == ("False", "AsExpected")


async def test_builtin_idle_timer_survives_an_operator_restart(paddler: Processes, balancers: BalancerClient) -> None:
    balancer = paddler.balancer()
    kube = FakeKube()
    kube.add(pool())
    autoscaling = {"mode": "Builtin", "minReplicas": 0, "maxReplicas": 3, "scaleDownDelaySeconds": 100}
    kube.add(model_deployment(autoscaling=autoscaling))
    settings = OperatorSettings(namespaces=(NS,), balancer_url_template=balancer.management_url)
    now = [1_000_000.0]
    first = Reconciler(kube, balancers, settings, clock=lambda: now[0])  # type: ignore[arg-type]
    await first.reconcile_model_deployment(NS, "m")
    kube.objects[deployment_ref("m-agent")]["spec"]["replicas"] = 1  # woken earlier; now idle
    await first.reconcile_model_deployment(NS, "m")
    md = kube.objects[ObjRef("paddler.dev/v1alpha1", "ModelDeployment", NS, "m")]
    assert md["status"]["lowDemandSince"] == "1970-01-12T13:46:40Z"

    restarted = Reconciler(kube, balancers, settings, clock=lambda: now[0])  # type: ignore[arg-type]
    now[0] += 60
    await restarted.reconcile_model_deployment(NS, "m")
    assert kube.objects[deployment_ref("m-agent")]["spec"]["replicas"] == 1  # not reset, still waiting
    now[0] += 41  # 101 s after demand fell: the first operator's timer, not one restarted 60 s late
    await restarted.reconcile_model_deployment(NS, "m")
    assert kube.objects[deployment_ref("m-agent")]["spec"]["replicas"] == 0
    assert "lowDemandSince" not in md["status"]


async def test_desired_state_put_carries_max_unavailable_and_status_shows_the_rollout(
    paddler: Processes, balancers: BalancerClient
) -> None:
    balancer = paddler.balancer()
    kube = FakeKube()
    kube.add(pool())
    kube.add(model_deployment(rollout={"maxUnavailable": "50%"}))
    r = reconciler(kube, balancers, balancer.management_url)
    await r.reconcile_model_deployment(NS, "m")
    rollout = await balancers.rollout(balancer.management_url, "m")
    assert rollout is not None
    assert rollout.max_unavailable == "50%"
    assert rollout.phase == "Complete"  # no agent yet: nothing to switch

    kube.objects[ObjRef("paddler.dev/v1alpha1", "ModelDeployment", NS, "m")]["spec"]["rollout"] = {"maxUnavailable": 2}
    await r.reconcile_model_deployment(NS, "m")
    rollout = await balancers.rollout(balancer.management_url, "m")
    assert rollout is not None
    assert rollout.max_unavailable == "2"


async def test_pool_reconcile_removes_groups_of_model_deployments_that_no_longer_exist(
    paddler: Processes, balancers: BalancerClient
) -> None:
    balancer = paddler.balancer()
    url = balancer.management_url
    state = {"model": {"LocalToAgent": "/m.gguf"}}
    for group, owner in [
        ("gone", "ModelDeployment/ns/gone"),  # deleted while the operator was down
        ("m", "ModelDeployment/ns/m"),  # exists and names this pool
        ("moved", "ModelDeployment/ns/moved"),  # exists but names another pool now
        ("elsewhere", "ModelDeployment/other-ns/gone"),  # not this namespace's to judge
        ("by-hand", "alice"),
    ]:
        await balancers.put_desired_state(url, group, state, owner)
    kube = FakeKube()
    kube.add(pool())
    kube.add(model_deployment("m"))
    kube.add(model_deployment("moved", pool_name="q"))
    await reconciler(kube, balancers, url).reconcile_pool(NS, "p")
    groups = (await balancers.snapshot(url)).group_owners
    assert {"gone", "moved"}.isdisjoint(groups)
    assert {"m", "elsewhere", "by-hand"} <= set(groups)
    assert [e[1] for e in kube.events].count("ModelGroupRemoved") == 2


# --- several balancer replicas ----------------------------------------------------------


async def test_balancer_pdb_follows_the_replica_count(balancers: BalancerClient) -> None:
    kube = FakeKube()
    kube.add(pool(balancer={"replicas": 2}))
    r = reconciler(kube, balancers)
    await r.reconcile_pool(NS, "p")
    pdb = ObjRef("policy/v1", "PodDisruptionBudget", NS, "p-balancer")
    assert pdb in kube.objects
    kube.objects[ObjRef("paddler.dev/v1alpha1", "LlmPool", NS, "p")]["spec"] = {"balancer": {"replicas": 1}}
    await r.reconcile_pool(NS, "p")
    assert pdb not in kube.objects
    assert ("Normal", "Deleted", "Deleted PodDisruptionBudget p-balancer") in kube.events


async def test_the_operator_writes_to_and_reads_from_every_balancer_replica(paddler: Processes) -> None:
    first, second = paddler.balancer(), paddler.balancer()
    replicas = [first.management_url, second.management_url]

    async def resolve(base_url: str) -> tuple[str, ...]:
        return tuple(replicas)

    client = BalancerClient(BalancerClientSettings(request_timeout=2.0), resolver=resolve)
    try:
        kube = FakeKube()
        kube.add(pool(balancer={"replicas": 2}))
        kube.add(model_deployment())
        r = reconciler(kube, client, "http://{service}.{namespace}.svc:{port}")
        assert (await r.reconcile_pool(NS, "p")).ok
        await r.reconcile_model_deployment(NS, "m")
        for balancer in (first, second):
            assert "m" in (await balancers_of(balancer.management_url)).group_states

        replicas.append(UNREACHABLE)  # a third replica that does not answer: a partial pass
        outcome = await r.reconcile_pool(NS, "p")
        assert outcome.retry
        assert kube.condition("LlmPool", "p") == ("True", "BalancerReady")
        assert kube.condition("LlmPool", "p", "Degraded") == ("True", "BalancerReplicasUnreachable")
        assert ("Warning", "BalancerReplicasUnreachable") in [(e[0], e[1]) for e in kube.events]
        status = kube.objects[ObjRef("paddler.dev/v1alpha1", "LlmPool", NS, "p")]["status"]
        assert (status["balancers"], status["balancerReplicasReached"]) == ("0/2", 2)
    finally:
        await client.close()


async def balancers_of(url: str) -> Any:
    client = BalancerClient(BalancerClientSettings(request_timeout=2.0))
    try:
        return await client.snapshot(url)
    finally:
        await client.close()


@pytest.mark.parametrize("mode", ["None", "HPA", "KEDA"])
async def test_a_steady_pass_reads_each_object_once_and_writes_nothing(
    paddler: Processes, balancers: BalancerClient, mode: str
) -> None:
    balancer = paddler.balancer()
    paddler.agent(balancer, slots=2, name="a1", extra=("--model-group", "m"))
    kube = FakeKube()
    kube.add(pool())
    kube.add(model_deployment(autoscaling={"mode": mode, "minReplicas": 1}))
    r = reconciler(kube, balancers, balancer.management_url)
    assert (await r.reconcile_pool(NS, "p")).ok

    async def settled() -> bool:
        before = len(kube.calls)
        outcome = await r.reconcile_model_deployment(NS, "m")
        # Ready (AgentsReady; for HPA/KEDA here ScaledToZero: this fake API server leaves a
        # Deployment created without replicas at none, where a real one defaults them to 1).
        ready = kube.condition("ModelDeployment", "m")[0] == "True"
        return outcome.ok and ready and len(kube.calls) == before

    await async_wait_until(settled, timeout=15, what="a pass that changes nothing")
    kube.calls.clear()
    kube.reads.clear()
    events = len(kube.events)
    assert (await r.reconcile_model_deployment(NS, "m")).ok
    assert kube.calls == []  # no create, apply, patch, delete or status write
    assert len(kube.events) == events
    reads = [ref for _, ref in kube.reads]
    assert len(reads) == len(set(reads)), reads  # nothing read twice
    expected = {f"ModelDeployment/{NS}/m", f"LlmPool/{NS}/p"}
    if mode != "None":
        expected.add(f"Deployment/{NS}/m-agent")  # the autoscaler's replicas
    assert expected <= set(reads), reads
