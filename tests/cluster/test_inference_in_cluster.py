"""The product on a real node: the chart's operator in-cluster, a pool of the project's
images serving SmolLM2 from the model image, clients in a pod calling the inference
Service by its DNS name.

One Helm release, pool and client pod for the module (a pod start costs seconds on
two cores); the scenarios that break things (agent pod deleted, ModelDeployment
deleted) run last, in file order.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from paddler_client.inference_message import parse_inference_client_message

from tests.kubectl import wait_until

from .clients import ClientRun, client_pod, stream_load_script, wait_for_client
from .conftest import (
    BALANCER_IMAGE,
    LLAMA_SERVER_MODEL_IMAGE,
    MODEL_IMAGE,
    MODEL_PATH,
    NODE_NAMES,
    RELEASE,
    RELEASE_NS,
    STATE,
    Cluster,
)
from .namespaces import scenario_namespace

pytestmark = pytest.mark.cluster

POOL = "p"
# Named `default`: the native API (/api/v1/...) serves the default model group; the
# OpenAI `model` field names the same group.
GROUP = "default"
QUESTION = "What is the capital of France? Answer in one sentence."
MAX_TOKENS = 32
MD_LABEL = "paddler.dev/model-deployment"


@dataclass(frozen=True)
class Pool:
    cluster: Cluster
    namespace: str

    @property
    def inference_url(self) -> str:
        return f"http://{POOL}-inference.{self.namespace}.svc:8061"

    @property
    def management_url(self) -> str:
        return f"http://{POOL}-management.{self.namespace}.svc:8060"

    def in_client(self, script: str, timeout: float = 300) -> str:
        return self.cluster.exec_python(self.namespace, "client", script, timeout=timeout)

    def management_token(self) -> str:
        """The pool's management token, from the Secret the operator made for it."""
        return self.cluster.pool_management_token(self.namespace, POOL)

    def agent_pods(self) -> list[dict[str, Any]]:
        pods: list[dict[str, Any]] = self.cluster.get_json("-n", self.namespace, "pods", "-l", f"{MD_LABEL}={GROUP}")[
            "items"
        ]
        return [p for p in pods if not p["metadata"].get("deletionTimestamp")]


def manifests(namespace: str) -> str:
    return f"""
apiVersion: paddler.dev/v1alpha1
kind: LlmPool
metadata: {{name: {POOL}, namespace: {namespace}}}
spec:
  balancer:
    bufferedRequestTimeout: 180s
  agent:
    image: {MODEL_IMAGE}
    slotsPerAgent: 4
    resources: {{requests: {{cpu: 500m, memory: 512Mi}}}}
---
apiVersion: paddler.dev/v1alpha1
kind: ModelDeployment
metadata: {{name: {GROUP}, namespace: {namespace}}}
spec:
  poolRef: {{name: {POOL}}}
  model: {{localPath: {MODEL_PATH}}}
  # Greedy, no penalties: the answer can be compared with llama-cpp-python's own.
  inferenceParameters:
    {{contextSize: 2048, temperature: 0, penaltyRepeat: 1.0, penaltyPresence: 0, penaltyFrequency: 0}}
""" + client_pod(namespace)


def record(title: str, text: str) -> None:
    """Keep what the tier saw in .k8s/cluster/transcript.txt (docs/kubernetes.md quotes it)."""
    with (STATE / "transcript.txt").open("a") as fh:
        fh.write(f"### {title}\n{text.rstrip()}\n\n")


def ready_condition(obj: dict[str, Any]) -> str | None:
    for c in obj.get("status", {}).get("conditions", []):
        if c["type"] == "Ready":
            return str(c["status"])
    return None


@pytest.fixture(scope="module")
def pool(cluster: Cluster, release: str) -> Iterator[Pool]:
    with scenario_namespace(cluster, "cl") as namespace:
        cluster.apply(manifests(namespace), namespace)
        wait_until(
            lambda: ready_condition(cluster.get_json("-n", namespace, "md", GROUP)) == "True",
            timeout=300,
            what="ModelDeployment Ready (balancer and agent pods up, model loaded)",
        )
        wait_for_client(cluster, namespace)
        yield Pool(cluster, namespace)


