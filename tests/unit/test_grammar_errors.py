"""Which Paddler variant a grammar that cannot be used is reported under (Paddler 4.1, as
``paddler-client`` reads it): a GBNF grammar llama.cpp refuses is
``GrammarInitializationFailed`` whatever the cause; a JSON schema that cannot become a
grammar is ``GrammarSyntaxError``."""

from __future__ import annotations

import pytest

from paddler_agent.llama.errors import RequestError
from paddler_agent.llama.sampling import grammar_failure, grammar_text
from paddler_core.inference import GenerationError, JsonSchemaGrammar

REFUSED = [
    ('root ::= "yes" | (', "root", ["parse: error parsing grammar: expecting ')'"], "invalid grammar: parse: error"),
    ("root ::= (", "root", [], "invalid grammar: llama.cpp could not parse it"),
    ('answer ::= "yes" | "no"', "root", [], "the grammar has no rule named 'root'"),
    ('root ::= root "a"', "root", ["left recursion detected for rule root"], "the grammar cannot be initialised"),
]


@pytest.mark.parametrize(("text", "root", "errors", "says"), REFUSED)
def test_a_refused_gbnf_grammar_is_grammar_initialization_failed(
    text: str, root: str, errors: list[str], says: str
) -> None:
    error = grammar_failure((text, root), errors)
    assert error.kind is GenerationError.GRAMMAR_INITIALIZATION_FAILED
    assert error.message.startswith(says)


def test_a_json_schema_that_cannot_become_a_grammar_is_grammar_syntax_error() -> None:
    constraint = JsonSchemaGrammar.model_validate({"type": "json_schema", "schema": "{not json"})
    with pytest.raises(RequestError) as raised:
        grammar_text(constraint)
    assert raised.value.kind is GenerationError.GRAMMAR_SYNTAX_ERROR
