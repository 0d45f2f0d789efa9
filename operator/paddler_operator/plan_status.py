"""Pure planning of status: conditions of an LlmPool and a ModelDeployment."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from paddler_operator.balancer_views import AgentView, BalancerSnapshot, RolloutView
from paddler_operator.crd_model_deployment import ModelDeploymentSpec
from paddler_operator.crd_models import Condition, LlmPoolStatus, ModelDeploymentStatus
from paddler_operator.crd_pool import LlmPoolSpec
from paddler_operator.plan_autoscaling import Load, load_of

# --- status -------------------------------------------------------------------------
REPLICAS_UNREACHABLE = "BalancerReplicasUnreachable"
"""Degraded reason: some balancer replicas answered, others not (a partial pass)."""


def _cond(type_: str, ok: bool, reason: str, message: str = "") -> Condition:
    return Condition(type=type_, status="True" if ok else "False", reason=reason, message=message)


def merge_conditions(
    previous: Sequence[Condition], current: Sequence[Condition], now: str, generation: int
) -> list[Condition]:
    """``current`` with ``lastTransitionTime`` kept from ``previous`` where the status did not change."""
    before = {c.type: c for c in previous}
    out = []
    for c in current:
        old = before.get(c.type)
        since = old.last_transition_time if old is not None and old.status == c.status else None
        out.append(c.model_copy(update={"last_transition_time": since or now, "observed_generation": generation}))
    return out


def pool_status(
    spec: LlmPoolSpec,
    *,
    generation: int,
    snapshot: BalancerSnapshot | None,
    balancer_error: str | None,
    apply_errors: Sequence[str],
    model_deployments: int,
    inference_url: str,
    management_url: str,
    previous: Sequence[Condition],
    now: str,
    balancers_ready: int = 0,
) -> LlmPoolStatus:
    """``balancers_ready``: Ready pods of the balancer Deployment (its status)."""
    load = load_of(snapshot.agents if snapshot else (), snapshot.buffered_total if snapshot else 0)
    partial = snapshot.partial if snapshot is not None else None
    if spec.balancer.replicas == 0:
        ready = _cond("Ready", False, "Stopped", "balancer.replicas is 0")
        progressing = _cond("Progressing", False, "Stopped")
    elif snapshot is None:
        msg = f"balancer management API unreachable: {balancer_error or 'unknown error'}; retrying"
        ready = _cond("Ready", False, "BalancerUnreachable", msg)
        progressing = _cond("Progressing", True, "BalancerUnreachable", msg)
    else:
        msg = (
            f"balancer up ({balancers_ready}/{spec.balancer.replicas} replicas ready): {load.ready} ready agents, "
            f"{load.slots_free}/{load.slots_total} free slots"
        )
        ready = _cond("Ready", True, "BalancerReady", msg)
        progressing = _cond("Progressing", False, "Complete", msg)
    if apply_errors:
        degraded = _cond("Degraded", True, "ApplyFailed", "; ".join(apply_errors))
    elif partial is not None:
        degraded = _cond("Degraded", True, REPLICAS_UNREACHABLE, f"{partial}; counts are partial, retrying")
    else:
        degraded = _cond("Degraded", False, "AsExpected")
    return LlmPoolStatus(
        observed_generation=generation,
        conditions=merge_conditions(previous, [ready, progressing, degraded], now, generation),
        **_load_fields(load),
        inference_url=inference_url,
        management_url=management_url,
        model_deployments=model_deployments,
        balancer_replicas=spec.balancer.replicas,
        balancer_ready_replicas=balancers_ready,
        balancers=f"{balancers_ready}/{spec.balancer.replicas}",
        balancer_replicas_reached=len(snapshot.replicas) if snapshot is not None else 0,
    )


def model_deployment_status(
    name: str,
    spec: ModelDeploymentSpec,
    *,
    generation: int,
    pool_found: bool,
    desired_replicas: int,
    snapshot: BalancerSnapshot | None,
    balancer_error: str | None,
    desired_state_error: str | None,
    apply_errors: Sequence[str],
    previous: Sequence[Condition],
    now: str,
    rollout: RolloutView | None = None,
    low_demand_since: str | None = None,
) -> ModelDeploymentStatus:
    """``rollout`` is the balancer's rollout of this spec's desired state (None when it
    has none, or one of another state)."""
    agents = snapshot.in_group(name) if snapshot else []
    load = load_of(agents, (snapshot.buffered_by_group.get(name, 0) if snapshot else 0))
    applied = snapshot is not None and desired_state_error is None and name in snapshot.group_states
    problems = list(apply_errors)
    if desired_state_error:
        problems.append(f"balancer refused the desired state: {desired_state_error}")
    ready, progressing = _md_ready_and_progressing(
        spec, pool_found, desired_replicas, snapshot, balancer_error, rollout, applied, load
    )
    degraded = _md_degraded(agents, problems, snapshot, rollout)
    return ModelDeploymentStatus(
        observed_generation=generation,
        conditions=merge_conditions(previous, [ready, progressing, degraded], now, generation),
        **_load_fields(load),
        replicas=desired_replicas,
        agents_summary=f"{load.ready}/{desired_replicas}",
        model=spec.model.to_core().describe(),
        desired_state_applied=applied,
        low_demand_since=low_demand_since,
    )


def _md_ready_and_progressing(
    spec: ModelDeploymentSpec,
    pool_found: bool,
    desired_replicas: int,
    snapshot: BalancerSnapshot | None,
    balancer_error: str | None,
    rollout: RolloutView | None,
    applied: bool,
    load: Load,
) -> tuple[Condition, Condition]:
    """``Ready`` and ``Progressing``: the first of these that holds decides both."""
    model = spec.model.to_core().describe()
    if not pool_found:
        msg = f"LlmPool {spec.pool_ref.name!r} not found in this namespace; waiting for it"
        return _cond("Ready", False, "PoolNotFound", msg), _cond("Progressing", False, "PoolNotFound", msg)
    if snapshot is None:
        msg = f"balancer management API unreachable: {balancer_error or 'unknown error'}; retrying"
        return _cond("Ready", False, "BalancerUnreachable", msg), _cond("Progressing", True, "BalancerUnreachable", msg)
    if rollout is not None and rollout.failed:
        msg = (
            f"rollout of {model} stopped at {rollout.applied}/{rollout.total} "
            "agents; the others keep serving the previous desired state"
        )
        detail = rollout.message or msg
        return _cond("Ready", False, "RolloutFailed", msg), _cond("Progressing", False, "RolloutFailed", detail)
    if rollout is not None and rollout.progressing:
        msg = (
            f"rolling out {model}: {rollout.applied}/{rollout.total} agents "
            f"switched, at most {rollout.max_unavailable} at a time"
        )
        return _cond("Ready", False, "RollingOut", msg), _cond("Progressing", True, "RollingOut", msg)
    if desired_replicas == 0:
        msg = "0 agent replicas; buffered requests wake the pool"
        return _cond("Ready", True, "ScaledToZero", msg), _cond("Progressing", False, "Complete")
    if applied and load.ready >= desired_replicas:
        msg = f"{load.ready}/{desired_replicas} agents serve {model}"
        return _cond("Ready", True, "AgentsReady", msg), _cond("Progressing", False, "Complete", msg)
    msg = f"{load.ready}/{desired_replicas} agents ready"
    if not applied:
        msg += "; desired state not yet on the balancer"
    return _cond("Ready", False, "AgentsNotReady", msg), _cond("Progressing", True, "WaitingForAgents", msg)


def _md_degraded(
    agents: Sequence[AgentView],
    problems: Sequence[str],
    snapshot: BalancerSnapshot | None,
    rollout: RolloutView | None,
) -> Condition:
    """``Degraded``: the first problem found, in order of what an operator must fix first."""
    partial = snapshot.partial if snapshot is not None else None
    stuck = [a for a in agents if a.state in ("Stuck", "AttemptedAndNotAppliable")]
    issues = [f"{a.name or a.id}: {i}" for a in agents for i in a.issues]
    if problems:
        return _cond("Degraded", True, "ApplyFailed", "; ".join(problems))
    if partial is not None:
        return _cond("Degraded", True, REPLICAS_UNREACHABLE, f"{partial}; counts are partial, retrying")
    if rollout is not None and rollout.failed:
        return _cond("Degraded", True, "RolloutFailed", (rollout.message or "rollout failed")[:1000])
    if stuck:
        return _cond("Degraded", True, "ModelNotAppliable", ", ".join(f"{a.name or a.id}: {a.state}" for a in stuck))
    if issues:
        return _cond("Degraded", True, "AgentIssues", "; ".join(issues)[:1000])
    return _cond("Degraded", False, "AsExpected")


def _load_fields(load: Load) -> dict[str, Any]:
    """The status fields a pool and a ModelDeployment both report from the balancers' load."""
    return {
        "ready_agents": load.ready,
        "agents": load.agents,
        "slots_free": load.slots_free,
        "slots_total": load.slots_total,
        "slots": f"{load.slots_free}/{load.slots_total}",
        "buffered_requests": load.buffered,
    }
