"""End to end on kind: the Helm-installed operator turns an LlmPool and a
ModelDeployment into a balancer and llama.cpp agents that answer an OpenAI
request, and the Builtin autoscaler wakes a pool from zero on a buffered request."""

from __future__ import annotations

import json
import threading
import urllib.request
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from .conftest import Kind, wait_for

pytestmark = pytest.mark.e2e

MODEL_REPO = "HuggingFaceTB/SmolLM2-135M-Instruct-GGUF"
MODEL_FILE = "smollm2-135m-instruct-q8_0.gguf"


@pytest.fixture
def namespace(kind: Kind) -> Iterator[str]:
    ns = f"e2e-{uuid.uuid4().hex[:8]}"
    kind.run("create", "namespace", ns)
    try:
        yield ns
    finally:
        kind.run("delete", "namespace", ns, "--wait=false", check=False)


def manifests(tag: str, autoscaling: str = "{mode: None}") -> str:
    return f"""
apiVersion: paddler.dev/v1alpha1
kind: LlmPool
metadata: {{name: p}}
spec:
  balancer: {{image: "paddler-balancer:{tag}", imagePullPolicy: Never, bufferedRequestTimeout: 600s}}
  agent:
    image: "paddler-agent:{tag}"
    imagePullPolicy: Never
    slotsPerAgent: 2
    resources: {{requests: {{cpu: 500m, memory: 512Mi}}}}
---
apiVersion: paddler.dev/v1alpha1
kind: ModelDeployment
metadata: {{name: smollm2}}
spec:
  poolRef: {{name: p}}
  model: {{huggingFace: {{repoId: {MODEL_REPO}, filename: {MODEL_FILE}}}}}
  inferenceParameters: {{contextSize: 2048, temperature: 0}}
  autoscaling: {autoscaling}
"""


def ready(kind: Kind, ns: str) -> Any:
    md = kind.get(ns, "md/smollm2")
    for c in (md or {}).get("status", {}).get("conditions", []):
        if c["type"] == "Ready" and c["status"] == "True":
            return md
    return None


def chat(port: int, text: str, timeout: float = 600) -> dict[str, Any]:
    body = json.dumps({"model": "smollm2", "messages": [{"role": "user", "content": text}], "max_tokens": 16})
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/chat/completions",
        data=body.encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=timeout) as resp:
        answer: dict[str, Any] = json.load(resp)
        return answer


def test_pool_serves_a_real_model(kind: Kind, namespace: str) -> None:
    kind.run("-n", namespace, "apply", "-f", "-", input=manifests(kind.tag))
    wait_for(lambda: ready(kind, namespace), timeout=900, what="ModelDeployment Ready (model downloaded, agents up)")
    printed = kind.run("-n", namespace, "get", "lp,md")
    assert "smollm2" in printed
    forward, port = kind.port_forward(namespace, "svc/p-inference", 8061)
    try:
        answer = chat(port, "Say hello.")
        assert answer["choices"][0]["message"]["content"]
    finally:
        forward.kill()


def test_builtin_autoscaler_wakes_from_zero(kind: Kind, namespace: str) -> None:
    autoscaling = "{mode: Builtin, minReplicas: 0, maxReplicas: 2, scaleDownDelaySeconds: 20}"
    kind.run("-n", namespace, "apply", "-f", "-", input=manifests(kind.tag, autoscaling))
    wait_for(
        lambda: (kind.get(namespace, "deployment/smollm2-agent") or {}).get("spec", {}).get("replicas") == 0,
        timeout=300,
        what="agents scaled to zero",
    )
    forward, port = kind.port_forward(namespace, "svc/p-inference", 8061)
    result: dict[str, Any] = {}

    def call() -> None:
        result["answer"] = chat(port, "Count to three.")

    thread = threading.Thread(target=call)
    try:
        thread.start()  # buffered by the balancer while no agent exists
        wait_for(
            lambda: (kind.get(namespace, "deployment/smollm2-agent") or {}).get("spec", {}).get("replicas", 0) >= 1,
            timeout=120,
            what="0 -> 1 on a buffered request",
        )
        thread.join(timeout=900)
        assert result["answer"]["choices"][0]["message"]["content"]
    finally:
        forward.kill()
