"""The ``paddler`` command's entry point: stop signals are remembered
(:mod:`paddler_cli.early_signals`) before :mod:`paddler_cli.main` and its heavy imports load."""

from __future__ import annotations

from paddler_cli.early_signals import remember_stop_signals


def main() -> int:
    remember_stop_signals()
    from paddler_cli.main import main as run

    return run()