@pytest.fixture(scope="module")
def reference_answer(pool: Pool) -> str:
    """llama-cpp-python's own greedy chat completion, run in the agent pod (same image,
    same llama.cpp build, same GGUF): what the served answer must equal."""
    (agent,) = pool.agent_pods()
    script = f"""
import llama_cpp
llm = llama_cpp.Llama(model_path="{MODEL_PATH}", n_ctx=2048, n_threads=1, verbose=False)
out = llm.create_chat_completion(
    messages=[{{"role": "user", "content": {QUESTION!r}}}],
    temperature=0.0, top_k=1, repeat_penalty=1.0, max_tokens={MAX_TOKENS},
)
print(out["choices"][0]["message"]["content"], end="")
"""
    proc = pool.cluster.kubectl_run(
        "-n", pool.namespace, "exec", agent["metadata"]["name"], "--", "python", "-c", script, timeout=180,
    )  # fmt: skip
    assert proc.stdout.strip(), proc.stderr
    return proc.stdout


def test_helm_runs_the_operator_on_the_node_under_the_chart_rbac(cluster: Cluster, release: str) -> None:
    pods = cluster.get_json("-n", RELEASE_NS, "pods", "-l", "app.kubernetes.io/name=paddler-operator")["items"]
    assert len(pods) == 2  # one leads (holds the Lease), one stands by
    lease = cluster.get_json("-n", RELEASE_NS, "lease", "paddler-operator")
    assert lease["spec"]["holderIdentity"] in {p["metadata"]["name"] for p in pods}
    pod = pods[0]
    assert pod["status"]["phase"] == "Running"
    assert pod["spec"]["nodeName"] in NODE_NAMES
    assert pod["spec"]["containers"][0]["image"] == BALANCER_IMAGE  # the chart's default image
    assert pod["spec"]["serviceAccountName"] == RELEASE
    assert pod["spec"]["containers"][0]["securityContext"]["readOnlyRootFilesystem"] is True
    can = cluster.kubectl_run(
        "auth",
        "can-i",
        "create",
        "deployments",
        f"--as=system:serviceaccount:{RELEASE_NS}:{RELEASE}",
        "-A",
        check=False,
    )
    assert can.stdout.strip() == "yes"
    cannot = cluster.kubectl_run(
        "auth", "can-i", "list", "secrets", f"--as=system:serviceaccount:{RELEASE_NS}:{RELEASE}", "-A", check=False
    )
    assert cannot.stdout.strip() == "no"


def test_pool_and_model_deployment_report_ready_with_four_slots(pool: Pool) -> None:
    def rows() -> tuple[str, dict[str, list[str]]]:
        out = pool.cluster.kubectl_run("-n", pool.namespace, "get", "lp,md").stdout
        return out, {line.split()[0]: line.split() for line in out.splitlines() if line and not line.startswith("NAME")}

    # The pool's status is written by its own reconcile, which may come a few seconds after
    # the ModelDeployment's: wait for it (bounded) instead of reading it once.
    def pool_caught_up() -> bool:
        return rows()[1][f"llmpool.paddler.dev/{POOL}"][1:5] == ["True", "1/1", "1", "4/4"]

    with contextlib.suppress(AssertionError):
        wait_until(pool_caught_up, timeout=60, what="the LlmPool's status shows the agent")
    printed, lines = rows()
    record("kubectl get pods,lp,md", pool.cluster.kubectl_run("-n", pool.namespace, "get", "pods,lp,md").stdout)
    lp = lines[f"llmpool.paddler.dev/{POOL}"]
    md = lines[f"modeldeployment.paddler.dev/{GROUP}"]
    assert lp[1:5] == ["True", "1/1", "1", "4/4"], printed
    assert md[1:5] == [POOL, "True", "1/1", "4/4"], printed
    assert md[6] == MODEL_PATH, printed
    for p in pool.cluster.get_json("-n", pool.namespace, "pods")["items"]:
        assert p["spec"]["nodeName"] in NODE_NAMES
        assert p["status"]["phase"] == "Running"


