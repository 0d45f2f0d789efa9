"""The operator turns the management token on by default (issue 10, case 12), derived from
its key and never read back (issue 20).

Per LlmPool it creates a Secret named from the pool's uid with the derived token, wires it
into the balancer and agent pods, and sends the token itself: checked against a real local
``paddler balancer`` that requires the token this test reads from that Secret. The operator
runs as a local process without ``--token-key-file``: it uses (and on first use makes) the
local key under ``$XDG_STATE_HOME/paddler``, which every operator of the session shares.
"""

from __future__ import annotations

import base64
import json
import socket
import urllib.error
import urllib.request
from typing import Any

import pytest

from tests.harness import Processes
from tests.kubectl import wait_until

from .test_operator_cluster import (  # noqa: F401 - crds and operators are fixtures
    MODEL,
    POOL,
    REPO,
    TIMEOUT,
    Operators,
    crds,
    get,
    operators,
    wait_condition,
    wait_object,
)

pytestmark = pytest.mark.k8s

LEGACY = """
apiVersion: v1
kind: Secret
metadata: {name: p-management-token}
stringData: {management-token: the-random-token-of-the-operator-before-issue-20}
"""
TOKEN_SECRETS = "-lpaddler.dev/pool=p,paddler.dev/component=management-token"


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


def token_ref(deployment: Any) -> dict[str, str]:
    env = env_of(deployment)
    ref: dict[str, str] = next(e for e in env if e["name"] == "PADDLER_MANAGEMENT_TOKEN")["valueFrom"]["secretKeyRef"]
    return ref


def test_operator_creates_a_token_secret_per_pool_and_uses_it(
    operators: Operators,  # noqa: F811
    k8s_namespace: str,
    paddler: Processes,
) -> None:
    cluster, ns = operators.cluster, k8s_namespace
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    first = operators.start(ns, balancer_url=url)
    cluster.apply(LEGACY + "---" + POOL + "---" + MODEL, namespace=ns)  # a Secret of the previous version

    ref = token_ref(wait_object(cluster, ns, "deployment/p-balancer"))
    assert ref["key"] == "management-token"
    assert ref["name"].startswith("p-management-")
    assert ref["name"] != "p-management-token"  # the old Secret is not the pool's any more
    assert token_ref(wait_object(cluster, ns, "deployment/m-agent")) == ref
    secret = wait_object(cluster, ns, f"secret/{ref['name']}")
    token = base64.b64decode(secret["data"]["management-token"]).decode()
    assert len(token) >= 32
    assert [(o["kind"], o["name"]) for o in secret["metadata"]["ownerReferences"]] == [("LlmPool", "p")]
    legacy = get(cluster, ns, "secret/p-management-token")
    assert base64.b64decode(legacy["data"]["management-token"]).decode().startswith("the-random-token")

    # The pool's balancer, as its pod would run it: the token from the Secret, nothing else.
    paddler.balancer("--management-addr", f"127.0.0.1:{port}", "--management-token", token)
    wait_condition(cluster, ns, "lp/p", "Ready", ("True", "BalancerReady"))
    group = wait_until(lambda: groups(url, token).get("m"), timeout=TIMEOUT, what="group m pushed with the token")
    assert group["desired_state"]["model"] == {"LocalToAgent": "/models/smollm2.gguf"}
    with pytest.raises(urllib.error.HTTPError) as keyless:
        groups(url, None)
    assert keyless.value.code == 401

    # Another operator process derives the same token: the same one Secret, the balancer still open to it.
    first.stop()
    second = operators.start(ns, balancer_url=url)
    wait_until(lambda: second.count("reconciled object=") >= 2, timeout=TIMEOUT, what="passes of the new operator")
    other = '{"spec": {"model": {"localPath": "/models/other.gguf"}}}'
    cluster.kubectl_run("-n", ns, "patch", "md/m", "--type=merge", "-p", other)
    wait_until(
        lambda: groups(url, token)["m"]["desired_state"]["model"] == {"LocalToAgent": "/models/other.gguf"},
        timeout=TIMEOUT,
        what="the new operator's push, with the token it derived",
    )
    (again,) = get(cluster, ns, "secrets", TOKEN_SECRETS)["items"]
    assert (again["metadata"]["name"], again["data"]) == (ref["name"], secret["data"])


def test_a_pool_can_turn_the_token_off(operators: Operators, k8s_namespace: str) -> None:  # noqa: F811
    cluster, ns = operators.cluster, k8s_namespace
    operators.start(ns)
    open_pool = POOL.replace("spec: {}", "spec: {balancer: {managementAuth: {enabled: false}}}")
    cluster.apply(open_pool + "---" + MODEL, namespace=ns)

    agent = wait_object(cluster, ns, "deployment/m-agent")
    balancer = wait_object(cluster, ns, "deployment/p-balancer")
    assert all(e["name"] != "PADDLER_MANAGEMENT_TOKEN" for e in env_of(agent) + env_of(balancer))
    assert get(cluster, ns, "secrets", TOKEN_SECRETS)["items"] == []
