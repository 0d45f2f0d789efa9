"""Balancer benchmark: throughput, added latency, and routing at 1,000 agents.

Run: ``.venv/bin/python bench/balancer_bench.py [--quick]``. Writes
``bench/results/balancer.json`` and prints a Markdown table for docs/benchmarks.md.

1. Throughput: simulated agents stream tokens through one balancer process to
   concurrent NDJSON clients (a separate client process); tokens/s counted at
   the clients.
2. Added latency at 200 concurrent streams: for each request, time to first
   token seen by the client minus the agent's own receive->first-token time
   (both CLOCK_MONOTONIC, comparable across local processes; the simulated
   agent reports its timestamps in the Done payload).
3. Routing decision time with 10 and 1,000 agents (in-process, the real
   Dispatcher), and 1,000 agents connected for real over WebSockets to one
   balancer, with the added latency measured the same way.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from paddler_balancer.agents import AgentController, AgentPool  # noqa: E402
from paddler_balancer.dispatcher import Dispatcher  # noqa: E402
from paddler_balancer.routing import RouteRequest  # noqa: E402
from paddler_core.protocol import AgentStatus  # noqa: E402
from tests.harness import Balancer, Processes  # noqa: E402


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1))))
    return ordered[k]


async def one_stream(session: aiohttp.ClientSession, url: str, max_tokens: int) -> dict[str, Any]:
    body = {"raw_prompt": f"bench {random.random()}", "max_tokens": max_tokens}
    sent = time.monotonic_ns()
    first: int | None = None
    tokens = 0
    timings: dict[str, int] = {}
    async with session.post(url + "/api/v1/continue_from_raw_prompt", json=body) as response:
        response.raise_for_status()
        buffer = b""
        async for chunk in response.content.iter_any():
            if first is None:
                first = time.monotonic_ns()
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            for line in lines:
                if not line:
                    continue
                message = json.loads(line)
                gen = message["Response"]["response"].get("GeneratedToken", {})
                if "ContentToken" in gen:
                    tokens += 1
                elif "Done" in gen:
                    timings = gen["Done"].get("timings", {})
    assert first is not None
    return {"sent": sent, "first": first, "tokens": tokens, "timings": timings}


async def load(url: str, concurrency: int, duration: float, max_tokens: int) -> dict[str, Any]:
    """Keep ``concurrency`` streams busy for ``duration`` seconds."""
    results: list[dict[str, Any]] = []
    deadline = time.monotonic() + duration
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=120)) as session:

        async def worker() -> None:
            while time.monotonic() < deadline:
                results.append(await one_stream(session, url, max_tokens))

        started = time.monotonic()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.monotonic() - started
    added = [
        ((r["first"] - r["sent"]) - (r["timings"]["first_token_ns"] - r["timings"]["received_ns"])) / 1e6
        for r in results
        if r["timings"]
    ]
    return {
        "requests": len(results),
        "tokens": sum(r["tokens"] for r in results),
        "elapsed_s": elapsed,
        "tokens_per_s": sum(r["tokens"] for r in results) / elapsed,
        "added_latency_ms_p50": percentile(added, 50),
        "added_latency_ms_p99": percentile(added, 99),
    }


def run_client(url: str, concurrency: int, duration: float, max_tokens: int) -> dict[str, Any]:
    """The load generator runs in its own process so it does not share the balancer's loop."""
    out = subprocess.run(
        [sys.executable, __file__, "--client", url, str(concurrency), str(duration), str(max_tokens)],
        check=True,
        capture_output=True,
        text=True,
    )
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def decision_time(agent_count: int, rounds: int = 20000) -> dict[str, float]:
    """Mean and p99 time of one claim (filters -> scorers -> picker) + release."""

    async def run() -> list[float]:
        pool = AgentPool()
        dispatcher = Dispatcher(pool, max_buffered=30, buffer_timeout=10)
        for i in range(agent_count):
            a = AgentController(id=f"a{i}", name=None, model_group="default", send=lambda m: None)
            a.status = AgentStatus(slots_total=4, prefix_hashes=[f"p{i % 50}"])
            pool.add(a)
        request = RouteRequest("default", ("p7",))
        samples = []
        for _ in range(rounds):
            t0 = time.perf_counter_ns()
            lease = dispatcher.try_claim(request)
            samples.append((time.perf_counter_ns() - t0) / 1000)
            assert lease is not None
            lease.release()
        return samples

    samples = asyncio.run(run())
    return {"agents": agent_count, "mean_us": statistics.fmean(samples), "p99_us": percentile(samples, 99)}


