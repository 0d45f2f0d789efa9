"""Fixtures of the engine tier: the real SmolLM2 model on llama.cpp, driven directly.

The model comes from scripts/fetch-model.sh (cached); llama-cpp-python from
scripts/install-llama.sh (``make llama``). Nothing here is ever skipped: a missing
piece is installed or the test fails with a message that says how to fix it.
"""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from paddler_agent.engine import StatusBoard
from paddler_core.desired_state import BalancerDesiredState, InferenceParameters, ModelSource
from paddler_core.inference import ErrorKind, ResponsePayload
from paddler_core.protocol import GenerateMessage, StateApplicationStatus, parse_generate_message

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def model_path() -> Path:
    """The SmolLM2 GGUF, fetched into the cache by scripts/fetch-model.sh."""
    result = subprocess.run([str(ROOT / "scripts" / "fetch-model.sh")], capture_output=True, text=True, check=False)
    assert result.returncode == 0, f"scripts/fetch-model.sh failed:\n{result.stderr}"
    path = Path(result.stdout.strip().splitlines()[-1])
    assert path.is_file(), f"fetch-model.sh printed {path}, which is not a file"
    return path


@pytest.fixture(scope="session", autouse=True)
def _llama_installed() -> None:
    try:
        import llama_cpp  # noqa: F401
    except ImportError as e:  # pragma: no cover - environment problem
        pytest.fail(f"llama-cpp-python is not installed; run `make llama` ({e})")


@dataclass
class Request:
    payloads: list[Any] = field(default_factory=list)
    done: asyncio.Event = field(default_factory=asyncio.Event)
    after_final: int = 0
    error_kind: ErrorKind | None = None
    """The ``error_kind`` of the last payload (what a terminal error means to the balancer)."""

    @property
    def text(self) -> str:
        return "".join(
            p["GeneratedToken"]["ContentToken"]
            for p in self.payloads
            if isinstance(p, dict) and "ContentToken" in p.get("GeneratedToken", {})
        )

    @property
    def final(self) -> Any:
        assert self.done.is_set(), "request not finished"
        return self.payloads[-1]

    @property
    def usage(self) -> dict[str, int]:
        final = self.final
        assert "Done" in final.get("GeneratedToken", {}), f"not Done: {final}"
        usage: dict[str, int] = final["GeneratedToken"]["Done"]["usage"]
        return usage


class FakeHost:
    """Records what the engine emits; checks it is called on the event loop thread."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.requests: dict[str, Request] = {}
        self.status_changes = 0
        self.board: StatusBoard | None = None
        self.slots_seen: list[int] = []
        """``board.slots_total`` at every status change."""
        self.events: list[tuple[str, bool]] = []
        """(request id, final) of every payload, in the order they were emitted."""

    def request(self, request_id: str) -> Request:
        return self.requests.setdefault(request_id, Request())

    def emit(self, request_id: str, payload: ResponsePayload, final: bool, error_kind: ErrorKind | None = None) -> None:
        assert asyncio.get_running_loop() is self.loop
        req = self.request(request_id)
        if req.done.is_set():
            req.after_final += 1
        req.payloads.append(payload)
        req.error_kind = error_kind
        self.events.append((request_id, final))
        if final:
            req.done.set()

    def status_changed(self) -> None:
        assert asyncio.get_running_loop() is self.loop
        self.status_changes += 1
        if self.board is not None:
            self.slots_seen.append(self.board.slots_total)

    async def wait(self, request_id: str, timeout: float = 120.0) -> Request:
        req = self.request(request_id)
        async with asyncio.timeout(timeout):
            await req.done.wait()
        return req


async def wait_for(condition: Callable[[], bool], timeout: float = 60.0) -> None:
    """Poll ``condition`` (board fields have no event) until it holds or time runs out."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


def raw(request_id: str, prompt: str, max_tokens: int = 16, **overrides: Any) -> GenerateMessage:
    return parse_generate_message(
        dict(
            request_id=request_id,
            variant="ContinueFromRawPrompt",
            params={"raw_prompt": prompt, "max_tokens": max_tokens, **overrides.pop("params", {})},
            overrides=overrides or {"temperature": 0.0},
        )
    )


GREEDY = {"temperature": 0.0, "penalty_repeat": 1.0, "penalty_presence": 0.0}


def state_for(path: Path | str, **params: Any) -> BalancerDesiredState:
    defaults: dict[str, Any] = {"context_size": 1024, "n_batch": 512, **params}
    return BalancerDesiredState(
        model=ModelSource.local(str(path)),
        inference_parameters=InferenceParameters(**defaults),
    )


@dataclass
class EngineUnderTest:
    engine: Any
    host: FakeHost
    board: StatusBoard


EngineFactory = Callable[..., Awaitable[EngineUnderTest]]


@pytest.fixture
async def make_engine(model_path: Path, tmp_path: Path) -> AsyncIterator[EngineFactory]:
    from paddler_agent.llama.engine import LlamaEngine

    made: list[EngineUnderTest] = []

    async def factory(slots: int = 4, path: Path | None = None, **params: Any) -> EngineUnderTest:
        host = FakeHost()
        board = StatusBoard()
        host.board = board
        engine = LlamaEngine(host, board, slots, model_cache_dir=tmp_path / "models")
        made.append(EngineUnderTest(engine, host, board))
        await engine.apply_desired_state(state_for(path or model_path, **params))
        assert board.state_application_status == StateApplicationStatus.APPLIED, board.issues
        assert board.slots_total == slots
        return made[-1]

    yield factory
    for item in made:
        await item.engine.close()
