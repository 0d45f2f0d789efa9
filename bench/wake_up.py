"""Scale from zero on the real node: a timeline of one request to a pool with no agent.

Run (as root, on the machine of the cluster tier):

    make cluster-up                      # the real node with the images of `make images`
    .venv/bin/python bench/wake_up.py [--modes Builtin] [--rounds 3]
    make cluster-down

For each autoscaling mode it installs the chart (the operator in-cluster, once), makes
a namespace with an ``LlmPool`` and a ``ModelDeployment`` (SmolLM2 from the model image,
``minReplicas: 0``, ``maxReplicas: 1``) and, each round, waits until the group has no
agent pod and no agent on the balancer, then sends ONE streamed chat request from this
machine (the node itself) to the pool's inference Service (its ClusterIP, through
kube-proxy) and timestamps, on this machine's clock:

* ``buffered``   the balancer's management API (``/api/v1/buffered_requests/stream``,
                 server-sent events) shows the request in its buffer;
* ``replicas``   the agent Deployment's ``spec.replicas`` becomes 1 (``kubectl get -w``);
* ``scheduled``  the agent pod has a node; ``running``: its phase is ``Running``
                 (containers started); ``ready``: its Ready condition (the pod watch);
* ``connected``  the agent appears on the balancer (``/api/v1/agents/stream``);
* ``loaded``     the agent reports slots (the model is loaded);
* ``first token`` and ``done`` at the client (the ``openai`` SDK, streamed).

Every wait is bounded. Writes ``bench/results/wake_up.json`` (machine, date, every
round) and prints a Markdown table (median and range of each step, seconds after the
request was sent) for docs/scaling.md.
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
import urllib.request
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
from openai import AsyncOpenAI

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.kubectl import Kubectl, wait_until  # noqa: E402

STATE = REPO / ".k8s" / "cluster"
KUBECONFIG = STATE / "kubeconfig"
KUBECTL = STATE / "bin" / "kubectl"
HELM = STATE / "bin" / "helm"
RESULTS = REPO / "bench" / "results" / "wake_up.json"
VERSION = next(
    line.split(":", 1)[1].strip().strip('"')
    for line in (REPO / "charts" / "paddler" / "Chart.yaml").read_text().splitlines()
    if line.startswith("appVersion:")
)
MODEL_IMAGE = f"ghcr.io/paddler-k8s/agent:{VERSION}-smollm2"
MODEL_PATH = "/models/SmolLM2-135M-Instruct.Q4_1.gguf"
RELEASE, RELEASE_NS, POOL, GROUP = "paddler", "paddler-system", "p", "default"
MD_LABEL = "paddler.dev/model-deployment"
STEPS = ["buffered", "replicas", "scheduled", "running", "ready", "connected", "loaded", "first_token", "done"]
STEP_NAMES = {
    "buffered": "request buffered (balancer)",
    "replicas": "replicas 0 → 1 (Deployment)",
    "scheduled": "pod scheduled",
    "running": "pod running (containers started)",
    "connected": "agent connected (balancer)",
    "loaded": "model loaded (agent reports slots)",
    "ready": "pod Ready (kubelet)",
    "first_token": "first token (client)",
    "done": "answer complete (client)",
}
ROUND_TIMEOUT_S = 300.0
SCALE_DOWN_DELAY_S = 5


def log(message: str) -> None:
    print(f"[wake-up {datetime.now(UTC):%H:%M:%S}] {message}", file=sys.stderr, flush=True)


CLUSTER = Kubectl(kubeconfig=KUBECONFIG, kubectl=KUBECTL)


def kubectl(*args: str, input: str | None = None, timeout: float = 60) -> str:
    return CLUSTER.kubectl_run(*args, input=input, timeout=timeout).stdout


def autoscaling(mode: str, prometheus_url: str | None) -> str:
    keda = ""
    if mode == "KEDA":
        # The default metricsApi trigger: KEDA (host processes, keda-up.sh with KEDA_DNS)
        # reads the balancer's JSON by its Service name through the cluster's DNS.
        keda = ", keda: {pollingIntervalSeconds: 1}"
    elif mode == "KEDA-prometheus":
        keda = (
            f", keda: {{trigger: prometheus, prometheusServerAddress: '{prometheus_url}', pollingIntervalSeconds: 1}}"
        )
    kind = "KEDA" if mode.startswith("KEDA") else mode
    return (
        f"{{mode: {kind}, minReplicas: 0, maxReplicas: 1, targetBufferedRequests: 1, "
        f"scaleDownDelaySeconds: {SCALE_DOWN_DELAY_S}{keda}}}"
    )


def manifests(namespace: str, mode: str, prometheus_url: str | None) -> str:
    # No management token: the host's Prometheus (HPA, KEDA) scrapes /metrics without
    # one; the same pool for the three modes.
    return f"""
