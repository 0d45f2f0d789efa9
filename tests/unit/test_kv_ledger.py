"""KvLedger: the llama engine's count of used cells in its unified KV cache."""

from __future__ import annotations

from paddler_agent.kv_cache import KvLedger


def test_evaluated_tokens_use_one_cell_each_across_slots() -> None:
    ledger = KvLedger(capacity=100, slots=3)
    ledger.extend(0, 30)
    ledger.extend(1, 50)

    assert (ledger.used, ledger.free) == (80, 20)
    assert (ledger.held(0), ledger.held(1), ledger.held(2)) == (30, 50, 0)


def test_truncating_a_slot_frees_its_tail() -> None:
    ledger = KvLedger(capacity=100, slots=2)
    ledger.extend(0, 40)

    ledger.truncate(0, 25)

    assert ledger.used == 25
    assert ledger.held(0) == 25


def test_a_shared_prefix_costs_no_cells_until_both_slots_drop_it() -> None:
    ledger = KvLedger(capacity=100, slots=2)
    ledger.extend(0, 40)

    ledger.share(0, 1, 30)
    assert ledger.used == 40
    assert ledger.held(1) == 30
    assert ledger.freed_by_truncate(0, 0) == 10  # only the unshared tail
    assert ledger.freed_by_truncate(1, 0) == 0

    ledger.truncate(0, 0)
    assert ledger.used == 30  # slot 1 still holds the shared prefix
    ledger.truncate(1, 10)
    assert ledger.used == 10


def test_sharing_replaces_what_the_destination_held() -> None:
    ledger = KvLedger(capacity=100, slots=2)
    ledger.extend(0, 20)
    ledger.extend(1, 15)

    ledger.share(0, 1, 20)

    assert ledger.used == 20
    assert ledger.held(1) == 20


def test_new_cells_after_a_shared_prefix_belong_to_one_slot() -> None:
    ledger = KvLedger(capacity=100, slots=2)
    ledger.extend(0, 10)
    ledger.share(0, 1, 10)

    ledger.extend(1, 5)
    ledger.extend(0, 3)

    assert ledger.used == 18
    assert ledger.freed_by_truncate(1, 0) == 5
    assert ledger.freed_by_truncate(0, 0) == 3
