"""The operator against a real control plane (kube-apiserver, controller-manager, etcd).

The operator runs as a real process (``python -m paddler_cli.main operator``) with
KUBECONFIG, watching one fresh namespace per test. Pods run nothing here, so pool
balancers are unreachable, except in the tests that point the operator (through
PADDLER_OPERATOR_BALANCER_URL_TEMPLATE) at a real local ``paddler balancer``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.harness import Processes
from tests.kubectl import wait_until

from .conftest import K8sCluster

pytestmark = pytest.mark.k8s

REPO = Path(__file__).resolve().parents[2]
TIMEOUT = 60.0

POOL = """
apiVersion: paddler.dev/v1alpha1
kind: LlmPool
metadata: {name: p}
spec: {}
"""

MODEL = """
apiVersion: paddler.dev/v1alpha1
kind: ModelDeployment
metadata: {name: m}
spec:
  poolRef: {name: p}
  model: {localPath: /models/smollm2.gguf}
"""


@dataclass(eq=False)
class OperatorProcess:
    popen: subprocess.Popen[str]
    lines: list[str] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def pump(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            with self._lock:
                self.lines.append(line.rstrip("\n"))

    def output(self) -> str:
        with self._lock:
            return "\n".join(self.lines)

    def count(self, needle: str) -> int:
        with self._lock:
            return sum(needle in line for line in self.lines)

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(20)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(10)


class Operators:
    """Starts ``paddler operator`` processes; stops them all at teardown."""

    def __init__(self, cluster: K8sCluster) -> None:
        self.cluster = cluster
        self.started: list[OperatorProcess] = []

    def start(
        self,
        namespace: str,
        balancer_url: str | None = None,
        kubeconfig: Path | None = None,
        extra_args: tuple[str, ...] = (),
    ) -> OperatorProcess:
        env = {**self.cluster.env, "PYTHONUNBUFFERED": "1"}
        if kubeconfig is not None:
            env["KUBECONFIG"] = str(kubeconfig)
        env.pop("PADDLER_OPERATOR_BALANCER_URL_TEMPLATE", None)
        if balancer_url is not None:
            env["PADDLER_OPERATOR_BALANCER_URL_TEMPLATE"] = balancer_url
        popen = subprocess.Popen(
            [sys.executable, "-m", "paddler_cli.main", "operator", "--namespace", namespace,
             "--resync-interval", "2", "--retry-max-delay", "4", *extra_args],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO,
        )  # fmt: skip
        proc = OperatorProcess(popen)
        threading.Thread(target=proc.pump, daemon=True).start()
        self.started.append(proc)
        wait_until(
            lambda: "paddler operator started" in proc.output() or popen.poll() is not None,
            timeout=30,
            what="operator start",
        )
        assert popen.poll() is None, proc.output()
        return proc

    def close(self) -> None:
        for proc in self.started:
            proc.stop()


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


def get(cluster: K8sCluster, ns: str, *what: str) -> Any:
    proc = cluster.kubectl_run("-n", ns, "get", "-o", "json", *what, check=False)
    return json.loads(proc.stdout) if proc.returncode == 0 else None


def condition(obj: Any, type_: str) -> tuple[str, str] | None:
    for c in ((obj or {}).get("status") or {}).get("conditions") or []:
        if c["type"] == type_:
            return c["status"], c["reason"]
    return None


def wait_condition(cluster: K8sCluster, ns: str, what: str, type_: str, expected: tuple[str, str]) -> Any:
    def probe() -> Any:
        obj = get(cluster, ns, what)
        return obj if condition(obj, type_) == expected else None

    try:
        return wait_until(probe, timeout=TIMEOUT, what=f"{what} {type_}={expected}")
    except AssertionError as err:
        raise AssertionError(f"{err}\nstatus: {json.dumps((get(cluster, ns, what) or {}).get('status'))}") from None


def wait_object(cluster: K8sCluster, ns: str, what: str, check: Callable[[Any], bool] = bool) -> Any:
    def probe() -> Any:
        obj = get(cluster, ns, what)
        return obj if obj is not None and check(obj) else None

    return wait_until(probe, timeout=TIMEOUT, what=what)


def args_of(deployment: Any) -> list[str]:
    args: list[str] = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    return args


def flag(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


OWNED = ["deployment/p-balancer", "service/p-inference", "service/p-management", "configmap/p-balancer"]


# --- CRDs -------------------------------------------------------------------------------


def test_crds_install_with_short_names_and_defaults(crds: K8sCluster, k8s_namespace: str) -> None:
    resources = crds.kubectl_run("api-resources", "--api-group=paddler.dev", "-o", "wide").stdout
    assert "lp" in resources
    assert "md" in resources
    # The API server publishes a changed CRD's OpenAPI a moment after it is Established.
    explained = wait_until(
        lambda: crds.kubectl_run("explain", "lp.spec.agent.slotsPerAgent", check=False).stdout,
        timeout=30,
        what="kubectl explain of the LlmPool schema",
    )
    assert "Concurrent sequences per agent pod" in explained
    crds.apply(POOL, namespace=k8s_namespace)  # spec: {} is a valid pool
    pool = get(crds, k8s_namespace, "lp/p")
    assert pool["spec"]["balancer"]["maxBufferedRequests"] == 30
    assert pool["spec"]["agent"]["slotsPerAgent"] == 4
    crds.apply(MODEL, namespace=k8s_namespace)  # poolRef + model source is enough
    md = get(crds, k8s_namespace, "md/m")
    assert md["spec"]["replicas"] == 1
    assert md["spec"]["inferenceParameters"]["contextSize"] == 8192
    assert md["spec"]["autoscaling"]["mode"] == "None"


BAD_MODELS = [
    (
        "spec: {poolRef: {name: p}, model: {localPath: /m.gguf, url: 'https://x.invalid/m.gguf'}}",
        "exactly one of huggingFace, url, localPath must be set",
    ),
    ("spec: {poolRef: {name: p}, model: {}}", "exactly one of huggingFace, url, localPath must be set"),
    ("spec: {poolRef: {name: p}}", "spec.model: Required value"),
    ("spec: {model: {localPath: /m.gguf}}", "spec.poolRef: Required value"),
    (
        "spec: {poolRef: {name: p}, model: {localPath: /m}, autoscaling: {minReplicas: 5, maxReplicas: 2}}",
        "minReplicas must be <= maxReplicas",
    ),
    ("spec: {poolRef: {name: p}, model: {localPath: /m}, autoscaling: {mode: Magic}}", 'Unsupported value: "Magic"'),
    ("spec: {poolRef: {name: p}, model: {localPath: /m}, slotsPerAgent: 0}", "greater than or equal to 1"),
    ("spec: {poolRef: {name: p}, model: {url: 'ftp://x/m.gguf'}}", "spec.model.url in body should match"),
    ("spec: {poolRef: {name: p}, model: {localPath: /m}, replicaz: 2}", 'unknown field "spec.replicaz"'),
]


@pytest.mark.parametrize(("spec", "message"), BAD_MODELS)
def test_invalid_model_deployments_are_rejected(crds: K8sCluster, k8s_namespace: str, spec: str, message: str) -> None:
    manifest = f"apiVersion: paddler.dev/v1alpha1\nkind: ModelDeployment\nmetadata: {{name: bad}}\n{spec}\n"
    proc = crds.kubectl_run("-n", k8s_namespace, "apply", "-f", "-", input=manifest, check=False)
    assert proc.returncode != 0
    assert message in proc.stderr, proc.stderr


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("spec: {balancer: {replicas: -1}}", "greater than or equal to 0"),
        (
            "spec: {balancer: {bufferedRequestTimeout: soon}}",
            "spec.balancer.bufferedRequestTimeout in body should match",
        ),
        ("spec: {balancer: {service: {type: Magic}}}", 'Unsupported value: "Magic"'),
        ("spec: {agent: {gpus: -1}}", "greater than or equal to 0"),
    ],
)
def test_invalid_pools_are_rejected(crds: K8sCluster, k8s_namespace: str, spec: str, message: str) -> None:
    manifest = f"apiVersion: paddler.dev/v1alpha1\nkind: LlmPool\nmetadata: {{name: bad}}\n{spec}\n"
    proc = crds.kubectl_run("-n", k8s_namespace, "apply", "-f", "-", input=manifest, check=False)
    assert proc.returncode != 0
    assert message in proc.stderr, proc.stderr


# --- reconcile ---------------------------------------------------------------------------


def test_pool_and_model_deployment_produce_owned_objects(operators: Operators, k8s_namespace: str) -> None:
    cluster, ns = operators.cluster, k8s_namespace
    operators.start(ns)
    cluster.apply(POOL + "---" + MODEL, namespace=ns)
    pool = wait_condition(cluster, ns, "lp/p", "Ready", ("False", "BalancerUnreachable"))
    assert condition(pool, "Progressing") == ("True", "BalancerUnreachable")
    assert condition(pool, "Degraded") == ("False", "AsExpected")
    assert pool["status"]["observedGeneration"] == pool["metadata"]["generation"]
    for what in OWNED:
        obj = wait_object(cluster, ns, what)
        owner = obj["metadata"]["ownerReferences"][0]
        assert (owner["kind"], owner["name"], owner["uid"], owner["controller"]) == (
            "LlmPool", "p", pool["metadata"]["uid"], True,
        )  # fmt: skip
    balancer = get(cluster, ns, "deployment/p-balancer")
    assert args_of(balancer)[2:5] == ["balancer", "--management-addr", "0.0.0.0:8060"]

    md = wait_condition(cluster, ns, "md/m", "Ready", ("False", "BalancerUnreachable"))
    agents = wait_object(cluster, ns, "deployment/m-agent")
    assert agents["metadata"]["ownerReferences"][0]["uid"] == md["metadata"]["uid"]
    args = args_of(agents)
    assert (flag(args, "--management-addr"), flag(args, "--slots"), flag(args, "--model-group")) == (
        f"p-management-peers.{ns}.svc:8060", "4", "m",  # the headless Service: every balancer replica
    )  # fmt: skip
    # The Deployment controller made a ReplicaSet and pods: the objects are real.
    wait_object(cluster, ns, "pods", lambda o: len(o["items"]) >= 2)
    events = get(cluster, ns, "events")["items"]
    reasons = {(e["involvedObject"]["kind"], e["reason"]) for e in events}
    assert ("LlmPool", "Created") in reasons
    assert ("ModelDeployment", "BalancerUnreachable") in reasons


def test_model_deployment_waits_for_its_pool(operators: Operators, k8s_namespace: str) -> None:
    cluster, ns = operators.cluster, k8s_namespace
    op = operators.start(ns)
    cluster.apply(MODEL, namespace=ns)
    md = wait_condition(cluster, ns, "md/m", "Ready", ("False", "PoolNotFound"))
    assert "LlmPool 'p' not found" in next(c["message"] for c in md["status"]["conditions"] if c["type"] == "Ready")
    assert get(cluster, ns, "deployment/m-agent") is None
    assert op.popen.poll() is None
    cluster.apply(POOL, namespace=ns)
    wait_object(cluster, ns, "deployment/m-agent")
    wait_condition(cluster, ns, "md/m", "Ready", ("False", "BalancerUnreachable"))


def test_changed_spec_applied_and_hand_edits_put_back(operators: Operators, k8s_namespace: str) -> None:
    cluster, ns = operators.cluster, k8s_namespace
    operators.start(ns)
    cluster.apply(POOL + "---" + MODEL, namespace=ns)
    wait_object(cluster, ns, "deployment/m-agent")
    wait_object(cluster, ns, "service/p-inference")

    cluster.kubectl_run("-n", ns, "patch", "lp/p", "--type=merge", "-p", '{"spec":{"agent":{"slotsPerAgent":2}}}')
    wait_object(cluster, ns, "deployment/m-agent", lambda d: flag(args_of(d), "--slots") == "2")
    cluster.kubectl_run("-n", ns, "patch", "md/m", "--type=merge", "-p", '{"spec":{"replicas":3}}')
    wait_object(cluster, ns, "deployment/m-agent", lambda d: d["spec"]["replicas"] == 3)

    hand_edit = {"spec": {"template": {"spec": {"containers": [{"name": "balancer", "args": ["hacked"]}]}}}}
    cluster.kubectl_run("-n", ns, "patch", "deployment/p-balancer", "--type=strategic", "-p", json.dumps(hand_edit))
    wait_object(cluster, ns, "deployment/p-balancer", lambda d: "balancer" in args_of(d))
    cluster.kubectl_run("-n", ns, "delete", "service/p-inference")
    wait_object(cluster, ns, "service/p-inference")
    cluster.kubectl_run(
        "-n", ns, "patch", "configmap/p-balancer", "--type=merge", "-p", '{"data":{"balancer.json":"{}"}}'
    )  # fmt: skip
    wait_object(cluster, ns, "configmap/p-balancer", lambda c: c["data"]["balancer.json"] != "{}")


def test_restarting_the_operator_creates_nothing_twice(operators: Operators, k8s_namespace: str) -> None:
    cluster, ns = operators.cluster, k8s_namespace
    first = operators.start(ns)
    cluster.apply(POOL + "---" + MODEL, namespace=ns)
    for what in [*OWNED, "deployment/m-agent"]:
        wait_object(cluster, ns, what)
    wait_condition(cluster, ns, "md/m", "Ready", ("False", "BalancerUnreachable"))
    wait_until(lambda: first.count("reconciled object=") >= 2, timeout=TIMEOUT, what="first passes")

    def snapshot() -> dict[str, Any]:
        """What a re-create or a real patch by the operator would change: uid, generation,
        and the operator's managedFields entries (a no-op patch leaves them alone; status
        updates by the Deployment controller or kwok do not touch them)."""
        out = {}
        for what in [*OWNED, "deployment/m-agent", "lp/p", "md/m"]:
            meta = get(cluster, ns, what)["metadata"]
            ours = sorted(
                (f.get("operation"), f.get("subresource", ""), f.get("time"))
                for f in meta.get("managedFields") or []
                if f.get("manager") == "paddler-operator"
            )
            out[what] = (meta["uid"], meta.get("generation"), ours)
        return out

    def created_events() -> int:
        return sum(e["reason"] == "Created" for e in get(cluster, ns, "events")["items"])

    # Let the first operator settle (its retries write nothing new), then swap it.
    settled: list[Any] = []

    def stable() -> bool:
        settled.append(snapshot())
        return len(settled) >= 3 and settled[-1] == settled[-3]

    wait_until(stable, timeout=TIMEOUT, interval=1.0, what="operator writes settled")
    before, events_before = snapshot(), created_events()
    first.stop()
    second = operators.start(ns)
    wait_until(
        lambda: second.count(f"reconciled object=LlmPool/{ns}/p") and second.count(f"ModelDeployment/{ns}/m ok="),
        timeout=TIMEOUT,
        what="the restarted operator's first passes",
    )
    assert snapshot() == before  # no object re-created, patched, or status rewritten
    assert created_events() == events_before
    assert "created object=" not in second.output()


def test_deleting_resources_garbage_collects(operators: Operators, k8s_namespace: str) -> None:
    cluster, ns = operators.cluster, k8s_namespace
    operators.start(ns)
    cluster.apply(POOL + "---" + MODEL, namespace=ns)
    for what in [*OWNED, "deployment/m-agent"]:
        wait_object(cluster, ns, what)
    cluster.kubectl_run("-n", ns, "delete", "md/m", "--wait=true", timeout=90)
    wait_until(lambda: get(cluster, ns, "deployment/m-agent") is None, timeout=TIMEOUT, what="agent Deployment GC")
    wait_until(
        lambda: not get(cluster, ns, "pods", "-l", "paddler.dev/model-deployment=m")["items"],
        timeout=TIMEOUT,
        what="agent pods GC",
    )
    assert get(cluster, ns, "deployment/p-balancer") is not None
    cluster.kubectl_run("-n", ns, "delete", "lp/p", "--wait=true", timeout=90)
    for what in OWNED:
        wait_until(gone(cluster, ns, what), timeout=TIMEOUT, what=f"{what} GC")


def gone(cluster: K8sCluster, ns: str, what: str) -> Callable[[], bool]:
    return lambda: get(cluster, ns, what) is None


def test_hpa_mode_makes_an_hpa_that_scales_to_zero(operators: Operators, k8s_namespace: str) -> None:
    cluster, ns = operators.cluster, k8s_namespace
    operators.start(ns)
    cluster.apply(POOL + "---" + MODEL, namespace=ns)
    wait_object(cluster, ns, "deployment/m-agent")
    patch = {"spec": {"autoscaling": {"mode": "HPA", "minReplicas": 0, "maxReplicas": 3}}}
    cluster.kubectl_run("-n", ns, "patch", "md/m", "--type=merge", "-p", json.dumps(patch))
    hpa = wait_object(cluster, ns, "hpa/m-agent")
    assert hpa["spec"]["minReplicas"] == 0
    assert hpa["metadata"]["ownerReferences"][0]["kind"] == "ModelDeployment"
    cluster.kubectl_run("-n", ns, "patch", "md/m", "--type=merge", "-p", '{"spec":{"autoscaling":{"mode":"None"}}}')
    wait_until(lambda: get(cluster, ns, "hpa/m-agent") is None, timeout=TIMEOUT, what="HPA removed")


# --- with a real balancer ------------------------------------------------------------------


def balancer_groups(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(f"{url}/api/v1/model_groups", timeout=5) as resp:
        return {g["name"]: g for g in json.load(resp)["model_groups"]}


def test_desired_state_arrives_at_a_real_balancer(operators: Operators, k8s_namespace: str, paddler: Processes) -> None:
    cluster, ns = operators.cluster, k8s_namespace
    balancer = paddler.balancer()
    operators.start(ns, balancer_url=balancer.management_url)
    cluster.apply(POOL + "---" + MODEL, namespace=ns)
    wait_condition(cluster, ns, "lp/p", "Ready", ("True", "BalancerReady"))

    group = wait_until(lambda: balancer_groups(balancer.management_url).get("m"), timeout=TIMEOUT, what="group m")
    assert group["owner"] == f"ModelDeployment/{ns}/m"
    assert group["desired_state"]["model"] == {"LocalToAgent": "/models/smollm2.gguf"}
    wait_condition(cluster, ns, "md/m", "Ready", ("False", "AgentsNotReady"))

    # An agent of the group connects (as the pods would): the deployment becomes Ready.
    paddler.agent(balancer, slots=4, name="agent-0", extra=("--model-group", "m"))
    md = wait_condition(cluster, ns, "md/m", "Ready", ("True", "AgentsReady"))
    assert (md["status"]["readyAgents"], md["status"]["slots"], md["status"]["agentsSummary"]) == (1, "4/4", "1/1")
    wait_object(cluster, ns, "lp/p", lambda p: p["status"]["readyAgents"] == 1)
    printed = cluster.kubectl_run("-n", ns, "get", "lp,md").stdout
    assert "AgentsReady" not in printed
    assert "4/4" in printed

    # A model swap through the custom resource reaches the balancer.
    cluster.kubectl_run(
        "-n", ns, "patch", "md/m", "--type=merge", "-p",
        '{"spec":{"model":{"localPath":"/models/other.gguf"},"inferenceParameters":{"temperature":0.1}}}',
    )  # fmt: skip
    wait_until(
        lambda: (
            balancer_groups(balancer.management_url)["m"]["desired_state"]["model"]
            == {"LocalToAgent": "/models/other.gguf"}
        ),
        timeout=TIMEOUT,
        what="swapped model on the balancer",
    )
    state = balancer_groups(balancer.management_url)["m"]["desired_state"]
    assert state["inference_parameters"]["temperature"] == 0.1

    # Deleting the ModelDeployment removes its model group from the balancer.
    cluster.kubectl_run("-n", ns, "delete", "md/m")
    wait_until(lambda: "m" not in balancer_groups(balancer.management_url), timeout=TIMEOUT, what="group removed")


def listed_models(inference_url: str) -> set[str]:
    with urllib.request.urlopen(f"{inference_url}/v1/models", timeout=5) as resp:
        return {m["id"] for m in json.load(resp)["data"]}


def test_model_group_of_a_model_deployment_deleted_while_the_operator_was_down_is_removed(
    operators: Operators, k8s_namespace: str, paddler: Processes
) -> None:
    cluster, ns = operators.cluster, k8s_namespace
    balancer = paddler.balancer()
    first = operators.start(ns, balancer_url=balancer.management_url)
    cluster.apply(POOL + "---" + MODEL, namespace=ns)
    wait_until(lambda: "m" in balancer_groups(balancer.management_url), timeout=TIMEOUT, what="group m")
    assert "m" in listed_models(balancer.inference_url)

    first.stop()
    cluster.kubectl_run("-n", ns, "delete", "md/m", "--wait=true", timeout=90)
    assert "m" in balancer_groups(balancer.management_url)  # nobody told the balancer

    second = operators.start(ns, balancer_url=balancer.management_url)
    wait_until(lambda: "m" not in listed_models(balancer.inference_url), timeout=TIMEOUT, what="group m removed")
    assert "orphan model group removed group=m" in second.output()
    reasons = [e["reason"] for e in get(cluster, ns, "events")["items"]]
    assert "ModelGroupRemoved" in reasons


EXEC_PLUGIN = """
import json, pathlib, sys
pathlib.Path(sys.argv[1]).open("a").write("run\\n")
json.dump({"apiVersion": "client.authentication.k8s.io/v1", "kind": "ExecCredential",
           "status": {"token": sys.argv[2]}}, sys.stdout)
