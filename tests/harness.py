"""Real processes for tests: ``paddler balancer`` and ``paddler agent`` as subprocesses.

Every process started here is stopped by the fixture that owns the
:class:`Processes` registry, even when the test fails. Ports are picked by the
balancer itself (port 0) and read back from its "paddler listening" lines.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
_LISTENING = re.compile(r"paddler listening service=(\w+) url=(\S+)")


@dataclass(eq=False)
class PaddlerProcess:
    name: str
    popen: subprocess.Popen[str]
    lines: list[str] = field(default_factory=list)
    urls: dict[str, str] = field(default_factory=dict)
    _seen: threading.Condition = field(default_factory=threading.Condition)

    def _pump(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            with self._seen:
                self.lines.append(line.rstrip("\n"))
                match = _LISTENING.search(line)
                if match:
                    self.urls[match.group(1)] = match.group(2)
                self._seen.notify_all()
        with self._seen:
            self._seen.notify_all()

    def wait_for_urls(self, services: list[str], timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        with self._seen:
            while not all(s in self.urls for s in services):
                if self.popen.poll() is not None:
                    raise RuntimeError(f"{self.name} exited early:\n" + "\n".join(self.lines[-40:]))
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"{self.name} did not listen in time:\n" + "\n".join(self.lines[-40:]))
                self._seen.wait(remaining)

    def output(self) -> str:
        with self._seen:
            return "\n".join(self.lines)

    @property
    def alive(self) -> bool:
        return self.popen.poll() is None

    def kill(self) -> None:
        """SIGKILL: the process vanishes without closing its sockets cleanly."""
        if self.alive:
            self.popen.kill()
            self.popen.wait(10)

    def stop(self, timeout: float = 10.0) -> None:
        if self.alive:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(10)


@dataclass(eq=False)
class Balancer:
    process: PaddlerProcess

    @property
    def inference_url(self) -> str:
        return self.process.urls["inference"]

    @property
    def management_url(self) -> str:
        return self.process.urls["management"]

    @property
    def management_addr(self) -> str:
        return self.management_url.removeprefix("http://")

    @property
    def admin_panel_url(self) -> str:
        return self.process.urls["web_admin_panel"]


class Processes:
    """Starts paddler processes and stops them all in ``close``."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.started: list[PaddlerProcess] = []

    def spawn(self, name: str, args: list[str], env: dict[str, str] | None = None) -> PaddlerProcess:
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        popen = subprocess.Popen(
            [sys.executable, "-m", "paddler_cli.main", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=full_env,
            cwd=REPO,
        )
        process = PaddlerProcess(name, popen)
        threading.Thread(target=process._pump, daemon=True).start()
        self.started.append(process)
        return process

    def balancer(self, *extra: str, admin_panel: bool = False) -> Balancer:
        args = ["balancer", "--inference-addr", "127.0.0.1:0", "--management-addr", "127.0.0.1:0", *extra]
        services = ["management", "inference"]
        if admin_panel:
            args += ["--web-admin-panel-addr", "127.0.0.1:0"]
            services.append("web_admin_panel")
        process = self.spawn("balancer", args)
        process.wait_for_urls(services)
        return Balancer(process)

    def agent(
        self,
        balancer: Balancer,
        *,
        slots: int,
        name: str,
        engine: str = "simulated",
        extra: tuple[str, ...] = (),
        env: dict[str, str] | None = None,
        replicas: tuple[Balancer, ...] = (),
    ) -> PaddlerProcess:
        """``paddler agent`` dialling ``balancer`` and every one of ``replicas`` (one
        ``--management-addr`` each)."""
        args = [
            "agent",
            "--management-addr",
            balancer.management_addr,
            *(arg for replica in replicas for arg in ("--management-addr", replica.management_addr)),
            "--slots",
            str(slots),
            "--name",
            name,
            "--engine",
            engine,
            *extra,
        ]
        return self.spawn(f"agent-{name}", args, env)

    def close(self) -> None:
        for process in reversed(self.started):
            process.stop()


async def wait_until(
    condition: Callable[[], Awaitable[bool]], timeout: float = 10.0, interval: float = 0.05, what: str = ""
) -> None:
    """Poll ``condition`` until it holds; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        if await condition():
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s: {what}")
        await asyncio.sleep(interval)


def free_port() -> int:
    """A loopback port the OS just handed out (for a command that takes an address, not 0)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