apiVersion: paddler.dev/v1alpha1
kind: LlmPool
metadata: {{name: {POOL}, namespace: {namespace}}}
spec:
  balancer: {{bufferedRequestTimeout: 300s, managementAuth: {{enabled: false}}}}
  agent:
    image: {MODEL_IMAGE}
    slotsPerAgent: 2
    resources: {{requests: {{cpu: 500m, memory: 512Mi}}}}
---
apiVersion: paddler.dev/v1alpha1
kind: ModelDeployment
metadata: {{name: {GROUP}, namespace: {namespace}}}
spec:
  poolRef: {{name: {POOL}}}
  model: {{localPath: {MODEL_PATH}}}
  inferenceParameters: {{contextSize: 2048, temperature: 0}}
  autoscaling: {autoscaling(mode, prometheus_url)}
"""


@dataclass
class Round:
    mode: str
    sent: float = 0.0
    at: dict[str, float] = field(default_factory=dict)
    text: str = ""

    def mark(self, step: str, when: float | None = None) -> None:
        if step not in self.at:
            self.at[step] = time.time() if when is None else when

    def relative(self) -> dict[str, float]:
        return {step: round(self.at[step] - self.sent, 3) for step in STEPS if step in self.at}


async def sse(session: aiohttp.ClientSession, url: str) -> AsyncIterator[dict[str, Any]]:
    """The JSON bodies of a management API event stream, as they arrive."""
    async with session.get(url) as response:
        response.raise_for_status()
        async for raw in response.content:
            line = raw.decode().strip()
            if line.startswith("data: "):
                yield json.loads(line[6:])


async def watch_lines(*args: str) -> AsyncIterator[str]:
    """Lines of a ``kubectl get -w`` (one per change), ended when the caller stops."""
    proc = await asyncio.create_subprocess_exec(
        str(KUBECTL), "--kubeconfig", str(KUBECONFIG), *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    assert proc.stdout is not None
    try:
        async for raw in proc.stdout:
            yield raw.decode().strip()
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()


class Pool:
    def __init__(self, namespace: str) -> None:
        self.namespace = namespace
        inference = CLUSTER.get_json("-n", namespace, "service", f"{POOL}-inference")["spec"]["clusterIP"]
        management = CLUSTER.get_json("-n", namespace, "service", f"{POOL}-management")["spec"]["clusterIP"]
        self.inference_url = f"http://{inference}:8061"
        self.management_address = f"{management}:8060"
        self.management_url = f"http://{self.management_address}"

    def agents(self) -> list[dict[str, Any]]:
        with urllib.request.urlopen(self.management_url + "/api/v1/agents", timeout=10) as response:
            found: list[dict[str, Any]] = json.load(response)["agents"]
        return [a for a in found if a["model_group"] == GROUP]

    def at_zero(self) -> bool:
        deployment = CLUSTER.get_json("-n", self.namespace, "deployment", f"{GROUP}-agent")
        pods = CLUSTER.get_json("-n", self.namespace, "pods", "-l", f"{MD_LABEL}={GROUP}")["items"]
        return deployment["spec"].get("replicas") == 0 and not pods and not self.agents()


async def watch_buffered(result: Round, pool: Pool, session: aiohttp.ClientSession) -> None:
    """``buffered``: the balancer's buffer holds the round's request."""
    async for body in sse(session, pool.management_url + "/api/v1/buffered_requests/stream"):
        if body["buffered_requests_current"] >= 1 and result.sent:
            result.mark("buffered")
            return


async def watch_agents(result: Round, pool: Pool, session: aiohttp.ClientSession) -> None:
    """``connected`` and ``loaded``: the group's agent on the balancer, then with slots."""
    async for body in sse(session, pool.management_url + "/api/v1/agents/stream"):
        mine = [a for a in body["agents"] if a["model_group"] == GROUP]
        if mine:
            result.mark("connected")
        if any(a["slots_total"] > 0 for a in mine):
            result.mark("loaded")
            return


async def watch_replicas(result: Round, ns: str, watching: asyncio.Event) -> None:
    """``replicas``: the agent Deployment asks for a pod; ``watching`` is set once the watch is live."""
    deployment = f"deployment/{GROUP}-agent"
    async for line in watch_lines("-n", ns, "get", deployment, "-w", "-o", 'jsonpath={.spec.replicas}{"\\n"}'):
        watching.set()
        if line.isdigit() and int(line) >= 1:
            result.mark("replicas")
            return


