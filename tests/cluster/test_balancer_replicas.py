"""A pool with two balancer replicas on the real node, serving through everything a
cluster does to its balancers: a pod deleted, a rolling restart, a forced kill, a model
swap, and a group woken from zero by a request buffered on either replica.

Every scenario runs continuous streamed load through the inference Service with the
`openai` SDK at its default retries (2), as an application would, and counts each
request's outcome in the client pod. One pool for the module (pods start in seconds
but not for free on two cores); the scenarios run in file order, each leaving two
Ready replicas that hold every agent.
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

from .clients import ClientRun, client_pod, stream_load_script, wait_for_client
from .conftest import MODEL_IMAGE, MODEL_PATH, Cluster
from .namespaces import scenario_namespace
from .test_inference_in_cluster import ready_condition, record

pytestmark = pytest.mark.cluster

POOL = "ha"
GROUP = "default"
SLEEPY = "sleepy"
POOL_LABEL = "paddler.dev/pool"
COMPONENT_LABEL = "paddler.dev/component"
MD_LABEL = "paddler.dev/model-deployment"
WORKERS = 4
"""Concurrent streams of the load (the pool has 2 agents x 4 slots)."""
MAX_TOKENS = 24


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
    slotsPerAgent: 4
    resources: {{requests: {{cpu: 200m, memory: 256Mi}}}}
---
apiVersion: paddler.dev/v1alpha1
kind: ModelDeployment
metadata: {{name: {GROUP}, namespace: {namespace}}}
spec:
  poolRef: {{name: {POOL}}}
  model: {{localPath: {MODEL_PATH}}}
  replicas: 2
  rollout: {{maxUnavailable: 1}}
  inferenceParameters: {{contextSize: 2048, temperature: 0}}
""" + client_pod(namespace)


@dataclass(frozen=True)
class HaPool:
    cluster: Cluster
    namespace: str

    @property
    def inference_url(self) -> str:
        return f"http://{POOL}-inference.{self.namespace}.svc:8061"

    def balancer_pods(self) -> list[dict[str, Any]]:
        selector = f"{POOL_LABEL}={POOL},{COMPONENT_LABEL}=balancer"
        pods: list[dict[str, Any]] = self.cluster.get_json("-n", self.namespace, "pods", "-l", selector)["items"]
        return [p for p in pods if not p["metadata"].get("deletionTimestamp")]

    def agent_pods(self, group: str = GROUP) -> list[dict[str, Any]]:
        pods: list[dict[str, Any]] = self.cluster.get_json("-n", self.namespace, "pods", "-l", f"{MD_LABEL}={group}")[
            "items"
        ]
        return [p for p in pods if not p["metadata"].get("deletionTimestamp")]

    def in_client(self, script: str, timeout: float = 120) -> str:
        return self.cluster.exec_python(self.namespace, "client", script, timeout=timeout)

    def token(self) -> str:
        return self.cluster.pool_management_token(self.namespace, POOL)

    def replica_views(self) -> dict[str, dict[str, Any]]:
        """Per Ready balancer pod (by name): its agents (name -> slots) and buffered count,
        read from the pod's own address inside the cluster."""
        ready = [
            (p["metadata"]["name"], p["status"]["podIP"])
            for p in self.balancer_pods()
            if p["status"].get("podIP")
            and any(c["type"] == "Ready" and c["status"] == "True" for c in p["status"].get("conditions", []))
        ]
        script = f"""
import json, urllib.request
out = {{}}
for name, ip in {ready!r}:
    def get(path):
        req = urllib.request.Request(f"http://{{ip}}:8060" + path, headers={{"Authorization": "Bearer {self.token()}"}})
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.load(r)
    try:
        agents = get("/api/v1/agents")["agents"]
        out[name] = {{"agents": {{a["name"]: a["slots_total"] for a in agents if a["model_group"] == "{GROUP}"}},
                     "buffered": get("/api/v1/buffered_requests")["buffered_requests_current"]}}
    except Exception as err:
        out[name] = {{"error": repr(err)}}
print(json.dumps(out))
"""
        views: dict[str, dict[str, Any]] = json.loads(self.in_client(script).strip().splitlines()[-1])
        return views

    def settled(self) -> bool:
        """Two Ready replicas, each holding both agents with their slots."""
        agents = {p["metadata"]["name"] for p in self.agent_pods()}
        views = self.replica_views()
        return len(views) == 2 and all(
            set(v.get("agents", {})) == agents and all(s > 0 for s in v["agents"].values()) for v in views.values()
        )


