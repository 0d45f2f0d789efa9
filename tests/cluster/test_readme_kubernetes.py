"""The README's "On Kubernetes" section, run as written on the two-node cluster: the same
`helm install` (the tier's `release`), the README's own LlmPool + ModelDeployment manifest
(read from README.md, not copied here), and the OpenAI API at the URL its comment names,
from a pod."""

from __future__ import annotations

import json
import re

import pytest

from tests.kubectl import wait_until

from .clients import client_pod, wait_for_client
from .conftest import NODE_NAMES, RELEASE, RELEASE_NS, REPO, Cluster
from .namespaces import scenario_namespace
from .test_inference_in_cluster import ready_condition, record

pytestmark = pytest.mark.cluster


def readme_kubernetes_block() -> str:
    """The ```sh block of README.md's "On Kubernetes" section."""
    readme = (REPO / "README.md").read_text()
    section = readme.split("## On Kubernetes", 1)[1].split("\n## ", 1)[0]
    match = re.search(r"```sh\n(.*?)```", section, re.S)
    assert match, "no ```sh block in the README's On Kubernetes section"
    return match.group(1)


def test_the_readmes_kubernetes_section_serves_a_chat_on_two_nodes(cluster: Cluster, release: str) -> None:
    block = readme_kubernetes_block()
    install = f"helm install {RELEASE} charts/paddler --namespace {RELEASE_NS} --create-namespace"
    assert install in block  # what the tier's `release` fixture ran
    manifest = block.split("<<'YAML'\n", 1)[1].split("\nYAML\n", 1)[0]
    url_comment = re.search(r"OpenAI API at (http://\S+) \(model \"(\w+)\"\)", block)
    assert url_comment, block
    with scenario_namespace(cluster, "readme") as namespace:
        base_url, model = url_comment.group(1).replace("<namespace>", namespace), url_comment.group(2)
        cluster.apply(manifest + "\n" + client_pod(namespace), namespace)
        wait_until(
            lambda: ready_condition(cluster.get_json("-n", namespace, "md", model)) == "True",
            timeout=300,
            what=f"the README's ModelDeployment {model} Ready",
        )
        wait_for_client(cluster, namespace)
        script = f"""
import json
from openai import OpenAI
client = OpenAI(base_url="{base_url}", api_key="unused", timeout=120)
chat = client.chat.completions.create(
    model="{model}", messages=[{{"role": "user", "content": "Say hello."}}], max_tokens=12, temperature=0
)
print(json.dumps({{"text": chat.choices[0].message.content, "model": chat.model}}))
"""
        answer = json.loads(cluster.exec_python(namespace, "client", script).strip().splitlines()[-1])
        pods = cluster.get_json("-n", namespace, "pods")["items"]
        placed = {p["metadata"]["name"]: p["spec"]["nodeName"] for p in pods}
        record("README's Kubernetes section on two nodes", json.dumps({"answer": answer, "pods": placed}, indent=1))

    assert answer["text"]
    assert set(placed.values()) <= set(NODE_NAMES)
