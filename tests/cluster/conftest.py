"""Fixtures of the cluster tier: the project's images on a real two-node cluster.

``cluster`` (package scope: set up for the tier's first test, stopped after its last,
so no node daemon runs beside the later, timing-sensitive tiers) runs ``make images`` (Docker daemon, base image, the
portable llama wheel, the cached llama-server, five images), builds the tier's client image (curl + the
``openai`` SDK), then ``make cluster-up``: the control plane of ``scripts/k8s/up.sh``
plus two real nodes (each its own containerd, CNI bridge and kubelet; kube-proxy and
CoreDNS once) with the images loaded into both. ``make cluster-down`` stops all of it afterwards, whatever happened,
unless the cluster was already up before the session (then it is left running).
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.kubectl import Kubectl

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
STATE = REPO / ".k8s" / "cluster"
NODE_NAME = "paddler-node"
NODE_NAMES = (NODE_NAME, "paddler-node-2")
"""The real nodes of ``make cluster-up`` (K8S_NODES=2)."""
VERSION = next(
    line.split(":", 1)[1].strip().strip('"')
    for line in (REPO / "charts" / "paddler" / "Chart.yaml").read_text().splitlines()
    if line.startswith("appVersion:")
)
BALANCER_IMAGE = f"ghcr.io/paddler-k8s/balancer:{VERSION}"
AGENT_IMAGE = f"ghcr.io/paddler-k8s/agent:{VERSION}"
MODEL_IMAGE = f"ghcr.io/paddler-k8s/agent:{VERSION}-smollm2"
LLAMA_SERVER_MODEL_IMAGE = f"ghcr.io/paddler-k8s/llama-server:{VERSION}-smollm2"
CLIENT_IMAGE = f"paddler-local/test-client:{VERSION}"
PREVIOUS_VERSION = "0.1.0"
"""The chart and images that the upgrade test starts from (scripts/previous-images.sh)."""
PREVIOUS_BALANCER_IMAGE = f"ghcr.io/paddler-k8s/balancer:{PREVIOUS_VERSION}"
PREVIOUS_AGENT_IMAGE = f"ghcr.io/paddler-k8s/agent:{PREVIOUS_VERSION}"
RELEASE = "paddler"
RELEASE_NS = "paddler-system"
MODEL_PATH = "/models/SmolLM2-135M-Instruct.Q4_1.gguf"

# Cold: base image (~2 min), images (~3 min), node images; warm: seconds.
SETUP_TIMEOUT_S = 30 * 60


@dataclass(frozen=True)
class Cluster(Kubectl):
    """The real node's cluster (kubeconfig and kubectl of ``make cluster-up``), with helm."""

    helm: Path
    previous_chart: Path
    """Chart 0.1.0 as it was released (scripts/previous-images.sh), its images on the nodes."""

    def exec_python(self, namespace: str, pod: str, script: str, timeout: float = 300) -> str:
        """Run a Python script in a pod of the cluster; return its stdout. The script travels as
        an argument, not on stdin: nothing depends on the exec stream passing stdin's end on."""
        proc = self.kubectl_run("-n", namespace, "exec", pod, "--", "python", "-c", script, timeout=timeout)
        return proc.stdout


def _make(*targets: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["make", "--no-print-directory", "-C", str(REPO), *targets],
        capture_output=True,
        text=True,
        timeout=SETUP_TIMEOUT_S,
        env=env,
    )


def _nodes_ready(kubectl: Path) -> bool:
    return all(_node_ready(kubectl, name) for name in NODE_NAMES)


