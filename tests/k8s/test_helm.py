"""The Helm chart: lint, render, validate offline (kubernetes-validate) and on a real
API server (server-side dry run), and run the operator with exactly the chart's RBAC."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml

from tests.kubectl import wait_until

from .conftest import K8sCluster
from .test_operator_cluster import MODEL, POOL, Operators, args_of, condition, get, wait_object

pytestmark = pytest.mark.k8s

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "paddler"
KUBE_VERSION = "1.34.0"

VALUE_SETS: dict[str, list[str]] = {
    "defaults": [],
    "namespaced": ["--set", "operator.watchNamespaces={team-a,team-b}"],
    "example-pool": [
        "--set", "examplePool.enabled=true",
        "--set-json", 'examplePool.spec={"agent":{"slotsPerAgent":2,"gpus":1}}',
    ],
    "prometheus-adapter-rules": ["--set", "prometheusAdapterRules.enabled=true"],
    "monitoring": [
        "--set", "monitoring.dashboard.enabled=true", "--set", "monitoring.prometheusRule.enabled=true",
        "--set", "monitoring.podMonitors=on", "--set", "networkPolicy.enabled=true",
        "--set", "networkPolicy.monitoringNamespaces={monitoring,keda}",
        "--set", "monitoring.podMonitorLabels.release=kps",
    ],
    "no-crds": ["--set", "crds.install=false"],
    "private-registry": [
        "--set", "imageRegistry=registry.example.com:5000/mirror", "--set", "images.agent.tag=0.1.0-cuda",
        "--set-json", 'rbac.readableSecrets=[{"namespace":"team-a","name":"own-token"}]',
    ],
    "no-rbac": ["--set", "rbac.create=false", "--set", "serviceAccount.create=false", "--set", "serviceAccount.name=x"],
    "no-leader-election": ["--set", "operator.leaderElection.enabled=false", "--set", "operator.replicas=1"],
}  # fmt: skip


def helm(cluster: K8sCluster) -> Path:
    path = cluster.helm or cluster.bin_dir / "helm"
    assert path.exists(), f"no helm binary at {path} (scripts/k8s/build.sh builds it)"
    return path


def run_helm(cluster: K8sCluster, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([str(helm(cluster)), *args], capture_output=True, text=True, timeout=120)
    if check and proc.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


def render(cluster: K8sCluster, *values: str, namespace: str = "paddler-system") -> list[dict[str, Any]]:
    """The release as on an upgrade: the API server already serves LlmPool (the example pool
    renders only then; Helm cannot create a CR in the release that brings its CRD)."""
    out = run_helm(
        cluster, "template", "rel", str(CHART), "--namespace", namespace,
        "--kube-version", KUBE_VERSION, "--api-versions", "paddler.dev/v1alpha1/LlmPool", *values,
    ).stdout  # fmt: skip
    return [d for d in yaml.safe_load_all(out) if d]


@pytest.mark.parametrize("values", sorted(VALUE_SETS))
def test_helm_lint_is_clean(k8s_cluster: K8sCluster, values: str) -> None:
    proc = run_helm(k8s_cluster, "lint", "--strict", str(CHART), *VALUE_SETS[values])
    assert "0 chart(s) failed" in proc.stdout
    assert "[WARNING]" not in proc.stdout
    assert "[ERROR]" not in proc.stdout


@pytest.mark.parametrize("values", sorted(VALUE_SETS))
def test_rendered_manifests_validate_against_kubernetes_schemas(k8s_cluster: K8sCluster, values: str) -> None:
    docs = render(k8s_cluster, *VALUE_SETS[values])
    kinds = [d["kind"] for d in docs]
    assert kinds.count("CustomResourceDefinition") == (0 if values == "no-crds" else 2)  # templates, not crds/
    assert "Deployment" in kinds
    for doc in docs:
        if doc["apiVersion"].startswith(("paddler.dev/", "monitoring.coreos.com/")):
            continue  # our own kinds: checked by the API server below; the prometheus-operator's
        kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)


def test_chart_installs_on_the_api_server(k8s_cluster: K8sCluster, k8s_namespace: str) -> None:
    """Server-side dry run: every object, the example LlmPool included (against our CRDs)."""
    k8s_cluster.kubectl_run("apply", "-f", str(REPO / "crds"))
    for name in ("llmpools.paddler.dev", "modeldeployments.paddler.dev"):
        k8s_cluster.kubectl_run("wait", "--for=condition=Established", f"crd/{name}", "--timeout=60s", timeout=90)
    docs = render(
        k8s_cluster, "--set", "examplePool.enabled=true", "--set", f"operator.watchNamespaces={{{k8s_namespace}}}",
        namespace=k8s_namespace,
    )  # fmt: skip
    manifest = yaml.safe_dump_all([d for d in docs if d["kind"] != "CustomResourceDefinition"])
    proc = k8s_cluster.kubectl_run("apply", "--dry-run=server", "-f", "-", input=manifest)
    assert "llmpool.paddler.dev/default created (server dry run)" in proc.stdout
    assert "deployment.apps/rel-paddler created (server dry run)" in proc.stdout


def test_values_schema_rejects_bad_values(k8s_cluster: K8sCluster) -> None:
    for args, message in [
        (["--set", "operator.logLevel=LOUD"], "value must be one of"),
        (["--set", "operator.watchNamespaces={Not_A_Namespace}"], "does not match pattern"),
        (["--set", "operatr.logLevel=INFO"], "additional properties 'operatr' not allowed"),
    ]:
        proc = run_helm(k8s_cluster, "template", "rel", str(CHART), *args, check=False)
        assert proc.returncode != 0
        assert message in proc.stderr, proc.stderr


def test_rbac_is_least_privilege(k8s_cluster: K8sCluster) -> None:
    docs = render(k8s_cluster)
    (role,) = [d for d in docs if d["kind"] == "ClusterRole"]
    granted: dict[str, set[str]] = {}
    for rule in role["rules"]:
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                granted.setdefault(f"{group}/{resource}", set()).update(rule["verbs"])
    text = json.dumps(role["rules"])
    assert '"*"' not in text
    assert not any(r.endswith(("/pods", "/nodes")) for r in granted)
    assert granted["/secrets"] == {"create"}  # pools' token Secrets: created, never read (the key is a mounted file)
    assert granted["networking.k8s.io/networkpolicies"] == {"get", "create", "patch", "delete"}  # by name, no list
    assert granted["/namespaces"] == {"list", "watch"}  # kopf follows namespaces; reads only
    assert granted["paddler.dev/llmpools"] == {"get", "list", "watch"}  # never writes specs
    assert granted["apps/deployments"] == {"get", "list", "watch", "create", "patch"}  # no delete: GC does it
    assert granted["/events"] == {"create"}
    namespaced = render(k8s_cluster, *VALUE_SETS["namespaced"])
    (framework,) = [d for d in namespaced if d["kind"] == "ClusterRole"]
    assert {v for r in framework["rules"] for v in r["verbs"]} == {"list", "watch"}  # read-only at cluster scope
    assert {r for rule in framework["rules"] for r in rule["resources"]} == {"customresourcedefinitions", "namespaces"}
    roles = sorted(d["metadata"]["namespace"] for d in namespaced if d["kind"] == "Role")
    assert roles == ["paddler-system", "team-a", "team-b"]  # the Lease's Role is in the operator's namespace
    (election,) = [d for d in docs if d["kind"] == "Role"]
    assert election["metadata"]["namespace"] == "paddler-system"
    assert {"coordination.k8s.io"} == {g for rule in election["rules"] for g in rule["apiGroups"]}
    assert {"leases"} == {r for rule in election["rules"] for r in rule["resources"]}
    by_verbs = {tuple(rule["verbs"]): rule.get("resourceNames") for rule in election["rules"]}
    assert by_verbs == {("create",): None, ("get", "update"): ["paddler-operator"]}  # one Lease, by name


def only(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def test_operator_replicas_with_leader_election_spread_and_a_disruption_budget(k8s_cluster: K8sCluster) -> None:
    docs = render(k8s_cluster)
    (deployment,) = only(docs, "Deployment")
    spec = deployment["spec"]
    assert spec["replicas"] == 2
    assert spec["strategy"]["type"] == "RollingUpdate"
    pod = spec["template"]["spec"]
    args = pod["containers"][0]["args"]
    assert "--leader-election" in args
    assert args[args.index("--leader-election-namespace") + 1] == "paddler-system"
    assert args[args.index("--leader-election-lease-name") + 1] == "paddler-operator"
    env = {e["name"]: e for e in pod["containers"][0]["env"]}
    assert env["POD_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    (term,) = pod["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    assert term["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
    assert term["podAffinityTerm"]["labelSelector"]["matchLabels"] == spec["selector"]["matchLabels"]
    (budget,) = only(docs, "PodDisruptionBudget")
    assert budget["spec"]["maxUnavailable"] == 1
    assert budget["spec"]["selector"] == spec["selector"]
    assert [r["metadata"]["name"] for r in only(docs, "RoleBinding")] == ["rel-paddler-leader-election"]


def test_without_leader_election_one_operator_is_replaced_not_doubled(k8s_cluster: K8sCluster) -> None:
    docs = render(k8s_cluster, *VALUE_SETS["no-leader-election"])
    (deployment,) = only(docs, "Deployment")
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    assert "--leader-election" not in args_of(deployment)
    assert "affinity" not in deployment["spec"]["template"]["spec"]
    assert not only(docs, "PodDisruptionBudget")
    assert not only(docs, "Role")
    # replicas: 2 (the default) without an election
    args = ("--kube-version", KUBE_VERSION, "--set", "operator.leaderElection.enabled=false")
    proc = run_helm(k8s_cluster, "template", "rel", str(CHART), *args, check=False)
    assert proc.returncode != 0
    assert "operator.replicas > 1 needs operator.leaderElection.enabled" in proc.stderr


def test_operator_runs_with_exactly_the_charts_rbac(
    k8s_cluster: K8sCluster, k8s_namespace: str, tmp_path: Path
) -> None:
    cluster, ns = k8s_cluster, k8s_namespace
    cluster.kubectl_run("apply", "-f", str(REPO / "crds"))
    for name in ("llmpools.paddler.dev", "modeldeployments.paddler.dev"):
        cluster.kubectl_run("wait", "--for=condition=Established", f"crd/{name}", "--timeout=60s", timeout=90)
    docs = render(cluster, "--set", f"operator.watchNamespaces={{{ns}}}", namespace=ns)
    rbac = [
        d for d in docs if d["kind"] in ("ServiceAccount", "Role", "RoleBinding", "ClusterRole", "ClusterRoleBinding")
    ]
    assert len(rbac) == 7  # with the leader election's Role and RoleBinding
    cluster.apply(yaml.safe_dump_all(rbac))
    token = cluster.kubectl_run("-n", ns, "create", "token", "rel-paddler", "--duration=1h").stdout.strip()
    admin = yaml.safe_load(cluster.kubectl_run("config", "view", "--raw", "--minify").stdout)
    kubeconfig = tmp_path / "operator-kubeconfig"
    kubeconfig.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "c", "cluster": admin["clusters"][0]["cluster"]}],
                "users": [{"name": "operator", "user": {"token": token}}],
                "contexts": [{"name": "c", "context": {"cluster": "c", "user": "operator", "namespace": ns}}],
                "current-context": "c",
            }
        )
    )
    kubeconfig.chmod(0o600)

    operators = Operators(cluster)
    try:
        op = operators.start(ns, kubeconfig=kubeconfig, extra_args=("--leader-election",))  # as the chart runs it
        wait_until(lambda: op.count("leader acquired identity="), timeout=30, what="the Lease")
        cluster.apply(POOL + "---" + MODEL, namespace=ns)
        for what in ("deployment/p-balancer", "service/p-inference", "configmap/p-balancer", "deployment/m-agent"):
            wait_object(cluster, ns, what)
        wait_object(cluster, ns, "md/m", lambda o: condition(o, "Ready") == ("False", "BalancerUnreachable"))
        wait_object(cluster, ns, "lp/p", lambda o: condition(o, "Ready") == ("False", "BalancerUnreachable"))
        events = get(cluster, ns, "events", "--field-selector", "involvedObject.kind=LlmPool")["items"]
        assert any(e["reason"] == "Created" for e in events)
        # Hand edits are put back with these permissions too.
        cluster.kubectl_run("-n", ns, "delete", "service/p-management")
        wait_object(cluster, ns, "service/p-management")
        wait_until(lambda: op.count("reconciled object=") >= 2, timeout=30, what="passes")
        output = op.output()
        assert "Forbidden" not in output, output[-3000:]
        assert " 403 " not in output, output[-3000:]
        assert_operator_reads_no_secret(cluster, ns)
    finally:
        operators.close()


def assert_operator_reads_no_secret(cluster: K8sCluster, ns: str) -> None:
    """The operator made the pool's token Secret and can read neither it nor any other Secret:
    asked (``kubectl auth can-i``) and tried (real reads as its ServiceAccount)."""
    token_secrets = "-lpaddler.dev/pool=p,paddler.dev/component=management-token"
    (own,) = get(cluster, ns, "secrets", token_secrets)["items"]
    cluster.kubectl_run("-n", ns, "create", "secret", "generic", "someone-elses", "--from-literal=password=hunter2")
    account = f"system:serviceaccount:{ns}:rel-paddler"
    for verb, target in [("get", "secret/someone-elses"), ("get", f"secret/{own['metadata']['name']}"),
                         ("list", "secrets"), ("watch", "secrets"), ("create", "secrets")]:  # fmt: skip
        proc = cluster.kubectl_run("-n", ns, "auth", "can-i", verb, target, f"--as={account}", check=False)
        assert proc.stdout.strip() == ("yes" if verb == "create" else "no"), (verb, target, proc.stdout)
    for name in ("someone-elses", own["metadata"]["name"]):
        read = cluster.kubectl_run("-n", ns, "get", "secret", name, "-o", "json", f"--as={account}", check=False)
        assert read.returncode != 0, read.stdout[:200]
        assert "Forbidden" in read.stderr
        assert "aHVudGVyMg" not in read.stdout  # hunter2, base64
