"""The one thread that touches a loaded model: load, warm-up, the decode loop, free."""

from __future__ import annotations

import asyncio
import threading

from paddler_agent.llama.decode_worker import DecodeWorker
from paddler_agent.llama.jobs import Deliver, Settings, decode_log
from paddler_agent.llama.native import LoadConfig, Runtime


class NativeThread:
    """The one thread that touches a model: load, warm-up, decode loop, free.

    llama.cpp's CPU backend runs its graph with OpenMP, which keeps a team of
    spinning worker threads per calling thread; a second thread that has ever
    decoded (e.g. a warm-up in an executor thread) keeps its team alive and halved
    the decode loop's speed on 2 cores. So everything native for one model happens
    on this thread.
    """

    def __init__(
        self, config: LoadConfig, settings: Settings, loop: asyncio.AbstractEventLoop, deliver: Deliver
    ) -> None:
        self.config = config
        self.settings = settings
        self.worker: DecodeWorker | None = None
        self._loop = loop
        self._deliver = deliver
        self._ready: asyncio.Future[Runtime] = loop.create_future()
        self._thread = threading.Thread(target=self._main, name="llama-native", daemon=True)

    def start(self) -> None:
        self._thread.start()

    async def ready(self) -> Runtime:
        """The loaded runtime once warm and serving; raises what loading raised."""
        return await self._ready

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def shutdown(self) -> None:
        """Stop the loop and free the model (blocking; call from a worker thread)."""
        if self.worker is not None:
            self.worker.request_stop()
        self._thread.join()

    def _main(self) -> None:
        try:
            runtime = Runtime.load(self.config)
            worker = DecodeWorker(runtime, self.settings, self._loop, self._deliver)
        except BaseException as e:
            self._resolve(e)
            return
        self.worker = worker
        self._resolve(runtime)
        try:
            worker.run()
        finally:
            runtime.free()
            decode_log.info("model freed path=%s", self.config.path)

    def _resolve(self, outcome: Runtime | BaseException) -> None:
        def settle() -> None:
            if self._ready.done():
                return
            if isinstance(outcome, BaseException):
                self._ready.set_exception(outcome)
            else:
                self._ready.set_result(outcome)

        try:
            self._loop.call_soon_threadsafe(settle)
        except RuntimeError:
            decode_log.warning("event loop closed before the model was ready")