async def watch_pods(result: Round, ns: str) -> None:
    """``scheduled``, ``running`` and ``ready`` of the agent pod."""
    template = (
        "jsonpath=name={.metadata.name} node={.spec.nodeName} phase={.status.phase} "
        'ready={.status.conditions[?(@.type=="Ready")].status}{"\\n"}'
    )
    async for line in watch_lines("-n", ns, "get", "pods", "-l", f"{MD_LABEL}={GROUP}", "-w", "-o", template):
        fields = dict(part.split("=", 1) for part in line.split() if "=" in part)
        if fields.get("node"):
            result.mark("scheduled")
        if fields.get("phase") == "Running":
            result.mark("running")
        if fields.get("ready") == "True":
            result.mark("ready")
            return


async def ask(result: Round, pool: Pool) -> None:
    """The round's one streamed chat request: ``first_token`` and ``done``."""
    async with AsyncOpenAI(
        base_url=pool.inference_url + "/v1", api_key="unused", max_retries=0, timeout=ROUND_TIMEOUT_S
    ) as openai:
        result.sent = time.time()
        stream = await openai.chat.completions.create(
            model=GROUP,
            messages=[{"role": "user", "content": "What is the capital of France? Answer in one sentence."}],
            max_tokens=32,
            temperature=0,
            stream=True,
        )
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                result.mark("first_token")
                result.text += chunk.choices[0].delta.content
        result.mark("done")


async def one_round(pool: Pool, mode: str) -> Round:
    result = Round(mode)
    watching = asyncio.Event()
    timeout = aiohttp.ClientTimeout(total=None, sock_read=None)
    async with aiohttp.ClientSession(timeout=timeout) as session, asyncio.timeout(ROUND_TIMEOUT_S):
        watchers = [
            asyncio.create_task(watch_replicas(result, pool.namespace, watching)),
            asyncio.create_task(watch_pods(result, pool.namespace)),
            asyncio.create_task(watch_agents(result, pool, session)),
        ]
        await asyncio.wait_for(watching.wait(), timeout=30)  # the Deployment watch is live
        watchers.append(asyncio.create_task(watch_buffered(result, pool, session)))
        await asyncio.sleep(0.5)  # the event streams are open (their first event is the current state)
        try:
            await ask(result, pool)
            await asyncio.wait_for(asyncio.gather(*watchers), timeout=30)
        finally:
            for task in watchers:
                task.cancel()
            await asyncio.gather(*watchers, return_exceptions=True)
    return result


def helm_install() -> None:
    installed = subprocess.run(
        [str(HELM), "status", RELEASE, "-n", RELEASE_NS],
        capture_output=True,
        env={**os.environ, "KUBECONFIG": str(KUBECONFIG)},
    )
    if installed.returncode == 0:
        return
    log("helm install (the operator in-cluster)")
    subprocess.run(
        [str(HELM), "install", RELEASE, str(REPO / "charts" / "paddler"), "-n", RELEASE_NS, "--create-namespace",
         "--take-ownership",  # CRDs a chart 0.1.0 run left on a kept cluster (docs/kubernetes.md, Upgrading)
         "--wait", "--timeout", "5m"],
        check=True, capture_output=True, timeout=360, env={**os.environ, "KUBECONFIG": str(KUBECONFIG)},
    )  # fmt: skip


def ready(namespace: str, kind: str, name: str) -> bool:
    for c in CLUSTER.get_json("-n", namespace, kind, name).get("status", {}).get("conditions", []):
        if c["type"] == "Ready":
            return bool(c["status"] == "True")
    return False


def script(name: str, *args: str, env: dict[str, str] | None = None) -> str:
    """Run one of scripts/k8s/*.sh against this cluster; its stdout."""
    full = {**os.environ, "PADDLER_K8S_DIR": str(STATE), "KUBECONFIG": str(KUBECONFIG), **(env or {})}
    proc = subprocess.run(
        ["bash", str(REPO / "scripts" / "k8s" / name), *args], capture_output=True, text=True, env=full, timeout=900
    )
    if proc.returncode != 0:
        raise RuntimeError(
            f"{name} {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-2000:]}{proc.stderr[-3000:]}"
        )
    return proc.stdout


METRICS = STATE / "metrics"
CLUSTER_DNS = "10.96.0.10"  # CoreDNS of scripts/k8s/node-up.sh


@contextlib.contextmanager
def scaler(mode: str) -> Iterator[str | None]:
    """What the mode needs beside the operator: nothing (Builtin); Prometheus and
    prometheus-adapter (HPA); KEDA resolving Service names through the cluster's DNS
    (KEDA, metricsApi trigger); Prometheus and KEDA (KEDA-prometheus). Yields the
    Prometheus URL, if any."""
    if mode in ("Builtin", "KEDA"):
        if mode == "KEDA":
            script("keda-up.sh", env={"KEDA_DNS": CLUSTER_DNS})
        try:
            yield None
        finally:
            if mode == "KEDA":
                script("keda-down.sh")
        return
    url = script("prometheus.sh", "up", str(METRICS)).strip().splitlines()[-1]
    log(f"{mode}: Prometheus at {url}")
    if mode == "HPA":
        script("prometheus-adapter.sh", "up")
    else:
        script("keda-up.sh")
    try:
        yield url
    finally:
        if mode == "HPA":
            script("prometheus-adapter.sh", "down")
        else:
            script("keda-down.sh")


