"""kind end-to-end fixtures: real images (Docker), a kind cluster, the Helm chart.

Opt-in (``make e2e-kind``; marker ``e2e``, excluded from ``make test``): this
machine has no Docker. The session builds nothing itself: ``make e2e-kind``
builds ``paddler-balancer:$TAG`` and ``paddler-agent:$TAG`` first.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest

REPO = Path(__file__).resolve().parents[2]
T = TypeVar("T")


def _tool(name: str, env: str) -> str:
    found = os.environ.get(env) or shutil.which(name)
    cached = REPO / ".k8s" / "bin" / name
    if not found and cached.exists():
        found = str(cached)
    if not found:
        pytest.fail(f"the e2e suite needs {name} on PATH (or ${env})")
    return found


def wait_for(probe: Callable[[], T | None], *, timeout: float, what: str, interval: float = 2.0) -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


@dataclass
class Kind:
    name: str
    kubeconfig: Path
    kubectl: str
    helm: str
    tag: str

    def run(self, *args: str, input: str | None = None, check: bool = True, timeout: float = 300) -> str:
        proc = subprocess.run(
            [self.kubectl, "--kubeconfig", str(self.kubeconfig), *args],
            input=input, capture_output=True, text=True, timeout=timeout,
        )  # fmt: skip
        if check and proc.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)}: {proc.stderr}")
        return proc.stdout

    def get(self, ns: str, what: str) -> Any:
        out = self.run("-n", ns, "get", "-o", "json", what, check=False)
        return json.loads(out) if out else None

    def port_forward(self, ns: str, target: str, port: int) -> tuple[subprocess.Popen[str], int]:
        popen = subprocess.Popen(
            [self.kubectl, "--kubeconfig", str(self.kubeconfig), "-n", ns, "port-forward", "--address", "127.0.0.1",
             target, f":{port}"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        assert popen.stdout is not None
        line = popen.stdout.readline()
        match = re.search(r"127\.0\.0\.1:(\d+)", line)
        if not match:
            popen.kill()
            raise AssertionError(f"port-forward failed: {line}")
        threading.Thread(target=popen.stdout.read, daemon=True).start()
        return popen, int(match.group(1))


@pytest.fixture(scope="session")
def kind(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Kind]:
    kind_bin = _tool("kind", "PADDLER_E2E_KIND")
    _tool("docker", "PADDLER_E2E_DOCKER")
    name = os.environ.get("PADDLER_E2E_CLUSTER", "paddler-e2e")
    tag = os.environ.get("PADDLER_E2E_TAG", "e2e")
    existing = subprocess.run([kind_bin, "get", "clusters"], capture_output=True, text=True, check=True).stdout.split()
    created = name not in existing
    if created:
        subprocess.run([kind_bin, "create", "cluster", "--name", name, "--wait", "180s"], check=True, timeout=600)
    kubeconfig = tmp_path_factory.mktemp("kind") / "kubeconfig"
    kubeconfig.write_text(
        subprocess.run(
            [kind_bin, "get", "kubeconfig", "--name", name], capture_output=True, text=True, check=True
        ).stdout
    )
    for image in (f"paddler-balancer:{tag}", f"paddler-agent:{tag}"):
        subprocess.run([kind_bin, "load", "docker-image", image, "--name", name], check=True, timeout=600)
    cluster = Kind(name, kubeconfig, _tool("kubectl", "PADDLER_E2E_KUBECTL"), _tool("helm", "PADDLER_E2E_HELM"), tag)
    subprocess.run(
        [cluster.helm, "--kubeconfig", str(kubeconfig), "upgrade", "--install", "paddler", str(REPO / "charts/paddler"),
         "--namespace", "paddler-system", "--create-namespace", "--wait", "--timeout", "5m",
         "--set", "image.repository=paddler-balancer", "--set", f"image.tag={tag}", "--set", "image.pullPolicy=Never",
         "--set", "operator.resyncInterval=5"],
        check=True, timeout=600,
    )  # fmt: skip
    try:
        yield cluster
    finally:
        subprocess.run(
            [cluster.helm, "--kubeconfig", str(kubeconfig), "uninstall", "paddler", "--namespace", "paddler-system"],
            check=False,
        )
        if created and not os.environ.get("PADDLER_E2E_KEEP"):
            subprocess.run([kind_bin, "delete", "cluster", "--name", name], check=False)
