"""The balancer's added latency and throughput, this tree against an earlier commit, side
by side in one run (for refactors: "no regression beyond noise").

Run: ``.venv/bin/python bench/balancer_before_after.py --before 34b5f38 [--rounds 8]``.

``--before`` is exported with ``git archive`` (its source, bench/ and tests/) into a
temporary folder and run with that source first on ``PYTHONPATH``, in this venv. Each
round starts, in turn (ABBA order), one variant's pool — a real ``paddler balancer`` and
4 simulated agents, as in bench/balancer_bench.py — and measures two 5-second phases with
200 concurrent NDJSON streams from a separate client process: added time to first token
at 20 tokens/s per slot (p50, p99), then streamed tokens/s at 400 tokens/s per slot.
Prints medians and ranges per variant.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
SOURCE_DIRS = ["core", "balancer", "agent", "operator", "cli"]


def child(repo: Path, seconds: float) -> None:
    """One round in ``repo``'s code: print one JSON line of results."""
    spec = importlib.util.spec_from_file_location("balancer_bench", repo / "bench" / "balancer_bench.py")
    assert spec is not None
    assert spec.loader is not None
    bench: Any = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    with bench.simulated_pool(agents=4, tokens_per_second=20, max_tokens=10) as balancer:
        latency = bench.run_client(balancer.inference_url, 200, seconds, 10)
    with bench.simulated_pool(agents=4, tokens_per_second=400, max_tokens=200) as balancer:
        throughput = bench.run_client(balancer.inference_url, 200, seconds, 200)
    print(
        json.dumps(
            {
                "p50_ms": latency["added_latency_ms_p50"],
                "p99_ms": latency["added_latency_ms_p99"],
                "tokens_per_s": throughput["tokens_per_s"],
            }
        ),
        flush=True,
    )


def export(ref: str, into: Path) -> None:
    archive = subprocess.run(
        ["git", "archive", ref, *SOURCE_DIRS, "bench", "tests"], cwd=REPO, check=True, capture_output=True
    )
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)


def run_round(repo: Path, seconds: float) -> dict[str, float]:
    env = dict(os.environ)
    if repo != REPO:
        env["PYTHONPATH"] = os.pathsep.join(str(repo / d) for d in SOURCE_DIRS)
    out = subprocess.run(
        [sys.executable, __file__, "--child", str(repo), "--seconds", str(seconds)],
        cwd=repo,
        env=env,
        check=True,
        capture_output=True,
        text=True,
    )
    result: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--before", default="HEAD", help="git ref of the 'before' code")
    parser.add_argument("--rounds", type=int, default=8, help="rounds per variant")
    parser.add_argument("--seconds", type=float, default=5.0, help="length of each phase")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(Path(args.child), args.seconds)
        return
    with tempfile.TemporaryDirectory(prefix="paddler-before-") as tmp:
        before = Path(tmp)
        export(args.before, before)
        results: dict[str, list[dict[str, float]]] = {"before": [], "after": []}
        order = ["before", "after", "after", "before"]
        for i in range(2 * args.rounds):
            variant = order[i % 4]
            result = run_round(before if variant == "before" else REPO, args.seconds)
            results[variant].append(result)
            print(variant, result, file=sys.stderr, flush=True)
    print(f"\nbefore = {args.before}, after = this tree, {args.rounds} rounds each, medians [range]\n")
    print("| what | before | after | after / before |\n|---|---:|---:|---:|")
    for key, name in [
        ("p50_ms", "added time to first token, 200 streams, p50 (ms)"),
        ("p99_ms", "added time to first token, 200 streams, p99 (ms)"),
        ("tokens_per_s", "streamed tokens/s, 200 streams"),
    ]:
        b = [r[key] for r in results["before"]]
        a = [r[key] for r in results["after"]]
        ratio = statistics.median(a) / statistics.median(b)
        print(
            f"| {name} | {statistics.median(b):,.1f} [{min(b):,.1f} to {max(b):,.1f}] "
            f"| {statistics.median(a):,.1f} [{min(a):,.1f} to {max(a):,.1f}] | {ratio:.2f} |"
        )


if __name__ == "__main__":
    main()
