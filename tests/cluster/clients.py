"""Clients that run in the tier's client pod: a Python script fed to ``kubectl exec``,
one JSON line per answer, read as they come."""

from __future__ import annotations

import json
import subprocess
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .conftest import CLIENT_IMAGE

if TYPE_CHECKING:
    from .conftest import Cluster


def client_pod(namespace: str) -> str:
    """The manifest of the tier's client pod (curl + the openai SDK), as unprivileged as
    the restricted Pod Security profile asks."""
    return f"""---
apiVersion: v1
kind: Pod
metadata: {{name: client, namespace: {namespace}}}
spec:
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


@dataclass
class ClientRun:
    """A Python script running in the client pod; one JSON line per answer."""

    popen: subprocess.Popen[str]
    results: list[dict[str, Any]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    pump: threading.Thread | None = None

    @classmethod
    def start(cls, cluster: Cluster, namespace: str, script: str) -> ClientRun:
        popen = subprocess.Popen(
            [str(cluster.kubectl), "--kubeconfig", str(cluster.kubeconfig), "-n", namespace,
             "exec", "-i", "client", "--", "python", "-u", "-"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        run = cls(popen)
        assert popen.stdin is not None
        popen.stdin.write(script)
        popen.stdin.close()
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
        try:
            self.popen.wait(timeout=timeout)
            if self.pump is not None:
                self.pump.join(timeout=10)
        finally:
            self.stop()
        with self.lock:
            return list(self.results)

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait(timeout=10)
