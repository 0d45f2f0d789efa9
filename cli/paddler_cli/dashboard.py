"""``paddler dashboard``: a terminal dashboard of one balancer (Textual).

It reads the management API: the agents and buffered-request SSE streams
(``/api/v1/agents/stream``, ``/api/v1/buffered_requests/stream``, pushed on every
change) and the model groups (``/api/v1/model_groups``, polled: it has no stream).
When the balancer cannot be reached it says so in a red banner, keeps the last data
on screen marked stale, and reconnects with backoff.

Keys: ``q`` quits, ``s`` cycles the sort order of the agents, arrows move the
selection and the selected agent's details (issues in full, model, download) show
below the table.

What is shown and read: :mod:`paddler_cli.dashboard_view` (pure state, the feed); how:
:mod:`paddler_cli.dashboard_app` (Textual), imported only when the subcommand runs, so
``paddler`` works without the ``[dashboard]`` extra.
"""

from __future__ import annotations

import argparse
from typing import Any

# ---- the subcommand ---------------------------------------------------------------------------


def add_subcommand(sub: Any) -> None:
    p = sub.add_parser("dashboard", help="a terminal dashboard of a balancer (needs the [dashboard] extra)")
    p.add_argument("--management-addr", default="127.0.0.1:8060", help="the balancer's management address (host:port)")
    p.set_defaults(run=_run)


def _run(args: argparse.Namespace) -> int:
    try:
        # Textual only now: every other subcommand starts without it.
        from paddler_cli.dashboard_app import DashboardApp
    except ModuleNotFoundError as e:
        print(f"error: the dashboard needs Textual: pip install 'paddler-k8s[dashboard]' ({e})")
        return 2
    DashboardApp(args.management_addr).run()
    return 0
