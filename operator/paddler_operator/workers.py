"""One reconcile loop per custom resource: woken by events, resynced by a timer, retried
with backoff; what a pass returns (:class:`Outcome`). The passes themselves are
:class:`paddler_operator.reconcile.Reconciler`'s.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field
from typing import Generic, Literal, Protocol, TypeVar

from paddler_operator.kube import KubeError
from paddler_operator.settings import OperatorSettings

log = logging.getLogger(__name__)

Kind = Literal["LlmPool", "ModelDeployment"]
Key = tuple[Kind, str, str]
"""(kind, namespace, name)"""


@dataclass(frozen=True)
class Outcome:
    ok: bool
    retry: bool = False
    """A transient failure: try again after the backoff, not the resync interval."""
    message: str = ""
    resync_after: float | None = None
    """Seconds until the next pass when it should come sooner than the resync interval."""


class Reconciles(Protocol):
    """What a worker drives: one pass over one object."""

    settings: OperatorSettings

    async def reconcile(self, key: Key) -> Outcome: ...


R = TypeVar("R", bound=Reconciles)


@dataclass
class _Worker:
    task: asyncio.Task[None]
    wake: asyncio.Event
    generation: int | None = None


@dataclass
class Workers(Generic[R]):
    """One reconcile loop per custom resource; woken by events, resynced by a timer."""

    reconciler: R
    _workers: dict[Key, _Worker] = field(default_factory=dict)
    _failures: dict[Key, int] = field(default_factory=dict)

    def keys(self) -> list[Key]:
        return list(self._workers)

    def touch(self, key: Key, generation: int | None = None) -> bool:
        """Make sure ``key`` has a worker; wake it if it is new or its generation moved.
        True if it was woken (status-only changes do not wake it)."""
        worker = self._workers.get(key)
        if worker is None:
            wake = asyncio.Event()
            wake.set()
            task = asyncio.create_task(self._loop(key, wake), name=f"reconcile {key[0]}/{key[1]}/{key[2]}")
            self._workers[key] = _Worker(task, wake, generation)
            return True
        if generation is None or generation != worker.generation:
            worker.generation = generation
            worker.wake.set()
            return True
        return False

    def wake(self, key: Key) -> None:
        worker = self._workers.get(key)
        if worker is not None:
            worker.wake.set()

    def wake_namespace(self, kind: Kind, namespace: str) -> None:
        for key, worker in self._workers.items():
            if key[0] == kind and key[1] == namespace:
                worker.wake.set()

    async def forget(self, key: Key) -> None:
        worker = self._workers.pop(key, None)
        self._failures.pop(key, None)
        if worker is not None:
            worker.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await worker.task

    async def stop(self) -> None:
        for key in list(self._workers):
            await self.forget(key)

    async def _loop(self, key: Key, wake: asyncio.Event) -> None:
        settings = self.reconciler.settings
        first = True
        while True:
            wake.clear()
            try:
                outcome = await self.reconciler.reconcile(key)
            except asyncio.CancelledError:
                raise
            except KubeError as err:
                outcome = Outcome(ok=False, retry=True, message=str(err))
                log.warning("reconcile failed object=%s/%s/%s err=%s", *key, err)
            except Exception:  # a bug: log it, keep the loop (and the operator) alive
                log.exception("reconcile crashed object=%s/%s/%s", *key)
                outcome = Outcome(ok=False, retry=True, message="internal error")
            level = logging.INFO if first else logging.DEBUG  # the first pass says the object is handled
            log.log(level, "reconciled object=%s/%s/%s ok=%s retry=%s", *key, outcome.ok, outcome.retry)
            first = False
            if outcome.retry:
                failures = self._failures.get(key, 0) + 1
                self._failures[key] = failures
                delay = settings.retry_delay(failures)
                log.debug("retry object=%s/%s/%s in=%.1fs reason=%s", *key, delay, outcome.message)
            else:
                self._failures.pop(key, None)
                delay = min(settings.resync_interval, outcome.resync_after or settings.resync_interval)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await wake.wait()
