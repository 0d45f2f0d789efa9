"""The chart's Grafana dashboard and alert rules, run on the tier's real Prometheus scraping real balancers.

Two replicas of one pool (``paddler balancer``) and their agents (``paddler agent``: the simulated
engine, and the llama engine on SmolLM2 where a panel needs what only a loaded model reports, its KV
cache) are scraped by ``metrics_pipeline.prometheus`` with the target labels the operator's PodMonitor
gives a balancer pod: ``namespace``, ``pod``, ``container="balancer"``, ``endpoint="management"``.

- After real streamed traffic (served, refused by an agent and routed again, 503 buffer full, 504
  buffer timeout), every expression of ``charts/paddler/files/dashboards/paddler.json`` (Grafana's
  variables replaced as in tests/unit/test_chart_monitoring.py, ``$namespace`` by the test's) returns
  a sample with a value.
- ``charts/paddler/files/prometheus-rules.yaml`` is loaded into that Prometheus as its rule file
  (``rule_files``, reloaded with SIGHUP, evaluated every second): once the test makes each rule's
  condition true for real, the rule is healthy and has an alert pending (or firing) for the group or
  pod it was made true for, and none for any other. Only the rules' ``for:`` is not waited.

No Kubernetes object is needed: ``namespace`` is a label, as a PodMonitor would set it.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import threading
import time
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from paddler_balancer.inference_api import MODEL_GROUP_HEADER
from tests.engine.conftest import model_path  # noqa: F401 (fixture: the SmolLM2 GGUF)
from tests.harness import Balancer, PaddlerProcess, Processes
from tests.kubectl import wait_until
from tests.unit.test_chart_monitoring import DASHBOARD, RULES, dashboard_exprs, promql_for_prometheus

from .metrics_pipeline import Prometheus, prometheus, prometheus_targets  # noqa: F401 (fixtures)

pytestmark = pytest.mark.k8s

TIMEOUT = 30.0
PODS = ("paddler-0", "paddler-1")
BUFFER = ("--max-buffered-requests", "4", "--buffered-request-timeout", "3s")
"""Small enough that a test fills the buffer (503) and outwaits it (504) in seconds."""
SIMULATED = ("--simulated-tokens-per-second", "20")
"""A 10-token request takes half a second on one slot."""

ALERTS = {
    "PaddlerWakeUpFailing": "ghost",
    "PaddlerRequestsRejected": "ghost",
    "PaddlerAgentsWithoutSlots": "cold",
    "PaddlerAgentsLostMidRequest": "lost",
    "PaddlerBalancerDown": PODS[1],
}
"""Each rule of the chart -> the model group (or, for a balancer, the pod) the test makes it true for."""
LABEL_VALUES = re.compile(r"label_values\((.+),\s*(\w+)\)")
"""A dashboard variable's query (Grafana's function over the label values API)."""


def put_state(balancer: Balancer, group: str, model: str, **parameters: int) -> None:
    """The group's desired state, as the operator PUTs it: the group exists from now on, agents or not."""
    body = {"model": {"LocalToAgent": model}, "inference_parameters": parameters}
    response = httpx.put(f"{balancer.management_url}/api/v1/model_groups/{group}/desired_state", json=body)
    assert response.status_code == 204, response.text


def generate(
    balancer: Balancer,
    group: str,
    *,
    prompt: str = "hello",
    max_tokens: int = 10,
    first_line: threading.Event | None = None,
) -> int:
    """One streamed (NDJSON) request to ``group``: its HTTP status (an agent lost mid-stream leaves it 200)."""
    with httpx.stream(
        "POST",
        f"{balancer.inference_url}/api/v1/continue_from_raw_prompt",
        json={"raw_prompt": prompt, "max_tokens": max_tokens},
        headers={MODEL_GROUP_HEADER: group},
        timeout=60,
    ) as response:
        for _ in response.iter_lines():
            if first_line is not None:
                first_line.set()
        return response.status_code


