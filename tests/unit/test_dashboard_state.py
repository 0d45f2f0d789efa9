"""The dashboard's pure pieces: bars, rows, sorting and the banner."""

from __future__ import annotations

import pytest

from paddler_cli.dashboard_view import DashboardState, agent_detail, agent_rows, group_rows, slot_bar


@pytest.mark.parametrize(
    ("busy", "total", "width", "bar"),
    [
        (0, 4, 8, "░░░░░░░░ 0/4"),
        (2, 4, 8, "████░░░░ 2/4"),
        (4, 4, 8, "████████ 4/4"),
        (5, 4, 8, "████████ 5/4"),
        (0, 0, 4, "     0/0"),
    ],
)
def test_slot_bar_shows_busy_of_total(busy: int, total: int, width: int, bar: str) -> None:
    assert slot_bar(busy, total, width) == bar


def state_with_agents() -> DashboardState:
    state = DashboardState("127.0.0.1:8060")
    state.apply_agents(
        {
            "agents": [
                {"id": "a1", "name": "zulu", "model_group": "g1", "slots_total": 4, "slots_in_flight": 1},
                {
                    "id": "a2",
                    "name": "alpha",
                    "model_group": "g2",
                    "slots_total": 2,
                    "slots_in_flight": 2,
                    "issues": [{"LlamaServerUnreachable": {"message": "connection refused"}}, "Plain"],
                    "download_filename": "m.gguf",
                    "download_current": 50,
                    "download_total": 200,
                },
            ]
        }
    )
    return state


@pytest.mark.parametrize(
    ("sort", "names"),
    [
        ("name", ["alpha", "zulu"]),
        ("group", ["zulu", "alpha"]),
        ("busy", ["alpha", "zulu"]),
        ("issues", ["alpha", "zulu"]),
    ],
)
def test_agents_sort_by_the_chosen_key(sort: str, names: list[str]) -> None:
    state = state_with_agents()
    state.sort = sort
    assert [cells[0] for _, cells in agent_rows(state)] == names


def test_sort_cycles_through_every_order() -> None:
    state = DashboardState("x:1")
    assert [state.next_sort() for _ in range(4)] == ["group", "busy", "issues", "name"]


def test_detail_lists_issues_in_full_and_the_download() -> None:
    detail = agent_detail(state_with_agents(), "a2")
    assert "issue: LlamaServerUnreachable: connection refused" in detail
    assert "issue: Plain" in detail
    assert "downloading m.gguf 25%" in detail


def test_banner_and_totals_follow_the_connection() -> None:
    state = DashboardState("10.0.0.1:8060")
    assert state.banner().startswith("Connecting")
    state.lost("cannot connect: Connection refused")
    assert "unreachable (cannot connect: Connection refused)" in state.banner()
    state = state_with_agents()
    state.apply_buffered({"buffered_requests_current": 3})
    assert "live" in state.banner()
    assert "buffered requests 3" in state.totals()
    assert "3/6" in state.totals()
    assert "issues 2" in state.totals()
    state.lost("boom")
    assert "last data" in state.banner()


def test_groups_show_their_desired_model_and_live_slots() -> None:
    state = DashboardState("x:1")
    state.apply_groups({"model_groups": [{"name": "default", "desired_state": {"model": {"LocalToAgent": "/m.gguf"}}}]})
    state.apply_agents({"agents": [{"id": "a", "model_group": "other", "slots_total": 4, "slots_in_flight": 1}]})
    assert group_rows(state) == [
        ("default", "0", "           0/0", '{"LocalToAgent":"/m.gguf"}'),
        ("other", "1", "██░░░░░░░░ 1/4", "-"),
    ]
