"""Routing quality on real agents: ``--routing least-busy`` against ``--routing prefix``,
alternating in one run, on four workloads.

Run: ``.venv/bin/python bench/routing_quality.py [--rounds 2] [--models smollm2,gemma]``.

For each round, model and scenario, each policy in turn (the order flips every round), a
fresh pool starts: one real ``paddler balancer --routing POLICY`` and ``--agents`` real
``paddler agent --engine llama --slots S`` processes (``PADDLER_THREADS=--threads``), with
a desired state on the model's GGUF (scripts/fetch-model.sh, scripts/fetch-second-model.sh)
that sets ``context_size`` (``--context-size``: the agent's whole KV cache, shared by its
slots and its cached conversations) and greedy sampling (temperature 0: both policies see
the same answers, hence the same later prompts); everything else is Paddler's default.
gemma-3-270m's GGUF carries no chat template, so its state sets
``chat_template_override`` (Gemma 3's template, :data:`GEMMA3_CHAT_TEMPLATE`) and
``use_chat_template_override``. Requests go through the native
``continue_from_conversation_history`` endpoint (NDJSON):

* ``multi_turn``: ``--conversations-per-agent`` x ``agents`` conversations, ``--turns``
  turns each, from ``agents + 1`` concurrent users (below saturation: 4 of 6 slots): each
  user takes its conversations' turns one after another, interleaved (turn 1 of each, then
  turn 2 of each...); conversation *i* goes to user *i* mod users. (With one user per agent,
  least-busy would keep each user on one agent: the user's next request finds its own
  agent the only one with every slot free.) Every conversation opens with one of
  ``agents`` long system prompts (``--system-words``, ~400 SmolLM2 tokens; conversation *i*
  has system prompt *i* mod agents) and a first user message with notes of its own (``--note-words``, ~180 tokens), so a
  conversation holds ~700 tokens by its last answer (each row's ``prompt_tokens_max``).
  The defaults (3 agents x 2 slots, 3 conversations per agent: 9, context_size 2048) are
  the situation prefix routing is for: one agent's KV cache holds about 3 such
  conversations (2048 / 700; a few more where they share a system prompt, whose cells the
  agent shares between sequences), the pool all 9 only if each agent keeps its own share;
  an agent that sees every conversation (least-busy sends each turn to the freest agent)
  needs ~3 x 400 + 9 x 300 = ~3,900 cells and 9 cached sequences (it has 2048 cells and 4
  per slot: 8), so it evicts;
* ``saturated``: the same conversations with more users than the pool has slots (one
  conversation each, all turns back to back);
* ``share_nothing``: single-turn requests, every prompt different from its first token;
* ``one_prefix``: one long system prompt for every request, distinct questions, as many
  concurrent users as slots.

Per run: mean, p50 and p99 time to first token, generated tokens/s (all streams / wall
time), share of requests answered, prompt tokens reused and evaluated (the balancer's
``paddler_prompt_tokens_reused`` / ``_evaluated`` gauges) and the most busy slots seen per
agent (``/api/v1/agents`` polled every 50 ms). ``--engine simulated`` runs the same
harness without a model (the test suite's smoke test).

``--max-minutes`` bounds a run of many rounds: after that long no new pair of rounds
starts (the first pair always runs; in a pair each policy goes first once).

Writes ``bench/results/routing_quality.json`` (``--out``), prints a Markdown table and,
with ``--plot``, draws docs/benchmarks-routing.png.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.agent_memory import Proc, spawn  # noqa: E402

GEMMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}"
    "{%- set first_user_prefix = '' -%}"
    "{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{%- endif -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else '') }}"
    "{{ message['content'] | trim }}"
    "{{ '<end_of_turn>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\\n' }}{%- endif -%}"
)
"""Gemma 3's chat template (google/gemma-3-270m-it's ``chat_template``, text content only):
the system prompt opens the first user turn; roles ``user`` and ``model``."""
CHAT_TEMPLATES = {"gemma": GEMMA3_CHAT_TEMPLATE}
"""Chat template overrides of the models whose GGUF has none."""

POLICIES = ("least-busy", "prefix")
SCENARIOS = ("multi_turn", "saturated", "share_nothing", "one_prefix")
MODEL_SCRIPTS = {"smollm2": "fetch-model.sh", "gemma": "fetch-second-model.sh"}
WORDS = tuple(
    "river stone garden window market letter music winter silver forest harbor candle engine "  # noqa: SIM905
    "village morning mountain lantern journey bridge meadow thunder pocket kitchen library "
    "station compass feather orchard painter sailor castle valley planet ribbon whisper".split()
)


@dataclass(frozen=True)
class Sizes:
    agents: int = 3
    slots: int = 2
    turns: int = 3
    conversations_per_agent: int = 3
    system_words: int = 330
    """~400 SmolLM2 tokens."""
    note_words: int = 180
    """The first user message of each conversation (its own notes): ~180 SmolLM2 tokens."""
    context_size: int = 2048
    """Each agent's KV cache (desired state ``context_size``): about 3 conversations."""
    max_tokens: int = 24
    single_requests: int = 12
    """Requests of the single-turn scenarios (share_nothing, one_prefix)."""
    max_seconds: float = 120.0
    """A run stops issuing requests after this long."""


