"""The chart's life on the real nodes: `helm upgrade` from the previous chart under load,
pod settings on running pods, `helm uninstall` and a second install.

The previous release is chart 0.1.0 with its own images, built from the git history by
``scripts/previous-images.sh`` (the ``cluster`` fixture loads them into the nodes): its
operator makes the pool and its CRDs store the schema defaults of that time (images
``…:0.1.0``, a random management token), so the upgrade meets what a real 0.1.0 cluster
holds. The pool downloads its model over HTTP from a pod in its namespace and leaves its
images unset, as a user of 0.1.0 would; two balancers and two agents serve continuous
streamed load (the `openai` SDK at its default retries, in the client pod) while the
upgrade replaces the operator and rolls every pod.

This module runs first in the tier (``pytest_collection_modifyitems`` in conftest): chart
0.1.0 installs its CRDs only where none exist, and only one operator may run. It leaves
the current chart installed as the tier's release (the ``release`` fixture's
``helm upgrade --install`` then finds it), and the scenarios run in file order.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import yaml

from tests.kubectl import wait_until

from .clients import client_pod, wait_for_client
from .conftest import (
    AGENT_IMAGE,
    BALANCER_IMAGE,
    MODEL_IMAGE,
    PREVIOUS_AGENT_IMAGE,
    PREVIOUS_BALANCER_IMAGE,
    RELEASE,
    RELEASE_NS,
    REPO,
    Cluster,
)
from .namespaces import scenario_namespace
from .test_balancer_replicas import GROUP, POOL, HaPool, Load, failures, summary
from .test_inference_in_cluster import ready_condition, record

pytestmark = pytest.mark.cluster

MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CRDS = ("llmpools.paddler.dev", "modeldeployments.paddler.dev")
TOKEN_KEY_SECRET = f"{RELEASE}-token-key"
HF_TOKEN = "hf_upgrade_test_token"


def manifests(namespace: str) -> str:
    """The pool as a 0.1.0 user writes it: no images (the CRD of 0.1.0 stores its defaults),
    the model downloaded from a URL (here a pod serving the GGUF of the model image)."""
    return f"""
apiVersion: v1
kind: Pod
metadata: {{name: models, namespace: {namespace}, labels: {{app: models}}}}
spec:
  securityContext: {{runAsNonRoot: true, runAsUser: 65534}}
  containers:
  - name: http
    image: {MODEL_IMAGE}
    imagePullPolicy: Never
    command: [python3, -m, http.server, "8080", --directory, /models]
    ports: [{{containerPort: 8080}}]
---
apiVersion: v1
kind: Service
metadata: {{name: models, namespace: {namespace}}}
spec:
  selector: {{app: models}}
  ports: [{{port: 8080}}]
---
apiVersion: paddler.dev/v1alpha1
kind: LlmPool
metadata: {{name: {POOL}, namespace: {namespace}}}
spec:
  modelAccess: {{urlAllow: ["http://models.{namespace}.svc:8080/"]}}
  balancer:
    replicas: 2
    bufferedRequestTimeout: 180s
    resources: {{requests: {{cpu: 50m, memory: 64Mi}}}}
  agent:
    slotsPerAgent: 4
    resources: {{requests: {{cpu: 200m, memory: 256Mi}}}}
---
apiVersion: paddler.dev/v1alpha1
kind: ModelDeployment
metadata: {{name: {GROUP}, namespace: {namespace}}}
spec:
  poolRef: {{name: {POOL}}}
  model: {{url: "http://models.{namespace}.svc:8080/{MODEL_FILE}"}}
  replicas: 2
  rollout: {{maxUnavailable: 1}}
  inferenceParameters: {{contextSize: 2048, temperature: 0}}
