"""Clients that run in the tier's client pod: a Python script run by ``kubectl exec`` (as ``python -c``),
one JSON line per answer, read as they come."""

from __future__ import annotations

import json
import subprocess
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .conftest import CLIENT_IMAGE

if TYPE_CHECKING:
    from .conftest import Cluster


def client_pod(namespace: str, node: str | None = None) -> str:
    """The manifest of the tier's client pod (curl + the openai SDK), as unprivileged as
    the restricted Pod Security profile asks; on ``node`` when given (a drain must not
    take the client with it)."""
    pinned = f"nodeName: {node}" if node else ""
    return f"""---
apiVersion: v1
kind: Pod
metadata: {{name: client, namespace: {namespace}}}
spec:
  {pinned}
  terminationGracePeriodSeconds: 1
  securityContext: {{runAsNonRoot: true, runAsUser: 65534}}
  containers:
  - name: client
    image: {CLIENT_IMAGE}
    imagePullPolicy: Never
    command: [sleep, infinity]
    securityContext: {{allowPrivilegeEscalation: false, readOnlyRootFilesystem: true, capabilities: {{drop: [ALL]}}}}
    volumeMounts: [{{name: tmp, mountPath: /tmp}}]
  volumes: [{{name: tmp, emptyDir: {{}}}}]
"""


def wait_for_client(cluster: Cluster, namespace: str, timeout: float = 240) -> None:
    """Until a command runs in the client pod. Not its Ready condition: that waits for the
    kubelet to report the started container, which on this busy 2-core host has lagged the
    container itself by 10 s to minutes, while `kubectl exec` reaches the running container."""
    deadline = time.monotonic() + timeout
    while True:
        proc = cluster.kubectl_run("-n", namespace, "exec", "client", "--", "true", check=False, timeout=30)
        if proc.returncode == 0:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"no command ran in pod/client of {namespace} in {timeout}s: {proc.stderr[-500:]}")
        time.sleep(1)


@dataclass
class ClientRun:
    """A Python script running in the client pod; one JSON line per answer."""

    popen: subprocess.Popen[str]
    results: list[dict[str, Any]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    pump: threading.Thread | None = None

    @classmethod
    def start(cls, cluster: Cluster, namespace: str, script: str) -> ClientRun:
        # The script as an argument (no stdin): it starts without waiting for stdin's end to
        # cross the exec stream.
        popen = subprocess.Popen(
            [str(cluster.kubectl), "--kubeconfig", str(cluster.kubeconfig), "-n", namespace,
             "exec", "client", "--", "python", "-u", "-c", script],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        run = cls(popen)
        run.pump = threading.Thread(target=run._read, daemon=True)
        run.pump.start()
        return run

    def _read(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            if line.startswith("{"):
                with self.lock:
                    self.results.append(json.loads(line))

    def stderr(self) -> str:
        """What the client wrote to stderr (once it has exited)."""
        if self.popen.poll() is None or self.popen.stderr is None:
            return ""
        return self.popen.stderr.read()[-3000:]

    def count(self) -> int:
        with self.lock:
            return len(self.results)

    def finish(self, timeout: float) -> list[dict[str, Any]]:
        """Its answers, once the script has ended; fails if it runs past ``timeout`` seconds."""
        try:
            self.popen.wait(timeout=timeout)
            if self.pump is not None:
                self.pump.join(timeout=10)
        except subprocess.TimeoutExpired:
            self.stop()
            with self.lock:
                answers = list(self.results)
            raise AssertionError(
                f"the client script ran past {timeout:.0f}s; {len(answers)} answers so far "
                f"(last: {answers[-1:]}); its stderr: {self.stderr()[-1500:]}"
            ) from None
        finally:
            self.stop()
        with self.lock:
            return list(self.results)

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait(timeout=10)


def stream_load_script(
    base_url: str, model: str, tag: str, *, workers: int, max_tokens: int, max_seconds: float, each: int = 0
) -> str:
    """``workers`` threads streaming chats to ``model`` back to back until /tmp/stop-<tag>
    appears (or ``max_seconds``, or ``each`` requests per thread when > 0), through the
    `openai` SDK at its default retries (2), as an application would; one JSON line per
    request: ok, wall-clock start/first token/end."""
    return f"""
import json, os, threading, time
from openai import OpenAI
client = OpenAI(base_url="{base_url}/v1", api_key="unused", timeout=240)
stop_file, deadline = "/tmp/stop-{tag}", time.monotonic() + {max_seconds}
lock = threading.Lock()
def emit(answer):
    with lock:
        print(json.dumps(answer), flush=True)
def worker(w):
    n = 0
    while not os.path.exists(stop_file) and time.monotonic() < deadline and not (0 < {each} <= n):
        n += 1
        t0, first, chunks = time.time(), None, 0
        try:
            stream = client.chat.completions.create(
                model="{model}",
                messages=[{{"role": "user", "content": f"Worker {{w}}, request {{n}}: count to ten."}}],
                max_tokens={max_tokens}, temperature=0, stream=True,
            )
            for chunk in stream:
                chunks += 1
                first = first or time.time()
            emit({{"w": w, "n": n, "ok": chunks > 0, "t0": t0, "first": first, "end": time.time()}})
        except Exception as err:
            failed = {{"ok": False, "error": repr(err)[:300], "t0": t0, "first": first, "end": time.time()}}
            emit({{"w": w, "n": n, **failed}})
threads = [threading.Thread(target=worker, args=(w,)) for w in range({workers})]
for t in threads:
    t.start()
for t in threads:
    t.join()
"""


def agents_watch_script(management_url: str, token: str, group: str, tag: str, max_seconds: float) -> str:
    """Sample the balancer's agents of ``group`` every 0.25 s until /tmp/stop-<tag>: one JSON
    line per sample, {"t", "serving": agents with slots, "agents": {name: slots_total}}."""
    return f"""
import json, os, time, urllib.request
stop_file, deadline = "/tmp/stop-{tag}", time.monotonic() + {max_seconds}
while not os.path.exists(stop_file) and time.monotonic() < deadline:
    request = urllib.request.Request("{management_url}/api/v1/agents", headers={{"Authorization": "Bearer {token}"}})
    try:
        with urllib.request.urlopen(request, timeout=5) as r:
            found = json.load(r)["agents"]
        agents = {{a["name"]: a["slots_total"] for a in found if a["model_group"] == "{group}"}}
        serving = sum(1 for s in agents.values() if s > 0)
        print(json.dumps({{"t": time.time(), "serving": serving, "agents": agents}}), flush=True)
    except Exception as err:
        print(json.dumps({{"t": time.time(), "error": repr(err)[:200]}}), flush=True)
    time.sleep(0.25)
"""