def test_openai_sdk_in_a_pod_streams_a_chat_through_the_inference_service(pool: Pool, reference_answer: str) -> None:
    script = f"""
import json
from openai import OpenAI
client = OpenAI(base_url="{pool.inference_url}/v1", api_key="unused", max_retries=0, timeout=120)
stream = client.chat.completions.create(
    model="{GROUP}", messages=[{{"role": "user", "content": {QUESTION!r}}}],
    max_tokens={MAX_TOKENS}, temperature=0, stream=True,
)
chunks = [c for c in stream]
text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
print(json.dumps({{"text": text, "chunks": len(chunks), "finish": finish}}))
"""
    answer = json.loads(pool.in_client(script).strip().splitlines()[-1])
    record("openai SDK in the client pod (streamed chat)", script + "\n# ->\n" + json.dumps(answer))
    assert answer["chunks"] > 2  # streamed token by token
    assert answer["text"] == reference_answer
    assert answer["finish"] in (["length"], ["stop"])


def test_curl_in_a_pod_streams_ndjson_from_the_native_api(pool: Pool, reference_answer: str) -> None:
    body = json.dumps(
        {
            "add_generation_prompt": True,
            "conversation_history": [{"role": "user", "content": QUESTION}],
            "enable_thinking": False,
            "max_tokens": MAX_TOKENS,
        }
    )
    proc = pool.cluster.kubectl_run(
        "-n", pool.namespace, "exec", "client", "--",
        "curl", "-sS", "-N", "--fail-with-body", "--max-time", "120", "-H", "Content-Type: application/json",
        "-d", body, f"{pool.inference_url}/api/v1/continue_from_conversation_history",
        timeout=150,
    )  # fmt: skip
    record(
        "curl in the client pod (native NDJSON API)",
        f"curl -N -d '{body}' {pool.inference_url}/api/v1/continue_from_conversation_history\n{proc.stdout}",
    )
    messages = [parse_inference_client_message(line) for line in proc.stdout.splitlines() if line.strip()]
    assert len(messages) > 2, proc.stdout
    assert messages[-1].is_done, proc.stdout
    assert "".join(m.token or "" for m in messages if m.is_token) == reference_answer


