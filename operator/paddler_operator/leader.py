"""Leader election over a ``coordination.k8s.io/v1`` Lease: several operator replicas, one active.

The decision is pure (:func:`decide`: the lease as last read, who I am, what I last saw and
when, and now -> acquire / renew / wait / lost), tested with a table; :class:`LeaderElector`
is the thin loop around it that reads and writes the Lease through
:class:`~paddler_operator.kube.KubeApi` and calls back when this replica starts or stops
leading.

Timing, as client-go's leader election does it (all on this process's monotonic clock, so
clock skew between nodes does not matter):

* a standby may take the lease once ``leaseDurationSeconds`` have passed since it last saw
  the Lease *change* (not since the ``renewTime`` written in it, which is another node's clock);
* the leader renews every ``retry_period``; when it has not renewed successfully for
  ``renew_deadline`` (< lease duration) it stops reconciling before anyone may take over;
* every write is a compare-and-swap on ``resourceVersion``: of two replicas that race, one
  gets a 409 and stays standby.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from paddler_operator.kube import KubeApi, KubeError
from paddler_operator.objects import Obj, ObjRef
from paddler_operator.settings import LeaderElectionSettings

log = logging.getLogger(__name__)

LEASE_API_VERSION = "coordination.k8s.io/v1"
MICROTIME_FORMAT = "%Y-%m-%dT%H:%M:%S.%fZ"
"""``metav1.MicroTime`` as the API server writes it (``acquireTime``, ``renewTime``)."""


class Decision(StrEnum):
    ACQUIRE = "acquire"
    """Standby: the lease is absent, released, expired or already mine: take it."""
    RENEW = "renew"
    """Leader: the lease is mine: renew it and go on reconciling."""
    WAIT = "wait"
    """Standby: someone else holds a live lease."""
    LOST = "lost"
    """Leader: someone else holds the lease, it is gone, or I could not renew it in time: stop."""


@dataclass(frozen=True)
class LeaseRecord:
    """What a Lease's spec says (``resourceVersion`` aside: any write changes that)."""

    holder: str | None
    duration: float
    """Seconds (``leaseDurationSeconds``)."""
    renew_time: str | None = None
    acquire_time: str | None = None
    transitions: int = 0

    @classmethod
    def of(cls, lease: Mapping[str, Any], default_duration: float) -> LeaseRecord:
        spec = lease.get("spec") or {}
        return cls(
            holder=spec.get("holderIdentity") or None,
            duration=float(spec.get("leaseDurationSeconds") or default_duration),
            renew_time=spec.get("renewTime"),
            acquire_time=spec.get("acquireTime"),
            transitions=int(spec.get("leaseTransitions") or 0),
        )


@dataclass(frozen=True)
class Observation:
    record: LeaseRecord
    at: float
    """Local monotonic seconds when this record was first seen."""


def observe(previous: Observation | None, record: LeaseRecord | None, now: float) -> Observation | None:
    """The observation after reading ``record`` at ``now``: unchanged records keep their time."""
    if record is None:
        return None
    if previous is not None and previous.record == record:
        return previous
    return Observation(record, now)


def renew_expired(renewed_at: float, now: float, renew_deadline: float) -> bool:
    """Has the leader gone ``renew_deadline`` seconds without a successful renewal?"""
    return now >= renewed_at + renew_deadline


def decide(
    lease: LeaseRecord | None,
    identity: str,
    now: float,
    *,
    observed_at: float,
    renewed_at: float | None,
    renew_deadline: float,
) -> Decision:
    """What to do with the lease as just read.

    ``observed_at``: when ``lease`` was first seen as it is (local seconds, like ``now``);
    ``renewed_at``: when the renewal that keeps me leader started, None while standby."""
    if renewed_at is not None:
        if renew_expired(renewed_at, now, renew_deadline):
            return Decision.LOST
        if lease is None or lease.holder != identity:
            return Decision.LOST
        return Decision.RENEW
    if lease is None or lease.holder is None or lease.holder == identity:
        return Decision.ACQUIRE
    if now >= observed_at + lease.duration:
        return Decision.ACQUIRE
    return Decision.WAIT


