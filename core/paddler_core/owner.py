"""Who set a model group's desired state: one header name, shared by the balancer and the operator."""

from __future__ import annotations

OWNER_HEADER = "X-Paddler-Owner"
"""Request header of ``PUT /api/v1/model_groups/{group}/desired_state`` naming the writer
(the operator sends ``ModelDeployment/<namespace>/<name>``); ``GET /api/v1/model_groups`` shows it as ``owner``."""
