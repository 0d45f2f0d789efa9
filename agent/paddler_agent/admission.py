"""The agent is the arbiter of its slots (pure, no I/O).

Every balancer replica claims this agent's slots from the last status it got, so two
replicas may both send a request for the last free slot. The agent decides, where the
request arrives: it runs a request only while it has a slot for it, and refuses the rest
at once (``refused``), before the engine sees them; the replica routes a refused request
elsewhere or buffers it.
"""

from __future__ import annotations

from paddler_core.protocol import RefusalReason


def admission(*, stopping: bool, running: int, slots_total: int) -> RefusalReason | None:
    """Why a new ``generate``/``embed`` is refused, or None to run it.

    ``running``: requests this agent accepted that have not ended, over all its balancer
    links. ``slots_total``: slots serving now (0 while loading or swapping a model).
    """
    if stopping:
        return RefusalReason.STOPPING
    if running >= slots_total:
        return RefusalReason.NO_FREE_SLOT
    return None