def keep_waiting(balancer: Balancer, group: str, stop: threading.Event, delay: float) -> list[int]:
    """Requests to ``group`` one after the other until ``stop``: with no agent, each waits out the buffer."""
    stop.wait(delay)
    statuses = []
    while not stop.is_set():
        statuses.append(generate(balancer, group))
    return statuses


def refused_somewhere(balancers: tuple[Balancer, ...]) -> bool:
    """Has an agent refused a request of some replica (the other replica took its slot first)?"""
    return any("paddler_agent_refusals_total{" in httpx.get(f"{b.management_url}/metrics").text for b in balancers)


def settle(probe: Callable[[], list[str]], timeout: float = TIMEOUT) -> list[str]:
    """Poll ``probe`` (what is still wrong) every second until it finds nothing; what it found last."""
    deadline = time.monotonic() + timeout
    while (wrong := probe()) and time.monotonic() < deadline:
        time.sleep(1)
    return wrong


def has_a_value(result: list[dict[str, Any]]) -> bool:
    """At least one sample that is a number (a quantile of no observation is NaN)."""
    return any(math.isfinite(float(sample["value"][1])) for sample in result)


def api(server: Prometheus, path: str) -> Any:
    with urllib.request.urlopen(f"{server.url}{path}", timeout=5) as resp:
        body = json.load(resp)
    assert body["status"] == "success", body
    return body["data"]


def loaded_rules(server: Prometheus) -> dict[str, dict[str, Any]]:
    """The alert rules Prometheus evaluates from the chart's rule file, by name."""
    groups = api(server, "/api/v1/rules?type=alert")["groups"]
    return {rule["name"]: rule for group in groups if group["file"] == str(RULES) for rule in group["rules"]}


def reload(server: Prometheus) -> None:
    """SIGHUP: Prometheus reads its configuration again (scripts/k8s/prometheus.sh keeps its pid)."""
    os.kill(int((server.directory / "pids" / "prometheus.pid").read_text()), signal.SIGHUP)


@pytest.fixture
def alert_rules(prometheus: Prometheus) -> Iterator[Prometheus]:  # noqa: F811
    """``prometheus`` with the chart's rule file as it is (what a PrometheusRule carries), for this test."""
    config = prometheus.directory / "prometheus.yml"
    original = config.read_text()
    config.write_text(f"{original}rule_files: [{json.dumps(str(RULES))}]\n")
    reload(prometheus)
    try:
        log = prometheus.directory / "logs" / "prometheus.log"
        wait_until(lambda: loaded_rules(prometheus), timeout=TIMEOUT, what=f"Prometheus loads {RULES} (see {log})")
        yield prometheus
    finally:
        config.write_text(original)
        reload(prometheus)


@dataclass
class Pool:
    """Two balancer replicas (pods paddler-0 and paddler-1 of namespace ``ns``), both scraped."""

    ns: str
    replicas: tuple[Balancer, ...]
    paddler: Processes
    prometheus: Prometheus
    executor: ThreadPoolExecutor

    def selector(self, metric: str, **labels: str) -> str:
        matchers = ",".join(f'{k}="{v}"' for k, v in {"namespace": self.ns, **labels}.items())
        return f"{metric}{{{matchers}}}"

    def wait(self, expr: str, what: str, timeout: float = TIMEOUT) -> None:
        """Until Prometheus answers ``expr`` with a sample."""
        wait_until(lambda: self.prometheus.query(expr), timeout=timeout, what=f"{what} ({expr})")

    def agent(
        self,
        name: str,
        group: str,
        *,
        slots: int = 1,
        on_replicas: int = 1,
        engine: str = "simulated",
        extra: tuple[str, ...] = (),
        env: dict[str, str] | None = None,
    ) -> PaddlerProcess:
        """An agent of ``group`` linked to the first ``on_replicas`` replicas."""
        first, *others = self.replicas[:on_replicas]
        return self.paddler.agent(
            first,
            slots=slots,
            name=name,
            engine=engine,
            extra=("--model-group", group, *extra),
            env=env,
            replicas=tuple(others),
        )

    def burst(self, group: str, per_replica: int) -> list[int]:
        """``per_replica`` requests to every replica at once, the same prompts on each (routed alike)."""
        futures = [
            self.executor.submit(generate, balancer, group, prompt=f"hello {i}")
            for i in range(per_replica)
            for balancer in self.replicas
        ]
        return [f.result(TIMEOUT) for f in futures]