def _node_ready(kubectl: Path, name: str) -> bool:
    if not (STATE / "kubeconfig").exists():
        return False
    proc = subprocess.run(
        [
            str(kubectl),
            "--kubeconfig",
            str(STATE / "kubeconfig"),
            "--request-timeout=5s",
            "get",
            "node",
            name,
            "-o",
            'jsonpath={.status.conditions[?(@.type=="Ready")].status}',
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    return proc.returncode == 0 and proc.stdout.strip() == "True"


def _build_client_image() -> None:
    import openai

    proc = subprocess.run(
        [
            "docker",
            "build",
            "-q",
            "--network",
            "host",
            "-f",
            str(REPO / "tests" / "cluster" / "Dockerfile.client"),
            "--build-arg",
            f"OPENAI_VERSION={openai.__version__}",
            "-t",
            CLIENT_IMAGE,
            str(REPO),
        ],
        capture_output=True,
        text=True,
        timeout=SETUP_TIMEOUT_S,
        env={**os.environ, "DOCKER_BUILDKIT": "0"},
    )
    assert proc.returncode == 0, f"client image build failed:\n{proc.stderr[-4000:]}"


def _build_previous_release() -> Path:
    proc = subprocess.run(
        ["bash", str(REPO / "scripts" / "previous-images.sh")],
        capture_output=True,
        text=True,
        timeout=SETUP_TIMEOUT_S,
    )
    assert proc.returncode == 0, f"scripts/previous-images.sh failed:\n{proc.stderr[-5000:]}"
    return Path(proc.stdout.strip().splitlines()[-1])


UPGRADE_MODULE = "test_chart_upgrade.py"
"""Runs before every other module of the tier: it installs chart 0.1.0, which must find no
CRDs and no other operator, and leaves the current chart installed as the tier's release."""


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # The tier's items keep their places in the session; among them the upgrade module's go
    # first (a stable sort: file order otherwise).
    places = [i for i, item in enumerate(items) if item.path.parent == HERE]
    ordered = sorted((items[i] for i in places), key=lambda item: item.path.name != UPGRADE_MODULE)
    for i, item in zip(places, ordered, strict=True):
        items[i] = item
    # The session fixture's set-up counts against the first cluster test's timeout.
    for item in items:
        if "cluster" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.timeout(SETUP_TIMEOUT_S + 900), append=False)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """A failed test of the tier reports the state of the scenario namespaces still alive (those
    of module fixtures; a namespace a test holds in its own body printed its state already)."""
    outcome = yield
    report = outcome.get_result()
    cluster = getattr(item, "funcargs", {}).get("cluster")
    if report.when == "call" and report.failed and isinstance(cluster, Cluster):
        from .namespaces import HEADER, LIVE, state_at_failure  # namespaces imports this module

        if HEADER in report.capstdout:  # the test's own namespace printed it: that one failed
            return

        for namespace in sorted(LIVE):
            report.sections.append((f"state of {namespace} at the failure", state_at_failure(cluster, namespace)))


@pytest.fixture(scope="package")
def cluster() -> Iterator[Cluster]:
    kubectl = STATE / "bin" / "kubectl"
    was_up = kubectl.exists() and _nodes_ready(kubectl)
    up_ok = False
    try:
        images = _make("images")
        assert images.returncode == 0, f"make images failed:\n{images.stdout[-3000:]}\n{images.stderr[-5000:]}"
        _build_client_image()
        previous_chart = _build_previous_release()
        extra = f"{CLIENT_IMAGE} {PREVIOUS_BALANCER_IMAGE} {PREVIOUS_AGENT_IMAGE}"
        up = _make("cluster-up", env={**os.environ, "CLUSTER_EXTRA_IMAGES": extra})
        assert up.returncode == 0, f"make cluster-up failed:\n{up.stdout[-3000:]}\n{up.stderr[-6000:]}"
        up_ok = True
        (STATE / "transcript.txt").unlink(missing_ok=True)
        yield Cluster(
            kubeconfig=STATE / "kubeconfig", kubectl=kubectl, helm=STATE / "bin" / "helm", previous_chart=previous_chart
        )
    finally:
        if not (was_up and up_ok):
            down = _make("cluster-down")
            if down.returncode != 0:
                raise AssertionError(f"make cluster-down failed:\n{down.stderr[-3000:]}")


@pytest.fixture(scope="package")
def release(cluster: Cluster) -> Iterator[str]:
    """`helm install` of charts/paddler with its defaults: the operator in-cluster, one
    release for the whole tier (each module makes its own pool in its own namespace).
    An upgrade when test_chart_upgrade.py, run first, has left the chart installed."""
    proc = subprocess.run(
        [
            str(cluster.helm),
            "upgrade",
            "--install",
            RELEASE,
            str(REPO / "charts" / "paddler"),
            "--namespace",
            RELEASE_NS,
            "--create-namespace",
            # A node cluster kept from a run of chart 0.1.0 holds the CRDs it installed from
            # crds/, without Helm's ownership metadata: adopt them, as the README's upgrade
            # from 0.1.0 does (Helm >= 3.17). A fresh cluster has nothing to adopt.
            "--take-ownership",
            "--wait",
            "--timeout",
            "5m",
        ],
        capture_output=True,
        text=True,
        timeout=360,
        env=cluster.env,
    )
    assert proc.returncode == 0, f"helm install failed:\n{proc.stderr}"
    try:
        yield RELEASE
    finally:
        subprocess.run(
            [str(cluster.helm), "uninstall", RELEASE, "--namespace", RELEASE_NS, "--wait", "--timeout", "2m"],
            capture_output=True,
            timeout=180,
            env=cluster.env,
        )