def microtime(when: dt.datetime) -> str:
    return when.astimezone(dt.UTC).strftime(MICROTIME_FORMAT)


def _metadata(settings: LeaderElectionSettings, current: Obj | None) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": settings.lease_name, "namespace": settings.namespace}
    if current is not None:
        have = current.get("metadata") or {}
        meta |= {k: have[k] for k in ("resourceVersion", "labels", "annotations") if k in have}
    return meta


def claimed_lease(settings: LeaderElectionSettings, current: Obj | None, wall: dt.datetime) -> Obj:
    """The Lease that makes (or keeps) me its holder, written over ``current`` (None: create it).
    Its ``resourceVersion`` makes the write fail if anyone wrote the Lease since we read it.
    A new holder counts one more transition; my own renewal keeps ``acquireTime``."""
    now = microtime(wall)
    acquired, transitions = now, 0
    if current is not None:
        record = LeaseRecord.of(current, settings.lease_duration)
        if record.holder == settings.identity:
            acquired, transitions = record.acquire_time or now, record.transitions
        else:
            transitions = record.transitions + 1
    spec = {
        "holderIdentity": settings.identity,
        "leaseDurationSeconds": int(settings.lease_duration),
        "acquireTime": acquired,
        "renewTime": now,
        "leaseTransitions": transitions,
    }
    return {"apiVersion": LEASE_API_VERSION, "kind": "Lease", "metadata": _metadata(settings, current), "spec": spec}


def released_lease(settings: LeaderElectionSettings, current: Obj, wall: dt.datetime) -> Obj:
    """``current`` given up: no holder, so a standby takes it at its next attempt."""
    record = LeaseRecord.of(current, settings.lease_duration)
    now = microtime(wall)
    spec = {"leaseDurationSeconds": 1, "acquireTime": now, "renewTime": now, "leaseTransitions": record.transitions}
    return {"apiVersion": LEASE_API_VERSION, "kind": "Lease", "metadata": _metadata(settings, current), "spec": spec}