@dataclass
class Outcome:
    ttft: list[float] = field(default_factory=list)
    generated: int = 0
    prompt_tokens: list[int] = field(default_factory=list)
    """Per answered request, its prompt's tokens (the agent's usage)."""
    sent: int = 0
    answered: int = 0
    errors: list[str] = field(default_factory=list)


# ---- workloads --------------------------------------------------------------------------------


def text(seed: str, words: int) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(words))


def system_prompt(tag: str, n: int, words: int) -> str:
    return f"You are assistant {n} of run {tag}. Remember this background: {text(f'{tag}-{n}', words)}."


def conversation_plan(scenario: str, sizes: Sizes, tag: str) -> list[list[list[dict[str, str]]]]:
    """Per user, its conversations' opening histories (each a list of messages)."""
    slots = sizes.agents * sizes.slots
    if scenario in ("multi_turn", "saturated"):
        users = sizes.agents + 1 if scenario == "multi_turn" else slots + sizes.agents
        count = max(users, sizes.agents * sizes.conversations_per_agent)
        systems = [system_prompt(tag, n, sizes.system_words) for n in range(max(1, sizes.agents))]
        convs = [
            [
                {"role": "system", "content": systems[i % len(systems)]},
                {"role": "user", "content": f"My notes {i}: {text(f'{tag}-n{i}', sizes.note_words)}."},
                {"role": "assistant", "content": "Noted."},
            ]
            for i in range(count)
        ]
        return [convs[u::users] for u in range(users)]
    users = sizes.agents if scenario == "share_nothing" else slots
    if scenario == "share_nothing":
        convs = [
            [{"role": "user", "content": f"{i} {tag} " + text(f"{tag}-q{i}", sizes.system_words // 2)}]
            for i in range(sizes.single_requests)
        ]
    else:
        shared = system_prompt(tag, 0, sizes.system_words)
        convs = [
            [{"role": "system", "content": shared}, {"role": "user", "content": f"Question {i}: name a colour."}]
            for i in range(sizes.single_requests)
        ]
    return [convs[u::users] for u in range(users)]


# ---- one request, one user --------------------------------------------------------------------


async def one_turn(session: Any, url: str, history: list[dict[str, str]], max_tokens: int, out: Outcome) -> str:
    """Stream one turn; records its time to first token and tokens; returns the answer."""
    body = {"conversation_history": history, "max_tokens": max_tokens}
    started = time.perf_counter()
    answer: list[str] = []
    out.sent += 1
    try:
        async with session.post(url + "/api/v1/continue_from_conversation_history", json=body) as response:
            if response.status != 200:
                raise RuntimeError(f"HTTP {response.status}: {(await response.text())[:200]}")
            done = await _read_stream(response, answer, started, out)
    except Exception as err:  # a failed request counts, the run goes on
        out.errors.append(repr(err)[:200])
        return ""
    if done:
        out.answered += 1
    return "".join(answer)


async def _read_stream(response: Any, answer: list[str], started: float, out: Outcome) -> bool:
    first = True
    async for raw in response.content:
        if not raw.strip():
            continue
        line = json.loads(raw)
        if "Error" in line:
            raise RuntimeError(f"stream failed: {str(line)[:200]}")
        token = line["Response"]["response"].get("GeneratedToken", {})
        if not isinstance(token, dict):
            continue
        if "ContentToken" in token:
            if first:
                out.ttft.append(time.perf_counter() - started)
                first = False
            answer.append(str(token["ContentToken"]))
        elif "Done" in token:
            out.generated += int(token["Done"]["usage"].get("content_tokens", 0))
            out.prompt_tokens.append(int(token["Done"]["usage"].get("prompt_tokens", 0)))
            return True
        elif token:
            raise RuntimeError(f"stream failed: {str(line)[:200]}")
    return False


async def user(
    session: Any, url: str, convs: list[list[dict[str, str]]], turns: int, sizes: Sizes, out: Outcome, stop_at: float
) -> None:
    """One user: turn 1 of each of its conversations, then turn 2 of each, and so on."""
    for t in range(turns):
        for n, history in enumerate(convs):
            if time.monotonic() > stop_at:
                return
            if turns > 1 or history[-1]["role"] != "user":
                history.append({"role": "user", "content": f"Turn {t + 1} of conversation {n}: tell me more."})
            answer = await one_turn(session, url, history, sizes.max_tokens, out)
            history.append({"role": "assistant", "content": answer or "..."})


# ---- one run: a fresh pool, one policy, one scenario ------------------------------------------


def start_pool(policy: str, engine: str, sizes: Sizes, threads: int) -> tuple[Proc, list[Proc], dict[str, str]]:
    balancer = spawn(
        ["balancer", "--inference-addr", "127.0.0.1:0", "--management-addr", "127.0.0.1:0", "--routing", policy,
         "--buffered-request-timeout", "600s", "--inference-item-timeout", "600s", "--max-buffered-requests", "1000"],
        None,
        threads,
    )  # fmt: skip
    urls = balancer.urls()
    addr = urls["management"].removeprefix("http://")
    extra = ["--simulated-tokens-per-second", "200"] if engine == "simulated" else []
    agents = [
        spawn(["agent", "--management-addr", addr, "--slots", str(sizes.slots), "--name", f"agent-{i}",
               "--engine", engine, *extra], None, threads)
        for i in range(sizes.agents)
    ]  # fmt: skip
    return balancer, agents, urls


def desired_state(model: str, path: str, sizes: Sizes) -> dict[str, Any]:
    """The pool's desired state: ``path``'s GGUF, the KV cache size, greedy sampling and,
    for a model without a chat template of its own, the override."""
    state: dict[str, Any] = {
        "model": {"LocalToAgent": path},
        "inference_parameters": {"context_size": sizes.context_size, "temperature": 0.0},
    }
    if model in CHAT_TEMPLATES:
        state |= {"chat_template_override": {"content": CHAT_TEMPLATES[model]}, "use_chat_template_override": True}
    return state


async def wait_serving(session: Any, urls: dict[str, str], state: dict[str, Any] | None, sizes: Sizes) -> None:
    """Put the desired state (a simulated pool, ``state`` None, serves without one) and
    wait until every agent serves its slots."""
    if state is not None:
        put = await session.put(urls["management"] + "/api/v1/balancer_desired_state", json=state)
        assert put.status == 204, await put.text()
    applied = ("Applied",) if state is not None else ("Applied", "Fresh")
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        agents = (await (await session.get(urls["management"] + "/api/v1/agents")).json())["agents"]
        serving = [a for a in agents if a["slots_total"] == sizes.slots and a["state_application_status"] in applied]
        if len(serving) == sizes.agents:
            return
        await asyncio.sleep(0.1)
    raise RuntimeError(f"agents not serving: {agents}")


async def watch_busy(session: Any, url: str, peaks: dict[str, int], kv: dict[str, int], stop: asyncio.Event) -> None:
    """Most busy slots (processing or claimed) and KV cache cells seen per agent."""
    while not stop.is_set():
        for a in (await (await session.get(url + "/api/v1/agents")).json())["agents"]:
            peaks[a["name"]] = max(peaks.get(a["name"], 0), int(a["slots_processing"]), int(a["slots_in_flight"]))
            kv[a["name"]] = int(a.get("kv_cache_tokens_total", 0))
        await asyncio.sleep(0.05)


async def reuse_counts(session: Any, url: str) -> tuple[int, int]:
    metrics = await (await session.get(url + "/metrics")).text()
    found = {"reused": 0, "evaluated": 0}
    for line in metrics.splitlines():
        for kind in found:
            if line.startswith(f"paddler_prompt_tokens_{kind}{{"):
                found[kind] += int(float(line.rsplit(" ", 1)[1]))
    return found["reused"], found["evaluated"]


async def drive(
    urls: dict[str, str], state: dict[str, Any] | None, scenario: str, sizes: Sizes, tag: str
) -> dict[str, Any]:
    import aiohttp

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=900)) as session:
        await wait_serving(session, urls, state, sizes)
        plan = conversation_plan(scenario, sizes, tag)
        turns = sizes.turns if scenario in ("multi_turn", "saturated") else 1
        out, stop = Outcome(), asyncio.Event()
        peaks: dict[str, int] = {}
        kv: dict[str, int] = {}
        watcher = asyncio.create_task(watch_busy(session, urls["management"], peaks, kv, stop))
        started = time.perf_counter()
        stop_at = time.monotonic() + sizes.max_seconds
        await asyncio.gather(*(user(session, urls["inference"], c, turns, sizes, out, stop_at) for c in plan))
        wall = time.perf_counter() - started
        stop.set()
        await watcher
        await asyncio.sleep(1.5)  # the agents' next status carries their last counts
        reused, evaluated = await reuse_counts(session, urls["management"])
    return summary(out, wall, reused, evaluated, peaks, users=len(plan)) | {
        "conversations": sum(len(c) for c in plan),
        "kv_cache_tokens_total": dict(sorted(kv.items())),
    }


def percentile(values: list[float], q: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def summary(
    out: Outcome, wall: float, reused: int, evaluated: int, peaks: dict[str, int], users: int
) -> dict[str, Any]:
    return {
        "users": users,
        "sent": out.sent,
        "answered": out.answered,
        "success_rate": out.answered / out.sent if out.sent else 0.0,
        "ttft_mean_s": statistics.fmean(out.ttft) if out.ttft else math.nan,
        "ttft_p50_s": percentile(out.ttft, 0.5),
        "ttft_p99_s": percentile(out.ttft, 0.99),
        "tokens_per_s": out.generated / wall if wall else 0.0,
        "wall_s": wall,
        "prompt_tokens_reused": reused,
        "prompt_tokens_evaluated": evaluated,
        "max_busy_slots": dict(sorted(peaks.items())),
        "prompt_tokens_mean": statistics.fmean(out.prompt_tokens) if out.prompt_tokens else math.nan,
        "prompt_tokens_max": max(out.prompt_tokens, default=0),
        "errors": out.errors[:5],
    }


def measure(
    policy: str, engine: str, state: dict[str, Any] | None, scenario: str, sizes: Sizes, tag: str, threads: int
) -> dict[str, Any]:
    balancer, agents, urls = start_pool(policy, engine, sizes, threads)
    try:
        return asyncio.run(drive(urls, state, scenario, sizes, tag))
    except Exception:
        for proc in (balancer, *agents):
            print("\n".join(proc.lines[-20:]), file=sys.stderr)
        raise
    finally:
        for proc in agents:
            proc.stop()
        balancer.stop()


# ---- report -----------------------------------------------------------------------------------


def fetch_model(name: str) -> str:
    script = REPO / "scripts" / MODEL_SCRIPTS[name]
    out = subprocess.run(["bash", str(script)], check=True, capture_output=True, text=True)
    return out.stdout.strip().splitlines()[-1]


def _median(rows: list[dict[str, Any]], key: str) -> float:
    values = [r[key] for r in rows if not (isinstance(r[key], float) and math.isnan(r[key]))]
    return statistics.median(values) if values else math.nan


def table(rows: list[dict[str, Any]]) -> str:
    """Per model, scenario and policy: the median over rounds of each run's TTFT mean, p50,
    p99 and tokens/s; answered and prompt tokens summed over rounds; the most busy slots
    seen per agent in any round."""
    lines = [
        "| model | scenario | policy | runs | TTFT mean | p50 | p99 | tok/s | answered "
        "| reused / evaluated prompt tokens | max busy slots per agent |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for model in dict.fromkeys(r["model"] for r in rows):
        for scenario in SCENARIOS:
            for policy in POLICIES:
                runs = [r for r in rows if (r["model"], r["scenario"], r["policy"]) == (model, scenario, policy)]
                if not runs:
                    continue
                answered, sent = sum(r["answered"] for r in runs), sum(r["sent"] for r in runs)
                lines.append(
                    f"| {model} | {scenario} | {policy} | {len(runs)} | {_median(runs, 'ttft_mean_s'):.2f} s "
                    f"| {_median(runs, 'ttft_p50_s'):.2f} s | {_median(runs, 'ttft_p99_s'):.2f} s "
                    f"| {_median(runs, 'tokens_per_s'):.1f} | {answered}/{sent} "
                    f"| {sum(r['prompt_tokens_reused'] for r in runs)} "
                    f"/ {sum(r['prompt_tokens_evaluated'] for r in runs)} "
                    f"| {' '.join(str(v) for v in max_busy(runs).values())} |"
                )
    return "\n".join(lines)


def max_busy(runs: list[dict[str, Any]]) -> dict[str, int]:
    peaks: dict[str, int] = {}
    for run in runs:
        for name, busy in run["max_busy_slots"].items():
            peaks[name] = max(peaks.get(name, 0), busy)
    return dict(sorted(peaks.items()))


def plot(rows: list[dict[str, Any]], path: Path, sizes: Sizes) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    width = 0.8 / (2 * len(models))
    for m, model in enumerate(models):
        for p, policy in enumerate(POLICIES):
            ttft, tps = [], []
            for scenario in SCENARIOS:
                runs = [r for r in rows if (r["model"], r["scenario"], r["policy"]) == (model, scenario, policy)]
                ttft.append(_median(runs, "ttft_mean_s") if runs else math.nan)
                tps.append(_median(runs, "tokens_per_s") if runs else math.nan)
            offset = (2 * m + p) * width - 0.4 + width / 2
            xs = [i + offset for i in range(len(SCENARIOS))]
            hatch = "" if policy == "least-busy" else "//"
            color = f"C{m}"
            axes[0].bar(xs, ttft, width, label=f"{model} {policy}", color=color, hatch=hatch, edgecolor="black")
            axes[1].bar(xs, tps, width, label=f"{model} {policy}", color=color, hatch=hatch, edgecolor="black")
    for ax, title in zip(axes, ("mean time to first token (s), median of rounds", "generated tokens/s"), strict=True):
        ax.set_xticks(range(len(SCENARIOS)), SCENARIOS)
        ax.set_title(title)
    axes[0].legend(fontsize=8)
    rounds = len({r["round"] for r in rows})
    fig.suptitle(
        f"least-busy vs prefix routing, {sizes.agents} agents x {sizes.slots} slots, context_size "
        f"{sizes.context_size}, real llama agents, {rounds} round(s)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--models", default="smollm2", help="comma-separated: smollm2, gemma")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS))
    parser.add_argument("--engine", default="llama", choices=["llama", "simulated"])
    parser.add_argument("--threads", type=int, default=1, help="PADDLER_THREADS of each agent")
    parser.add_argument("--agents", type=int, default=Sizes.agents)
    parser.add_argument("--slots", type=int, default=Sizes.slots)
    parser.add_argument("--turns", type=int, default=Sizes.turns)
    parser.add_argument("--conversations-per-agent", type=int, default=Sizes.conversations_per_agent)
    parser.add_argument("--system-words", type=int, default=Sizes.system_words)
    parser.add_argument("--note-words", type=int, default=Sizes.note_words)
    parser.add_argument("--context-size", type=int, default=Sizes.context_size, help="each agent's KV cache")
    parser.add_argument("--max-tokens", type=int, default=Sizes.max_tokens)
    parser.add_argument("--single-requests", type=int, default=Sizes.single_requests)
    parser.add_argument("--max-seconds", type=float, default=Sizes.max_seconds, help="per run, then stop sending")
    parser.add_argument(
        "--max-minutes",
        type=float,
        default=None,
        help="after this long, start no new pair of rounds (the first pair always runs)",
    )
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "routing_quality.json")
    parser.add_argument("--plot", type=Path, default=None, help="draw the medians here (PNG)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    sizes = Sizes(args.agents, args.slots, args.turns, args.conversations_per_agent, args.system_words,
                  args.note_words, args.context_size, args.max_tokens, args.single_requests,
                  args.max_seconds)  # fmt: skip
    models = [m for m in args.models.split(",") if m]
    paths = {m: (fetch_model(m) if args.engine == "llama" else None) for m in models}
    states = {m: (desired_state(m, path, sizes) if path is not None else None) for m, path in paths.items()}
    rows: list[dict[str, Any]] = []
    started = datetime.now(UTC)
    deadline = time.monotonic() + 60 * args.max_minutes if args.max_minutes is not None else math.inf
    out: dict[str, Any] = {
        "started": started.isoformat(timespec="seconds"),
        "command": " ".join(
            [".venv/bin/python", "bench/routing_quality.py", *(argv if argv is not None else sys.argv[1:])]
        ),
        "machine": f"{platform.node()} {platform.machine()} cpus={os.cpu_count()} {platform.platform()}",
        "sizes": asdict(sizes),
        "engine": args.engine,
        "threads": args.threads,
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for round_no in range(args.rounds):
        if round_no >= 2 and round_no % 2 == 0 and time.monotonic() > deadline:  # each policy first as often
            out["cut_short"] = f"--max-minutes {args.max_minutes}: {round_no} of {args.rounds} rounds"
            break
        for model in models:
            for scenario in [s for s in args.scenarios.split(",") if s]:
                order = POLICIES if round_no % 2 == 0 else POLICIES[::-1]
                for policy in order:
                    tag = f"{started:%H%M%S}-r{round_no}-{scenario}"  # both policies: the same prompts
                    load_before = os.getloadavg()[0]
                    result = measure(policy, args.engine, states[model], scenario, sizes, tag, args.threads)
                    row = {
                        "round": round_no,
                        "model": model,
                        "scenario": scenario,
                        "policy": policy,
                        **result,
                        "load_average_1m": [load_before, os.getloadavg()[0]],
                        "finished": datetime.now(UTC).isoformat(timespec="seconds"),
                    }
                    rows.append(row)
                    print(json.dumps(row), flush=True)
                    out |= {
                        "finished": datetime.now(UTC).isoformat(timespec="seconds"),
                        "load_average": os.getloadavg(),
                    }
                    args.out.write_text(json.dumps(out, indent=2))  # after every run: a cut-short run keeps its rows
    args.out.write_text(json.dumps(out, indent=2))
    print(table(rows))
    if args.plot is not None:
        plot(rows, args.plot, sizes)
    return out


if __name__ == "__main__":
    main()