""" + client_pod(namespace)


def helm(cluster: Cluster, *args: str, timeout: float = 400, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([str(cluster.helm), *args], capture_output=True, text=True, timeout=timeout, env=cluster.env)
    if check:
        assert proc.returncode == 0, f"helm {' '.join(args)} failed:\n{proc.stderr[-3000:]}"
    return proc


def start_from_nothing(cluster: Cluster) -> None:
    """No release and no CRDs (on a fresh cluster: nothing to do). A kept cluster's pools
    lose their finalizers first: without an operator nothing would remove them."""
    if helm(cluster, "status", RELEASE, "-n", RELEASE_NS, check=False).returncode == 0:
        helm(cluster, "uninstall", RELEASE, "-n", RELEASE_NS, "--wait", "--timeout", "3m")
    for crd in CRDS:
        if cluster.kubectl_run("get", "crd", crd, check=False).returncode != 0:
            continue
        for obj in cluster.get_json(crd.split(".")[0], "-A")["items"]:
            meta = obj["metadata"]
            cluster.kubectl_run(
                "-n", meta["namespace"], "patch", crd.split(".")[0], meta["name"],
                "--type=merge", "-p", '{"metadata":{"finalizers":null}}', check=False,
            )  # fmt: skip
        cluster.kubectl_run("delete", "crd", crd, "--timeout=120s", timeout=150)


def pods(cluster: Cluster, namespace: str, selector: str) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = cluster.get_json("-n", namespace, "pods", "-l", selector)["items"]
    return found


def images_of(found: list[dict[str, Any]]) -> dict[str, list[str]]:
    """Pod name -> the images of its containers (init containers included)."""
    return {
        p["metadata"]["name"]: [c["image"] for c in p["spec"].get("initContainers", []) + p["spec"]["containers"]]
        for p in found
    }


def pool_images(pool: HaPool) -> dict[str, list[str]]:
    """Every pod of the pool, terminating ones included: balancers and agents."""
    return images_of(pods(pool.cluster, pool.namespace, f"paddler.dev/pool={POOL}"))


def operator_images(cluster: Cluster) -> dict[str, list[str]]:
    return images_of(pods(cluster, RELEASE_NS, "app.kubernetes.io/name=paddler-operator"))


def all_on(images: dict[str, list[str]], allowed: set[str]) -> bool:
    return bool(images) and all(set(found) <= allowed for found in images.values())


@dataclass(frozen=True)
class Chart:
    cluster: Cluster
    namespace: str

    @property
    def pool(self) -> HaPool:
        return HaPool(self.cluster, self.namespace)


@pytest.fixture(scope="module")
def chart(cluster: Cluster) -> Iterator[Chart]:
    start_from_nothing(cluster)
    helm(cluster, "install", RELEASE, str(cluster.previous_chart), "-n", RELEASE_NS, "--create-namespace",
         "--wait", "--timeout", "5m")  # fmt: skip
    with scenario_namespace(cluster, "up", delete_timeout_s=180) as namespace:
        cluster.apply(manifests(namespace), namespace)
        md_ready(cluster, namespace, timeout=360)  # under chart 0.1.0: 2 balancers, 2 agents, model downloaded
        wait_for_client(cluster, namespace)
        yield Chart(cluster, namespace)


def window(results: list[dict[str, Any]], start: float, end: float) -> str:
    """The requests that began while the upgrade ran, and their slowest first token."""
    during = [r for r in results if start <= r["t0"] <= end]
    slowest = max((r["first"] - r["t0"] for r in during if r.get("first")), default=0.0)
    return (
        f"{len(during)} requests began during it, {len(failures(during))} failed, slowest first token {slowest:.1f} s"
    )


def md_ready(cluster: Cluster, namespace: str, timeout: float = 180) -> None:
    """Until the ModelDeployment reports Ready; else fail with its conditions."""
    try:
        wait_until(
            lambda: ready_condition(cluster.get_json("-n", namespace, "md", GROUP)) == "True",
            timeout=timeout,
            what="ModelDeployment Ready",
        )
    except AssertionError as err:
        conditions = cluster.get_json("-n", namespace, "md", GROUP).get("status", {}).get("conditions")
        raise AssertionError(f"{err}: {conditions}") from None


def test_helm_upgrade_from_chart_0_1_0_under_load_moves_every_pod_and_fails_no_request(chart: Chart) -> None:
    cluster, pool = chart.cluster, chart.pool
    old = {PREVIOUS_BALANCER_IMAGE, PREVIOUS_AGENT_IMAGE}
    assert all_on(pool_images(pool), old), pool_images(pool)
    assert all_on(operator_images(cluster), {PREVIOUS_BALANCER_IMAGE}), operator_images(cluster)
    stored = cluster.get_json("-n", pool.namespace, "llmpool", POOL)["spec"]
    assert stored["balancer"]["image"] == PREVIOUS_BALANCER_IMAGE  # what 0.1.0's CRD defaulting wrote

    load = Load.start(pool)
    started = time.time()
    upgraded = helm(
        cluster, "upgrade", RELEASE, str(REPO / "charts" / "paddler"), "-n", RELEASE_NS,
        "--take-ownership", "--wait", "--timeout", "5m",
    )  # fmt: skip
    new = {BALANCER_IMAGE, AGENT_IMAGE}
    wait_until(
        lambda: all_on(operator_images(cluster), {BALANCER_IMAGE}), timeout=180, what="operator pods on new image"
    )
    helm_s = time.time() - started
    wait_until(lambda: all_on(pool_images(pool), new), timeout=420, what="every pool pod on the new images")
    moved = time.time()
    wait_until(pool.settled, timeout=180, what="both new replicas holding both new agents")
    load.wait_for_answers(2 * 4)
    results = load.finish()

    record(
        "helm upgrade from chart 0.1.0 under load",
        f"{upgraded.stdout.strip().splitlines()[0]}\n{summary(results)}\n"
        f"helm upgrade --wait {helm_s:.0f} s; every pool pod on the new images {moved - started:.0f} s after it began; "
        f"{window(results, started, moved)}\n"
        + "\n".join(f"{name}: {', '.join(images)}" for name, images in sorted(pool_images(pool).items())),
    )
    assert not failures(results), summary(results)
    assert len(results) >= 16, summary(results)
    md_ready(cluster, pool.namespace)


def test_pod_settings_reach_the_running_pods(chart: Chart) -> None:
    """A gated-model token from a Secret, a registry pull secret on every pod, a patch of
    the agents' pod template: on the pods the kubelet runs, not only in the Deployments."""
    cluster, pool = chart.cluster, chart.pool
    ns = pool.namespace
    cluster.kubectl_run("-n", ns, "create", "secret", "generic", "hf", f"--from-literal=token={HF_TOKEN}")
    docker_config = '{"auths":{"registry.example.com":{"auth":"dXNlcjpwYXNz"}}}'
    cluster.kubectl_run(
        "-n", ns, "create", "secret", "generic", "regcred", "--type=kubernetes.io/dockerconfigjson",
        f"--from-literal=.dockerconfigjson={docker_config}",
    )  # fmt: skip
    pull = [{"name": "regcred"}]
    env = [{"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}}}]
    patch = {"metadata": {"annotations": {"example.com/patched": "yes"}}, "spec": {"enableServiceLinks": False}}
    spec = {
        "balancer": {"pod": {"imagePullSecrets": pull}},
        "agent": {"pod": {"imagePullSecrets": pull, "env": env, "podTemplatePatch": patch}},
    }
    cluster.kubectl_run("-n", ns, "patch", "llmpool", POOL, "--type=merge", "-p", yaml.safe_dump({"spec": spec}))

    def rolled() -> bool:
        found = pods(cluster, ns, f"paddler.dev/pool={POOL}")
        return len(found) == 4 and all(
            p["spec"].get("imagePullSecrets") == pull and not p["metadata"].get("deletionTimestamp") for p in found
        )

    wait_until(rolled, timeout=420, what="4 pool pods (2 balancers, 2 agents) with the pull secret")
    md_ready(cluster, ns, timeout=300)
    for agent in pool.agent_pods():
        assert agent["metadata"]["annotations"]["example.com/patched"] == "yes"
        assert agent["spec"]["enableServiceLinks"] is False
        name = agent["metadata"]["name"]
        seen = cluster.kubectl_run("-n", ns, "exec", name, "-c", "agent", "--", "printenv", "HF_TOKEN").stdout
        assert seen.strip() == HF_TOKEN


def release_objects(cluster: Cluster) -> list[tuple[str, str, str]]:
    """(resource, namespace, name) of every object the release's manifest holds."""
    manifest = helm(cluster, "get", "manifest", RELEASE, "-n", RELEASE_NS).stdout
    found = []
    for doc in yaml.safe_load_all(manifest):
        if not doc:
            continue
        group = doc["apiVersion"].rpartition("/")[0]
        resource = doc["kind"].lower() + (f".{group}" if group else "")
        found.append((resource, doc["metadata"].get("namespace", RELEASE_NS), doc["metadata"]["name"]))
    return found


def exists(cluster: Cluster, resource: str, namespace: str, name: str) -> bool:
    proc = cluster.kubectl_run("-n", namespace, "get", resource, name, "-o", "name", "--ignore-not-found")
    return bool(proc.stdout.strip())


def secret_data(cluster: Cluster, namespace: str, name: str) -> dict[str, str]:
    data: dict[str, str] = cluster.get_json("-n", namespace, "secret", name)["data"]
    return data


def test_helm_uninstall_leaves_the_crds_pools_and_token_key_and_a_reinstall_adopts_them(chart: Chart) -> None:
    cluster, pool = chart.cluster, chart.pool
    objects = release_objects(cluster)
    key = secret_data(cluster, RELEASE_NS, TOKEN_KEY_SECRET)
    pool_token = pool.token()
    pool_pods = set(pool_images(pool))

    helm(cluster, "uninstall", RELEASE, "-n", RELEASE_NS, "--wait", "--timeout", "3m")

    kept = {(resource, name) for resource, ns, name in objects if exists(cluster, resource, ns, name)}
    expected = {("customresourcedefinition.apiextensions.k8s.io", crd) for crd in CRDS}
    expected.add(("secret", TOKEN_KEY_SECRET))
    record("helm uninstall keeps", "\n".join(f"{r} {n}" for r, n in sorted(kept)))
    assert kept == expected, f"kept {sorted(kept)} of {len(objects)} release objects"
    wait_until(lambda: not operator_images(cluster), timeout=120, what="operator pods gone")
    # The pools and what they own stay, and serve without an operator.
    assert set(pool_images(pool)) == pool_pods
    answer = pool.in_client(f"""
from openai import OpenAI
client = OpenAI(base_url="{pool.inference_url}/v1", api_key="unused")
messages = [{{"role": "user", "content": "Hi"}}]
print(client.chat.completions.create(model="{GROUP}", messages=messages, max_tokens=8).choices[0].finish_reason)
""")
    assert answer.strip().splitlines()[-1] in ("stop", "length")

    helm(cluster, "install", RELEASE, str(REPO / "charts" / "paddler"), "-n", RELEASE_NS, "--wait", "--timeout", "5m")
    assert secret_data(cluster, RELEASE_NS, TOKEN_KEY_SECRET) == key
    assert pool.token() == pool_token
    wait_until(lambda: all_on(operator_images(cluster), {BALANCER_IMAGE}), timeout=180, what="operator back")
    wait_until(pool.settled, timeout=180, what="pool settled under the reinstalled operator")
    assert set(pool_images(pool)) == pool_pods, "a reinstall with the same key rolled the pool"