Callback = Callable[[], Awaitable[None]]


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class LeaderElector:
    """Runs the election; ``on_lead`` is awaited when this replica becomes leader, ``on_stop``
    when it stops (lost, or :meth:`stop`). Neither may block for long: renewals wait on them."""

    def __init__(
        self,
        kube: KubeApi,
        settings: LeaderElectionSettings,
        on_lead: Callback,
        on_stop: Callback,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], dt.datetime] = _utcnow,
    ) -> None:
        self.kube = kube
        self.settings = settings
        self._on_lead = on_lead
        self._on_stop = on_stop
        self._clock = clock
        self._wall = wall
        self._ref = ObjRef(LEASE_API_VERSION, "Lease", settings.namespace, settings.lease_name)
        self._observed: Observation | None = None
        self._renewed_at: float | None = None
        self._standby_logged: str | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def leading(self) -> bool:
        return self._renewed_at is not None

    def holds_lease(self) -> bool:
        """Leading, and the last renewal is within the renew deadline by the clock now. Writes ask
        this (not :attr:`leading`): after a pause (a stopped process, a frozen VM) a worker's timer
        may fire before this loop has noticed that the deadline passed."""
        return self._renewed_at is not None and not renew_expired(
            self._renewed_at, self._clock(), self.settings.renew_deadline
        )

    @property
    def lease(self) -> str:
        return f"{self.settings.namespace}/{self.settings.lease_name}"

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"leader election {self.lease}")

    async def stop(self) -> None:
        """Stop electing. A leader stops reconciling, then releases the lease so that a standby
        takes over at its next attempt instead of waiting for the lease to expire."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self.leading:
            self._renewed_at = None
            await self._on_stop()
            await self._release()

    async def _run(self) -> None:
        while True:
            delay = await self.step()
            await asyncio.sleep(delay)

    async def step(self) -> float:
        """One attempt (read, decide, maybe write); returns the seconds until the next one."""
        s = self.settings
        started = self._clock()
        if self._renewed_at is not None and renew_expired(self._renewed_at, started, s.renew_deadline):
            await self._lose(f"not renewed for {s.renew_deadline:g}s")
        try:
            async with asyncio.timeout(self._budget(started)):
                current = await self.kube.get(self._ref)
        except (KubeError, TimeoutError) as err:
            log.warning("leader election: lease not read lease=%s err=%s", self.lease, err or "timeout")
            return self._next_delay(started)
        # Seen now, after the read: a standby's wait for expiry starts late rather than early.
        seen = self._clock()
        record = LeaseRecord.of(current, s.lease_duration) if current is not None else None
        self._observed = observe(self._observed, record, seen)
        observed_at = self._observed.at if self._observed is not None else seen
        decision = decide(
            record, s.identity, seen, observed_at=observed_at, renewed_at=self._renewed_at,
            renew_deadline=s.renew_deadline,
        )  # fmt: skip
        if decision is Decision.LOST:
            await self._lose(f"holder={record.holder if record else None}")
        elif decision is Decision.WAIT and record is not None:
            if self._standby_logged != record.holder:
                self._standby_logged = record.holder
                log.info("standby holder=%s identity=%s lease=%s", record.holder, s.identity, self.lease)
            return min(s.retry_period, max(0.0, observed_at + record.duration - self._clock()))
        elif decision in (Decision.ACQUIRE, Decision.RENEW):
            await self._claim(current, started)
        return self._next_delay(started)

    def _budget(self, started: float) -> float:
        """Seconds one request may take: a retry period, and never past the renew deadline."""
        budget = self.settings.retry_period
        if self._renewed_at is not None:
            budget = min(budget, self._renewed_at + self.settings.renew_deadline - started)
        return max(budget, 0.001)

    def _next_delay(self, started: float) -> float:
        delay = self.settings.retry_period - (self._clock() - started)
        if self._renewed_at is not None:  # wake in time to stop at the deadline
            delay = min(delay, self._renewed_at + self.settings.renew_deadline - self._clock())
        return max(delay, 0.0)

    async def _claim(self, current: Obj | None, started: float) -> None:
        """Write myself in as holder. The renewal's time is ``started``, before the read: the
        renew deadline runs from earlier than the API server saw the write, never later."""
        want = claimed_lease(self.settings, current, self._wall())
        try:
            async with asyncio.timeout(self._budget(started)):
                if current is None:
                    written = await self.kube.create(want)
                else:
                    written = await self.kube.replace(want)
        except KubeError as err:
            if err.status == 409:  # another replica wrote it first (compare-and-swap)
                log.info("leader election: lease taken by another replica lease=%s", self.lease)
            else:
                log.warning("leader election: lease not written lease=%s err=%s", self.lease, err)
            return
        except TimeoutError:
            log.warning("leader election: lease write timed out lease=%s", self.lease)
            return
        self._observed = observe(self._observed, LeaseRecord.of(written, self.settings.lease_duration), self._clock())
        if self._renewed_at is None:
            self._renewed_at = started
            self._standby_logged = None
            transitions = int((written.get("spec") or {}).get("leaseTransitions") or 0)
            log.info(
                "leader acquired identity=%s lease=%s transitions=%d", self.settings.identity, self.lease, transitions
            )
            await self._on_lead()
        else:
            self._renewed_at = started

    async def _lose(self, reason: str) -> None:
        self._renewed_at = None
        log.warning("leader lost identity=%s lease=%s reason=%s", self.settings.identity, self.lease, reason)
        await self._on_stop()

    async def _release(self) -> None:
        try:
            async with asyncio.timeout(self.settings.renew_deadline):
                current = await self.kube.get(self._ref)
                if current is None or LeaseRecord.of(current, 0).holder != self.settings.identity:
                    return
                await self.kube.replace(released_lease(self.settings, current, self._wall()))
        except (KubeError, TimeoutError) as err:
            log.warning("lease not released (a standby waits for it to expire) lease=%s err=%s", self.lease, err)
            return
        log.info("leader released identity=%s lease=%s", self.settings.identity, self.lease)