def measure_mode(mode: str, rounds: int, found: list[Round]) -> None:
    namespace = f"wake-{mode.lower()}-{uuid.uuid4().hex[:6]}"
    with scaler(mode) as prometheus_url:
        kubectl("create", "namespace", namespace)
        try:
            kubectl("-n", namespace, "apply", "-f", "-", input=manifests(namespace, mode, prometheus_url))
            wait_until(lambda: ready(namespace, "lp", POOL), timeout=300, what="the LlmPool Ready (balancer up)")
            pool = Pool(namespace)
            if prometheus_url is not None:
                script(
                    "prometheus.sh",
                    "target",
                    str(METRICS),
                    namespace,
                    pool.management_address,
                    f"namespace={namespace}",
                )
            for n in range(rounds):
                log(f"{mode} round {n + 1}/{rounds}: waiting for zero agents")
                wait_until(pool.at_zero, timeout=300, what=f"{mode}: scaled to zero")
                time.sleep(2)  # nothing left moving (a terminated pod's last status updates)
                one = asyncio.run(one_round(pool, mode))
                log(f"{mode} round {n + 1}: {one.relative()} answer={one.text!r}")
                found.append(one)
        finally:
            if prometheus_url is not None:
                script("prometheus.sh", "untarget", str(METRICS), namespace)
            kubectl("delete", "namespace", namespace, "--wait=false")


def machine() -> dict[str, Any]:
    cpu = next(
        (line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
         if line.startswith("model name")),
        platform.processor(),
    )  # fmt: skip
    return {"cpu": cpu, "cores": os.cpu_count(), "kernel": platform.release(), "python": platform.python_version()}


def table(rounds: list[Round], modes: list[str]) -> str:
    header = "| step | " + " | ".join(modes) + " |\n|---|" + "---|" * len(modes) + "\n"
    lines = []
    for step in STEPS:
        cells = []
        for mode in modes:
            values = [r.relative()[step] for r in rounds if r.mode == mode and step in r.relative()]
            if not values:
                cells.append("n/a")
            elif len(values) == 1:
                cells.append(f"{values[0]:.1f} s")
            else:
                cells.append(f"{statistics.median(values):.1f} s ({min(values):.1f} to {max(values):.1f})")
        lines.append(f"| {STEP_NAMES[step]} | " + " | ".join(cells) + " |")
    return header + "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--modes", nargs="+", default=["Builtin"], choices=["Builtin", "HPA", "KEDA", "KEDA-prometheus"]
    )
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if not KUBECONFIG.exists():
        raise SystemExit("no cluster: run `make cluster-up` first")
    helm_install()
    rounds: list[Round] = []
    try:
        for mode in args.modes:
            measure_mode(mode, args.rounds, rounds)
    finally:
        if set(args.modes) & {"HPA", "KEDA-prometheus"}:
            script("prometheus.sh", "down", str(METRICS))
        write_report(rounds, args.modes)


def write_report(rounds: list[Round], modes: list[str]) -> None:
    """Whatever was measured, even when a later step failed; the rounds of other modes
    already in the results file are kept (each round has its date)."""
    today = datetime.now(UTC).isoformat(timespec="seconds")
    kept: list[dict[str, Any]] = []
    if RESULTS.exists():
        kept = [r for r in json.loads(RESULTS.read_text()).get("rounds", []) if r["mode"] not in modes]
    report = {
        "date": today,
        "machine": machine(),
        "model": MODEL_PATH,
        "image": MODEL_IMAGE,
        "settings": {
            "Builtin": "operator --builtin-poll-interval 1s (in-cluster, chart defaults)",
            "HPA": "Prometheus (host) scrape 1s, prometheus-adapter relist 2s, HPA sync period 1s, HPAScaleToZero",
            "KEDA": "KEDA (host processes, KEDA_DNS) metricsApi trigger, pollingIntervalSeconds 1",
            "KEDA-prometheus": "KEDA (host processes) prometheus trigger, pollingIntervalSeconds 1, scrape 1s",
        },
        "rounds": kept
        + [{"mode": r.mode, "date": today, "seconds_after_send": r.relative(), "answer": r.text} for r in rounds],
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=2) + "\n")
    print(table(rounds, modes))
    log(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
