"""SIGTERM/SIGINT remembered from the ``paddler`` command's first instant, before the heavy
imports of :mod:`paddler_cli.main` (llama.cpp, aiohttp, pydantic) run.

In a container the command is PID 1, and the kernel drops a signal whose handler is still
the default for PID 1. A pod deleted while its agent was still importing (an autoscaler
scaling to 0 right after the Deployment made its first pod) lost its SIGTERM that way:
the agent came up, linked to the balancer, took requests, and was SIGKILLed with them at
the end of the grace period. :mod:`paddler_cli.entry` installs these handlers first; the
event loop then starts stopped when :func:`stop_requested`."""

from __future__ import annotations

import signal
from types import FrameType

_received: list[int] = []


def _remember(signum: int, frame: FrameType | None) -> None:
    _received.append(signum)


def remember_stop_signals() -> None:
    """From now on until the event loop installs its own handlers, SIGTERM/SIGINT are remembered."""
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _remember)


def stop_requested() -> bool:
    """A SIGTERM or SIGINT arrived before the event loop took the signals over."""
    return bool(_received)
