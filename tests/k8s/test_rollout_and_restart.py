"""Rolling model swaps and the Builtin scaler's memory, on the real control plane.

The operator runs as a process against kube-apiserver and points (through
PADDLER_OPERATOR_BALANCER_URL_TEMPLATE) at a real local balancer; simulated agents of
the ModelDeployment's group stand in for its pods.
"""

from __future__ import annotations

import datetime as dt
import json
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.harness import Processes
from tests.kubectl import wait_until

from .test_operator_cluster import (  # noqa: F401 - crds and operators are fixtures
    MODEL,
    POOL,
    TIMEOUT,
    Operators,
    balancer_groups,
    condition,
    crds,
    get,
    operators,
    wait_condition,
    wait_object,
)

pytestmark = pytest.mark.k8s


def gguf(path: Path) -> str:
    path.write_bytes(b"GGUF" + bytes(60))
    return str(path)


def agents_of(url: str) -> list[dict[str, Any]]:
    with urllib.request.urlopen(f"{url}/api/v1/agents", timeout=5) as resp:
        found: list[dict[str, Any]] = json.load(resp)["agents"]
    return found


def message(obj: Any, type_: str) -> str:
    return str(next(c["message"] for c in obj["status"]["conditions"] if c["type"] == type_))


def swap_pool(operators: Operators, ns: str, paddler: Processes, old: str) -> str:  # noqa: F811
    """A pool with a real balancer, a 2-replica ModelDeployment on ``old``, and its two agents serving."""
    balancer = paddler.balancer("--buffered-request-timeout", "1s")
    operators.start(ns, balancer_url=balancer.management_url)
    model = MODEL.replace("/models/smollm2.gguf", old).replace("  model:", "  replicas: 2\n  model:")
    operators.cluster.apply(POOL + "---" + model, namespace=ns)
    wait_until(lambda: balancer_groups(balancer.management_url).get("m"), timeout=TIMEOUT, what="group m")
    for i in range(2):
        extra = ("--model-group", "m", "--simulated-load-time", "3s")
        paddler.agent(balancer, slots=2, name=f"agent-{i}", extra=extra)
    wait_condition(operators.cluster, ns, "md/m", "Ready", ("True", "AgentsReady"))
    return balancer.management_url


def test_model_change_is_progressing_with_applied_over_total_then_ready(
    operators: Operators,  # noqa: F811
    k8s_namespace: str,
    paddler: Processes,
    tmp_path: Path,
) -> None:
    cluster, ns = operators.cluster, k8s_namespace
    url = swap_pool(operators, ns, paddler, gguf(tmp_path / "old.gguf"))
    new = gguf(tmp_path / "new.gguf")

    patch = {"spec": {"model": {"localPath": new}}}
    cluster.kubectl_run("-n", ns, "patch", "md/m", "--type=merge", "-p", json.dumps(patch))
    md = wait_condition(cluster, ns, "md/m", "Progressing", ("True", "RollingOut"))
    assert condition(md, "Ready") == ("False", "RollingOut")
    assert "/2 agents switched, at most 1 at a time" in message(md, "Progressing")
    md = wait_condition(cluster, ns, "md/m", "Ready", ("True", "AgentsReady"))
    assert condition(md, "Progressing") == ("False", "Complete")
    assert condition(md, "Degraded") == ("False", "AsExpected")
    assert [a["model_path"] for a in agents_of(url)] == [new, new]
    reasons = [e["reason"] for e in get(cluster, ns, "events")["items"]]
    assert "DesiredStateApplied" in reasons


def test_model_that_fails_to_load_is_degraded_and_the_old_model_keeps_serving(
    operators: Operators,  # noqa: F811
    k8s_namespace: str,
    paddler: Processes,
    tmp_path: Path,
) -> None:
    cluster, ns = operators.cluster, k8s_namespace
    old = gguf(tmp_path / "old.gguf")
    url = swap_pool(operators, ns, paddler, old)
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"not a model")

    patch = {"spec": {"model": {"localPath": str(broken)}}}
    cluster.kubectl_run("-n", ns, "patch", "md/m", "--type=merge", "-p", json.dumps(patch))
    md = wait_condition(cluster, ns, "md/m", "Degraded", ("True", "RolloutFailed"))
    assert "is not a GGUF file" in message(md, "Degraded")
    assert condition(md, "Ready") == ("False", "RolloutFailed")
    assert condition(md, "Progressing") == ("False", "RolloutFailed")
    assert "the others keep serving the previous desired state" in message(md, "Ready")
    found = agents_of(url)
    assert [a["model_path"] for a in found] == [old, old]
    assert all(a["slots_total"] == 2 and not a["draining"] for a in found)
    warnings = [e for e in get(cluster, ns, "events")["items"] if e["reason"] == "RolloutFailed"]
    assert warnings
    assert {e["type"] for e in warnings} == {"Warning"}


