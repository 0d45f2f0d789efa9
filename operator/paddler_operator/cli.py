"""``paddler operator``: the subcommand, discovered by :mod:`paddler_cli.main`.

kopf is imported only when the operator runs, so ``paddler balancer`` and
``paddler agent`` never pay for it.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import socket
import sys
from collections.abc import Mapping
from typing import Any

from paddler_operator.settings import (
    BALANCER_URL_TEMPLATE_ENV,
    DEFAULT_LEASE_NAME,
    LeaderElectionSettings,
    OperatorSettings,
)

POD_NAME_ENV = "POD_NAME"
POD_NAMESPACE_ENV = "POD_NAMESPACE"


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
    election = p.add_argument_group("leader election (several replicas, one active)")
    election.add_argument(
        "--leader-election",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="take part in leader election over a coordination.k8s.io Lease: only the holder reconciles, "
        "the others wait and take over when it is gone (default: off, this process reconciles)",
    )
    election.add_argument(
        "--leader-election-namespace",
        default=None,
        metavar="NS",
        help=f"namespace of the Lease (default: env {POD_NAMESPACE_ENV}, else the one --namespace)",
    )
    election.add_argument("--leader-election-lease-name", default=DEFAULT_LEASE_NAME, metavar="NAME")
    defaults = LeaderElectionSettings  # the dataclass' defaults, one place
    election.add_argument(
        "--leader-election-lease-duration",
        type=float,
        default=_field_default(defaults, "lease_duration"),
        metavar="S",
        help="whole seconds after the last renewal before a standby may take the lease (the takeover bound)",
    )
    election.add_argument(
        "--leader-election-renew-deadline",
        type=float,
        default=_field_default(defaults, "renew_deadline"),
        metavar="S",
        help="seconds a leader keeps reconciling without renewing; then it stops (< lease duration)",
    )
    election.add_argument(
        "--leader-election-retry-period",
        type=float,
        default=_field_default(defaults, "retry_period"),
        metavar="S",
        help="seconds between renewals, and between a standby's attempts",
    )
    p.set_defaults(run=run)


def _field_default(cls: type[Any], name: str) -> Any:
    return next(f.default for f in dataclasses.fields(cls) if f.name == name)


def leader_identity(env: Mapping[str, str] | None = None) -> str:
    """Who this replica is in the Lease: the pod's name (downward API, env POD_NAME), else the
    host name and the process id (two processes on one host stay apart)."""
    env = os.environ if env is None else env
    return env.get(POD_NAME_ENV) or f"{socket.gethostname()}_{os.getpid()}"


def leader_election_from_args(
    args: argparse.Namespace, env: Mapping[str, str] | None = None
) -> LeaderElectionSettings | None:
    if not args.leader_election:
        return None
    env = os.environ if env is None else env
    namespace = args.leader_election_namespace or env.get(POD_NAMESPACE_ENV)
    if not namespace and len(args.namespace) == 1:
        namespace = args.namespace[0]
    if not namespace:
        raise ValueError(f"--leader-election needs --leader-election-namespace (or env {POD_NAMESPACE_ENV})")
    return LeaderElectionSettings(
        namespace=namespace,
        identity=leader_identity(env),
        lease_name=args.leader_election_lease_name,
        lease_duration=args.leader_election_lease_duration,
        renew_deadline=args.leader_election_renew_deadline,
        retry_period=args.leader_election_retry_period,
    )


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
        leader_election=leader_election_from_args(args),
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
