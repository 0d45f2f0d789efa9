"""The agent's pure decisions about its balancer links and its slots: which links to open
and close, which resolved addresses count, and whether a request may run."""

from __future__ import annotations

import socket

import pytest

from paddler_agent.admission import admission
from paddler_agent.links import LinkChanges, merge_targets, plan_links, preferred_addresses
from paddler_core.protocol import RefusalReason

V4 = int(socket.AF_INET)
V6 = int(socket.AF_INET6)


@pytest.mark.parametrize(
    ("current", "wanted", "expected"),
    [
        ((), (), LinkChanges((), ())),
        ((), ("10.0.0.1:8060",), LinkChanges(("10.0.0.1:8060",), ())),
        (("10.0.0.1:8060",), ("10.0.0.1:8060",), LinkChanges((), ())),
        (("10.0.0.1:8060",), (), LinkChanges((), ("10.0.0.1:8060",))),
        (
            ("10.0.0.1:8060", "10.0.0.2:8060"),
            ("10.0.0.2:8060", "10.0.0.3:8060"),
            LinkChanges(("10.0.0.3:8060",), ("10.0.0.1:8060",)),
        ),
        (("10.0.0.2:8060", "10.0.0.1:8060"), (), LinkChanges((), ("10.0.0.1:8060", "10.0.0.2:8060"))),
    ],
    ids=["nothing", "first-address", "unchanged", "gone", "pod-replaced", "all-gone-sorted"],
)
def test_plan_links_opens_new_addresses_and_closes_vanished_ones(
    current: tuple[str, ...], wanted: tuple[str, ...], expected: LinkChanges
) -> None:
    assert plan_links(current, wanted) == expected


@pytest.mark.parametrize(
    ("resolved", "expected"),
    [
        ([], set()),
        ([(V4, "10.0.0.1")], {"10.0.0.1:8060"}),
        ([(V4, "10.0.0.1"), (V4, "10.0.0.2"), (V4, "10.0.0.1")], {"10.0.0.1:8060", "10.0.0.2:8060"}),
        ([(V6, "::1"), (V4, "127.0.0.1")], {"127.0.0.1:8060"}),
        ([(V6, "fd00::1"), (V6, "fd00::2")], {"[fd00::1]:8060", "[fd00::2]:8060"}),
    ],
    ids=["none", "one", "replicas-deduplicated", "dual-stack-takes-ipv4", "ipv6-only-bracketed"],
)
def test_preferred_addresses_keep_one_family_so_no_replica_gets_two_links(
    resolved: list[tuple[int, str]], expected: set[str]
) -> None:
    assert preferred_addresses(resolved, 8060) == expected


def test_merge_targets_keeps_the_first_entrys_host_header_for_a_shared_address() -> None:
    merged = merge_targets([(None, ["10.0.0.1:8060"]), ("pool:8060", ["10.0.0.1:8060", "10.0.0.2:8060"])])

    assert merged == {"10.0.0.1:8060": None, "10.0.0.2:8060": "pool:8060"}


@pytest.mark.parametrize(
    ("stopping", "running", "slots_total", "expected"),
    [
        (False, 0, 2, None),
        (False, 1, 2, None),
        (False, 2, 2, RefusalReason.NO_FREE_SLOT),
        (False, 3, 2, RefusalReason.NO_FREE_SLOT),
        (False, 0, 0, RefusalReason.NO_FREE_SLOT),
        (True, 0, 2, RefusalReason.STOPPING),
        (True, 2, 2, RefusalReason.STOPPING),
        (True, 0, 0, RefusalReason.STOPPING),
    ],
    ids=[
        "idle",
        "one-slot-left",
        "full",
        "over-full-after-a-swap-shrank-the-slots",
        "loading-or-swapping",
        "stopping-idle",
        "stopping-full",
        "stopping-while-loading",
    ],
)
def test_admission_runs_a_request_only_when_a_slot_is_free_and_the_agent_is_not_stopping(
    stopping: bool, running: int, slots_total: int, expected: RefusalReason | None
) -> None:
    assert admission(stopping=stopping, running=running, slots_total=slots_total) is expected
