"""Agent memory and throughput for one desired state, before and after a change, same run.

Run: ``.venv/bin/python bench/agent_memory.py [--before REF] [--rounds 3] [--tokens 200]``.

For each round, for each configuration (streams, slots) = (1, 4), (4, 4), (8, 8) and
for each variant, alternately:

* ``before``: the agent from git ref ``--before`` (exported with ``git archive`` to a
  temporary folder and put first on ``PYTHONPATH``; same venv, same llama.cpp wheel);
* ``after``: the agent of this checkout;

it starts a real ``paddler balancer`` and one real ``paddler agent --engine llama
--slots S`` (PADDLER_THREADS=``--threads``, default 2), puts Paddler's default desired state (context_size
8192, n_batch 2048, Q8_0 KV cache, default sampling) with the SmolLM2 GGUF
(scripts/fetch-model.sh), warms up with one request, then sends N concurrent
streams of ``--tokens`` tokens through the native NDJSON API and measures:

* aggregate tokens/s: generated tokens of all streams / wall time of the burst;
* time to first token (median over the streams);
* the agent process's peak resident set size (VmHWM) at the end.

Writes ``bench/results/agent_memory.json`` and prints a Markdown table of medians.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.workload import balancer_stream, chat_prompt, story_prompts  # noqa: E402

SOURCE_DIRS = ["core", "balancer", "agent", "operator", "cli"]
BEFORE_REF = "2e1f765"
"""The last commit whose agent gave every slot its own context_size cells."""
CONFIGS = [(1, 4), (4, 4), (8, 8)]
"""(concurrent streams, agent slots), as in the Paddler comparison of issue 14."""
PADDLER_PEAK_MIB = {4: 235, 8: 244}
"""Paddler 4.1's agent peak RSS with its default desired state (issue 14, same machine kind)."""
_LISTENING = re.compile(r"paddler listening service=(\w+) url=(\S+)")


# ---- processes --------------------------------------------------------------------------------


@dataclass
class Proc:
    popen: subprocess.Popen[str]
    lines: list[str] = field(default_factory=list)

    def pump(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            self.lines.append(line.rstrip())

    def urls(self, timeout: float = 30.0) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = {m[1]: m[2] for line in list(self.lines) if (m := _LISTENING.search(line))}
            if {"inference", "management"} <= set(found):
                return found
            if self.popen.poll() is not None:
                break
            time.sleep(0.05)
        raise RuntimeError("balancer did not start:\n" + "\n".join(self.lines[-30:]))

    def peak_rss_kib(self) -> int:
        with open(f"/proc/{self.popen.pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
        return 0

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()


def spawn(args: list[str], pythonpath: str | None, threads: int) -> Proc:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PADDLER_THREADS": str(threads)}
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    popen = subprocess.Popen(
        [sys.executable, "-m", "paddler_cli.main", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        cwd=REPO,
    )
    proc = Proc(popen)
    threading.Thread(target=proc.pump, daemon=True).start()
    return proc


def export_ref(ref: str, into: Path) -> str:
    """The source folders of ``ref``, for PYTHONPATH."""
    archive = subprocess.run(["git", "archive", ref, *SOURCE_DIRS], cwd=REPO, check=True, capture_output=True)
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    return os.pathsep.join(str(into / d) for d in SOURCE_DIRS)


# ---- one measurement --------------------------------------------------------------------------


async def _drive(urls: dict[str, str], model: str, slots: int, streams: int, tokens: int, tag: str) -> dict[str, Any]:
    import aiohttp

    state = {"model": {"LocalToAgent": model}}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=900)) as session:
        put = await session.put(urls["management"] + "/api/v1/balancer_desired_state", json=state)
        assert put.status == 204, await put.text()
        deadline = time.monotonic() + 300
        while True:
            agents = (await (await session.get(urls["management"] + "/api/v1/agents")).json())["agents"]
            if agents and agents[0]["slots_total"] == slots and agents[0]["state_application_status"] == "Applied":
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"agent not serving: {agents}")
            await asyncio.sleep(0.1)
        await balancer_stream(session, urls["inference"], chat_prompt(f"({tag}) Say hello."), 8)
        started = time.perf_counter()
        prompts = story_prompts(tag, streams)
        results = await asyncio.gather(*(balancer_stream(session, urls["inference"], p, tokens) for p in prompts))
        wall = time.perf_counter() - started
    generated = sum(r.generated for r in results)
    return {
        "tokens_per_s": generated / wall,
        "generated": generated,
        "wall_s": wall,
        "ttft_s": statistics.median(r.time_to_first_token for r in results),
    }


