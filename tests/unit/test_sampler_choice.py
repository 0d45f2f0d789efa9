"""Which sampler a request gets (paddler_agent.llama.slot_admission.sampler_kind): the fast
numpy path where its parameters allow, with a grammar on top when it has one, llama.cpp's
full chain otherwise."""

from __future__ import annotations

import pytest

from paddler_agent.llama.slot_admission import SamplerKind, sampled_prompt, sampler_kind
from paddler_core.desired_state import InferenceParameters

GRAMMAR = ('root ::= "a"', "root")


@pytest.mark.parametrize(
    ("temperature", "top_k", "grammar", "kind"),
    [
        (0.8, 40, None, SamplerKind.FAST),
        (0.8, 40, GRAMMAR, SamplerKind.GRAMMAR),
        (0.0, 0, None, SamplerKind.FAST),  # greedy: top-k does not matter
        (0.8, 0, None, SamplerKind.FULL),  # the whole vocabulary: llama.cpp's chain
        (0.8, 0, GRAMMAR, SamplerKind.FULL),
    ],
)
def test_sampler_kind(temperature: float, top_k: int, grammar: tuple[str, str] | None, kind: SamplerKind) -> None:
    params = InferenceParameters(temperature=temperature, top_k=top_k)
    assert sampler_kind(params, grammar) is kind


def test_a_samplers_prompt_leaves_out_image_placeholders() -> None:
    assert sampled_prompt([5, -1, -1, 6]) == [5, 6]
