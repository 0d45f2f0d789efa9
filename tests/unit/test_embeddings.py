"""paddler_core.embeddings: the one embedding normalisation every engine uses."""

from __future__ import annotations

import math

import pytest
from pydantic import ValidationError

from paddler_core.desired_state import EmbeddingNormalizationMethod
from paddler_core.embeddings import normalize_embedding

NONE = EmbeddingNormalizationMethod.model_validate("None")
L2 = EmbeddingNormalizationMethod.model_validate("L2")


def rms(epsilon: float) -> EmbeddingNormalizationMethod:
    return EmbeddingNormalizationMethod.model_validate({"RmsNorm": {"epsilon": epsilon}})


@pytest.mark.parametrize(
    ("vector", "method", "expected"),
    [
        ([3.0, 4.0], NONE, [3.0, 4.0]),
        ([3.0, 4.0], L2, [0.6, 0.8]),
        ([0.0, 0.0], L2, [0.0, 0.0]),
        ([], L2, []),
        # mean(x²) = (9 + 16) / 2 = 12.5
        ([3.0, 4.0], rms(0.0), [3.0 / math.sqrt(12.5), 4.0 / math.sqrt(12.5)]),
        ([3.0, 4.0], rms(0.5), [3.0 / math.sqrt(13.0), 4.0 / math.sqrt(13.0)]),
        ([2.0, -2.0, 2.0, -2.0], rms(0.0), [1.0, -1.0, 1.0, -1.0]),
        ([0.0, 0.0], rms(0.0), [0.0, 0.0]),
        ([0.0, 0.0], rms(1e-6), [0.0, 0.0]),
    ],
)
def test_normalizes_as_paddler_does(
    vector: list[float], method: EmbeddingNormalizationMethod, expected: list[float]
) -> None:
    assert normalize_embedding(vector, method) == pytest.approx(expected)


def test_l2_output_has_unit_length() -> None:
    out = normalize_embedding([0.1 * i - 1.3 for i in range(64)], L2)
    assert math.sqrt(sum(v * v for v in out)) == pytest.approx(1.0)


def test_rms_norm_without_an_epsilon_is_refused_as_paddler_refuses_it() -> None:
    with pytest.raises(ValidationError, match="RmsNorm needs an epsilon"):
        EmbeddingNormalizationMethod.model_validate({"kind": "RmsNorm"})