def measure(
    variant: str, pythonpath: str | None, model: str, streams: int, slots: int, tokens: int, tag: str, threads: int
) -> dict[str, Any]:
    balancer = spawn(
        [
            "balancer",
            "--inference-addr",
            "127.0.0.1:0",
            "--management-addr",
            "127.0.0.1:0",
            "--buffered-request-timeout",
            "600s",
            "--inference-item-timeout",
            "600s",
        ],
        None,
        threads,
    )
    agent: Proc | None = None
    try:
        urls = balancer.urls()
        management_addr = urls["management"].removeprefix("http://")
        agent = spawn(
            [
                "agent",
                "--management-addr",
                management_addr,
                "--slots",
                str(slots),
                "--name",
                variant,
                "--engine",
                "llama",
            ],
            pythonpath,
            threads,
        )
        result = asyncio.run(_drive(urls, model, slots, streams, tokens, tag))
        result["peak_rss_mib"] = agent.peak_rss_kib() / 1024
        return result
    except Exception:
        if agent is not None:
            print("\n".join(agent.lines[-40:]), file=sys.stderr)
        raise
    finally:
        if agent is not None:
            agent.stop()
        balancer.stop()


# ---- report -----------------------------------------------------------------------------------


def fetch_model() -> str:
    out = subprocess.run(["bash", str(REPO / "scripts" / "fetch-model.sh")], check=True, capture_output=True, text=True)
    return out.stdout.strip().splitlines()[-1]


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| streams (slots) | peak RSS before | peak RSS after | Paddler 4.1 | after / Paddler "
        "| tok/s before | tok/s after | TTFT before / after |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for streams, slots in CONFIGS:
        med: dict[str, dict[str, float]] = {}
        for variant in ("before", "after"):
            runs = [r for r in rows if r["variant"] == variant and r["streams"] == streams and r["slots"] == slots]
            med[variant] = {
                k: statistics.median(r[k] for r in runs) for k in ("peak_rss_mib", "tokens_per_s", "ttft_s")
            }
        paddler = PADDLER_PEAK_MIB[slots]
        lines.append(
            f"| {streams} ({slots}) | {med['before']['peak_rss_mib']:.0f} MiB | {med['after']['peak_rss_mib']:.0f} MiB "
            f"| {paddler} MiB | {med['after']['peak_rss_mib'] / paddler:.2f} "
            f"| {med['before']['tokens_per_s']:.1f} | {med['after']['tokens_per_s']:.1f} "
            f"| {med['before']['ttft_s'] * 1000:.0f} / {med['after']['ttft_s'] * 1000:.0f} ms |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", default=BEFORE_REF, help="git ref of the 'before' agent")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=200, help="max tokens per stream")
    parser.add_argument("--threads", type=int, default=2, help="PADDLER_THREADS of the agent")
    args = parser.parse_args()
    model = fetch_model()
    rows: list[dict[str, Any]] = []
    started = datetime.now(UTC)
    with tempfile.TemporaryDirectory(prefix="paddler-before-") as tmp:
        before_path = export_ref(args.before, Path(tmp))
        variants = [("before", before_path), ("after", None)]
        for round_no in range(args.rounds):
            for streams, slots in CONFIGS:
                order = variants if round_no % 2 == 0 else variants[::-1]
                for variant, pythonpath in order:
                    tag = f"r{round_no}-{variant}-{streams}"
                    result = measure(variant, pythonpath, model, streams, slots, args.tokens, tag, args.threads)
                    row = {"round": round_no, "variant": variant, "streams": streams, "slots": slots, **result}
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    out = {
        "started": started.isoformat(timespec="seconds"),
        "machine": f"{platform.node()} {platform.machine()} cpus={os.cpu_count()} {platform.platform()}",
        "load_average_at_end": os.getloadavg(),
        "before": args.before,
        "tokens": args.tokens,
        "threads": args.threads,
        "rows": rows,
    }
    results = REPO / "bench" / "results"
    results.mkdir(exist_ok=True)
    (results / "agent_memory.json").write_text(json.dumps(out, indent=2))
    print(table(rows))


if __name__ == "__main__":
    main()
