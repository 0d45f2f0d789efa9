"""The agents JSON of the management API (``GET /api/v1/agents``): one model, written by the
balancer and read by the operator and ``paddler dashboard``."""

from __future__ import annotations

from typing import Any

import pytest

from paddler_balancer.agents import AgentController
from paddler_cli.dashboard_view import AgentView as DashboardAgent
from paddler_core.management_wire import AgentSnapshot, AgentsSnapshot, read_issue
from paddler_core.protocol import AgentIssue, AgentStatus, StateApplicationStatus
from paddler_operator.balancer_views import AgentView as OperatorAgent

STATUS = AgentStatus(
    version=7,
    slots_total=4,
    slots_processing=1,
    model_path="/models/m.gguf",
    issues=[AgentIssue(variant="ModelCannotBeLoaded", params={"message": "not GGUF"}), AgentIssue(variant="Plain")],
    state_application_status=StateApplicationStatus.APPLIED,
    prefix_hashes=["h1", "h2"],
    applied_state_revision="r1",
    desired_state_version=3,
)


def controller(**fields: Any) -> AgentController:
    agent = AgentController(id="a1", name="pod-1", model_group="m", send=lambda _: None, status=STATUS)
    for key, value in fields.items():
        setattr(agent, key, value)
    return agent


def test_the_balancer_writes_paddlers_snapshot_plus_its_own_fields_in_order() -> None:
    agent = controller(in_flight=2, draining=True)
    expected = {
        "id": "a1",
        "name": "pod-1",
        "model_group": "m",
        "slots_in_flight": 2,
        "unresponsive": False,
        "draining": True,
        **STATUS.model_dump(mode="json", exclude={"version", "prefix_hashes"}),
    }
    written = agent.snapshot().model_dump(mode="json")
    assert written == expected
    assert list(written) == list(expected)
    assert written["issues"] == [{"ModelCannotBeLoaded": {"message": "not GGUF"}}, "Plain"]


def test_built_in_python_the_status_is_taken_as_given() -> None:
    assert AgentSnapshot(id="a", status=STATUS).status is STATUS
    assert AgentSnapshot.model_validate({"id": "a", "status": {"slots_total": 2}}).status.slots_total == 2


def test_what_the_balancer_writes_reads_back_the_same() -> None:
    written = controller(in_flight=3, unresponsive=True).snapshot()
    read = AgentSnapshot.model_validate(written.model_dump(mode="json"))
    assert read.model_dump(mode="json") == written.model_dump(mode="json")
    assert read.status.version == 0  # not on the wire
    assert read.status.prefix_hashes == []


@pytest.mark.parametrize(
    ("entry", "field", "value"),
    [
        pytest.param({}, "id", "", id="no-id"),
        pytest.param({}, "model_group", "default", id="no-group-is-default"),
        pytest.param({"name": None}, "name", None, id="null-name"),
        pytest.param({"slots_in_flight": None}, "slots_in_flight", 0, id="null-count-is-zero"),
        pytest.param(
            {"slots_in_flight": 5, "future_field": {"x": 1}}, "slots_in_flight", 5, id="unknown-field-ignored"
        ),
        pytest.param({"draining": True}, "draining", True, id="draining"),
    ],
)
def test_balancer_fields_read_with_defaults(entry: dict[str, Any], field: str, value: Any) -> None:
    assert getattr(AgentSnapshot.model_validate(entry), field) == value


@pytest.mark.parametrize(
    ("entry", "field", "value"),
    [
        pytest.param({}, "slots_total", 0, id="no-slots"),
        pytest.param({"slots_total": None}, "slots_total", 0, id="null-slots"),
        pytest.param({}, "state_application_status", StateApplicationStatus.FRESH, id="no-state-is-fresh"),
        pytest.param(
            {"state_application_status": "Stuck"}, "state_application_status", StateApplicationStatus.STUCK, id="stuck"
        ),
        pytest.param(
            {"state_application_status": "Hibernating"},
            "state_application_status",
            StateApplicationStatus.FRESH,
            id="a-newer-balancers-state-reads-as-not-applied",
        ),
        pytest.param({"model_path": "/m.gguf"}, "model_path", "/m.gguf", id="model-path"),
        pytest.param({"download_total": None, "download_current": 3}, "download_total", 0, id="null-download-total"),
        pytest.param({"issues": None}, "issues", [], id="null-issues"),
        pytest.param({"version": 9, "prefix_hashes": ["h"]}, "version", 9, id="status-only-fields-read-if-sent"),
    ],
)
def test_status_fields_read_flat_with_defaults(entry: dict[str, Any], field: str, value: Any) -> None:
    assert getattr(AgentSnapshot.model_validate(entry).status, field) == value


@pytest.mark.parametrize(
    ("raw", "variant", "params"),
    [
        pytest.param("Plain", "Plain", {}, id="bare-variant"),
        pytest.param({"Broken": {"message": "m", "n": 1}}, "Broken", {"message": "m", "n": 1}, id="serde-shape"),
        pytest.param({"Empty": {}}, "Empty", {}, id="serde-no-params"),
        pytest.param({"kind": "x"}, '{"kind": "x"}', {}, id="non-object-params-kept-as-json"),
        pytest.param({"b": 1, "a": 2}, '{"a": 2, "b": 1}', {}, id="many-keys-kept-as-json"),
        pytest.param(3, "3", {}, id="number-kept-as-json"),
    ],
)
def test_issues_of_any_shape_are_read(raw: Any, variant: str, params: dict[str, Any]) -> None:
    assert read_issue(raw) == AgentIssue(variant=variant, params=params)
    assert AgentSnapshot.model_validate({"issues": [raw]}).status.issues == [AgentIssue(variant=variant, params=params)]


@pytest.mark.parametrize(
    ("body", "ids"),
    [
        pytest.param(None, [], id="no-body"),
        pytest.param({}, [], id="no-agents-key"),
        pytest.param({"agents": None}, [], id="null-agents"),
        pytest.param({"agents": [{"id": "a"}, {"id": "b"}], "other": 1}, ["a", "b"], id="in-order"),
    ],
)
def test_agents_body_is_read(body: Any, ids: list[str]) -> None:
    assert [a.id for a in AgentsSnapshot.model_validate(body).agents] == ids


def test_operator_and_dashboard_views_come_from_the_same_json() -> None:
    body = AgentsSnapshot(agents=[controller(in_flight=2).snapshot()]).model_dump(mode="json")
    (operator,) = OperatorAgent.all_of(body)
    assert (operator.id, operator.model_group, operator.slots_total, operator.slots_in_flight) == ("a1", "m", 4, 2)
    assert operator.ready
    assert operator.issues == ('{"ModelCannotBeLoaded": {"message": "not GGUF"}}', "Plain")
    dashboard = DashboardAgent.of(AgentsSnapshot.model_validate(body).agents[0])
    assert (dashboard.name, dashboard.group, dashboard.busy, dashboard.model) == ("pod-1", "m", 2, "/models/m.gguf")
    assert dashboard.issues == ["ModelCannotBeLoaded: not GGUF", "Plain"]
    assert dashboard.status == "Applied"