def load_script(pool: HaPool, tag: str, max_seconds: float = 400) -> str:
    """WORKERS threads streaming chats back to back until /tmp/stop-<tag> appears, with the
    SDK's default retries; one JSON line per request: ok, wall-clock start/first/end."""
    return stream_load_script(
        pool.inference_url, GROUP, tag, workers=WORKERS, max_tokens=MAX_TOKENS, max_seconds=max_seconds
    )


@dataclass
class Load:
    """Continuous load running in the client pod while a scenario disrupts the pool."""

    pool: HaPool
    tag: str
    run: ClientRun

    @classmethod
    def start(cls, pool: HaPool) -> Load:
        tag = uuid.uuid4().hex[:8]
        load = cls(pool, tag, ClientRun.start(pool.cluster, pool.namespace, load_script(pool, tag)))
        load.wait_for_answers(WORKERS)
        return load

    def wait_for_answers(self, more: int, timeout: float = 120) -> None:
        target = self.run.count() + more
        wait_until(lambda: self.run.count() >= target, timeout=timeout, what=f"{more} more answers under load")

    def finish(self) -> list[dict[str, Any]]:
        self.pool.in_client(f"open('/tmp/stop-{self.tag}', 'w').close()")
        return self.run.finish(timeout=180)


@pytest.fixture(scope="module")
def ha(cluster: Cluster, release: str) -> Iterator[HaPool]:
    with scenario_namespace(cluster, "ha") as namespace:
        cluster.apply(manifests(namespace), namespace)
        wait_until(
            lambda: ready_condition(cluster.get_json("-n", namespace, "md", GROUP)) == "True",
            timeout=300,
            what="ModelDeployment Ready (2 balancers, 2 agents, model loaded)",
        )
        wait_for_client(cluster, namespace)
        pool = HaPool(cluster, namespace)
        wait_until(pool.settled, timeout=120, what="both replicas holding both agents")
        yield pool


def failures(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in results if not r["ok"]]


def summary(results: list[dict[str, Any]]) -> str:
    return f"{len(results)} requests, {len(failures(results))} failed: {json.dumps(failures(results))[:1500]}"


def test_every_agent_joins_both_balancer_replicas(ha: HaPool) -> None:
    views = ha.replica_views()
    record("two balancer replicas", json.dumps(views, indent=1))
    agents = {p["metadata"]["name"] for p in ha.agent_pods()}
    assert len(views) == 2
    for name, view in views.items():
        assert set(view["agents"]) == agents, (name, view)
    nodes = {p["spec"]["nodeName"] for p in ha.balancer_pods()}
    assert nodes  # spread over the nodes there are (one here): topology spread is ScheduleAnyway


def test_deleting_a_balancer_pod_under_load_fails_no_request(ha: HaPool) -> None:
    load = Load.start(ha)
    try:
        victim = ha.balancer_pods()[0]["metadata"]["name"]
        started = time.monotonic()
        ha.cluster.kubectl_run("-n", ha.namespace, "delete", "pod", victim, "--wait=true", timeout=150)
        gone_after = time.monotonic() - started
        wait_until(ha.settled, timeout=180, what="a replacement replica holding both agents")
        load.wait_for_answers(WORKERS)
    finally:
        results = load.finish()
    record("balancer pod deleted under load", f"{victim} stopped in {gone_after:.1f}s; {summary(results)}")
    print(f"balancer pod deleted: drained in {gone_after:.1f}s; {summary(results)}")
    assert results
    assert failures(results) == []


def test_rollout_restart_of_the_balancers_under_load_fails_no_request(ha: HaPool) -> None:
    load = Load.start(ha)
    try:
        started = time.monotonic()
        ha.cluster.kubectl_run("-n", ha.namespace, "rollout", "restart", f"deployment/{POOL}-balancer")
        ha.cluster.kubectl_run(
            "-n", ha.namespace, "rollout", "status", f"deployment/{POOL}-balancer", "--timeout=300s", timeout=320
        )
        took = time.monotonic() - started
        wait_until(ha.settled, timeout=180, what="the new replicas holding both agents")
        load.wait_for_answers(WORKERS)
    finally:
        results = load.finish()
    record("balancer rollout restart under load", f"rollout took {took:.1f}s; {summary(results)}")
    print(f"balancer rollout restart: {took:.1f}s; {summary(results)}")
    assert results
    assert failures(results) == []


