"""Embedding normalisation, written once for every engine (Paddler's semantics).

``L2`` scales a vector to unit length; ``RmsNorm`` divides it by
``sqrt(mean(x²) + epsilon)``. Paddler's ``RmsNorm`` always carries its ``epsilon``
(``{"RmsNorm": {"epsilon": x}}``, no default), and so does
:class:`~paddler_core.desired_state.EmbeddingNormalizationMethod`. A zero vector
(or an RMS of 0 with ``epsilon`` 0) is returned unchanged rather than divided by zero:
JSON cannot carry the NaNs a division would make.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from paddler_core.desired_state import EmbeddingNormalizationMethod


def normalize_embedding(vector: Sequence[float], method: EmbeddingNormalizationMethod) -> list[float]:
    """``vector`` normalised by ``method``, as a new list."""
    if method.kind == "None" or not vector:
        return list(vector)
    squares = math.fsum(v * v for v in vector)
    radicand = squares if method.kind == "L2" else squares / len(vector) + (method.epsilon or 0.0)
    scale = math.sqrt(radicand)
    if scale == 0.0:
        return list(vector)
    return [v / scale for v in vector]