def test_operator_restart_keeps_builtin_replicas_and_its_scale_down_timer(
    operators: Operators,  # noqa: F811
    k8s_namespace: str,
    paddler: Processes,
) -> None:
    cluster, ns = operators.cluster, k8s_namespace
    delay = 24
    balancer = paddler.balancer("--buffered-request-timeout", "60s")
    first = operators.start(ns, balancer_url=balancer.management_url)
    builtin = f"  autoscaling: {{mode: Builtin, minReplicas: 0, maxReplicas: 3, scaleDownDelaySeconds: {delay}}}\n"
    cluster.apply(POOL + "---" + MODEL.replace("  model:", builtin + "  model:"), namespace=ns)
    wait_condition(cluster, ns, "md/m", "Ready", ("True", "ScaledToZero"))

    answer: dict[str, Any] = {}

    def call() -> None:
        body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}).encode()
        request = urllib.request.Request(
            f"{balancer.inference_url}/v1/chat/completions", data=body, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=60) as resp:
            answer["status"] = resp.status

    thread = threading.Thread(target=call)
    thread.start()  # buffered at zero agents: the operator wakes the group
    try:
        wait_object(cluster, ns, "deployment/m-agent", lambda d: d["spec"]["replicas"] == 1)
        paddler.agent(balancer, slots=2, name="agent-0", extra=("--model-group", "m"))
    finally:
        thread.join(timeout=60)
    assert answer.get("status") == 200

    # Idle now: the scaler starts its scale-down delay, in the ModelDeployment's status.
    md = wait_object(cluster, ns, "md/m", lambda o: bool((o.get("status") or {}).get("lowDemandSince")))
    low_since = md["status"]["lowDemandSince"]
    timer_started = dt.datetime.strptime(low_since, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.UTC).timestamp()
    # Stop half-way through the delay (by the stored timer, a deliberate pause): the stored
    # timer then has half the delay left, a timer started again by the next operator all of it.
    time.sleep(max(0.0, timer_started + delay / 2 - time.time()))
    first.stop()
    assert get(cluster, ns, "deployment/m-agent")["spec"]["replicas"] == 1

    second = operators.start(ns, balancer_url=balancer.management_url)
    restarted_at = time.time()
    wait_until(lambda: second.count(f"ModelDeployment/{ns}/m ok="), timeout=TIMEOUT, what="restarted operator's pass")
    assert get(cluster, ns, "md/m")["status"]["lowDemandSince"] == low_since  # the same timer, not a new one
    wait_object(cluster, ns, "deployment/m-agent", lambda d: d["spec"]["replicas"] == 0)
    scaled_down_at = time.time()
    # The stored timer's promise: not before its delay ran out (lowDemandSince has whole
    # seconds), and before a timer restarted by the new operator could have.
    assert scaled_down_at >= timer_started + delay - 1, (scaled_down_at - timer_started, delay)
    assert scaled_down_at < restarted_at + delay, (scaled_down_at - restarted_at, delay)


def test_model_cache_with_both_a_claim_and_a_host_path_is_rejected(
    crds: Any,  # noqa: F811
    k8s_namespace: str,
) -> None:
    manifest = (
        "apiVersion: paddler.dev/v1alpha1\nkind: LlmPool\nmetadata: {name: bad}\n"
        "spec: {agent: {modelCache: {persistentVolumeClaim: {claimName: m}, hostPath: {path: /m}}}}\n"
    )
    proc = crds.kubectl_run("-n", k8s_namespace, "apply", "-f", "-", input=manifest, check=False)
    assert proc.returncode != 0
    assert "set at most one of persistentVolumeClaim, hostPath" in proc.stderr, proc.stderr
