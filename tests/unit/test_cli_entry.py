"""A stop signal that reaches ``paddler`` while it starts is kept, also as PID 1 of a
container (where the kernel drops a signal left to its default action), and the event
loop then starts stopped."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys

import pytest

from paddler_cli import early_signals
from paddler_cli.main import _run_until_signal

PID_1_SCRIPT = """
import os, signal, time
from paddler_cli import early_signals
if {install}:
    early_signals.remember_stop_signals()
os.kill(os.getpid(), signal.SIGTERM)  # as the kubelet does, to PID 1 of the container
time.sleep(0.2)
print("remembered" if early_signals.stop_requested() else "dropped", flush=True)
"""


@pytest.mark.parametrize(("install", "expected"), [(True, "remembered"), (False, "dropped")])
def test_sigterm_to_pid_1_during_start_up_is_remembered_only_with_the_early_handlers(
    install: bool, expected: str
) -> None:
    unshare = shutil.which("unshare")
    assert unshare, "unshare (util-linux) is needed to run a process as PID 1"
    proc = subprocess.run(
        [unshare, "--pid", "--fork", sys.executable, "-c", PID_1_SCRIPT.format(install=install)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.stdout.strip() == expected, proc.stderr


def test_the_event_loop_starts_stopped_when_a_signal_came_during_start_up(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(early_signals, "_received", [15])
    seen: list[bool] = []

    async def main(stop: asyncio.Event) -> None:
        seen.append(stop.is_set())

    assert _run_until_signal(main) == 0
    assert seen == [True]
