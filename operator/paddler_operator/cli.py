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

from paddler_operator.crd_models import DEFAULT_IMAGES, Images
from paddler_operator.settings import (
    BALANCER_URL_TEMPLATE_ENV,
    DEFAULT_LEASE_NAME,
    LeaderElectionSettings,
    OperatorSettings,
    Switch,
)

POD_NAME_ENV = "POD_NAME"
POD_NAMESPACE_ENV = "POD_NAMESPACE"
TOKEN_KEY_FILE_ENV = "PADDLER_TOKEN_KEY_FILE"


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
    _add_image_flags(p)
    _add_token_and_reader_flags(p)
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


def _add_image_flags(p: argparse.ArgumentParser) -> None:
    images = p.add_argument_group("images (of pods whose LlmPool / ModelDeployment leaves image unset)")
    images.add_argument("--balancer-image", default=DEFAULT_IMAGES.balancer, metavar="IMAGE")
    images.add_argument("--agent-image", default=DEFAULT_IMAGES.agent, metavar="IMAGE")
    images.add_argument("--llama-server-image", default=DEFAULT_IMAGES.llama_server, metavar="IMAGE")
    images.add_argument(
        "--image-registry",
        type=image_registry,
        default=None,
        metavar="HOST[:PORT][/PATH]",
        help="registry of the built-in default images (a mirror); an image given by flag or written in a spec "
        "is used as written",
    )


def image_registry(value: str) -> str:
    """``--image-registry``: a registry host (and optional path), no scheme, no tag."""
    host = value.strip().rstrip("/")
    if not host or "://" in host or any(c.isspace() for c in host) or "@" in host:
        raise argparse.ArgumentTypeError(f"not a registry host: {value!r} (e.g. registry.example.com:5000)")
    return host


def images_from_args(args: argparse.Namespace) -> Images:
    return Images(
        balancer=args.balancer_image, agent=args.agent_image, llama_server=args.llama_server_image
    ).with_registry(args.image_registry)


def _add_token_and_reader_flags(p: argparse.ArgumentParser) -> None:
    """The management token's key, and who reads a pool's management port (issue 20)."""
    group = p.add_argument_group("management token and monitoring")
    group.add_argument(
        "--token-key-file",
        default=os.environ.get(TOKEN_KEY_FILE_ENV) or None,
        metavar="PATH",
        help="key every pool's management token is derived from, at least 32 bytes (the chart mounts a Secret it "
        f"generates); default outside a pod: made once under $XDG_STATE_HOME/paddler (env {TOKEN_KEY_FILE_ENV})",
    )
    group.add_argument(
        "--pod-monitors",
        choices=[s.value for s in Switch],
        default=os.environ.get("PADDLER_OPERATOR_POD_MONITORS", Switch.AUTO.value),
        help="a PodMonitor per pool scraping its balancers' /metrics with the pool's token; auto: where the "
        "cluster serves monitoring.coreos.com/v1 PodMonitor (env PADDLER_OPERATOR_POD_MONITORS)",
    )
    group.add_argument(
        "--pod-monitor-label",
        type=label_pair,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a label on each PodMonitor, for a Prometheus' podMonitorSelector (repeatable)",
    )
    group.add_argument(
        "--network-policy",
        choices=[Switch.ON.value, Switch.OFF.value],
        default=os.environ.get("PADDLER_OPERATOR_NETWORK_POLICY", Switch.OFF.value),
        help="a NetworkPolicy per pool: its balancers' management port only from the pool's agents, the "
        "operator and --monitoring-namespace (env PADDLER_OPERATOR_NETWORK_POLICY)",
    )
    group.add_argument(
        "--monitoring-namespace",
        action="append",
        default=None,
        metavar="NS",
        help="namespace whose pods may read the management port (repeatable; default: monitoring)",
    )
    group.add_argument(
        "--operator-namespace",
        default=os.environ.get(POD_NAMESPACE_ENV) or None,
        metavar="NS",
        help=f"the operator's namespace, for the NetworkPolicy (env {POD_NAMESPACE_ENV})",
    )
    group.add_argument(
        "--operator-pod-label",
        type=label_pair,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a label of the operator's pods, for the NetworkPolicy (repeatable)",
    )


def label_pair(value: str) -> tuple[str, str]:
    """``KEY=VALUE`` of a label flag."""
    key, sep, val = value.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"not KEY=VALUE: {value!r}")
    return key.strip(), val.strip()


def token_and_readers_from_args(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "token_key_file": args.token_key_file,
        "pod_monitors": Switch(args.pod_monitors),
        "pod_monitor_labels": tuple(args.pod_monitor_label),
        "network_policy": Switch(args.network_policy),
        "monitoring_namespaces": tuple(args.monitoring_namespace or ("monitoring",)),
        "operator_namespace": args.operator_namespace,
        "operator_pod_labels": tuple(args.operator_pod_label),
    }


def with_token_key(settings: OperatorSettings, env: Mapping[str, str] | None = None) -> OperatorSettings:
    """The settings with a token key file that holds a key, else an error. None named: as a pod's
    ServiceAccount (in a pod, no kubeconfig) that is an error (a key in the pod's own files dies
    with it, and every pool's token with it); otherwise the local key (made on first use, shared
    by every local run: the ``k8s`` test tier runs the operator so)."""
    from paddler_operator import management_token

    env = os.environ if env is None else env
    path = settings.token_key_file
    if path is None:
        if env.get("KUBERNETES_SERVICE_HOST") and not (settings.kubeconfig or env.get("KUBECONFIG")):
            raise ValueError(f"in a pod, pass --token-key-file (env {TOKEN_KEY_FILE_ENV}): the key of the tokens")
        local = management_token.local_key_path(env)
        try:
            if management_token.create_local_key(local):
                print(f"made a management token key at {local}", file=sys.stderr)
        except OSError as err:
            raise ValueError(f"cannot make a token key at {local}: {err}; pass --token-key-file") from err
        path = str(local)
    management_token.load_key(path)
    return dataclasses.replace(settings, token_key_file=path)


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
        images=images_from_args(args),
        **token_and_readers_from_args(args),
    )


def run(args: argparse.Namespace) -> int:
    from paddler_operator.management_token import TokenKeyError  # imports the API client: only here

    try:
        settings = with_token_key(settings_from_args(args))
    except (ValueError, TokenKeyError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from paddler_operator import handlers  # imports kopf: only now, only here

    handlers.run(settings)
    return 0
