"""``paddler operator``: the subcommand, discovered by :mod:`paddler_cli.main`.

kopf is imported only when the operator runs, so ``paddler balancer`` and
``paddler agent`` never pay for it.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from paddler_operator.settings import BALANCER_URL_TEMPLATE_ENV, OperatorSettings


def add_subcommand(sub: Any) -> None:
    p = sub.add_parser("operator", help="run the Kubernetes operator (LlmPool, ModelDeployment)")
    scope = p.add_mutually_exclusive_group(required=True)
    scope.add_argument(
        "--namespace", "-n", action="append", default=[], metavar="NS", help="watch this namespace (repeatable)"
    )
    scope.add_argument("--all-namespaces", "-A", action="store_true", help="watch every namespace")
    p.add_argument(
        "--balancer-url-template",
        default=OperatorSettings.template_from_env(),
        help=f"management API URL of a pool's balancer; fields {{pool}} {{namespace}} {{service}} {{port}} "
        f"(env {BALANCER_URL_TEMPLATE_ENV})",
    )
    p.add_argument(
        "--resync-interval",
        type=float,
        default=float(os.environ.get("PADDLER_OPERATOR_RESYNC_INTERVAL", "10")),
        help="seconds between full reconciles of an idle resource (env PADDLER_OPERATOR_RESYNC_INTERVAL)",
    )
    p.add_argument(
        "--builtin-poll-interval",
        type=float,
        default=1.0,
        help="seconds between load readings of Builtin-autoscaled deployments (wake-up latency from zero)",
    )
    p.add_argument("--retry-max-delay", type=float, default=30.0, help="ceiling of the retry backoff (seconds)")
    p.add_argument("--kubeconfig", default=None, help="kubeconfig path (default: $KUBECONFIG or in-cluster)")
    p.add_argument(
        "--liveness-endpoint", default=None, help="serve kopf's liveness probe, e.g. http://0.0.0.0:8080/healthz"
    )
    p.add_argument(
        "--hpa-scale-to-zero",
        choices=["auto", "on", "off"],
        default=os.environ.get("PADDLER_OPERATOR_HPA_SCALE_TO_ZERO", "auto"),
        help="HPA mode: the cluster's HPA does 0 <-> 1 itself (feature gate HPAScaleToZero): on, off, or auto "
        "(ask the API server with a dry-run HPA); off: the operator wakes a group 0 -> 1 and the HPA does 1 <-> N "
        "(env PADDLER_OPERATOR_HPA_SCALE_TO_ZERO)",
    )
    p.set_defaults(run=run)


def settings_from_args(args: argparse.Namespace) -> OperatorSettings:
    return OperatorSettings(
        namespaces=tuple(args.namespace),
        all_namespaces=args.all_namespaces,
        balancer_url_template=args.balancer_url_template,
        resync_interval=args.resync_interval,
        retry_max_delay=args.retry_max_delay,
        builtin_poll_interval=args.builtin_poll_interval,
        kubeconfig=args.kubeconfig,
        liveness_endpoint=args.liveness_endpoint,
        hpa_scale_to_zero={"auto": None, "on": True, "off": False}[args.hpa_scale_to_zero],
    )


def run(args: argparse.Namespace) -> int:
    try:
        settings = settings_from_args(args)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from paddler_operator import handlers  # imports kopf: only now, only here

    handlers.run(settings)
    return 0