def test_llama_server_engine_pod_runs_the_server_beside_the_agent_and_answers_through_the_service(
    pool: Pool,
) -> None:
    """`engine: llamaServer`: each agent pod runs llama.cpp's own llama-server (the image
    `make images` builds from the tests' cached binary, with SmolLM2 inside) beside the
    agent; the group is Ready with the server's slots, and a client pod gets the server's
    own greedy answer through the pool's inference Service."""
    cluster, ns, group, slots = pool.cluster, pool.namespace, "smollm2-server", 2
    cluster.apply(
        f"""
apiVersion: paddler.dev/v1alpha1
kind: ModelDeployment
metadata: {{name: {group}}}
spec:
  poolRef: {{name: {POOL}}}
  engine: llamaServer
  model: {{localPath: {MODEL_PATH}}}
  slotsPerAgent: {slots}
  inferenceParameters:
    {{contextSize: 2048, temperature: 0, penaltyRepeat: 1.0, penaltyPresence: 0, penaltyFrequency: 0}}
  llamaServer:
    image: {LLAMA_SERVER_MODEL_IMAGE}
    imagePullPolicy: Never
    # One thread: two spin on each other's barrier on a busy 2-core node.
    args: [--threads, "1"]
    resources: {{requests: {{cpu: 500m, memory: 512Mi}}}}
""",
        ns,
    )
    try:
        wait_until(
            lambda: ready_condition(cluster.get_json("-n", ns, "md", group)) == "True",
            timeout=300,
            what=f"ModelDeployment {group} Ready (llama-server loaded the model, the agent reports its slots)",
        )

        def pods() -> list[dict[str, Any]]:
            found: list[dict[str, Any]] = cluster.get_json("-n", ns, "pods", "-l", f"{MD_LABEL}={group}")["items"]
            return [p for p in found if not p["metadata"].get("deletionTimestamp")]

        # The kubelet's readiness probe of the agent (/ready, which asks llama-server's /health;
        # every 5 s) may trail the agent's own report, which made the group Ready.
        (pod,) = wait_until(
            lambda: [p for p in pods() if all(c["ready"] for c in p["status"].get("containerStatuses", [{}]))],
            timeout=60,
            what="the agent container ready",
        )
        name = pod["metadata"]["name"]
        images = {c["name"]: c["image"] for c in pod["spec"]["containers"]}
        assert images == {"agent": BALANCER_IMAGE}
        # llama-server is a native sidecar: started before the agent, stopped after its drain.
        (sidecar,) = pod["spec"]["initContainers"]
        assert (sidecar["name"], sidecar["image"], sidecar["restartPolicy"]) == (
            "llama-server",
            LLAMA_SERVER_MODEL_IMAGE,
            "Always",
        )
        assert [s["started"] for s in pod["status"]["initContainerStatuses"]] == [True]
        row = next(
            line.split()
            for line in cluster.kubectl_run("-n", ns, "get", "md", group).stdout.splitlines()
            if line.startswith(group)
        )
        assert row[1:5] == [POOL, "True", "1/1", f"{slots}/{slots}"], row
        record(
            "engine: llamaServer, kubectl get pods,md",
            cluster.kubectl_run("-n", ns, "get", "pods,md", "-o", "wide").stdout,
        )

        prompt = "The three primary colors are"
        script = f"""
import json
from openai import OpenAI
client = OpenAI(base_url="{pool.inference_url}/v1", api_key="unused", max_retries=0, timeout=120)
completion = client.completions.create(model="{group}", prompt={prompt!r}, max_tokens=16, temperature=0)
stream = client.chat.completions.create(
    model="{group}", messages=[{{"role": "user", "content": {QUESTION!r}}}],
    max_tokens={MAX_TOKENS}, temperature=0, stream=True,
)
chat = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
print(json.dumps({{"completion": completion.choices[0].text, "chat": chat}}))
"""
        answer = json.loads(pool.in_client(script).strip().splitlines()[-1])
        record("engine: llamaServer, openai SDK in the client pod", script + "\n# ->\n" + json.dumps(answer))
        # The server's own answer to the same prompt, asked on the pod's loopback (the
        # image's base has python3).
        direct_script = f"""
import json, urllib.request
body = {{"prompt": {prompt!r}, "n_predict": 16, "temperature": 0.0, "repeat_penalty": 1.0, "presence_penalty": 0.0}}
request = urllib.request.Request("http://127.0.0.1:8080/completion", data=json.dumps(body).encode())
with urllib.request.urlopen(request, timeout=120) as r:
    print(json.load(r)["content"], end="")
"""
        direct = cluster.kubectl_run(
            "-n", ns, "exec", name, "-c", "llama-server", "--", "python3", "-c", direct_script, timeout=150
        ).stdout
        assert answer["completion"]
        assert answer["completion"] == direct
        assert "Paris" in answer["chat"], answer

        # The pod deleted mid-stream: the agent drains the request while its sidecar keeps
        # serving it (Kubernetes stops llama-server only after the agent container exited).
        streaming = ClientRun.start(
            cluster,
            ns,
            stream_load_script(
                pool.inference_url, group, "sidecar", workers=1, max_tokens=160, max_seconds=240, each=1
            ),
        )
        watch = f"""
import json, time, urllib.request
deadline = time.monotonic() + 120
while time.monotonic() < deadline:
    request = urllib.request.Request(
        "{pool.management_url}/api/v1/agents", headers={{"Authorization": "Bearer {pool.management_token()}"}}
    )
    with urllib.request.urlopen(request, timeout=30) as r:
        if any(a["name"] == "{name}" and a["slots_in_flight"] >= 1 for a in json.load(r)["agents"]):
            print("in flight")
            break
    time.sleep(0.1)
"""
        assert "in flight" in pool.in_client(watch, timeout=150)
        cluster.kubectl_run("-n", ns, "delete", "pod", name, "--wait=false")
        (drained,) = streaming.finish(timeout=180)
        record("engine: llamaServer, pod deleted mid-stream", json.dumps(drained))
        assert drained["ok"], drained
    finally:
        cluster.kubectl_run("-n", ns, "delete", "md", group, "--wait=false", check=False)
        wait_until(
            lambda: not cluster.get_json("-n", ns, "pods", "-l", f"{MD_LABEL}={group}")["items"],
            timeout=180,
            what="the llama-server pods collected",
        )


