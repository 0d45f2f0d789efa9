"""What the decode thread answers: the payloads of one turn, gathered for the event loop.

Generated text goes out classified for conversations (content, reasoning, tool-call
text), counted per kind (:class:`~paddler_agent.llama.token_step.TokenTally`), and a
request ends with ``Done`` or an error; every payload is built by
:mod:`paddler_core.generated_output`, the constructors all engines share.
"""

from __future__ import annotations

from paddler_agent.llama.jobs import Emit, Payload, SlotSequence
from paddler_agent.tool_calls import parse_tool_calls
from paddler_core.generated_output import TokenKind, done, generated_token, generation_error
from paddler_core.inference import ErrorKind, GenerationError


class Outbox:
    """The payloads of the decode thread's current turn, in order; the worker hands
    them to the event loop at the end of the turn (:meth:`take`)."""

    def __init__(self) -> None:
        self._out: list[Emit] = []

    def __bool__(self) -> bool:
        return bool(self._out)

    def take(self) -> list[Emit]:
        """This turn's payloads; the outbox starts the next turn empty."""
        out, self._out = self._out, []
        return out

    def emit(self, request_id: str, payload: Payload, final: bool, error_kind: ErrorKind | None = None) -> None:
        self._out.append((request_id, payload, final, error_kind))

    def error(self, request_id: str, kind: GenerationError, message: str, error_kind: ErrorKind | None = None) -> None:
        """End ``request_id`` with a terminal generation error."""
        self.emit(request_id, generation_error(kind, message), True, error_kind)

    def text(self, seq: SlotSequence, text: str) -> None:
        """Emit generated text, classified for conversations, and give the tokens that
        wait for a kind (:class:`~paddler_agent.llama.token_step.TokenTally`) the first
        piece's kind. Unclassified text is all content, even while held back."""
        rid = seq.job.request_id
        classifier = seq.classifier
        if classifier is None:
            if text:
                self.emit(rid, generated_token(text), False)
            seq.tally.emitted(TokenKind.CONTENT)
            return
        pieces = classifier.feed(text) if text else []
        for piece_kind, piece_text in pieces:
            self.emit(rid, generated_token(piece_text, piece_kind), False)
        if pieces:
            seq.tally.emitted(pieces[0][0])

    def flush_text(self, seq: SlotSequence) -> None:
        """Emit what the stop-string matcher and the classifier held back, and the
        parsed tool calls: the request's text ends here."""
        self.text(seq, seq.text.flush())
        classifier = seq.classifier
        if classifier is None:
            return
        pieces = classifier.finish()
        for piece_kind, piece_text in pieces:
            self.emit(seq.job.request_id, generated_token(piece_text, piece_kind), False)
        seq.tally.emitted(pieces[0][0] if pieces else classifier.last_kind)
        if classifier.saw_tool_call and seq.job.parse_tool_calls:
            outcome = parse_tool_calls(classifier.tool_call_text, seq.job.tools or [])
            self.emit(seq.job.request_id, outcome.payload, False)

    def finished(self, seq: SlotSequence) -> None:
        """End ``seq`` well: its held-back text, then ``Done`` with its usage."""
        self.flush_text(seq)
        job = seq.job
        usage = seq.tally.counts.usage(
            prompt_tokens=len(job.prompt), cached_prompt_tokens=seq.cached, input_image_tokens=job.image_tokens
        )
        self.emit(job.request_id, done(usage), True)

    def context_full(self, seq: SlotSequence, n_ctx: int) -> None:
        """End ``seq`` because it used up its context (the balancer reads ``context_full``:
        OpenAI's ``finish_reason: "length"``)."""
        self.flush_text(seq)
        message = (
            f"context full: the agent's KV cache of {n_ctx} tokens was used up after {seq.generated} generated tokens"
        )
        self.error(seq.job.request_id, GenerationError.SAMPLER_ERROR, message, ErrorKind.CONTEXT_FULL)
