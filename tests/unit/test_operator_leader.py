"""Leader election: the pure decision (a table), the Lease objects written, the flags, and two
electors stepped by hand against an in-memory API server that does compare-and-swap on
``resourceVersion`` as the real one does (the k8s tier runs real processes against a real one)."""

from __future__ import annotations

import copy
import datetime as dt
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from paddler_cli.main import build_parser
from paddler_operator.cli import add_subcommand, leader_identity, settings_from_args
from paddler_operator.kube import KubeApi, KubeError, KubeSettings, collection_path, object_path
from paddler_operator.leader import (
    Decision,
    LeaderElector,
    LeaseRecord,
    Observation,
    claimed_lease,
    decide,
    observe,
    released_lease,
)
from paddler_operator.objects import Obj, ObjRef
from paddler_operator.settings import LeaderElectionSettings

ME, OTHER = "me", "other"
DEADLINE = 7.0


def lease(holder: str | None, duration: float = 10.0, renew: str = "t1") -> LeaseRecord:
    return LeaseRecord(holder=holder, duration=duration, renew_time=renew)


@pytest.mark.parametrize(
    ("record", "observed_at", "renewed_at", "now", "expected"),
    [
        # standby
        (None, 0.0, None, 0.0, Decision.ACQUIRE),  # no Lease yet: create it
        (lease(None), 0.0, None, 0.0, Decision.ACQUIRE),  # released by its last holder
        (lease(ME), 0.0, None, 0.0, Decision.ACQUIRE),  # mine from an earlier run of this pod
        (lease(OTHER), 0.0, None, 0.0, Decision.WAIT),
        (lease(OTHER), 0.0, None, 9.99, Decision.WAIT),  # live until its duration has passed...
        (lease(OTHER), 0.0, None, 10.0, Decision.ACQUIRE),  # ...since I saw it change, then mine
        (lease(OTHER, duration=1), 5.0, None, 6.0, Decision.ACQUIRE),  # the holder's own duration counts
        (lease(OTHER), 5.0, None, 14.0, Decision.WAIT),  # seen changing at 5: live until 15
        # leader
        (lease(ME), 0.0, 10.0, 12.0, Decision.RENEW),
        (lease(ME), 0.0, 10.0, 16.99, Decision.RENEW),
        (lease(ME), 0.0, 10.0, 17.0, Decision.LOST),  # renew deadline passed: stop before anyone may take it
        (lease(OTHER), 0.0, 10.0, 12.0, Decision.LOST),  # someone else holds it
        (lease(None), 0.0, 10.0, 12.0, Decision.LOST),  # released behind my back
        (None, 0.0, 10.0, 12.0, Decision.LOST),  # deleted
    ],
)
def test_decide(
    record: LeaseRecord | None, observed_at: float, renewed_at: float | None, now: float, expected: Decision
) -> None:
    got = decide(record, ME, now, observed_at=observed_at, renewed_at=renewed_at, renew_deadline=DEADLINE)
    assert got is expected


def test_observation_keeps_its_time_until_the_record_changes() -> None:
    first = observe(None, lease(OTHER, renew="t1"), 1.0)
    assert first == Observation(lease(OTHER, renew="t1"), 1.0)
    assert observe(first, lease(OTHER, renew="t1"), 5.0) is first
    assert observe(first, lease(OTHER, renew="t2"), 5.0) == Observation(lease(OTHER, renew="t2"), 5.0)
    assert observe(first, None, 5.0) is None


SETTINGS = LeaderElectionSettings(namespace="ops", identity=ME)
WALL = dt.datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=dt.UTC)