def chat_requests_script(pool: Pool, count: int, max_tokens: int) -> str:
    """`count` chat requests at once (one thread each), one JSON line per answer."""
    return f"""
import json, threading, time
from openai import OpenAI
client = OpenAI(base_url="{pool.inference_url}/v1", api_key="unused", max_retries=0, timeout=300)
lock = threading.Lock()
def emit(answer):
    with lock:  # one whole line per answer
        print(json.dumps(answer), flush=True)
def one(i):
    t0 = time.monotonic()
    try:
        r = client.chat.completions.create(
            model="{GROUP}", messages=[{{"role": "user", "content": f"Count from 1 to 20, request {{i}}."}}],
            max_tokens={max_tokens}, temperature=0,
        )
        emit({{"i": i, "ok": bool(r.choices[0].message.content), "s": time.monotonic() - t0}})
    except Exception as err:
        emit({{"i": i, "ok": False, "error": repr(err)[:300], "s": time.monotonic() - t0}})
threads = [threading.Thread(target=one, args=(i,)) for i in range({count})]
for t in threads:
    t.start()
for t in threads:
    t.join()
"""


def test_agent_pod_deleted_with_requests_waiting_answers_them_all_on_the_new_pod(pool: Pool) -> None:
    """The agent pod is deleted with one request in flight on it; several requests sent
    while the group has no agent all wait in the balancer's buffer at once
    (`bufferedRequestTimeout: 180s`) and are all answered once the Deployment's
    replacement pod has loaded the model. Only the request in flight on the killed pod
    may fail (the agent drains on SIGTERM, so it normally does not).

    The node is cordoned while the pod is replaced, so the replacement stays Pending
    until the requests are seen waiting (on a quiet node it serves within seconds: the
    window would be a race); uncordoned, it is scheduled, loads SmolLM2 and serves them."""
    waiting = 6
    token = pool.management_token()
    probe = f"""
import json, urllib.request
def get(path):
    request = urllib.request.Request("{pool.management_url}" + path, headers={{"Authorization": "Bearer {token}"}})
    with urllib.request.urlopen(request, timeout=30) as r:
        return json.load(r)
print(json.dumps({{"agents": [a for a in get("/api/v1/agents")["agents"] if a["model_group"] == "{GROUP}"],
                   "buffered": get("/api/v1/buffered_requests")["buffered_requests_current"]}}))
"""

    def balancer() -> dict[str, Any]:
        seen: dict[str, Any] = json.loads(pool.in_client(probe).strip().splitlines()[-1])
        return seen

    # A long answer (a count does not stop early at temperature 0): in flight for tens of
    # seconds even on a quiet node (300 tokens took 6.6 s there; the probe below is ~1 s).
    # Longer than the agent's 50 s drain on a slow node: then it is the one that may fail.
    long_script = f"""
import json, time
from openai import OpenAI
client = OpenAI(base_url="{pool.inference_url}/v1", api_key="unused", max_retries=0, timeout=300)
t0 = time.monotonic()
try:
    r = client.completions.create(model="{GROUP}", prompt="1, 2, 3, 4, 5,", max_tokens=1200, temperature=0)
    tokens = r.usage.completion_tokens if r.usage else 0
    print(json.dumps({{"ok": bool(r.choices[0].text), "tokens": tokens, "s": time.monotonic() - t0}}))
except Exception as err:
    print(json.dumps({{"ok": False, "error": repr(err)[:300], "s": time.monotonic() - t0}}))
"""
    (old,) = pool.agent_pods()
    old_name = old["metadata"]["name"]
    cluster = pool.cluster
    in_flight = ClientRun.start(pool.cluster, pool.namespace, long_script)
    waiters: ClientRun | None = None
    cordoned = False
    try:
        # Polled inside the client pod every 0.1 s: one `kubectl exec` per look takes seconds
        # on a busy 2-core node and can miss the whole request.
        watch = f"""
import json, time, urllib.request
deadline = time.monotonic() + 120
while time.monotonic() < deadline:
    headers = {{"Authorization": "Bearer {token}"}}
    request = urllib.request.Request("{pool.management_url}/api/v1/agents", headers=headers)
    with urllib.request.urlopen(request, timeout=30) as r:
        agents = json.load(r)["agents"]
    if any(a["name"] == "{old_name}" and a["slots_in_flight"] >= 1 for a in agents):
        print("in flight")
        break
    time.sleep(0.1)
"""
        assert "in flight" in pool.in_client(watch, timeout=150), (in_flight.results, in_flight.stderr())
        cluster.kubectl_run("cordon", *NODE_NAMES)
        cordoned = True
        cluster.kubectl_run("-n", pool.namespace, "delete", "pod", old_name, "--wait=false")
        # The killed agent takes no new request (it reports no slots at once, then leaves).
        wait_until(
            lambda: not any(a["slots_total"] > a["slots_in_flight"] for a in balancer()["agents"]),
            timeout=60,
            what="no agent with a free slot",
        )
        waiters = ClientRun.start(pool.cluster, pool.namespace, chat_requests_script(pool, waiting, max_tokens=48))

        def all_waiting() -> int | None:
            buffered = int(balancer()["buffered"])
            return buffered if buffered >= waiting else None

        peak = wait_until(all_waiting, timeout=60, what=f"{waiting} requests waiting in the buffer at once")
        (pending,) = [p for p in pool.agent_pods() if p["metadata"]["name"] != old_name]
        assert pending["status"]["phase"] == "Pending"  # not scheduled: nothing served them yet
        assert waiters.count() == 0
        cluster.kubectl_run("uncordon", *NODE_NAMES)
        cordoned = False
        wait_until(
            lambda: any(
                c["type"] == "Ready" and c["status"] == "True"
                for p in pool.agent_pods()
                if p["metadata"]["name"] == pending["metadata"]["name"]
                for c in p["status"].get("conditions", [])
            ),
            timeout=240,
            what="the replacement agent pod Ready",
        )
        answered = waiters.finish(timeout=300)
        first = in_flight.finish(timeout=120)
    finally:
        if cordoned:
            cluster.kubectl_run("uncordon", *NODE_NAMES, check=False)
        in_flight.stop()
        if waiters is not None:
            waiters.stop()
    new_name = pending["metadata"]["name"]
    record(
        "agent pod deleted with requests waiting",
        f"deleted {old_name} with 1 request in flight; {peak} requests buffered at once; "
        f"replacement {new_name}\nin flight: {json.dumps(first)}\nwaiting: {json.dumps(answered)}",
    )
    assert peak == waiting
    assert len(answered) == waiting, answered
    assert all(r["ok"] for r in answered), answered
    assert len(first) == 1  # answered or failed, but not lost
    # The old agent leaves once its in-flight request is done: the new pod served the rest.
    wait_until(
        lambda: [a["name"] for a in balancer()["agents"]] == [new_name],
        timeout=90,
        what="only the replacement agent on the balancer",
    )