@pytest.fixture
def pool(paddler: Processes, prometheus_targets: Prometheus) -> Iterator[Pool]:  # noqa: F811
    """The replicas scraped, and group m served by 2 agents of 2 slots linked to both replicas."""
    ns = f"t-{uuid.uuid4().hex[:10]}"
    replicas = tuple(paddler.balancer(*BUFFER, "--replica-name", pod) for pod in PODS)
    for pod, balancer in zip(PODS, replicas, strict=True):
        labels = {"namespace": ns, "pod": pod, "container": "balancer", "endpoint": "management"}
        prometheus_targets.scrape(f"{ns}-{pod}", balancer.management_addr, **labels)
    executor = ThreadPoolExecutor(max_workers=16)
    try:
        pool = Pool(ns, replicas, paddler, prometheus_targets, executor)
        for i in range(2):
            pool.agent(f"m-{i}", "m", slots=2, on_replicas=2, extra=SIMULATED)
        slots = pool.selector("paddler_slots_total", model_group="m")
        pool.wait(f"count({slots} == 4) == 2", "both replicas scraped, each seeing m's 4 slots")
        yield pool
    finally:
        executor.shutdown(wait=False, cancel_futures=True)  # a stream left running ends with its agent


def test_every_dashboard_query_returns_data_after_traffic(pool: Pool, model_path: Path) -> None:  # noqa: F811
    first = pool.replicas[0]
    # The KV cache panels need an engine that has a KV cache: the llama engine, group llm.
    put_state(first, "llm", str(model_path), context_size=2048)
    llama = pool.agent("llm-0", "llm", engine="llama", env={"PADDLER_THREADS": "2"})
    # A group with a desired state and no agent: its requests wait out the buffer (504) or find it full (503).
    put_state(first, "ghost", "/models/ghost.gguf")

    # Both replicas place requests on the same 4 slots of m at once: an agent refuses what the
    # other replica took first, and the request is routed again.
    served: list[int] = []
    for burst in range(8):
        served += pool.burst("m", per_replica=4)
        if burst and refused_somewhere(pool.replicas):
            break
    assert refused_somewhere(pool.replicas), "no agent refused a request in 8 bursts on both replicas"
    assert 200 in served, served

    try:
        pool.wait(pool.selector("paddler_agent_kv_cache_tokens_total", model_group="llm") + " > 0", "model loaded")
    except AssertionError as err:
        raise AssertionError(f"{err}\nllama agent:\n{llama.output()[-4000:]}") from None
    assert [generate(first, "llm", prompt="Name a colour.", max_tokens=4) for _ in range(2)] == [200, 200]

    # 6 at once for 4 places in the buffer: 2 are turned away (503), 4 time out there (504).
    rejected = sorted(pool.executor.map(lambda _: generate(first, "ghost"), range(6)))
    assert rejected == [503, 503, 504, 504, 504, 504], rejected

    def promql(expr: str) -> str:
        return promql_for_prometheus(expr.replace("$namespace", pool.ns))

    # The variables' label_values(series, label) list this namespace and group m (Grafana asks the
    # label values API), and every panel's query has data for them.
    variables = [
        v["definition"] for v in json.loads(DASHBOARD.read_text())["templating"]["list"] if v["type"] == "query"
    ]
    listed = {"namespace": pool.ns, "model_group": "m"}

    def empty() -> list[str]:
        missing = []
        for definition in variables:
            match = LABEL_VALUES.fullmatch(definition)
            assert match is not None, f"a dashboard variable that is not label_values(series, label): {definition}"
            series, label = match.groups()
            query = urllib.parse.urlencode({"match[]": promql(series)})
            values = api(pool.prometheus, f"/api/v1/label/{label}/values?{query}")
            if listed.get(label) not in values:
                missing.append(f"{definition}\n  -> {values}")
        for expr in dashboard_exprs():
            result = pool.prometheus.query(promql(expr))
            if not has_a_value(result):
                missing.append(f"{expr}\n  -> {result}")
        return missing

    missing = settle(empty)
    assert not missing, "dashboard queries with no data:\n" + "\n".join(missing)


