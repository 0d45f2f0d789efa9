"""The ``paddler`` command: ``balancer``, ``agent``, ``operator``, ``quickstart``, ``dashboard``.

Subcommands import their component lazily, so ``paddler balancer`` never loads
llama.cpp and ``paddler agent`` never loads kopf.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Callable, Coroutine
from typing import Any

from paddler_balancer.settings import BalancerSettings, RoutingPolicy, parse_duration
from paddler_cli.early_signals import stop_requested
from paddler_core.model_access import AllowEntry, ModelUrlPolicy

log = logging.getLogger("paddler")

Runner = Callable[[argparse.Namespace], int]


def _duration(text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _max_unavailable(text: str) -> str:
    from paddler_core.desired_state import MaxUnavailable

    try:
        return str(MaxUnavailable.parse(text))
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _add_balancer(sub: Any) -> None:
    p = sub.add_parser("balancer", help="run the load balancer (inference + management APIs)")
    p.add_argument("--inference-addr", default="127.0.0.1:8061", help="native and OpenAI APIs (host:port)")
    p.add_argument("--management-addr", default="127.0.0.1:8060", help="management API, agent sockets, /metrics")
    p.add_argument("--web-admin-panel-addr", default=None, help="serve the web admin panel here (off by default)")
    p.add_argument("--compat-openai-addr", default=None, help="also serve the OpenAI API alone on this address")
    p.add_argument(
        "--max-buffered-requests",
        type=int,
        default=30,
        help="requests held while no slot is free; 0 disables buffering",
    )
    p.add_argument(
        "--buffered-request-timeout",
        type=_duration,
        default=10.0,
        help="max wait in the buffer: 10000 (ms), 10s, 500ms",
    )
    p.add_argument(
        "--inference-item-timeout", type=_duration, default=30.0, help="max wait for the next token: 30000 (ms), 30s"
    )
    p.add_argument(
        "--routing",
        type=RoutingPolicy,
        choices=list(RoutingPolicy),
        default=RoutingPolicy.PREFIX,
        help="prefix: prefix affinity under a load cap, new prefixes by consistent hashing with bounded loads "
        "(the same choice on every replica), and a freed slot may serve a buffered request it holds the prefix of "
        "before up to 4 older ones (none passed over more than twice); least-busy: the agent with the most free "
        "slots, the buffer strictly first come first served (Paddler 4.1)",
    )
    p.add_argument("--state-database", default="memory://", help="memory:// or file:///path.json (survives restarts)")
    p.add_argument("--statsd-addr", default=None, help="report gauges to StatsD at host:port")
    p.add_argument("--statsd-prefix", default="paddler_")
    p.add_argument("--statsd-reporting-interval", type=_duration, default=10.0, help="10000 (ms), 10s")
    p.add_argument(
        "--max-unavailable",
        type=_max_unavailable,
        default="25%",
        help="agents of a model group switching to a new desired state at once: a count or a percentage "
        "(rounded down, at least 1); a PUT may override it with ?max_unavailable=",
    )
    p.add_argument(
        "--api-key",
        default=os.environ.get("PADDLER_API_KEY"),
        help="require this key on inference: Bearer, Basic password, or ?api_key= on native routes "
        "(env PADDLER_API_KEY)",
    )
    _add_management_token(p, "require this token on every management route and agent socket")
    p.add_argument(
        "--inference-cors-allowed-host",
        action="append",
        type=_origin,
        default=[],
        metavar="ORIGIN",
        help="browser origin (scheme://host[:port], or *) allowed to call the inference API; repeatable",
    )
    p.add_argument(
        "--management-cors-allowed-host",
        action="append",
        type=_origin,
        default=[],
        metavar="ORIGIN",
        help="browser origin allowed to call the management API (the admin panel's always is); repeatable",
    )
    _add_model_url_allow(p)
    _add_balancer_replica(p)
    p.set_defaults(run=_run_balancer)


def _host_port(text: str) -> str:
    from paddler_core.addresses import split_host_port

    try:
        split_host_port(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return text


def _add_balancer_replica(p: argparse.ArgumentParser) -> None:
    """A balancer as one replica of several: its name, graceful stop, its peers."""
    from paddler_balancer.settings import default_replica_name

    p.add_argument(
        "--replica-name",
        default=default_replica_name(),
        help="this replica's name, shown by the admin panel and sent as X-Paddler-Balancer "
        "(default: env POD_NAME, else the host name)",
    )
    p.add_argument(
        "--drain-delay",
        type=_duration,
        default=0.0,
        help="on SIGTERM, keep accepting this long after /ready turned 503 (endpoints propagate): 5s",
    )
    p.add_argument(
        "--drain-timeout",
        type=_duration,
        default=50.0,
        help="on SIGTERM, wait at most this long for in-flight and buffered requests: 50s",
    )
    p.add_argument(
        "--peer-management-addr",
        action="append",
        type=_host_port,
        default=[],
        metavar="HOST:PORT",
        help="management address of the other replicas (a headless Service name resolves to every one); "
        "repeatable; GET /api/v1/buffered_requests?scope=pool adds their counts",
    )


def _origin(text: str) -> str:
    from paddler_balancer.http_util import normalize_origin

    try:
        return normalize_origin(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _allow_entry(text: str) -> str:
    try:
        AllowEntry.parse(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return text


def _add_management_token(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument(
        "--management-token",
        default=os.environ.get("PADDLER_MANAGEMENT_TOKEN") or None,
        help=f"{what} (env PADDLER_MANAGEMENT_TOKEN)",
    )


def _add_model_url_allow(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model-url-allow",
        action="append",
        type=_allow_entry,
        default=[],
        metavar="URL_PREFIX",
        help="model URLs a desired state may name, as URL prefixes (https://, http://host:port/path, "
        "https://*.example.com); repeatable; default https:// (never loopback, link-local or metadata "
        "addresses unless an entry names the host)",
    )


def _run_balancer(args: argparse.Namespace) -> int:
    if args.max_buffered_requests < 0:
        print("error: --max-buffered-requests must be >= 0", file=sys.stderr)
        return 2
    settings = BalancerSettings(
        inference_addr=args.inference_addr,
        management_addr=args.management_addr,
        web_admin_panel_addr=args.web_admin_panel_addr,
        compat_openai_addr=args.compat_openai_addr,
        max_buffered_requests=args.max_buffered_requests,
        buffered_request_timeout=args.buffered_request_timeout,
        inference_item_timeout=args.inference_item_timeout,
        state_database=args.state_database,
        statsd_addr=args.statsd_addr,
        statsd_prefix=args.statsd_prefix,
        statsd_reporting_interval=args.statsd_reporting_interval,
        api_key=args.api_key,
        management_token=args.management_token,
        inference_cors_allowed_hosts=tuple(args.inference_cors_allowed_host),
        management_cors_allowed_hosts=tuple(args.management_cors_allowed_host),
        model_url_policy=ModelUrlPolicy.from_entries(args.model_url_allow),
        max_unavailable=args.max_unavailable,
        replica_name=args.replica_name,
        drain_delay=args.drain_delay,
        drain_timeout=args.drain_timeout,
        peer_management_addrs=tuple(args.peer_management_addr),
        routing=args.routing,
    )
    from paddler_balancer.app import serve

    return _run_until_signal(lambda stop: serve(settings, stop))


def _add_agent(sub: Any) -> None:
    p = sub.add_parser("agent", help="run an agent that serves slots to a balancer")
    p.add_argument(
        "--management-addr",
        action="append",
        required=True,
        help="a balancer's management address (host:port); repeat it for every replica of the pool; a name that "
        "resolves to several addresses (a headless Service) means every one of them",
    )
    p.add_argument(
        "--resolve-interval",
        type=_duration,
        default=5.0,
        help="look the --management-addr names up again this often (5s, 500ms): replicas that appear get a link, "
        "those gone lose theirs",
    )
    p.add_argument(
        "--slots",
        type=int,
        default=None,
        help="concurrent sequences this agent serves (required, except with --engine llama-server, where it "
        "caps the server's own slots)",
    )
    p.add_argument("--name", default=None, help="a name shown in the admin panel")
    p.add_argument("--model-group", default="default", help="the model group this agent serves")
    p.add_argument("--engine", choices=["llama", "simulated", "llama-server"], default="llama")
    p.add_argument(
        "--llama-server-url",
        default="http://127.0.0.1:8080",
        help="llama-server engine: the base URL of the llama-server this agent forwards to",
    )
    p.add_argument(
        "--llama-server-host-header",
        default=None,
        help="llama-server engine: send this Host header (a server behind a proxy that routes by host name)",
    )
    p.add_argument(
        "--model-cache-dir", default=None, help="downloaded models go here (default ~/.cache/paddler/models)"
    )
    p.add_argument(
        "--simulated-tokens-per-second", type=float, default=100.0, help="simulated engine: tokens/s per slot"
    )
    p.add_argument("--simulated-max-tokens", type=int, default=100, help="simulated engine: tokens per request at most")
    _add_management_token(p, "send this token to the balancer")
    _add_model_url_allow(p)
    p.add_argument(
        "--model-local-root",
        action="append",
        default=[],
        metavar="DIR",
        help="LocalToAgent paths and file:// URLs must lie under one of these folders; repeatable (default: any path)",
    )
    p.add_argument(
        "--simulated-load-time",
        type=_duration,
        default=0.0,
        help="simulated engine: time to load a new model (15s, 500ms); the agent serves nothing meanwhile",
    )
    p.add_argument(
        "--drain-timeout",
        type=_duration,
        default=50.0,
        help="on SIGTERM, wait at most this long for in-flight requests before closing the links: 60s "
        "(a bare number is milliseconds, as on the balancer)",
    )
    p.add_argument(
        "--health-addr",
        type=_host_port,
        default=None,
        metavar="HOST:PORT",
        help="serve GET /ready, /live and /started here for Kubernetes probes (off by default; the operator "
        "renders 0.0.0.0:8086)",
    )
    p.set_defaults(run=_run_agent)


def _run_agent(args: argparse.Namespace) -> int:
    if args.slots is None and args.engine != "llama-server":
        print(f"error: --slots is required with --engine {args.engine}", file=sys.stderr)
        return 2
    if args.slots is not None and args.slots < 1:
        print("error: --slots must be >= 1", file=sys.stderr)
        return 2
    if args.engine == "llama-server" and not args.llama_server_url.startswith(("http://", "https://")):
        print("error: --llama-server-url must start with http:// or https://", file=sys.stderr)
        return 2
    if args.resolve_interval <= 0:
        print("error: --resolve-interval must be > 0", file=sys.stderr)
        return 2
    from paddler_agent.runtime import AgentSettings, run_agent
    from paddler_core.addresses import split_host_port

    for address in args.management_addr:
        try:
            split_host_port(address)
        except ValueError as err:
            print(f"error: --management-addr: {err}", file=sys.stderr)
            return 2
    settings = AgentSettings(
        management_addrs=tuple(dict.fromkeys(args.management_addr)),
        resolve_interval=args.resolve_interval,
        slots=args.slots or 0,
        name=args.name,
        model_group=args.model_group,
        engine=args.engine,
        model_cache_dir=args.model_cache_dir,
        simulated_tokens_per_second=args.simulated_tokens_per_second,
        simulated_max_tokens=args.simulated_max_tokens,
        management_token=args.management_token,
        model_url_policy=ModelUrlPolicy.from_entries(args.model_url_allow),
        model_local_roots=tuple(args.model_local_root),
        simulated_load_time=args.simulated_load_time,
        llama_server_url=args.llama_server_url,
        llama_server_host_header=args.llama_server_host_header,
        # The server's --api-key, if any, from the environment llama-server itself reads.
        llama_server_api_key=os.environ.get("LLAMA_API_KEY") or None,
        drain_timeout=args.drain_timeout,
        health_addr=args.health_addr,
    )
    return _run_until_signal(lambda stop: run_agent(settings, stop))


def _run_until_signal(main: Callable[[asyncio.Event], Coroutine[Any, Any, None]]) -> int:
    async def runner() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        if stop_requested():  # a signal that came during start-up (paddler_cli.early_signals)
            log.info("stop requested during start-up: stopping at once")
            stop.set()
        await main(stop)

    run_event_loop(runner())
    return 0


def run_event_loop(main: Coroutine[Any, Any, None]) -> None:
    """Run on uvloop when installed (the default install has it): it moves the same
    traffic with a fraction of asyncio's per-event overhead. PADDLER_EVENT_LOOP=asyncio
    forces the standard loop."""
    if os.environ.get("PADDLER_EVENT_LOOP", "uvloop") == "uvloop":
        try:
            import uvloop
        except ModuleNotFoundError:
            pass
        else:
            uvloop.run(main)
            return
    asyncio.run(main)


def build_parser(extensions: list[Callable[[Any], None]] | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="paddler", description="Paddler LLM load balancer for Kubernetes")
    parser.add_argument("--log-level", default=os.environ.get("PADDLER_LOG_LEVEL", "INFO"))
    sub = parser.add_subparsers(dest="command", required=True)
    for add in [_add_balancer, _add_agent, *(extensions or [])]:
        add(sub)
    return parser


def _extensions() -> list[Callable[[Any], None]]:
    """Subcommands owned by other components (operator, quickstart), if installed."""
    found: list[Callable[[Any], None]] = []
    for module, attr in (
        ("paddler_operator.cli", "add_subcommand"),
        ("paddler_cli.quickstart", "add_subcommand"),
        ("paddler_cli.dashboard", "add_subcommand"),
    ):
        try:
            mod = __import__(module, fromlist=[attr])
        except ModuleNotFoundError:
            continue
        found.append(getattr(mod, attr))
    return found


def main(argv: list[str] | None = None) -> int:
    args = build_parser(_extensions()).parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
        stream=sys.stderr,
    )
    run: Runner = args.run
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
