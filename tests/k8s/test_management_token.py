"""The operator turns the management token on by default (issue 10, case 12).

Per LlmPool it creates a Secret with a random token, wires it into the balancer and
agent pods, and sends it itself: checked against a real local ``paddler balancer``
that requires the token it reads from that Secret.
"""

from __future__ import annotations

import base64
import json
import socket
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from tests.harness import Processes
from tests.kubectl import wait_until

from .conftest import K8sCluster
from .test_operator_cluster import MODEL, POOL, REPO, TIMEOUT, Operators, get, wait_condition, wait_object

pytestmark = pytest.mark.k8s

TOKEN_ENV = {
    "name": "PADDLER_MANAGEMENT_TOKEN",
    "valueFrom": {"secretKeyRef": {"name": "p-management-token", "key": "management-token"}},
}


@pytest.fixture(scope="module")
def crds(k8s_cluster: K8sCluster) -> K8sCluster:
    k8s_cluster.kubectl_run("apply", "-f", str(REPO / "crds"))
    for name in ("llmpools.paddler.dev", "modeldeployments.paddler.dev"):
        k8s_cluster.kubectl_run("wait", "--for=condition=Established", f"crd/{name}", "--timeout=60s", timeout=90)
    return k8s_cluster


@pytest.fixture
def operators(crds: K8sCluster) -> Iterator[Operators]:
    ops = Operators(crds)
    try:
        yield ops
    finally:
        ops.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def env_of(deployment: Any) -> list[dict[str, Any]]:
    env: list[dict[str, Any]] = deployment["spec"]["template"]["spec"]["containers"][0]["env"]
    return env


def groups(url: str, token: str | None) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    request = urllib.request.Request(f"{url}/api/v1/model_groups", headers=headers)
    with urllib.request.urlopen(request, timeout=5) as resp:
        return {g["name"]: g for g in json.load(resp)["model_groups"]}


def test_operator_creates_a_token_secret_per_pool_and_uses_it(
    operators: Operators, k8s_namespace: str, paddler: Processes
) -> None:
    cluster, ns = operators.cluster, k8s_namespace
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    operators.start(ns, balancer_url=url)
    cluster.apply(POOL + "---" + MODEL, namespace=ns)

    secret = wait_object(cluster, ns, "secret/p-management-token")
    token = base64.b64decode(secret["data"]["management-token"]).decode()
    assert len(token) >= 32
    assert [(o["kind"], o["name"]) for o in secret["metadata"]["ownerReferences"]] == [("LlmPool", "p")]
    assert TOKEN_ENV in env_of(wait_object(cluster, ns, "deployment/p-balancer"))
    assert TOKEN_ENV in env_of(wait_object(cluster, ns, "deployment/m-agent"))

    # The pool's balancer, as its pod would run it: the token from the Secret, nothing else.
    paddler.balancer("--management-addr", f"127.0.0.1:{port}", "--management-token", token)
    wait_condition(cluster, ns, "lp/p", "Ready", ("True", "BalancerReady"))
    group = wait_until(lambda: groups(url, token).get("m"), timeout=TIMEOUT, what="group m pushed with the token")
    assert group["desired_state"]["model"] == {"LocalToAgent": "/models/smollm2.gguf"}
    with pytest.raises(urllib.error.HTTPError) as keyless:
        groups(url, None)
    assert keyless.value.code == 401
    # Reconciles later keep the same token (the Secret is created once, never rewritten).
    again = get(cluster, ns, "secret/p-management-token")
    assert again["data"] == secret["data"]


def test_a_pool_can_turn_the_token_off(operators: Operators, k8s_namespace: str) -> None:
    cluster, ns = operators.cluster, k8s_namespace
    operators.start(ns)
    open_pool = POOL.replace("spec: {}", "spec: {balancer: {managementAuth: {enabled: false}}}")
    cluster.apply(open_pool + "---" + MODEL, namespace=ns)

    agent = wait_object(cluster, ns, "deployment/m-agent")
    balancer = wait_object(cluster, ns, "deployment/p-balancer")
    assert all(e["name"] != "PADDLER_MANAGEMENT_TOKEN" for e in env_of(agent) + env_of(balancer))
    assert get(cluster, ns, "secret/p-management-token") is None
