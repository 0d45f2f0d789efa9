"""One namespace per scenario of the cluster tier, and what the cluster looked like when a
scenario in it failed.

:func:`scenario_namespace` makes the namespace and deletes it afterwards, whatever happened.
A failure inside it (a fixture's set-up, or a scenario that holds its namespace in its own
body) prints :func:`state_at_failure` before the namespace goes; the tier's
``pytest_runtest_makereport`` hook does the same for the namespaces of module fixtures still
alive when a test fails. The state is short enough to read in the tail of CI's output: pods,
workloads and autoscalers, the latest events, and the log lines of the operator, the pool's
balancers and KEDA about the namespace.
"""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from .conftest import RELEASE_NS, STATE

if TYPE_CHECKING:
    from .conftest import Cluster

LIVE: set[str] = set()
"""The namespaces of scenarios running now (what a failing test's report describes)."""
HEADER = "=== state of namespace"
"""How :func:`state_at_failure` begins."""
LINE_WIDTH = 240
"""Characters kept of one line of the state (events and logs can be long)."""
EVENT_COLUMNS = (
    "custom-columns=LAST:.lastTimestamp,TYPE:.type,REASON:.reason,OBJECT:.involvedObject.name,MESSAGE:.message"
)
OPERATOR_SELECTOR = "app.kubernetes.io/name=paddler-operator"
"""The chart's operator pods (in RELEASE_NS)."""
BALANCER_SELECTOR = "app.kubernetes.io/name=paddler-balancer"
"""A pool's balancer pods."""


@contextmanager
def scenario_namespace(cluster: Cluster, prefix: str, *, delete_timeout_s: int = 120) -> Iterator[str]:
    """A fresh namespace ``<prefix>-<8 hex>`` for one scenario; deleted on the way out (the
    operator, still installed, removes its finalizers)."""
    namespace = f"{prefix}-{uuid.uuid4().hex[:8]}"
    cluster.kubectl_run("create", "namespace", namespace)
    LIVE.add(namespace)
    try:
        yield namespace
    except Exception:
        print(state_at_failure(cluster, namespace))
        raise
    finally:
        LIVE.discard(namespace)
        cluster.kubectl_run(
            "delete", "namespace", namespace, f"--timeout={delete_timeout_s}s", check=False,
            timeout=delete_timeout_s + 30,
        )  # fmt: skip


def state_at_failure(cluster: Cluster, namespace: str) -> str:
    """The namespace's pods, workloads, autoscalers and latest events, and the last log lines
    about it of the operator, the balancers and (when it ran) KEDA."""
    ns = ("-n", namespace)
    events = _kubectl(cluster, *ns, "get", "events", "--sort-by=.lastTimestamp", "-o", EVENT_COLUMNS)
    operator_log = _kubectl(cluster, "-n", RELEASE_NS, "logs", "-l", OPERATOR_SELECTOR, "--tail=3000")
    sections = [
        ("pods", _kubectl(cluster, *ns, "get", "pods", "-o", "wide")),
        ("deployments", _kubectl(cluster, *ns, "get", "deployments")),
        ("pools and model deployments", _kubectl(cluster, *ns, "get", "llmpools,modeldeployments")),
        ("horizontal pod autoscalers", _kubectl(cluster, *ns, "get", "hpa")),
        ("KEDA scaled objects", _kubectl(cluster, *ns, "get", "scaledobjects.keda.sh")),
        ("events, latest last", _tail(events, 25)),
        ("operator log lines about the namespace", _tail(_about(operator_log, namespace), 15)),
        ("balancer logs", _kubectl(cluster, *ns, "logs", "-l", BALANCER_SELECTOR, "--tail=8", "--prefix")),
    ]
    keda_log = STATE / "logs" / "keda-operator.log"
    if keda_log.exists():
        sections.append(
            ("KEDA operator log lines about the namespace", _tail(_about(keda_log.read_text(), namespace), 12))
        )
    text = "\n".join(f"--- {title}\n{_clip(body) or '(none)'}" for title, body in sections)
    return f"{HEADER} {namespace} at the failure ===\n{text}\n=== end of the state of {namespace} ==="


def _kubectl(cluster: Cluster, *args: str) -> str:
    """kubectl's stdout, or what went wrong: reading the state must not raise."""
    try:
        proc = cluster.kubectl_run(*args, check=False, timeout=30)
    except subprocess.TimeoutExpired:
        return f"(kubectl {' '.join(args[:4])} ... timed out)"
    return proc.stdout if proc.returncode == 0 else f"({proc.stderr.strip()[-300:]})"


def _about(text: str, namespace: str) -> str:
    return "\n".join(line for line in text.splitlines() if namespace in line)


def _tail(text: str, lines: int) -> str:
    return "\n".join(text.splitlines()[-lines:])


def _clip(text: str) -> str:
    return "\n".join(line[:LINE_WIDTH] for line in text.strip().splitlines())