def test_each_alert_fires_when_its_condition_is_made_true(pool: Pool, alert_rules: Prometheus) -> None:
    assert set(loaded_rules(alert_rules)) == set(ALERTS), "a rule of the chart with no condition made true here"
    first, second = pool.replicas
    stop = threading.Event()
    waiting: list[Future[list[int]]] = []
    try:
        # PaddlerWakeUpFailing and PaddlerRequestsRejected: group ghost has a desired state and no
        # agent; requests keep waiting in the buffer (two, staggered) and end in 504.
        put_state(first, "ghost", "/models/ghost.gguf")
        waiting += [pool.executor.submit(keep_waiting, first, "ghost", stop, delay) for delay in (0, 1.5)]

        # PaddlerAgentsWithoutSlots: an agent of group cold is connected, loading its model (no slot).
        put_state(first, "cold", "/models/cold.gguf")
        pool.agent("cold-0", "cold", slots=2, extra=("--simulated-load-time", "600s"))

        # PaddlerAgentsLostMidRequest: the 2 agents of group lost (1 slot each) die in the middle of
        # a streamed request each (502), one after the other so that the rate sees the counter grow.
        lost = [pool.agent(f"lost-{i}", "lost", extra=("--simulated-tokens-per-second", "5")) for i in range(2)]
        pool.wait(pool.selector("paddler_slots_total", model_group="lost") + " == 2", "both lost agents serve")
        started = [threading.Event() for _ in lost]
        streams = [
            pool.executor.submit(generate, first, "lost", prompt=f"story {i}", max_tokens=100, first_line=event)
            for i, event in enumerate(started)
        ]
        assert all(event.wait(TIMEOUT) for event in started), "a request of group lost streamed nothing"
        lost[0].kill()
        pool.wait(pool.selector("paddler_requests_total", model_group="lost", code="502"), "the first loss scraped")
        lost[1].kill()
        assert [s.result(TIMEOUT) for s in streams] == [200, 200]  # the status was sent before the loss

        # PaddlerBalancerDown: the second replica stops; Prometheus keeps its target.
        second.process.stop()

        def wrong() -> list[str]:
            found = []
            for name, rule in sorted(loaded_rules(alert_rules).items()):
                about = {
                    a["labels"].get("model_group") or a["labels"].get("pod", "?")
                    for a in rule["alerts"]
                    if a["labels"].get("namespace") == pool.ns and a["state"] in {"pending", "firing"}
                }
                if rule["health"] != "ok" or about != {ALERTS[name]}:
                    now = [s for s in pool.prometheus.query(rule["query"]) if s["metric"].get("namespace") == pool.ns]
                    health = " ".join(filter(None, (rule["health"], rule.get("lastError"))))
                    found.append(
                        f"{name}: health {health}, alerts for {sorted(about)} (expected [{ALERTS[name]!r}]); "
                        f"its expr now: {now}\n  {rule['query']}"
                    )
            return found

        not_firing = settle(wrong)
        assert not not_firing, "alert rules not pending or firing as expected:\n" + "\n".join(not_firing)
    finally:
        stop.set()
    assert {504} == {status for w in waiting for status in w.result(TIMEOUT)}
