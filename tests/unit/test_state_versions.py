"""Desired-state versions: what an agent does with a state offered by one of several
balancer replicas (paddler_core.desired_state.judge_state_offer), and how a balancer
stamps a version (next_state_version)."""

from __future__ import annotations

import pytest

from paddler_core.desired_state import (
    BalancerDesiredState,
    ModelSource,
    StateOffer,
    judge_state_offer,
    next_state_version,
    state_revision,
)

EMPTY = BalancerDesiredState()
SMOL = BalancerDesiredState(model=ModelSource.model_validate({"LocalToAgent": "/models/smol.gguf"}))
GEMMA = BalancerDesiredState(model=ModelSource.model_validate({"LocalToAgent": "/models/gemma.gguf"}))


@pytest.mark.parametrize(
    ("held", "held_version", "offered", "offered_version", "expected"),
    [
        pytest.param(None, None, SMOL, 5, StateOffer.APPLY, id="holds-nothing-takes-any"),
        pytest.param(None, None, EMPTY, 0, StateOffer.APPLY, id="holds-nothing-takes-empty"),
        pytest.param(SMOL, 5, GEMMA, 6, StateOffer.APPLY, id="newer-and-different-applies"),
        pytest.param(SMOL, 5, SMOL, 9, StateOffer.ADOPT_VERSION, id="newer-same-content-reloads-nothing"),
        pytest.param(SMOL, 5, EMPTY, 0, StateOffer.IGNORE_OLDER, id="replica-restarted-empty-is-ignored"),
        pytest.param(SMOL, 5, GEMMA, 4, StateOffer.IGNORE_OLDER, id="stale-replica-cannot-swap-back"),
        pytest.param(SMOL, 5, SMOL, 5, StateOffer.IGNORE_OLDER, id="same-version-same-content-is-nothing-new"),
        pytest.param(
            *(SMOL, 5, GEMMA, 5) if state_revision(GEMMA) > state_revision(SMOL) else (GEMMA, 5, SMOL, 5),
            StateOffer.APPLY,
            id="same-millisecond-tie-larger-revision-wins",
        ),
        pytest.param(
            *(GEMMA, 5, SMOL, 5) if state_revision(GEMMA) > state_revision(SMOL) else (SMOL, 5, GEMMA, 5),
            StateOffer.IGNORE_OLDER,
            id="same-millisecond-tie-smaller-revision-loses",
        ),
        pytest.param(SMOL, 5, GEMMA, None, StateOffer.APPLY, id="unversioned-balancer-content-decides"),
        pytest.param(SMOL, 5, SMOL, None, StateOffer.ADOPT_VERSION, id="unversioned-same-content-is-a-no-op"),
        pytest.param(SMOL, None, GEMMA, 3, StateOffer.APPLY, id="held-unversioned-takes-a-versioned-change"),
    ],
)
def test_agent_judges_a_state_offer(
    held: BalancerDesiredState | None,
    held_version: int | None,
    offered: BalancerDesiredState,
    offered_version: int | None,
    expected: StateOffer,
) -> None:
    assert judge_state_offer(held, held_version, offered, offered_version) is expected


@pytest.mark.parametrize(
    ("stored", "now_ms", "expected"),
    [
        pytest.param(None, 1_700_000_000_000, 1_700_000_000_000, id="first-state-is-the-clock"),
        pytest.param(1_700_000_000_000, 1_700_000_000_500, 1_700_000_000_500, id="later-write-takes-the-clock"),
        pytest.param(1_700_000_000_000, 1_699_999_999_000, 1_700_000_000_001, id="clock-behind-still-grows"),
        pytest.param(0, 5, 5, id="from-zero"),
    ],
)
def test_balancer_stamps_a_version_that_only_grows(stored: int | None, now_ms: int, expected: int) -> None:
    assert next_state_version(stored, now_ms) == expected