"""


def test_operator_logged_in_by_a_kubeconfig_exec_plugin_reconciles(
    operators: Operators, k8s_namespace: str, tmp_path: Path
) -> None:
    """A kubeconfig whose user is an ``exec`` credential plugin (as EKS, GKE, AKS and OIDC
    logins are): the operator's requests and kopf's watches both use its token."""
    cluster, ns = operators.cluster, k8s_namespace
    admin = yaml.safe_load(cluster.kubeconfig.read_text())
    token = admin["users"][0]["user"]["token"]
    plugin, runs = tmp_path / "credential-plugin.py", tmp_path / "runs"
    plugin.write_text(EXEC_PLUGIN)
    user = {
        "exec": {
            "apiVersion": "client.authentication.k8s.io/v1",
            "command": sys.executable,
            "args": [str(plugin), str(runs), token],
            "interactiveMode": "Never",
        }
    }
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump({**admin, "users": [{"name": admin["users"][0]["name"], "user": user}]}))

    operators.start(ns, kubeconfig=kubeconfig)
    cluster.apply(POOL + "---" + MODEL, namespace=ns)
    for what in [*OWNED, "deployment/m-agent"]:
        wait_object(cluster, ns, what)
    wait_condition(cluster, ns, "md/m", "Ready", ("False", "BalancerUnreachable"))  # status written too
    assert len(runs.read_text().splitlines()) >= 2  # our client and kopf's login each ran it


def test_keda_mode_without_keda_is_degraded_not_crashed(operators: Operators, k8s_namespace: str) -> None:
    cluster, ns = operators.cluster, k8s_namespace
    op = operators.start(ns)
    cluster.apply(POOL + "---" + MODEL.replace("  model:", "  autoscaling: {mode: KEDA}\n  model:"), namespace=ns)
    md = wait_condition(cluster, ns, "md/m", "Degraded", ("True", "ApplyFailed"))
    message = next(c["message"] for c in md["status"]["conditions"] if c["type"] == "Degraded")
    assert "keda.sh/v1alpha1 ScaledObject is not served by this cluster" in message
    wait_object(cluster, ns, "deployment/m-agent", lambda d: "replicas" in d["spec"])
    assert op.popen.poll() is None


def test_liveness_endpoint(operators: Operators, k8s_namespace: str) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    operators.start(k8s_namespace, extra_args=("--liveness-endpoint", f"http://127.0.0.1:{port}/healthz"))

    def healthy() -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as resp:
                return bool(resp.status == 200)
        except OSError:
            return False

    wait_until(healthy, timeout=30, what="kopf liveness probe answers")


def test_builtin_autoscaler_wakes_from_zero_and_goes_back(
    operators: Operators, k8s_namespace: str, paddler: Processes
) -> None:
    cluster, ns = operators.cluster, k8s_namespace
    balancer = paddler.balancer("--buffered-request-timeout", "60s")
    operators.start(ns, balancer_url=balancer.management_url)
    builtin = "  autoscaling: {mode: Builtin, minReplicas: 0, maxReplicas: 3, scaleDownDelaySeconds: 3}\n  model:"
    cluster.apply(POOL + "---" + MODEL.replace("  model:", builtin), namespace=ns)
    wait_condition(cluster, ns, "md/m", "Ready", ("True", "ScaledToZero"))
    assert get(cluster, ns, "deployment/m-agent")["spec"]["replicas"] == 0

    answer: dict[str, Any] = {}

    def call() -> None:
        body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}).encode()
        request = urllib.request.Request(
            f"{balancer.inference_url}/v1/chat/completions", data=body, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=60) as resp:
            answer["status"] = resp.status

    thread = threading.Thread(target=call)
    thread.start()  # no agent: the balancer buffers it, the operator sees it and wakes the pool
    try:
        wait_object(cluster, ns, "deployment/m-agent", lambda d: d["spec"]["replicas"] == 1)
        md = get(cluster, ns, "md/m")
        assert md["status"]["bufferedRequests"] >= 0
        paddler.agent(balancer, slots=4, name="agent-0", extra=("--model-group", "m"))  # the pod comes up
    finally:
        thread.join(timeout=60)
    assert answer.get("status") == 200
    # Idle for scaleDownDelaySeconds: back to zero.
    wait_object(cluster, ns, "deployment/m-agent", lambda d: d["spec"]["replicas"] == 0)


def test_agents_parked_while_the_pool_is_gone(operators: Operators, k8s_namespace: str) -> None:
    cluster, ns = operators.cluster, k8s_namespace
    operators.start(ns)
    cluster.apply(POOL + "---" + MODEL, namespace=ns)
    wait_object(cluster, ns, "deployment/m-agent", lambda d: d["spec"]["replicas"] == 1)
    cluster.kubectl_run("-n", ns, "delete", "lp/p", "--wait=true", timeout=90)
    wait_condition(cluster, ns, "md/m", "Ready", ("False", "PoolNotFound"))
    wait_object(cluster, ns, "deployment/m-agent", lambda d: d["spec"]["replicas"] == 0)
    cluster.apply(POOL, namespace=ns)
    wait_object(cluster, ns, "deployment/m-agent", lambda d: d["spec"]["replicas"] == 1)
    wait_condition(cluster, ns, "md/m", "Ready", ("False", "BalancerUnreachable"))


LLAMA_SERVER_MODEL = """
apiVersion: paddler.dev/v1alpha1
kind: ModelDeployment
metadata: {name: m}
spec:
  poolRef: {name: p}
  model: {localPath: /models/smollm2.gguf}
  engine: llamaServer
  slotsPerAgent: 2
  llamaServer:
    image: registry.local/llama-server:cuda
    args: ["--flash-attn", "on"]
    gpus: 1
