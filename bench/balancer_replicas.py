"""Balancer replicas: streamed tokens/s and balancer-added time to first token at 200
streams with 1, 2 and 4 balancer processes in front of the same simulated agents.

Run: ``.venv/bin/python bench/balancer_replicas.py [--rounds 2] [--seconds 5]``.
Writes ``bench/results/balancer_replicas.json`` and prints a Markdown table.

Each round starts, for each replica count in turn (the order reversed every other round,
so drift hits every count alike), N real ``paddler balancer`` processes and 4 simulated
agents of 64 slots, each agent dialling every balancer (``--management-addr`` repeated).
A separate client process spreads 200 concurrent NDJSON streams over the N inference
addresses (stream i goes to replica i mod N), as a Service spreads connections, and
measures two phases as bench/balancer_bench.py does: added time to first token at 20
tokens/s per slot (client's time to first token minus the agent's own receive -> first
token time), then streamed tokens/s at 400 tokens/s per slot. On a 2-core machine every
process shares the same two cores: more replicas add processes, not cores, so the figure
to read is the cost of replication (the slot arbitration across replicas, the status
pushed to each), not a scale-out.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
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

from bench.balancer_bench import count_agents, one_stream, percentile  # noqa: E402
from tests.harness import Balancer, Processes  # noqa: E402

AGENTS = 4
STREAMS = 200
REPLICAS = (1, 2, 4)


async def load(urls: list[str], concurrency: int, duration: float, max_tokens: int) -> dict[str, Any]:
    """Keep ``concurrency`` streams busy for ``duration`` seconds, stream i on urls[i % n]."""
    results: list[dict[str, Any]] = []
    deadline = time.monotonic() + duration
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=120)) as session:

        async def worker(url: str) -> None:
            while time.monotonic() < deadline:
                results.append(await one_stream(session, url, max_tokens))

        started = time.monotonic()
        await asyncio.gather(*(worker(urls[i % len(urls)]) for i in range(concurrency)))
        elapsed = time.monotonic() - started
    added = [
        ((r["first"] - r["sent"]) - (r["timings"]["first_token_ns"] - r["timings"]["received_ns"])) / 1e6
        for r in results
        if r["timings"]
    ]
    return {
        "requests": len(results),
        "tokens_per_s": sum(r["tokens"] for r in results) / elapsed,
        "added_latency_ms_p50": percentile(added, 50),
        "added_latency_ms_p99": percentile(added, 99),
    }


def run_client(urls: list[str], duration: float, max_tokens: int) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, __file__, "--client", json.dumps(urls), str(duration), str(max_tokens)],
        check=True,
        capture_output=True,
        text=True,
    )
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


@contextlib.contextmanager
def replicated_pool(replicas: int, tokens_per_second: float, max_tokens: int) -> Iterator[list[Balancer]]:
    """``replicas`` balancer processes and AGENTS simulated agents that dial every one."""
    processes = Processes(REPO / "bench" / "results")
    try:
        balancers = [processes.balancer("--max-buffered-requests", "1000") for _ in range(replicas)]
        addrs = [arg for b in balancers for arg in ("--management-addr", b.management_addr)]
        flags = ("--simulated-tokens-per-second", str(tokens_per_second), "--simulated-max-tokens", str(max_tokens))
        for i in range(AGENTS):
            processes.spawn(
                f"agent-sim{i}",
                ["agent", *addrs, "--slots", "64", "--name", f"sim{i}", "--engine", "simulated", *flags],
            )
        deadline = time.monotonic() + 60
        for b in balancers:
            while asyncio.run(count_agents(b.management_url)) < AGENTS:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"agents did not join {b.management_url}")
                time.sleep(0.1)
        yield balancers
    finally:
        processes.close()


def one_round(replicas: int, seconds: float) -> dict[str, float]:
    with replicated_pool(replicas, tokens_per_second=20, max_tokens=10) as balancers:
        latency = run_client([b.inference_url for b in balancers], seconds, 10)
    with replicated_pool(replicas, tokens_per_second=400, max_tokens=200) as balancers:
        throughput = run_client([b.inference_url for b in balancers], seconds, 200)
    return {
        "p50_ms": latency["added_latency_ms_p50"],
        "p99_ms": latency["added_latency_ms_p99"],
        "tokens_per_s": throughput["tokens_per_s"],
    }


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    median = results["median"]
    counts = [str(n) for n in REPLICAS]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    x = range(len(counts))
    left.bar([i - 0.2 for i in x], [median[n]["p50_ms"] for n in counts], width=0.4, label="p50")
    left.bar([i + 0.2 for i in x], [median[n]["p99_ms"] for n in counts], width=0.4, label="p99")
    left.set_xticks(list(x), counts)
    left.set_xlabel("balancer replicas")
    left.set_ylabel("ms added to time to first token")
    left.set_title(f"Added latency, {STREAMS} streams")
    left.legend(loc="lower center")
    right.bar(counts, [median[n]["tokens_per_s"] for n in counts])
    right.set_xlabel("balancer replicas")
    right.set_ylabel("streamed tokens/s")
    right.set_title(f"Throughput, {STREAMS} streams, {AGENTS} simulated agents")
    fig.suptitle(f"Balancer replicas, {results['date']}, {results['machine']} (medians)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()
    rows: dict[int, list[dict[str, float]]] = {n: [] for n in REPLICAS}
    for r in range(args.rounds):
        for n in REPLICAS if r % 2 == 0 else tuple(reversed(REPLICAS)):
            result = one_round(n, args.seconds)
            rows[n].append(result)
            print(f"round {r + 1} replicas={n} {json.dumps(result)}", flush=True)
    summary = {
        str(n): {key: statistics.median(row[key] for row in rows[n]) for key in ("p50_ms", "p99_ms", "tokens_per_s")}
        for n in REPLICAS
    }
    out = {
        "date": datetime.now(UTC).isoformat(timespec="minutes"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "rounds": rows,
        "median": summary,
    }
    path = REPO / "bench" / "results" / "balancer_replicas.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2))
    plot(out, REPO / "docs" / "benchmarks-balancer-replicas.png")
    print("\n| balancer replicas | added TTFT p50 (ms) | added TTFT p99 (ms) | streamed tokens/s |")
    print("|---:|---:|---:|---:|")
    for n in REPLICAS:
        s = summary[str(n)]
        print(f"| {n} | {s['p50_ms']:.1f} | {s['p99_ms']:.1f} | {s['tokens_per_s']:,.0f} |")
    print(f"\nwrote {path}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--client":
        urls, duration, max_tokens = json.loads(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
        print(json.dumps(asyncio.run(load(urls, STREAMS, duration, max_tokens))))
    else:
        main()
