"""Fixtures for tests against a real local Kubernetes control plane.

``k8s_cluster`` (session scope) runs ``scripts/k8s/up.sh``: etcd,
kube-apiserver, kube-controller-manager, kube-scheduler and kwok (fake
nodes) as local processes, binaries built once from source and cached under
``~/.cache/paddler/k8s/`` (see ``scripts/k8s/build.sh``).

A control plane that was already up before the session is reused and left
running (``make k8s-up``). One started by a test session is stopped by the
last test session using it, even when tests fail: several pytest sessions
may share ``.k8s/`` at the same time, so each registers itself in
``.k8s/sessions/`` under ``.k8s/.lock`` (the lock up.sh and down.sh take).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.kubectl import Kubectl

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = REPO / "scripts" / "k8s"
STATE = Path(os.environ.get("PADDLER_K8S_DIR", REPO / ".k8s"))
SESSIONS = STATE / "sessions"
STARTED_BY_TESTS = STATE / "started-by-tests"
CLUSTER_ID = STATE / "cluster-id"

# A cold build of the binaries takes tens of minutes; run `make k8s-build`
# first. If the cache is empty anyway, the first test gets this much time.
COLD_BUILD_TIMEOUT_S = 90 * 60


def binaries_cached() -> bool:
    return subprocess.run(["bash", str(SCRIPTS / "build.sh"), "--check"]).returncode == 0


def keda_cached() -> bool:
    return subprocess.run(["bash", str(SCRIPTS / "keda-build.sh"), "--check"]).returncode == 0


@dataclass(frozen=True)
class K8sCluster(Kubectl):
    helm: Path | None
    bin_dir: Path

    @property
    def env(self) -> dict[str, str]:
        """Environment for child processes (kopf, helm, the operator)."""
        env = super().env
        env["PATH"] = f"{self.kubectl.parent}{os.pathsep}{env.get('PATH', '')}"
        return env


@contextlib.contextmanager
def _state_lock() -> Iterator[None]:
    """The lock scripts/k8s/up.sh and down.sh take (flock on .k8s/.lock)."""
    STATE.mkdir(parents=True, exist_ok=True)
    with (STATE / ".lock").open("w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _script(name: str, timeout: float) -> subprocess.CompletedProcess[str]:
    # We hold .k8s/.lock already: tell the scripts not to wait for it.
    env = dict(os.environ, PADDLER_K8S_LOCKED="1")
    return subprocess.run(["bash", str(SCRIPTS / name)], capture_output=True, text=True, timeout=timeout, env=env)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _live_sessions() -> list[int]:
    live = []
    for entry in SESSIONS.glob("*") if SESSIONS.is_dir() else []:
        if entry.name.isdigit() and _pid_alive(int(entry.name)):
            live.append(int(entry.name))
        else:
            entry.unlink(missing_ok=True)
    return live


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # The session fixture's set-up counts against the first test's timeout;
    # give it room for a cold build when the binary cache is empty.
    # Whichever k8s test runs first pays for it (-k may deselect any of them).
    k8s_items = [i for i in items if "k8s_cluster" in getattr(i, "fixturenames", ())]
    if k8s_items and not binaries_cached():
        for item in k8s_items:
            item.add_marker(pytest.mark.timeout(COLD_BUILD_TIMEOUT_S), append=False)
    # The same for prometheus-adapter (scripts/k8s/prometheus-adapter.sh builds it once).
    adapter_items = [i for i in items if "metrics_adapter" in getattr(i, "fixturenames", ())]
    if adapter_items and subprocess.run(["bash", str(SCRIPTS / "prometheus-adapter.sh"), "--check"]).returncode:
        for item in adapter_items:
            item.add_marker(pytest.mark.timeout(COLD_BUILD_TIMEOUT_S), append=False)
    # The same for KEDA's build (scripts/k8s/keda-build.sh), paid by the first KEDA test.
    keda_items = [i for i in items if "keda" in getattr(i, "fixturenames", ())]
    if keda_items and not keda_cached():
        for item in keda_items:
            item.add_marker(pytest.mark.timeout(COLD_BUILD_TIMEOUT_S), append=False)


@pytest.fixture(scope="session")
def k8s_cluster() -> Iterator[K8sCluster]:
    me = SESSIONS / str(os.getpid())
    with _state_lock():
        before = CLUSTER_ID.read_text() if CLUSTER_ID.exists() else None
        up = _script("up.sh", timeout=COLD_BUILD_TIMEOUT_S)
        if up.returncode != 0:
            if not _live_sessions():
                _script("down.sh", timeout=120)
            pytest.fail(f"scripts/k8s/up.sh failed:\n{up.stdout[-4000:]}\n{up.stderr[-4000:]}")
        after = CLUSTER_ID.read_text() if CLUSTER_ID.exists() else None
        if after != before:
            STARTED_BY_TESTS.write_text(after or "")
        SESSIONS.mkdir(exist_ok=True)
        me.write_text("")
    helm = STATE / "bin" / "helm"
    cluster = K8sCluster(
        kubeconfig=STATE / "kubeconfig",
        kubectl=STATE / "bin" / "kubectl",
        helm=helm if helm.exists() else None,
        bin_dir=Path(
            subprocess.run(
                ["bash", str(SCRIPTS / "build.sh"), "--bin-dir"],
                capture_output=True,
                text=True,
                check=True,
            ).stdout.strip()
        ),
    )
    try:
        yield cluster
    finally:
        with _state_lock():
            me.unlink(missing_ok=True)
            # The last test session out stops a control plane that tests
            # started; one started by hand (make k8s-up) keeps running.
            if not _live_sessions() and STARTED_BY_TESTS.exists():
                _script("down.sh", timeout=120)


@pytest.fixture
def k8s_namespace(k8s_cluster: K8sCluster) -> Iterator[str]:
    """A fresh namespace per test, deleted afterwards (without waiting)."""
    name = f"t-{uuid.uuid4().hex[:10]}"
    k8s_cluster.kubectl_run("create", "namespace", name)
    try:
        yield name
    finally:
        k8s_cluster.kubectl_run("delete", "namespace", name, "--wait=false", check=False)
