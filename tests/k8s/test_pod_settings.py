"""Pod settings, images and tolerant parsing (issue 20) against a real API server.

The CRDs from ``crds/`` (their CEL rules pass the API server's cost budget when they install),
then the operator as a process: what reaches the pod templates of the Deployments it writes.
Pods run nothing here (kwok nodes), so only the objects are checked.
"""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
import yaml

from .conftest import K8sCluster
from .test_operator_cluster import (  # noqa: F401 - crds and operators are fixtures
    MODEL,
    REPO,
    Operators,
    crds,
    get,
    operators,
    wait_object,
)

pytestmark = pytest.mark.k8s

HF_TOKEN = {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}}}


def pool(spec: dict[str, Any]) -> str:
    return yaml.safe_dump(
        {"apiVersion": "paddler.dev/v1alpha1", "kind": "LlmPool", "metadata": {"name": "p"}, "spec": spec}
    )


def template(cluster: K8sCluster, ns: str, deployment: str) -> dict[str, Any]:
    found: dict[str, Any] = wait_object(cluster, ns, f"deployment/{deployment}")["spec"]["template"]
    return found


def container(pod: dict[str, Any], name: str) -> dict[str, Any]:
    found: dict[str, Any] = next(c for c in pod["spec"]["containers"] if c["name"] == name)
    return found


def test_env_from_a_secret_reaches_the_agent_container(operators: Operators, k8s_namespace: str) -> None:  # noqa: F811
    cluster, ns = operators.cluster, k8s_namespace
    operators.start(ns)
    cluster.apply(pool({"agent": {"pod": {"env": [HF_TOKEN]}}}) + "---" + MODEL, namespace=ns)
    assert HF_TOKEN in container(template(cluster, ns, "m-agent"), "agent")["env"]


def test_an_image_pull_secret_reaches_every_pod(operators: Operators, k8s_namespace: str) -> None:  # noqa: F811
    cluster, ns = operators.cluster, k8s_namespace
    operators.start(ns)
    secrets = {"pod": {"imagePullSecrets": [{"name": "regcred"}]}}
    cluster.apply(pool({"balancer": secrets, "agent": secrets}) + "---" + MODEL, namespace=ns)
    for deployment in ("p-balancer", "m-agent"):
        assert template(cluster, ns, deployment)["spec"]["imagePullSecrets"] == [{"name": "regcred"}]


def test_a_pod_template_patch_is_applied(operators: Operators, k8s_namespace: str) -> None:  # noqa: F811
    cluster, ns = operators.cluster, k8s_namespace
    operators.start(ns)
    patch = {"spec": {"dnsPolicy": "Default", "containers": [{"name": "balancer", "workingDir": "/tmp"}]}}
    cluster.apply(pool({"balancer": {"pod": {"podTemplatePatch": patch}}}), namespace=ns)
    pod = template(cluster, ns, "p-balancer")
    assert pod["spec"]["dnsPolicy"] == "Default"
    assert container(pod, "balancer")["workingDir"] == "/tmp"


def test_free_form_pod_fields_are_stored_as_written(crds: K8sCluster, k8s_namespace: str) -> None:  # noqa: F811
    affinity = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": []}}}
    crds.apply(
        pool({"agent": {"pod": {"affinity": affinity, "podSecurityContext": {"runAsNonRoot": True}}}}), k8s_namespace
    )
    stored = get(crds, k8s_namespace, "lp/p")["spec"]["agent"]["pod"]
    assert stored == {"affinity": affinity, "podSecurityContext": {"runAsNonRoot": True}}


def test_pod_labels_may_not_set_the_operators_labels(crds: K8sCluster, k8s_namespace: str) -> None:  # noqa: F811
    manifest = pool({"balancer": {"pod": {"labels": {"paddler.dev/component": "x"}}}})
    proc = crds.kubectl_run("-n", k8s_namespace, "apply", "-f", "-", input=manifest, check=False)
    assert proc.returncode != 0
    assert "labels may not set the operator's own labels" in proc.stderr, proc.stderr


def test_a_pool_stored_with_the_old_default_image_follows_the_operator(
    operators: Operators,  # noqa: F811
    k8s_namespace: str,
) -> None:
    """What the 0.1.0 CRD's defaulting stored counts as unset: the operator's --balancer-image wins."""
    cluster, ns = operators.cluster, k8s_namespace
    operators.start(ns, extra_args=("--balancer-image", "registry.local/balancer:9"))
    cluster.apply(pool({"balancer": {"image": "ghcr.io/paddler-k8s/balancer:0.1.0"}}), namespace=ns)
    assert container(template(cluster, ns, "p-balancer"), "balancer")["image"] == "registry.local/balancer:9"


def test_a_crd_with_an_unknown_field_is_still_reconciled(operators: Operators, k8s_namespace: str) -> None:  # noqa: F811
    """A CRD newer than the operator (a field it does not know) must not stop reconciling."""
    cluster, ns = operators.cluster, k8s_namespace
    original = cluster.get_json("crd/llmpools.paddler.dev")
    newer = copy.deepcopy(original)
    for key in ("resourceVersion", "uid", "creationTimestamp", "generation", "managedFields"):
        newer["metadata"].pop(key, None)
    newer.pop("status", None)
    spec_schema = newer["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    spec_schema["properties"]["futureField"] = {"type": "string", "description": "From a newer CRD."}
    cluster.kubectl_run("apply", "-f", "-", input=json.dumps(newer))
    try:
        operators.start(ns)
        cluster.apply(pool({"futureField": "on"}), namespace=ns)
        assert get(cluster, ns, "lp/p")["spec"]["futureField"] == "on"
        assert template(cluster, ns, "p-balancer")
    finally:
        cluster.kubectl_run("apply", "-f", str(REPO / "crds" / "paddler.dev_llmpools.yaml"))