"""


def test_llama_server_engine_runs_the_server_beside_the_agent_in_one_pod(
    operators: Operators, k8s_namespace: str
) -> None:
    cluster, ns = operators.cluster, k8s_namespace
    operators.start(ns)
    cluster.apply(POOL + "---" + LLAMA_SERVER_MODEL, namespace=ns)
    deployment = wait_object(cluster, ns, "deployment/m-agent")
    template = deployment["spec"]["template"]["spec"]
    # llama-server is a native sidecar: an init container that restarts, stopped after the agent.
    containers = {c["name"]: c for c in [*template["containers"], *template["initContainers"]]}
    assert list(containers) == ["agent", "llama-server"]
    assert containers["llama-server"]["restartPolicy"] == "Always"
    agent, server = containers["agent"], containers["llama-server"]
    assert (flag(agent["args"], "--engine"), flag(agent["args"], "--llama-server-url")) == (
        "llama-server", "http://127.0.0.1:8080",
    )  # fmt: skip
    assert server["image"] == "registry.local/llama-server:cuda"
    assert (flag(server["args"], "--parallel"), flag(server["args"], "--model")) == ("2", "/models/smollm2.gguf")
    assert server["args"][-2:] == ["--flash-attn", "on"]
    assert server["resources"]["limits"]["nvidia.com/gpu"] == "1"  # the API server's quantity form
    assert "nvidia.com/gpu" not in agent["resources"].get("limits", {})
    # The Deployment controller made pods with both containers: the objects are real.
    pods = wait_object(
        cluster, ns, "pods", lambda o: any(p["metadata"]["name"].startswith("m-agent") for p in o["items"])
    )
    pod = next(p for p in pods["items"] if p["metadata"]["name"].startswith("m-agent"))
    assert [c["name"] for c in pod["spec"]["containers"]] == ["agent"]
    assert [c["name"] for c in pod["spec"]["initContainers"]] == ["llama-server"]
