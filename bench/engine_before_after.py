"""Our llama engine, this tree against an earlier commit, side by side in one run (for
refactors of the decode thread: "no slower").

Run: ``.venv/bin/python bench/engine_before_after.py --before d6dd28f [--rounds 3]``.

``--before`` is exported with ``git archive`` (as bench/balancer_before_after.py does) and
each variant is driven by its own tree's ``bench/engine_vs_llama_server.py --engine-worker``
(the same workload: real llama.cpp, the project's SmolLM2 GGUF, greedy, a KV cache of
2048 cells per slot), in a child process with that tree's source first on ``PYTHONPATH``.
For each concurrency N and each round the two variants run in turn, ABBA order:
N concurrent streams of ``--tokens`` tokens (aggregate generated tokens/s); at N = 1 also
time to first token and prompt tokens/s. Prints medians and ranges per variant.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.balancer_before_after import SOURCE_DIRS, export  # noqa: E402

ORDER = ("before", "after", "after", "before")
METRICS = (
    ("gen_tps", "generated tokens/s"),
    ("ttft_s", "time to first token (s)"),
    ("prompt_tps", "prompt tokens/s"),
)


def run_variant(tree: Path, spec: dict[str, Any], threads: int) -> dict[str, Any]:
    """One measurement with ``tree``'s engine and its own bench driver."""
    env = {**os.environ, "PADDLER_THREADS": str(threads)}
    env["PYTHONPATH"] = os.pathsep.join(str(tree / d) for d in SOURCE_DIRS)
    proc = subprocess.run(
        [sys.executable, str(tree / "bench" / "engine_vs_llama_server.py"), "--engine-worker", json.dumps(spec)],
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=900,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"engine worker in {tree} failed:\n{proc.stderr[-4000:]}")
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def model_path() -> str:
    out = subprocess.run([str(REPO / "scripts" / "fetch-model.sh")], capture_output=True, text=True, check=True)
    return out.stdout.strip().splitlines()[-1]


def table_row(name: str, before: list[float], after: list[float]) -> str:
    b, a = statistics.median(before), statistics.median(after)
    return (
        f"| {name} | {b:,.3g} [{min(before):,.3g} to {max(before):,.3g}] "
        f"| {a:,.3g} [{min(after):,.3g} to {max(after):,.3g}] | {a / b:.2f} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", default="HEAD", help="git ref of the 'before' code")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per variant and concurrency")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--threads", type=int, default=int(os.environ.get("PADDLER_THREADS", os.cpu_count() or 1)))
    args = parser.parse_args()
    model = model_path()
    results: dict[int, dict[str, list[dict[str, Any]]]] = {}
    with tempfile.TemporaryDirectory(prefix="paddler-before-") as tmp:
        before = Path(tmp)
        export(args.before, before)
        for n in args.concurrency:
            results[n] = {"before": [], "after": []}
            for i in range(2 * args.rounds):
                variant = ORDER[i % 4]
                spec = dict(
                    slots=n,
                    tokens=args.tokens,
                    threads=args.threads,
                    tag=f"n{n}r{i}",
                    measure_latency=n == 1,
                    model=model,
                )
                result = run_variant(before if variant == "before" else REPO, spec, args.threads)
                results[n][variant].append(result)
                print(f"N={n} {variant}: {result['gen_tps']:.1f} tok/s", file=sys.stderr, flush=True)
    print(f"\nbefore = {args.before}, after = this tree, {args.rounds} rounds each, medians [range]\n")
    print("| what | before | after | after / before |\n|---|---:|---:|---:|")
    for n, sides in results.items():
        for key, name in METRICS:
            if all(key in r for r in sides["before"] + sides["after"]):
                before_values = [float(r[key]) for r in sides["before"]]
                after_values = [float(r[key]) for r in sides["after"]]
                print(table_row(f"N={n}: {name}", before_values, after_values))


if __name__ == "__main__":
    main()
