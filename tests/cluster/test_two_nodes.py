"""A pool on the two real nodes, through what a cluster does to its agents: a group woken
from zero by a request and scaled out over both nodes and back to zero (Builtin scaler),
a pod-template change rolled under load, and `kubectl drain` of a node holding agents
under load.

Every scenario runs continuous streamed load through the inference Service with the
`openai` SDK (default retries) from the client pod, pinned to the first node (the one
never drained), and counts each request's outcome there; the figures (time to first
token from zero, requests failed, agents serving at the worst moment) are printed and
kept in the tier's transcript. One pool for the module, the scenarios in file order.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from tests.kubectl import wait_until

from .clients import ClientRun, agents_watch_script, client_pod, stream_load_script, wait_for_client
from .conftest import MODEL_IMAGE, MODEL_PATH, NODE_NAMES, Cluster
from .namespaces import scenario_namespace
from .test_inference_in_cluster import ready_condition, record

pytestmark = pytest.mark.cluster

POOL = "tn"
STEADY = "steady"
"""Two agent pods (replicas: 2), one per node: the rollout and the drain."""
WAKE = "wake"
"""Builtin autoscaling 0..2: woken by a request, out to two pods under load, back to 0."""
CLIENT_NODE, DRAINED_NODE = NODE_NAMES
MD_LABEL = "paddler.dev/model-deployment"
SLOTS = 2
WORKERS = 4
"""Concurrent streams: twice one agent's slots, so the Builtin scaler wants two agents."""
SCALE_DOWN_DELAY_S = 20


def manifests(namespace: str) -> str:
    return f"""
apiVersion: paddler.dev/v1alpha1
kind: LlmPool
metadata: {{name: {POOL}, namespace: {namespace}}}
spec:
  balancer:
    replicas: 2
    bufferedRequestTimeout: 180s
    resources: {{requests: {{cpu: 50m, memory: 64Mi}}}}
  agent:
    image: {MODEL_IMAGE}
    slotsPerAgent: {SLOTS}
    resources: {{requests: {{cpu: 100m, memory: 256Mi}}}}
---
apiVersion: paddler.dev/v1alpha1
kind: ModelDeployment
metadata: {{name: {STEADY}, namespace: {namespace}}}
spec:
  poolRef: {{name: {POOL}}}
  model: {{localPath: {MODEL_PATH}}}
  replicas: 2
  rollout: {{maxUnavailable: 1}}
  inferenceParameters: {{contextSize: 1024, temperature: 0}}
---
apiVersion: paddler.dev/v1alpha1
kind: ModelDeployment
metadata: {{name: {WAKE}, namespace: {namespace}}}
spec:
  poolRef: {{name: {POOL}}}
  model: {{localPath: {MODEL_PATH}}}
  inferenceParameters: {{contextSize: 1024, temperature: 0}}
  autoscaling:
    mode: Builtin
    minReplicas: 0
    maxReplicas: 2
    targetSlotUtilization: 100
    scaleDownDelaySeconds: {SCALE_DOWN_DELAY_S}
""" + client_pod(namespace, node=CLIENT_NODE)


@dataclass(frozen=True)
class TwoNodePool:
    """A pool's Services, agent pods and token, as the tests of this tier read them."""

    cluster: Cluster
    namespace: str
    name: str = POOL
    auth: bool = True
    """The pool keeps its management token (``managementAuth.enabled``)."""

    @property
    def inference_url(self) -> str:
        return f"http://{self.name}-inference.{self.namespace}.svc:8061"

    @property
    def management_url(self) -> str:
        return f"http://{self.name}-management.{self.namespace}.svc:8060"

    def token(self) -> str:
        if not self.auth:
            return "none"
        return self.cluster.pool_management_token(self.namespace, self.name)

    def agent_pods(self, group: str) -> list[dict[str, Any]]:
        pods: list[dict[str, Any]] = self.cluster.get_json("-n", self.namespace, "pods", "-l", f"{MD_LABEL}={group}")[
            "items"
        ]
        return [p for p in pods if not p["metadata"].get("deletionTimestamp")]

    def ready_agent_nodes(self, group: str) -> list[str]:
        """The node of each Ready agent pod of ``group``."""
        return sorted(
            p["spec"]["nodeName"]
            for p in self.agent_pods(group)
            if any(c["type"] == "Ready" and c["status"] == "True" for c in p["status"].get("conditions", []))
        )

    def on_both_nodes(self, group: str) -> list[str] | None:
        """The nodes of ``group``'s two Ready agent pods, once there are two; else None."""
        nodes = self.ready_agent_nodes(group)
        return nodes if len(nodes) == 2 else None

    def replicas(self, group: str) -> int:
        deployment = self.cluster.get_json("-n", self.namespace, "deployment", f"{group}-agent")
        return int(deployment["spec"].get("replicas") or 0)

    def serves(self, group: str) -> bool:
        """The inference Service lists ``group`` among its models (the operator told the balancer)."""
        script = f"""
import json, urllib.request
with urllib.request.urlopen("{self.inference_url}/v1/models", timeout=10) as r:
    print(json.dumps([m["id"] for m in json.load(r)["data"]]))
"""
        return group in json.loads(self.in_client(script).strip().splitlines()[-1])

    def in_client(self, script: str, timeout: float = 120) -> str:
        return self.cluster.exec_python(self.namespace, "client", script, timeout=timeout)

    def stop(self, tag: str) -> None:
        self.in_client(f"open('/tmp/stop-{tag}', 'w').close()")


