"""``model``: which model group a request names, and the ``/v1/models`` listing."""

from __future__ import annotations

from pathlib import PurePosixPath
from typing import Any

from paddler_balancer.openai.errors import OpenAIError
from paddler_core.desired_state import BalancerDesiredState

# ---- model groups ---------------------------------------------------------------------------


def model_aliases(state: BalancerDesiredState) -> set[str]:
    """Display names a group's model answers to besides the group name: its
    description, file name, file stem and Hugging Face repo id."""
    source = state.model
    if source.is_none:
        return set()
    described = source.describe()
    names = {described}
    path = source.huggingface.filename if source.huggingface is not None else described
    name = PurePosixPath(path.rstrip("/")).name
    if name:
        names.add(name)
        names.add(name.removesuffix(".gguf"))
    if source.huggingface is not None:
        names.add(source.huggingface.repo_id)
    return names


def served_groups(stored: dict[str, BalancerDesiredState], with_agents: set[str], default: str) -> list[str]:
    """Groups that /v1/models lists: every group with desired state or agents; the
    default group also when it is the only one (a fresh balancer)."""
    groups = set(stored) | with_agents
    return sorted(groups) if groups else [default]


def resolve_model(requested: str | None, served: list[str], states: dict[str, BalancerDesiredState]) -> str:
    """The model group that serves ``requested``; raises OpenAIError 400/404."""
    if not requested:
        if len(served) == 1:
            return served[0]
        raise OpenAIError(
            400,
            f"model is required: this pool serves several models ({', '.join(served)})",
            code="model_required",
            param="model",
        )
    if requested in served:
        return requested
    matches = [g for g in served if requested in model_aliases(states.get(g, BalancerDesiredState()))]
    if len(matches) == 1:
        return matches[0]
    if not matches and len(served) == 1:
        return served[0]  # one group serves any name, as Paddler ignores the field
    if len(matches) > 1:
        raise OpenAIError(
            400,
            f"model {requested!r} is ambiguous: groups {', '.join(matches)} serve it; use a group name",
            code="model_ambiguous",
            param="model",
        )
    raise OpenAIError(
        404,
        f"The model {requested!r} does not exist; this pool serves: {', '.join(served)}",
        code="model_not_found",
        param="model",
    )


def models_list(served: list[str], states: dict[str, BalancerDesiredState], created: int) -> dict[str, Any]:
    data = []
    for group in served:
        state = states.get(group, BalancerDesiredState())
        data.append(
            {
                "id": group,
                "object": "model",
                "created": created,
                "owned_by": "paddler",
                "root": None if state.model.is_none else state.model.describe(),
            }
        )
    return {"object": "list", "data": data}