def test_deleting_a_model_deployment_collects_its_agents_and_the_balancer_forgets_its_group(pool: Pool) -> None:
    # A second model group beside `default` (which the balancer always lists).
    cluster, group = pool.cluster, "smollm2"
    cluster.apply(
        f"""
apiVersion: paddler.dev/v1alpha1
kind: ModelDeployment
metadata: {{name: {group}}}
spec:
  poolRef: {{name: {POOL}}}
  model: {{localPath: {MODEL_PATH}}}
  inferenceParameters: {{contextSize: 1024}}
""",
        pool.namespace,
    )
    wait_until(
        lambda: ready_condition(cluster.get_json("-n", pool.namespace, "md", group)) == "True",
        timeout=300,
        what=f"ModelDeployment {group} Ready",
    )
    groups_script = f"""
import json, urllib.request
request = urllib.request.Request(
    "{pool.management_url}/api/v1/model_groups", headers={{"Authorization": "Bearer {pool.management_token()}"}}
)
with urllib.request.urlopen(request, timeout=30) as r:
    print(json.dumps({{g["name"]: g["agents"] for g in json.load(r)["model_groups"]}}))
"""

    def groups() -> dict[str, int]:
        answer: dict[str, int] = json.loads(pool.in_client(groups_script).strip())
        return answer

    assert groups().get(group) == 1
    cluster.kubectl_run("-n", pool.namespace, "delete", "md", group, "--wait=false")

    def collected() -> bool:
        deployments = cluster.get_json("-n", pool.namespace, "deployments")["items"]
        pods = cluster.get_json("-n", pool.namespace, "pods", "-l", f"{MD_LABEL}={group}")["items"]
        return not pods and f"{group}-agent" not in [d["metadata"]["name"] for d in deployments]

    wait_until(collected, timeout=180, what="agent Deployment and pods garbage-collected")
    wait_until(lambda: group not in groups(), timeout=120, what="the balancer to forget the model group")
    assert groups().get(GROUP) == 1  # the other group keeps its agent