@dataclass
class Load:
    """Streamed load on one group, and a sampler of the balancer's view of its agents."""

    pool: TwoNodePool
    tag: str
    requests: ClientRun
    watch: ClientRun

    @classmethod
    def start(cls, pool: TwoNodePool, group: str, workers: int = WORKERS, wait_for: int = WORKERS) -> Load:
        tag = uuid.uuid4().hex[:8]
        script = stream_load_script(pool.inference_url, group, tag, workers=workers, max_tokens=24, max_seconds=600)
        watch = agents_watch_script(pool.management_url, pool.token(), group, tag, max_seconds=600)
        load = cls(
            pool,
            tag,
            ClientRun.start(pool.cluster, pool.namespace, script),
            ClientRun.start(pool.cluster, pool.namespace, watch),
        )
        if wait_for:
            load.wait_for_answers(wait_for)
        return load

    def wait_for_answers(self, more: int, timeout: float = 240) -> None:
        target = self.requests.count() + more
        wait_until(lambda: self.requests.count() >= target, timeout=timeout, what=f"{more} more answers under load")

    def finish(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """(one line per request, one line per sample of the agents)."""
        self.pool.stop(self.tag)
        return self.requests.finish(timeout=300), self.watch.finish(timeout=30)

    def cancel(self) -> None:
        self.requests.stop()
        self.watch.stop()


def failures(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in results if not r["ok"]]


def serving_after_scale_out(samples: list[dict[str, Any]], peak: int) -> int:
    """Fewest agents with slots from the first sample showing ``peak`` of them to the end of the load."""
    counts = [int(s["serving"]) for s in samples if "serving" in s]
    assert peak in counts, counts
    return min(counts[counts.index(peak) :])


def fewest_serving(samples: list[dict[str, Any]]) -> int:
    """Agents with slots at the worst sampled moment."""
    counts = [int(s["serving"]) for s in samples if "serving" in s]
    assert counts, samples[:5]
    return min(counts)


@pytest.fixture(scope="module")
def two_nodes(cluster: Cluster, release: str) -> Iterator[TwoNodePool]:
    with scenario_namespace(cluster, "tn") as namespace:
        try:
            cluster.apply(manifests(namespace), namespace)
            wait_until(
                lambda: ready_condition(cluster.get_json("-n", namespace, "md", STEADY)) == "True",
                timeout=300,
                what="ModelDeployment steady Ready (2 balancers, 2 agents, model loaded)",
            )
            wait_for_client(cluster, namespace)
            yield TwoNodePool(cluster, namespace)
        finally:
            cluster.kubectl_run("uncordon", *NODE_NAMES, check=False)


def test_agents_of_a_model_deployment_spread_over_both_nodes(two_nodes: TwoNodePool) -> None:
    nodes = wait_until(
        lambda: two_nodes.on_both_nodes(STEADY),
        timeout=120,
        what="two Ready agent pods",
    )
    record("agents over two nodes", json.dumps(nodes))
    assert nodes == sorted(NODE_NAMES)


@dataclass(frozen=True)
class ScaleRun:
    """What one 0 -> N -> 0 run of a group saw."""

    ttft: float
    """The client's time to first token of one request sent at zero pods (seconds)."""
    nodes: list[str]
    """The nodes of the group's Ready agents under load."""
    results: list[dict[str, Any]]
    held: int
    """Fewest agents serving from the scale-out to the end of the load."""
    to_zero: float
    """Seconds from the end of the load to 0 replicas."""


def zero_to_n_to_zero(pool: TwoNodePool, group: str, mode: str, delay_s: int) -> ScaleRun:
    """One request to ``group`` at zero pods (buffered, the scaler starts a pod, the model loads,
    the answer streams), then WORKERS streams (twice one agent's slots: the second pod lands on
    the other node) on past the scale-down delay (busy slots are demand too: nothing scales in),
    then idle until 0 replicas. Prints and records the figures."""
    first = ClientRun.start(
        pool.cluster,
        pool.namespace,
        stream_load_script(pool.inference_url, group, "first", workers=1, max_tokens=16, max_seconds=240, each=1),
    )
    (woken,) = first.finish(timeout=240)
    assert woken["ok"], woken
    ttft = woken["first"] - woken["t0"]
    print(f"\n{mode}: time to first token from zero {ttft:.2f}s (one request, model in the image)")
    load = Load.start(pool, group)
    try:
        nodes = wait_until(lambda: pool.on_both_nodes(group), timeout=240, what=f"{mode}: two Ready agents under load")
        time.sleep(delay_s + 10)
        load.wait_for_answers(WORKERS)
    finally:
        results, samples = load.finish()
    t_idle = time.monotonic()
    wait_until(lambda: pool.replicas(group) == 0, timeout=delay_s + 180, what=f"{mode}: back to 0 replicas")
    run = ScaleRun(ttft, nodes, results, serving_after_scale_out(samples, peak=2), time.monotonic() - t_idle)
    figures = (
        f"time to first token from zero {run.ttft:.2f}s; 0 -> {len(nodes)} pods on {nodes}; "
        f"{len(results)} requests under load, {len(failures(results))} failed; fewest agents serving "
        f"under load after scale-out {run.held}; idle -> 0 replicas in {run.to_zero:.1f}s (delay {delay_s}s)"
    )
    print(f"{mode}: {figures}")
    record(f"{mode} 0 -> N -> 0 on real pods", figures)
    return run


def test_builtin_wakes_a_real_pod_from_zero_scales_out_over_both_nodes_and_back_to_zero(
    two_nodes: TwoNodePool,
) -> None:
    pool = two_nodes
    wait_until(lambda: pool.replicas(WAKE) == 0 and not pool.agent_pods(WAKE), timeout=120, what="wake at 0 pods")
    wait_until(lambda: pool.serves(WAKE), timeout=60, what="the balancer serving the group wake")
    run = zero_to_n_to_zero(pool, WAKE, "Builtin", SCALE_DOWN_DELAY_S)
    assert run.nodes == sorted(NODE_NAMES)
    assert run.held == 2
    assert run.results
    assert not failures(run.results), failures(run.results)[:5]


def test_a_pod_template_change_rolls_one_agent_at_a_time_while_the_other_serves(two_nodes: TwoNodePool) -> None:
    pool = two_nodes
    before = {p["metadata"]["name"] for p in pool.agent_pods(STEADY)}
    load = Load.start(pool, STEADY)
    try:
        patch = {"spec": {"resources": {"requests": {"cpu": "110m", "memory": "256Mi"}}}}
        pool.cluster.kubectl_run("-n", pool.namespace, "patch", "md", STEADY, "--type=merge", "-p", json.dumps(patch))

        def rolled() -> bool:
            names = {p["metadata"]["name"] for p in pool.agent_pods(STEADY)}
            return not names & before and len(pool.ready_agent_nodes(STEADY)) == 2

        wait_until(rolled, timeout=300, what="both agent pods replaced and Ready")
        load.wait_for_answers(WORKERS)
    finally:
        results, samples = load.finish()
    worst = fewest_serving(samples)
    figures = f"{len(results)} requests, {len(failures(results))} failed; agents serving at the worst moment: {worst}/2"
    print(f"\npod-template rollout (maxUnavailable 1): {figures}")
    record("pod-template rollout under load", figures)
    assert results
    assert not failures(results), failures(results)[:5]
    assert worst >= 1


def test_draining_a_node_under_streamed_load_fails_no_request(two_nodes: TwoNodePool) -> None:
    pool = two_nodes
    nodes = wait_until(lambda: pool.on_both_nodes(STEADY), timeout=240, what="two Ready steady agents")
    assert DRAINED_NODE in nodes
    load = Load.start(pool, STEADY)
    try:
        started = time.monotonic()
        drain = pool.cluster.kubectl_run(
            "drain", DRAINED_NODE, "--ignore-daemonsets", "--delete-emptydir-data", "--timeout=300s", timeout=330
        )
        drained_in = time.monotonic() - started
        wait_until(
            lambda: pool.ready_agent_nodes(STEADY) == [CLIENT_NODE, CLIENT_NODE],
            timeout=240,
            what="both steady agents Ready on the node left",
        )
        load.wait_for_answers(WORKERS)
    finally:
        results, samples = load.finish()
        pool.cluster.kubectl_run("uncordon", DRAINED_NODE, check=False)
    worst = fewest_serving(samples)
    figures = (
        f"drain of {DRAINED_NODE} took {drained_in:.1f}s; {len(results)} requests, {len(failures(results))} failed; "
        f"agents serving at the worst moment: {worst}/2"
    )
    print(f"\nkubectl drain under load: {figures}\n{drain.stdout[-800:]}")
    record("kubectl drain under load", figures)
    assert results
    assert not failures(results), failures(results)[:5]