def lease_obj(spec: dict[str, Any], version: str = "7") -> Obj:
    meta = {"name": "paddler-operator", "namespace": "ops", "resourceVersion": version, "labels": {"a": "b"}}
    return {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": meta, "spec": spec}


@pytest.mark.parametrize(
    ("current", "acquire_time", "transitions"),
    [
        (None, "2026-01-02T03:04:05.678901Z", 0),  # created
        (lease_obj({"holderIdentity": OTHER, "leaseTransitions": 3}), "2026-01-02T03:04:05.678901Z", 4),  # taken
        (lease_obj({"leaseTransitions": 3}), "2026-01-02T03:04:05.678901Z", 4),  # released, then taken
        (lease_obj({"holderIdentity": ME, "acquireTime": "then", "leaseTransitions": 3}), "then", 3),  # renewed
    ],
)
def test_claimed_lease(current: Obj | None, acquire_time: str, transitions: int) -> None:
    want = claimed_lease(SETTINGS, current, WALL)
    assert want["spec"] == {
        "holderIdentity": ME,
        "leaseDurationSeconds": 10,
        "acquireTime": acquire_time,
        "renewTime": "2026-01-02T03:04:05.678901Z",
        "leaseTransitions": transitions,
    }
    # The version read goes back with the write: the API server refuses it if anyone wrote since.
    assert want["metadata"].get("resourceVersion") == (None if current is None else "7")


def test_released_lease_has_no_holder_and_keeps_the_count() -> None:
    released = released_lease(SETTINGS, lease_obj({"holderIdentity": ME, "leaseTransitions": 3}), WALL)
    assert "holderIdentity" not in released["spec"]
    assert released["spec"]["leaseTransitions"] == 3
    assert released["metadata"]["labels"] == {"a": "b"}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"identity": ""}, "needs a namespace"),
        ({"renew_deadline": 10.0}, "renew_deadline < lease_duration"),
        ({"retry_period": 0.0}, "0 < retry_period"),
        ({"retry_period": 8.0}, "retry_period < renew_deadline"),
        ({"lease_duration": 10.5}, "whole seconds"),
    ],
)
def test_invalid_leader_election_settings(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        LeaderElectionSettings(**{"namespace": "ops", "identity": ME, **kwargs})


# --- flags -------------------------------------------------------------------------------


def parse(*argv: str) -> Any:
    return settings_from_args(build_parser([add_subcommand]).parse_args(["operator", *argv]))


def test_leader_election_is_off_by_default() -> None:
    assert parse("-n", "a").leader_election is None


def test_leader_election_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POD_NAME", "op-0")
    got = parse(
        "-A", "--leader-election", "--leader-election-namespace", "ops", "--leader-election-lease-name", "l",
        "--leader-election-lease-duration", "15", "--leader-election-renew-deadline", "10",
        "--leader-election-retry-period", "3",
    )  # fmt: skip
    assert got.leader_election == LeaderElectionSettings(
        namespace="ops", identity="op-0", lease_name="l", lease_duration=15, renew_deadline=10, retry_period=3
    )


def test_leader_election_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POD_NAME", "op-0")
    monkeypatch.delenv("POD_NAMESPACE", raising=False)
    got = parse("-n", "watched", "--leader-election").leader_election
    assert (got.namespace, got.lease_name) == ("watched", "paddler-operator")  # the one watched namespace
    assert (got.lease_duration, got.renew_deadline, got.retry_period) == (10.0, 7.0, 2.0)
    monkeypatch.setenv("POD_NAMESPACE", "mine")
    assert parse("-A", "--leader-election").leader_election.namespace == "mine"


def test_leader_election_without_a_namespace_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("POD_NAMESPACE", raising=False)
    with pytest.raises(ValueError, match="--leader-election-namespace"):
        parse("-A", "--leader-election")


def test_identity_is_the_pod_name_else_host_and_pid() -> None:
    assert leader_identity({"POD_NAME": "op-0"}) == "op-0"
    host, _, pid = leader_identity({}).rpartition("_")
    assert host
    assert int(pid) > 0


# --- two electors against an in-memory API server ----------------------------------------


class FakeLeases:
    """get / create / replace of Leases with resourceVersion compare-and-swap; ``down`` makes
    every call fail as an unreachable API server does."""

    def __init__(self) -> None:
        self.objects: dict[str, Obj] = {}
        self.version = 0
        self.down = False

    def _check(self) -> None:
        if self.down:
            raise KubeError(0, "Unreachable", "down")

    def _store(self, obj: Obj) -> Obj:
        self.version += 1
        stored = copy.deepcopy(obj)
        stored["metadata"]["resourceVersion"] = str(self.version)
        self.objects[stored["metadata"]["name"]] = stored
        return copy.deepcopy(stored)

    async def get(self, ref: ObjRef) -> Obj | None:
        self._check()
        found = self.objects.get(ref.name)
        return copy.deepcopy(found) if found else None

    async def create(self, obj: Obj) -> Obj:
        self._check()
        if obj["metadata"]["name"] in self.objects:
            raise KubeError(409, "AlreadyExists", "exists")
        return self._store(obj)

    async def replace(self, obj: Obj) -> Obj:
        self._check()
        have = self.objects[obj["metadata"]["name"]]
        if obj["metadata"].get("resourceVersion") != have["metadata"]["resourceVersion"]:
            raise KubeError(409, "Conflict", "the object has been modified")
        return self._store(obj)

    def holder(self) -> str | None:
        return LeaseRecord.of(self.objects["paddler-operator"], 10).holder


class Replica:
    def __init__(self, api: FakeLeases, name: str, clock: list[float]) -> None:
        self.events: list[str] = []
        self.elector = LeaderElector(
            api,  # type: ignore[arg-type]  # the fake has the three calls the elector makes
            LeaderElectionSettings(namespace="ops", identity=name),
            self._lead,
            self._stop,
            clock=lambda: clock[0],
            wall=lambda: WALL + dt.timedelta(seconds=clock[0]),
        )

    async def _lead(self) -> None:
        self.events.append("lead")

    async def _stop(self) -> None:
        self.events.append("stop")


@pytest.fixture
def world() -> tuple[FakeLeases, list[float], Replica, Replica]:
    api, clock = FakeLeases(), [100.0]
    return api, clock, Replica(api, "a", clock), Replica(api, "b", clock)


async def run_until(clock: list[float], until: float, *replicas: Replica) -> None:
    """Step each replica whenever its own delay says, until the clock reaches ``until``."""
    due = dict.fromkeys(replicas, clock[0])
    while True:
        replica = min(due, key=lambda r: due[r])
        if due[replica] > until:
            clock[0] = until
            return
        clock[0] = due[replica]
        due[replica] = clock[0] + max(await replica.elector.step(), 0.01)


async def test_one_leads_and_the_other_takes_over_a_lease_duration_after_it_dies(
    world: tuple[FakeLeases, list[float], Replica, Replica],
) -> None:
    api, clock, a, b = world
    await run_until(clock, 130.0, a, b)
    assert api.holder() == "a"
    assert (a.events, b.events) == (["lead"], [])
    # a dies (no more steps, no release): b takes over when the lease it last saw renewed expires.
    died = clock[0]
    last_renewal = api.objects["paddler-operator"]["spec"]["renewTime"]
    await run_until(clock, died + 20.0, b)
    assert api.holder() == "b"
    assert b.events == ["lead"]
    taken = dt.datetime.strptime(api.objects["paddler-operator"]["spec"]["acquireTime"], "%Y-%m-%dT%H:%M:%S.%fZ")
    renewed = dt.datetime.strptime(last_renewal, "%Y-%m-%dT%H:%M:%S.%fZ")
    assert 10.0 <= (taken - renewed).total_seconds() <= 12.0  # a lease duration, plus at most one retry period
    assert api.objects["paddler-operator"]["spec"]["leaseTransitions"] == 1


async def test_a_leader_that_cannot_renew_stops_before_anyone_may_take_over(
    world: tuple[FakeLeases, list[float], Replica, Replica],
) -> None:
    api, clock, a, b = world
    await run_until(clock, 110.0, a, b)
    assert a.elector.leading
    api.down = True  # a is cut off from the API server (b too, here: nobody takes over)
    await run_until(clock, 116.5, a)
    assert a.events == ["lead"]  # still inside the renew deadline
    await run_until(clock, 118.0, a)
    assert a.events == ["lead", "stop"]  # 7 s without a renewal: stopped, 3 s before the lease expires
    assert not a.elector.leading
    api.down = False
    await run_until(clock, 125.0, a, b)
    assert api.holder() == "a"  # nobody took it meanwhile: a carries on (compare-and-swap kept it safe)
    assert a.events == ["lead", "stop", "lead"]
    assert b.events == []


async def test_a_leader_that_sees_another_holder_stops(world: tuple[FakeLeases, list[float], Replica, Replica]) -> None:
    api, clock, a, _b = world
    await run_until(clock, 104.0, a)
    taken = api.objects["paddler-operator"]
    taken["spec"]["holderIdentity"] = "intruder"
    await run_until(clock, 107.0, a)
    assert a.events == ["lead", "stop"]


async def test_stopping_the_leader_releases_the_lease_for_the_standby_at_once(
    world: tuple[FakeLeases, list[float], Replica, Replica],
) -> None:
    api, clock, a, b = world
    await run_until(clock, 110.0, a, b)
    await a.elector.stop()
    assert a.events == ["lead", "stop"]
    assert api.holder() is None
    await b.elector.step()  # its next attempt, not a lease duration later
    assert api.holder() == "b"
    assert b.events == ["lead"]


async def test_two_standbys_racing_for_a_free_lease_give_one_leader(
    world: tuple[FakeLeases, list[float], Replica, Replica],
) -> None:
    api, _clock, a, b = world
    real_get = api.get
    reads: list[Obj | None] = []

    async def both_read_first(ref: ObjRef) -> Obj | None:
        reads.append(await real_get(ref))
        return reads[0]  # b decides on what a read: the race the API server's CAS settles

    api.get = both_read_first  # type: ignore[method-assign]
    await a.elector.step()
    await b.elector.step()
    assert (a.elector.leading, b.elector.leading) == (True, False)
    assert api.holder() == "a"


# --- the Lease calls kube.py makes ---------------------------------------------------------


def test_lease_and_cluster_wide_paths() -> None:
    ref = ObjRef("coordination.k8s.io/v1", "Lease", "ops", "paddler-operator")
    assert object_path(ref) == "/apis/coordination.k8s.io/v1/namespaces/ops/leases/paddler-operator"
    assert collection_path("paddler.dev/v1alpha1", "LlmPool", None) == "/apis/paddler.dev/v1alpha1/llmpools"


@pytest.fixture
async def lease_api(tmp_path: Path) -> AsyncIterator[tuple[KubeApi, list[tuple[str, str, Any]], list[bool]]]:
    """A KubeApi against a small API server whose PUT is a compare-and-swap on version "2"; the
    client's writes are allowed while ``allowed[0]`` (its ``may_write``)."""
    seen: list[tuple[str, str, Any]] = []
    allowed = [True]

    async def handler(request: web.Request) -> web.Response:
        text = await request.text()
        body = json.loads(text) if text else {}
        meta = body.get("metadata") or {}
        seen.append((request.method, request.path, meta.get("resourceVersion")))
        if request.method == "PUT" and meta.get("resourceVersion") != "2":
            return web.json_response({"kind": "Status", "reason": "Conflict", "message": "modified"}, status=409)
        return web.json_response({**body, "metadata": {**meta, "resourceVersion": "3"}})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    config = tmp_path / "config"
    config.write_text(
        json.dumps(
            {
                "clusters": [{"name": "c", "cluster": {"server": f"http://127.0.0.1:{server.port}"}}],
                "users": [{"name": "u", "user": {"token": "tok"}}],
                "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}],
                "current-context": "x",
            }
        )
    )
    api = KubeApi(KubeSettings(kubeconfig=str(config), request_timeout=5), may_write=lambda: allowed[0])
    try:
        yield api, seen, allowed
    finally:
        await api.close()
        await server.close()


async def test_replace_is_a_put_that_a_stale_version_turns_into_a_409(
    lease_api: tuple[KubeApi, list[tuple[str, str, Any]], list[bool]],
) -> None:
    api, seen, _allowed = lease_api
    written = await api.replace(claimed_lease(SETTINGS, lease_obj({"holderIdentity": OTHER}, version="2"), WALL))
    assert written["metadata"]["resourceVersion"] == "3"
    with pytest.raises(KubeError) as err:
        await api.replace(claimed_lease(SETTINGS, lease_obj({"holderIdentity": OTHER}, version="1"), WALL))
    assert err.value.status == 409
    assert seen[0][:2] == ("PUT", "/apis/coordination.k8s.io/v1/namespaces/ops/leases/paddler-operator")


async def test_writes_are_refused_unsent_once_the_lease_is_not_held(
    lease_api: tuple[KubeApi, list[tuple[str, str, Any]], list[bool]],
) -> None:
    api, seen, allowed = lease_api
    ref = ObjRef("apps/v1", "Deployment", "ns", "d")
    allowed[0] = False
    with pytest.raises(KubeError, match="does not hold the leader lease"):
        await api.patch(ref, {"spec": {"replicas": 2}})
    assert seen == []  # nothing reached the API server
    await api.get(ref)  # reads stay allowed (a standby may look)
    allowed[0] = True
    await api.patch(ref, {"spec": {"replicas": 2}})
    assert [method for method, _path, _version in seen] == ["GET", "PATCH"]


async def test_the_lease_is_not_held_past_the_renew_deadline_even_before_the_loop_notices(
    world: tuple[FakeLeases, list[float], Replica, Replica],
) -> None:
    _api, clock, a, _b = world
    await a.elector.step()
    assert a.elector.holds_lease()
    clock[0] += 7.0  # the process was paused: no step ran, a worker's timer may fire first
    assert a.elector.leading  # the loop has not noticed yet...
    assert not a.elector.holds_lease()  # ...but a write asking now is refused