def test_force_deleting_a_balancer_pod_fails_at_most_the_streams_in_flight_on_it(ha: HaPool) -> None:
    load = Load.start(ha)
    try:
        victim = ha.balancer_pods()[0]["metadata"]["name"]
        killed_at = time.time()
        ha.cluster.kubectl_run(
            "-n", ha.namespace, "delete", "pod", victim, "--grace-period=0", "--force", "--wait=false", check=False
        )
        wait_until(ha.settled, timeout=180, what="a replacement replica holding both agents")
        load.wait_for_answers(2 * WORKERS)
    finally:
        results = load.finish()
    failed = failures(results)
    started_after_kill = [r for r in failed if r["t0"] > killed_at + 1.0]
    record("balancer pod force-deleted under load", f"{victim} killed; {summary(results)}")
    print(f"balancer pod force-deleted: {summary(results)}")
    # Only streams in flight on the killed pod may fail: at most one per load worker, and
    # none that started after the kill (the SDK retries a refused connection elsewhere).
    assert len(failed) <= WORKERS, failed
    assert started_after_kill == [], started_after_kill


def test_model_swap_with_two_replicas_under_load_fails_nothing_and_loads_each_agent_once(ha: HaPool) -> None:
    agents = [p["metadata"]["name"] for p in ha.agent_pods()]
    load = Load.start(ha)
    try:
        generation = ha.cluster.get_json("-n", ha.namespace, "md", GROUP)["metadata"]["generation"]
        ha.cluster.kubectl_run(
            "-n", ha.namespace, "patch", "md", GROUP, "--type=merge",
            "-p", json.dumps({"spec": {"inferenceParameters": {"contextSize": 1536}}}),
        )  # fmt: skip

        def swapped() -> bool:
            md = ha.cluster.get_json("-n", ha.namespace, "md", GROUP)
            observed = md.get("status", {}).get("observedGeneration", 0)
            return observed > generation and ready_condition(md) == "True" and ha.settled()

        wait_until(swapped, timeout=300, what="both agents serving the new inference parameters")
        load.wait_for_answers(WORKERS)
    finally:
        results = load.finish()
    unloads = {
        name: ha.cluster.kubectl_run("-n", ha.namespace, "logs", name).stdout.count("model unloaded") for name in agents
    }
    record("model swap with two replicas under load", f"unloads per agent {unloads}; {summary(results)}")
    print(f"model swap with 2 replicas: unloads per agent {unloads}; {summary(results)}")
    assert failures(results) == []
    assert unloads == dict.fromkeys(agents, 1)


def sleepy_manifest(namespace: str) -> str:
    return f"""
apiVersion: paddler.dev/v1alpha1
kind: ModelDeployment
metadata: {{name: {SLEEPY}, namespace: {namespace}}}
spec:
  poolRef: {{name: {POOL}}}
  model: {{localPath: {MODEL_PATH}}}
  inferenceParameters: {{contextSize: 1024, temperature: 0}}
  autoscaling: {{mode: Builtin, minReplicas: 0, maxReplicas: 1, scaleDownDelaySeconds: 5}}
"""


def test_a_request_buffered_on_either_replica_wakes_a_group_scaled_to_zero(ha: HaPool) -> None:
    ha.cluster.apply(sleepy_manifest(ha.namespace), ha.namespace)
    woken: dict[str, float] = {}
    for pod in sorted(ha.balancer_pods(), key=lambda p: str(p["metadata"]["name"])):
        wait_until(lambda: not ha.agent_pods(SLEEPY), timeout=180, what=f"{SLEEPY} at 0 agent pods")
        name, ip = pod["metadata"]["name"], pod["status"]["podIP"]
        script = f"""
import json, time
from openai import OpenAI
client = OpenAI(base_url="http://{ip}:8061/v1", api_key="unused", max_retries=0, timeout=240)
t0 = time.monotonic()
r = client.chat.completions.create(model="{SLEEPY}", messages=[{{"role": "user", "content": "Say hi."}}], max_tokens=8)
print(json.dumps({{"ok": bool(r.choices[0].message.content), "s": time.monotonic() - t0}}))
"""
        answer = json.loads(ha.in_client(script, timeout=300).strip().splitlines()[-1])
        assert answer["ok"], (name, answer)
        woken[name] = round(answer["s"], 1)
    record("a group at zero woken through each replica", json.dumps(woken))
    print(f"woken from zero through each replica (seconds to the answer): {woken}")
    assert len(woken) == 2