def connect_many_agents(management_addr: str, count: int) -> subprocess.Popen[str]:
    code = f"""
import asyncio, sys
sys.path.insert(0, {str(REPO)!r})
from paddler_agent.runtime import AgentRuntime, AgentSettings
async def main():
    stop = asyncio.Event()
    runtimes = [AgentRuntime(AgentSettings(management_addrs=({management_addr!r},), slots=1, name=f"bulk{{i}}",
                engine="simulated", simulated_tokens_per_second=1000, simulated_max_tokens=20)) for i in range({count})]
    await asyncio.gather(*(r.run(stop) for r in runtimes))
asyncio.run(main())
"""
    return subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True
    )


async def count_agents(management_url: str) -> int:
    async with aiohttp.ClientSession() as session, session.get(management_url + "/api/v1/agents") as r:
        return len((await r.json())["agents"])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--client", nargs=4)
    args = parser.parse_args()
    if args.client:
        url, concurrency, duration, max_tokens = args.client
        print(json.dumps(asyncio.run(load(url, int(concurrency), float(duration), int(max_tokens)))))
        return

    duration = 5.0 if args.quick else 15.0
    results: dict[str, Any] = {
        "machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} cores, Python {platform.python_version()}",
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "load_average_at_start": os.getloadavg(),
    }
    # 4 agents x 64 slots at 400 tokens/s per slot: more than one balancer can move.
    with simulated_pool(agents=4, tokens_per_second=400, max_tokens=200) as balancer:
        results["throughput"] = run_client(balancer.inference_url, 200, duration, 200)
    print("throughput", results["throughput"], flush=True)
    # Added latency at 200 concurrent streams, at a realistic token rate.
    with simulated_pool(agents=4, tokens_per_second=20, max_tokens=10) as balancer:
        results["latency_200_streams"] = run_client(balancer.inference_url, 200, duration, 10)
    print("latency", results["latency_200_streams"], flush=True)
    # 1,000 agents connected for real over WebSockets (one process holds them all).
    with simulated_pool(agents=0, tokens_per_second=0, max_tokens=0) as balancer:
        bulk = connect_many_agents(balancer.management_addr, 1000)
        try:
            deadline = time.monotonic() + 120
            while asyncio.run(count_agents(balancer.management_url)) < 1000 and time.monotonic() < deadline:
                time.sleep(0.5)
            results["connected_agents"] = asyncio.run(count_agents(balancer.management_url))
            results["latency_1000_agents"] = run_client(balancer.inference_url, 50, duration, 10)
        finally:
            bulk.terminate()
            bulk.wait(30)
    print("1000 agents", results["latency_1000_agents"], flush=True)
    results["decision"] = [decision_time(n) for n in (10, 100, 1000)]
    print("decision", results["decision"])
    out = REPO / "bench" / "results" / "balancer.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    plot(results, REPO / "docs" / "benchmarks-balancer.png")
    print(f"wrote {out}")


@contextlib.contextmanager
def simulated_pool(agents: int, tokens_per_second: float, max_tokens: int) -> Iterator[Balancer]:
    """A balancer process with ``agents`` simulated agents of 64 slots each, registered."""
    processes = Processes(REPO / "bench" / "results")
    try:
        balancer = processes.balancer("--max-buffered-requests", "1000")
        flags = ("--simulated-tokens-per-second", str(tokens_per_second), "--simulated-max-tokens", str(max_tokens))
        for i in range(agents):
            processes.agent(balancer, slots=64, name=f"sim{i}", extra=flags)
        while asyncio.run(count_agents(balancer.management_url)) < agents:
            time.sleep(0.1)
        yield balancer
    finally:
        processes.close()


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    scenarios = [("200 streams", "latency_200_streams"), ("1,000 agents", "latency_1000_agents")]
    labels = [label for label, _ in scenarios]
    p50 = [results[key]["added_latency_ms_p50"] for _, key in scenarios]
    p99 = [results[key]["added_latency_ms_p99"] for _, key in scenarios]
    x = range(len(labels))
    left.bar([i - 0.2 for i in x], p50, width=0.4, label="p50")
    left.bar([i + 0.2 for i in x], p99, width=0.4, label="p99")
    left.set_xticks(list(x), labels)
    left.set_ylabel("ms added by the balancer")
    left.set_title("Latency added to time to first token")
    left.legend()
    decisions = results["decision"]
    right.plot([d["agents"] for d in decisions], [d["mean_us"] for d in decisions], marker="o", label="mean")
    right.plot([d["agents"] for d in decisions], [d["p99_us"] for d in decisions], marker="o", label="p99")
    right.set_xscale("log")
    right.set_xlabel("agents in the pool")
    right.set_ylabel("µs per routing decision")
    right.set_title("Routing decision time")
    right.legend()
    fig.suptitle(f"Balancer benchmark, {results['date']}, {results['machine']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
