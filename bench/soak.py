"""Soak benchmark: many clients, retries, mid-stream disconnects and a killed agent,
against one real balancer process and real simulated agents, for a long time.

Run: ``.venv/bin/python bench/soak.py [--duration 600] [--clients 500]``. Writes
``bench/results/soak.json`` and prints a Markdown summary for docs/reliability.md:

* outcomes by status (per attempt: 200, 502, 503, 504, client-side disconnects, errors),
  and per client request after its retries;
* the most requests buffered at once;
* the balancer's RSS over time (sampled every 2 s: first, min, max, last);
* slots still held once the clients stop (leaked slots; must be 0).

Clients: half native NDJSON (``/api/v1/continue_from_raw_prompt``), half OpenAI SSE
(``/v1/chat/completions`` with ``stream: true``); ``--disconnect-rate`` of them close
the connection after the first chunk; 502/503/504 are retried up to ``--retries`` times
with jittered backoff. Halfway through, one agent is killed (SIGKILL) and a fresh one
started ``--restart-after`` seconds later.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import platform
import random
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.harness import Balancer, PaddlerProcess, Processes  # noqa: E402

RETRIED = {502, 503, 504}


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


class Soak:
    def __init__(self, args: argparse.Namespace, balancer: Balancer, processes: Processes) -> None:
        self.args = args
        self.balancer = balancer
        self.processes = processes
        self.attempts: collections.Counter[str] = collections.Counter()
        self.requests: collections.Counter[str] = collections.Counter()
        self.max_buffered = 0
        self.rss: list[tuple[float, float]] = []
        self.deadline = 0.0
        self.started = 0.0
        self.agents: list[PaddlerProcess] = []
        self.rng = random.Random(10)

    async def run(self) -> dict[str, Any]:
        self.started = time.monotonic()
        self.deadline = self.started + self.args.duration
        timeout = aiohttp.ClientTimeout(total=120)
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
            sampler = asyncio.create_task(self.sample(session))
            chaos = asyncio.create_task(self.kill_an_agent())
            await asyncio.gather(*(self.client(session, i) for i in range(self.args.clients)))
            chaos.cancel()
            leaked, settle_s = await self.settle(session)
            sampler.cancel()
        rss = [r for _, r in self.rss]
        return {
            "attempts_by_outcome": dict(self.attempts.most_common()),
            "requests_by_final_outcome": dict(self.requests.most_common()),
            "max_buffered": self.max_buffered,
            "rss_mb": {"first": rss[0], "min": min(rss), "max": max(rss), "last": rss[-1], "samples": self.rss},
            "leaked_slots": leaked,
            "settled_in_s": round(settle_s, 1),
        }

    async def client(self, session: aiohttp.ClientSession, index: int) -> None:
        rng = random.Random(index)
        await asyncio.sleep(rng.random() * 2)  # spread the start
        while time.monotonic() < self.deadline:
            outcome = "none"
            for attempt in range(self.args.retries + 1):
                outcome = await self.attempt(session, rng)
                self.attempts[outcome] += 1
                if outcome not in {str(s) for s in RETRIED}:
                    break
                await asyncio.sleep(min(2.0, 0.1 * 2**attempt) * (0.5 + rng.random()))
            self.requests[outcome] += 1

    async def attempt(self, session: aiohttp.ClientSession, rng: random.Random) -> str:
        url = self.balancer.inference_url
        disconnect = rng.random() < self.args.disconnect_rate
        prompt = f"soak {rng.randrange(1000)} " + "x" * rng.randrange(200)
        if rng.random() < 0.5:
            request = session.post(
                f"{url}/api/v1/continue_from_raw_prompt", json={"raw_prompt": prompt, "max_tokens": 16}
            )
        else:
            request = session.post(
                f"{url}/v1/chat/completions",
                json={"messages": [{"role": "user", "content": prompt}], "max_tokens": 16, "stream": True},
            )
        try:
            async with request as response:
                if response.status != 200:
                    await response.read()
                    return str(response.status)
                async for line in response.content:
                    if disconnect:
                        response.close()  # mid-stream: the balancer must free the slot
                        return "client_disconnected"
                    text = line.decode()
                    if '"Error"' in text or '"error"' in text:
                        body = json.loads(text.removeprefix("data: "))
                        code = body.get("Error", {}).get("error", {}).get("code") or body.get("error", {}).get("code")
                        return f"stream_error_{code}"
                return "200"
        except (aiohttp.ClientError, TimeoutError) as err:
            return f"client_error_{type(err).__name__}"

    async def sample(self, session: aiohttp.ClientSession) -> None:
        pid = self.balancer.process.popen.pid
        while True:
            try:
                async with session.get(f"{self.balancer.management_url}/api/v1/buffered_requests") as r:
                    self.max_buffered = max(self.max_buffered, (await r.json())["buffered_requests_current"])
            except aiohttp.ClientError:
                pass
            self.rss.append((round(time.monotonic() - self.started, 1), round(rss_mb(pid), 1)))
            await asyncio.sleep(2.0)

    async def kill_an_agent(self) -> None:
        await asyncio.sleep(self.args.duration / 2)
        victim = self.agents[0]
        print(f"killing {victim.name} at t={time.monotonic() - self.started:.0f}s", flush=True)
        victim.kill()
        await asyncio.sleep(self.args.restart_after)
        self.agents.append(self.start_agent("replacement"))

    def start_agent(self, name: str) -> PaddlerProcess:
        flags = ("--simulated-tokens-per-second", str(self.args.tokens_per_second), "--simulated-max-tokens", "16")
        return self.processes.agent(self.balancer, slots=self.args.slots, name=name, extra=flags)

    async def settle(self, session: aiohttp.ClientSession) -> tuple[int, float]:
        """Slots held once every client stopped (waits up to 30 s for in-flight ones)."""
        started = time.monotonic()
        held = -1
        while time.monotonic() - started < 30:
            async with session.get(f"{self.balancer.management_url}/api/v1/agents") as r:
                agents = (await r.json())["agents"]
            held = sum(a["slots_in_flight"] for a in agents)
            if held == 0:
                break
            await asyncio.sleep(0.5)
        return held, time.monotonic() - started


def summary(result: dict[str, Any]) -> str:
    rss = result["rss_mb"]
    rows = [
        f"- machine: {result['machine']}; date: {result['date']}; duration {result['duration_s']} s, "
        f"{result['clients']} clients, {result['agents']} agents x {result['slots']} slots",
        "- attempts by outcome: " + ", ".join(f"{k}: {v}" for k, v in result["attempts_by_outcome"].items()),
        "- requests by final outcome (after retries): "
        + ", ".join(f"{k}: {v}" for k, v in result["requests_by_final_outcome"].items()),
        f"- max buffered: {result['max_buffered']}",
        f"- balancer RSS (MB): first {rss['first']}, min {rss['min']}, max {rss['max']}, last {rss['last']}",
        f"- leaked slots: {result['leaked_slots']} (settled in {result['settled_in_s']} s)",
    ]
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=600.0, help="seconds of load (default 600)")
    parser.add_argument("--clients", type=int, default=500)
    parser.add_argument("--agents", type=int, default=4)
    parser.add_argument("--slots", type=int, default=8)
    parser.add_argument("--tokens-per-second", type=float, default=50.0, help="per slot, simulated")
    parser.add_argument("--retries", type=int, default=3)
    parser.add_argument("--disconnect-rate", type=float, default=0.1)
    parser.add_argument("--restart-after", type=float, default=5.0, help="seconds before the killed agent is replaced")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "soak.json")
    args = parser.parse_args()

    processes = Processes(REPO / "bench" / "results")
    try:
        balancer = processes.balancer(
            "--max-buffered-requests", "200", "--buffered-request-timeout", "10s", "--inference-item-timeout", "10s"
        )
        soak = Soak(args, balancer, processes)
        soak.agents = [soak.start_agent(f"soak{i}") for i in range(args.agents)]
        asyncio.run(wait_for_agents(balancer, args.agents))
        result = asyncio.run(soak.run())
    finally:
        processes.close()
    result.update(
        {
            "machine": f"{platform.node()} {platform.machine()} {platform.processor() or ''} cpus={_cpus()}".strip(),
            "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "duration_s": args.duration,
            "clients": args.clients,
            "agents": args.agents,
            "slots": args.slots,
        }
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(summary(result))
    print(f"wrote {args.out}")


def _cpus() -> int:
    import os

    return os.cpu_count() or 0


async def wait_for_agents(balancer: Balancer, count: int) -> None:
    async with aiohttp.ClientSession() as session:
        for _ in range(300):
            async with session.get(f"{balancer.management_url}/api/v1/agents") as r:
                if len((await r.json())["agents"]) >= count:
                    return
            await asyncio.sleep(0.1)
    raise RuntimeError("agents did not register")


if __name__ == "__main__":
    main()
