"""The balancer in front of llama-server against clients straight to the same llama-server.

Run: ``.venv/bin/python bench/balancer_vs_llama_server.py [--rounds 3] [--tokens 128]``.
Builds or reuses llama-server (scripts/install-llama-server.sh) and the SmolLM2 GGUF
(scripts/fetch-model.sh). For each concurrency N (4, 8) it starts one llama-server
with ``--parallel N`` (1 thread, 2,048 tokens of context per slot), a real
``paddler balancer`` and one ``paddler agent --engine llama-server`` in front of it, then
alternates, round by round:

* **direct**: N clients stream ``POST /completion`` from llama-server;
* **balanced**: N clients stream the native NDJSON API of the balancer
  (``/api/v1/continue_from_raw_prompt``), which goes balancer -> agent -> llama-server.

Both send the same raw prompts (distinct per round and side, so no side reuses the
other's prompt cache) with the same greedy sampling fields. Aggregate tokens/s = all
generated tokens / wall time from the first send to the last token. Time to first
token: the median over the N streams of a run; "added" = balanced - direct. A separate
single-stream TTFT (short prompt, median of 9) shows the cost of the two extra hops
without queueing. Writes ``bench/results/balancer_vs_llama_server.json`` and prints a
Markdown table for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.workload import Streamed, balancer_stream, chat_prompt, llama_server_stream, story_prompts  # noqa: E402
from paddler_agent.llama_server_wire import sampling_fields  # noqa: E402
from paddler_core.desired_state import InferenceParameters  # noqa: E402
from tests.harness import Processes, wait_until  # noqa: E402
from tests.llama_server.conftest import LlamaServers  # noqa: E402

CONTEXT_PER_SLOT = 2048
GREEDY = InferenceParameters(temperature=0.0, penalty_repeat=1.0, penalty_presence=0.0, context_size=2048)


def script(name: str) -> Path:
    out = subprocess.run([str(REPO / "scripts" / name)], capture_output=True, text=True, check=True, cwd=REPO)
    return Path(out.stdout.strip().splitlines()[-1])


async def direct_stream(session: aiohttp.ClientSession, url: str, text: str, tokens: int) -> Streamed:
    return await llama_server_stream(session, url, text, tokens, sampling_fields(GREEDY))


async def run_side(side: str, url: str, n: int, tokens: int, tag: str) -> dict[str, Any]:
    stream = direct_stream if side == "direct" else balancer_stream
    # llama-server closes a streamed response's connection: a new one per request on both sides.
    connector = aiohttp.TCPConnector(force_close=True, limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=600)) as session:
        await stream(session, url, chat_prompt(f"({tag}) warm up"), 4)
        hellos = [await stream(session, url, chat_prompt(f"({tag}-{i}) Say hi."), 2) for i in range(9)]
        single = [h.time_to_first_token for h in hellos]
        prompts = story_prompts(tag, n)
        start = time.perf_counter()
        outs = await asyncio.gather(*(stream(session, url, p, tokens) for p in prompts))
        wall = time.perf_counter() - start
    generated = sum(o.generated for o in outs)
    return {
        "tps": generated / wall,
        "generated": generated,
        "wall_s": wall,
        "ttft_s": statistics.median(o.time_to_first_token for o in outs),
        "single_ttft_s": statistics.median(single),
    }


async def measure(n: int, rounds: int, tokens: int, servers: LlamaServers, processes: Processes) -> dict[str, Any]:
    server = servers.start("--parallel", str(n), "--ctx-size", str(CONTEXT_PER_SLOT * n))
    balancer = processes.balancer("--buffered-request-timeout", "600s", "--inference-item-timeout", "600s")
    processes.spawn(
        f"agent-{n}",
        ["agent", "--management-addr", balancer.management_addr, "--engine", "llama-server",
         "--llama-server-url", server.url, "--name", f"bench-{n}"],
    )  # fmt: skip
    state = {"model": "None", "inference_parameters": GREEDY.model_dump(mode="json")}
    async with aiohttp.ClientSession() as http:
        async with http.put(balancer.management_url + "/api/v1/balancer_desired_state", json=state) as put:
            assert put.status == 204, await put.text()

        async def serving() -> bool:
            async with http.get(balancer.management_url + "/api/v1/agents") as response:
                agents = (await response.json())["agents"]
            return bool(agents) and agents[0]["slots_total"] == n and agents[0]["state_application_status"] == "Applied"

        await wait_until(serving, timeout=60, what="agent serving")
    results: dict[str, list[dict[str, Any]]] = {"direct": [], "balanced": []}
    for r in range(rounds):
        order = ("direct", "balanced") if r % 2 == 0 else ("balanced", "direct")
        for side in order:
            url = server.url if side == "direct" else balancer.inference_url
            results[side].append(await run_side(side, url, n, tokens, f"n{n}-r{r}-{side}"))
            print(f"N={n} round {r} {side}: {results[side][-1]}", flush=True)
    server.stop()
    return results


def median_of(runs: list[dict[str, Any]], key: str) -> float:
    return float(statistics.median(run[key] for run in runs))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--streams", type=int, nargs="+", default=[4, 8])
    args = parser.parse_args()
    binary, model = script("install-llama-server.sh"), script("fetch-model.sh")
    started = datetime.now(UTC)
    load_before = os.getloadavg()
    report: dict[str, Any] = {}
    tmp = REPO / "bench" / "results"
    tmp.mkdir(parents=True, exist_ok=True)
    for n in args.streams:
        servers, processes = LlamaServers(binary, model), Processes(tmp)
        try:
            report[str(n)] = asyncio.run(measure(n, args.rounds, args.tokens, servers, processes))
        finally:
            processes.close()
            servers.close()
    info = {
        "started": started.isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.platform()}",
        "load_before": load_before,
        "load_after": os.getloadavg(),
        "tokens_per_stream": args.tokens,
        "rounds": args.rounds,
    }
    (tmp / "balancer_vs_llama_server.json").write_text(json.dumps({"info": info, "runs": report}, indent=1))
    print(f"\n{info}\n")
    print("| streams | direct tok/s | through balancer tok/s | ratio | TTFT direct | TTFT balanced | added |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for n, runs in report.items():
        d, b = median_of(runs["direct"], "tps"), median_of(runs["balanced"], "tps")
        td, tb = median_of(runs["direct"], "ttft_s"), median_of(runs["balanced"], "ttft_s")
        ttft = f"{td * 1e3:.0f} ms | {tb * 1e3:.0f} ms | {(tb - td) * 1e3:+.1f} ms"
        print(f"| {n} | {d:.1f} | {b:.1f} | {b / d:.3f} | {ttft} |")
    for n, runs in report.items():
        sd, sb = median_of(runs["direct"], "single_ttft_s"), median_of(runs["balanced"], "single_ttft_s")
        print(f"single-stream TTFT (server idle, N={n} server): direct {sd * 1e3:.1f} ms, "
              f"balanced {sb * 1e3:.1f} ms, added {(sb - sd) * 1e3:+.1f} ms")  # fmt: skip


if __name__ == "__main__":
    main()
