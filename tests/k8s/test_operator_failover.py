"""Two operator replicas with leader election, as real processes against the real control plane.

Exactly one holds the Lease and reconciles; the other only watches. When the leader is
killed outright (SIGKILL: a crashed pod, a lost node) the standby takes over once the
lease it last saw renewed expires, and reconciles a change made after the kill from the
objects as they are (it never reconciled before, so nothing comes from its memory): within
15 s of the kill. A leader stopped gracefully (SIGTERM) releases the Lease, and the standby
takes over at its next attempt instead of waiting for the lease to expire. A leader paused
(SIGSTOP) past its lease steps down when it wakes.
"""

from __future__ import annotations

import json
import re
import signal
import time
from typing import Any

import pytest

from tests.kubectl import wait_until

from .conftest import K8sCluster
from .test_operator_cluster import (  # noqa: F401 - crds and operators are fixtures
    MODEL,
    POOL,
    OperatorProcess,
    Operators,
    args_of,
    crds,
    get,
    operators,
    wait_object,
)

pytestmark = pytest.mark.k8s

LEASE = "lease/paddler-operator"
ELECTION = ("--leader-election",)  # the Lease goes to the one watched namespace (the test's)
LEASE_DURATION_S = 10.0
TAKEOVER_BOUND_S = 15.0
"""After a SIGKILL: the lease duration, one retry period, and the reconcile itself."""


def identity(op: OperatorProcess) -> str:
    found = re.search(r"leader_election=lease=\S+ identity=(\S+)", op.output())
    assert found, op.output()[-3000:]
    return found.group(1)


def lease(cluster: K8sCluster, ns: str) -> Any:
    return get(cluster, ns, LEASE)


def holder(cluster: K8sCluster, ns: str) -> str | None:
    spec = (lease(cluster, ns) or {}).get("spec") or {}
    return spec.get("holderIdentity")


def agent_replicas(cluster: K8sCluster, ns: str) -> int | None:
    deployment = get(cluster, ns, "deployment/m-agent")
    return None if deployment is None else int(deployment["spec"]["replicas"])


def start_pair(ops: Operators, ns: str) -> tuple[OperatorProcess, OperatorProcess]:
    """Two replicas, the pool and its model reconciled by the leader; (leader, standby)."""
    cluster = ops.cluster
    first, second = ops.start(ns, extra_args=ELECTION), ops.start(ns, extra_args=ELECTION)
    ids = {identity(first): first, identity(second): second}
    assert len(ids) == 2

    def elected() -> str | None:
        name = holder(cluster, ns)
        return name if name in ids else None

    leader = ids[wait_until(elected, timeout=30, what="a leader")]
    standby = second if leader is first else first
    wait_until(lambda: f"standby holder={identity(leader)}" in standby.output(), timeout=30, what="a standby")
    cluster.apply(POOL + "---" + MODEL, namespace=ns)
    wait_object(cluster, ns, "deployment/m-agent", lambda d: "--model-group" in args_of(d))
    wait_until(lambda: leader.count(f"reconciled object=ModelDeployment/{ns}/m "), timeout=30, what="leader's pass")
    return leader, standby


def set_replicas(cluster: K8sCluster, ns: str, replicas: int) -> None:
    cluster.kubectl_run("-n", ns, "patch", "md/m", "--type=merge", "-p", json.dumps({"spec": {"replicas": replicas}}))


def test_standby_reconciles_a_change_made_after_the_leader_is_killed_within_15s(
    operators: Operators,  # noqa: F811
    k8s_namespace: str,
) -> None:
    cluster, ns = operators.cluster, k8s_namespace
    leader, standby = start_pair(operators, ns)
    # Only the leader acts: the standby watched the same events and did nothing.
    assert standby.count("reconciled object=") == 0
    assert "created object=" not in standby.output()
    assert "leader acquired" not in standby.output()

    leader.popen.kill()  # SIGKILL: no release, the lease must expire
    killed = time.monotonic()
    leader.popen.wait(10)
    set_replicas(cluster, ns, 3)
    wait_until(
        lambda: agent_replicas(cluster, ns) == 3,
        timeout=TAKEOVER_BOUND_S - (time.monotonic() - killed),
        what="the standby to reconcile the change",
    )
    takeover = time.monotonic() - killed
    print(f"\ntakeover after SIGKILL of the leader: {takeover:.1f}s (lease duration {LEASE_DURATION_S:g}s)")
    assert takeover <= TAKEOVER_BOUND_S
    assert holder(cluster, ns) == identity(standby)
    assert lease(cluster, ns)["spec"]["leaseTransitions"] >= 1
    assert f"leader acquired identity={identity(standby)}" in standby.output()
    assert "leader reconciles objects=2" in standby.output()  # it listed, not replayed events


def test_a_leader_stopped_with_sigterm_releases_the_lease_and_the_standby_takes_over_at_once(
    operators: Operators,  # noqa: F811
    k8s_namespace: str,
) -> None:
    cluster, ns = operators.cluster, k8s_namespace
    leader, standby = start_pair(operators, ns)

    leader.popen.terminate()  # SIGTERM: stop the workers, release the Lease, exit
    stopped = time.monotonic()
    set_replicas(cluster, ns, 2)
    wait_until(lambda: agent_replicas(cluster, ns) == 2, timeout=TAKEOVER_BOUND_S, what="the standby's pass")
    handover = time.monotonic() - stopped
    print(f"\nhandover after SIGTERM of the leader: {handover:.1f}s (lease duration {LEASE_DURATION_S:g}s)")
    assert handover < LEASE_DURATION_S  # it did not wait for the lease to expire
    assert leader.popen.wait(20) == 0
    assert f"leader released identity={identity(leader)}" in leader.output()
    assert holder(cluster, ns) == identity(standby)


def test_a_leader_paused_past_its_lease_steps_down_when_it_wakes(
    operators: Operators,  # noqa: F811
    k8s_namespace: str,
) -> None:
    """SIGSTOP (a frozen VM, a stalled node) for longer than the lease: the standby takes over;
    the old leader, woken, finds its renew deadline long past, stops and stands by."""
    cluster, ns = operators.cluster, k8s_namespace
    leader, standby = start_pair(operators, ns)
    leader.popen.send_signal(signal.SIGSTOP)
    try:
        set_replicas(cluster, ns, 3)
        wait_until(lambda: agent_replicas(cluster, ns) == 3, timeout=TAKEOVER_BOUND_S, what="the standby's pass")
        assert holder(cluster, ns) == identity(standby)
    finally:
        leader.popen.send_signal(signal.SIGCONT)
    wait_until(lambda: f"standby holder={identity(standby)}" in leader.output(), timeout=30, what="old leader waits")
    assert f"leader lost identity={identity(leader)}" in leader.output()
    assert holder(cluster, ns) == identity(standby)
    # Anything its workers tried before the loop noticed was refused unsent, never written.
    refused = [line for line in leader.output().splitlines() if "NotLeader" in line]
    print(f"\nwrites the woken leader tried and had refused: {len(refused)}")
