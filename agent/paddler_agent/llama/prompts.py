"""Request preparation on the decode thread: a ``generate`` message becomes a :class:`Job`
(sampling parameters, prompt tokens and image chunks, grammar, prefix keys), or a
RequestError for a request that can never run (a prompt longer than the whole KV cache,
a broken template, an image the model cannot take)."""

from __future__ import annotations

import llama_cpp

from paddler_agent.images import DecodedImage
from paddler_agent.llama.errors import RequestError
from paddler_agent.llama.jobs import (
    Job,
    Settings,
)
from paddler_agent.llama.multimodal import (
    MediaPrompt,
    Projector,
    is_placeholder,
)
from paddler_agent.llama.native import Runtime
from paddler_agent.llama.sampling import grammar_text
from paddler_agent.tool_calls import prompt_opens_reasoning
from paddler_core.inference import (
    ContinueFromRawPromptParams,
    ErrorKind,
    GenerationError,
    Tool,
)
from paddler_core.protocol import (
    GenerateMessage,
)


class JobPreparer:
    """Prepares the requests of one loaded model (decode thread only)."""

    def __init__(self, runtime: Runtime, settings: Settings) -> None:
        self.runtime = runtime
        self.model = runtime.model
        self.gen = runtime.gen
        self.settings = settings
        self._next_placeholder = -1
        """The next placeholder token of an image chunk (counts down, never reused)."""

    def prepare(self, message: GenerateMessage, rendered: str | None, images: list[DecodedImage] | None) -> Job:
        """The job of a request; ``rendered`` is its prompt rendered on the event loop (with
        its decoded ``images``), None to render here. Raises RequestError."""
        params = message.params
        overrides = message.overrides
        sampling = overrides.apply(self.settings.defaults) if overrides else self.settings.defaults
        tools: list[Tool] | None = None
        parse_calls = True
        if isinstance(params, ContinueFromRawPromptParams):
            text = params.raw_prompt
        else:
            # The engine rendered it (and decoded its images, or refused them) before
            # queueing: a conversation never reaches the decode thread unrendered.
            assert rendered is not None, "conversations are rendered before they are queued"
            text = rendered
            tools = list(params.tools)
            parse_calls = params.parse_tool_calls
        grammar = grammar_text(params.grammar)
        media = self._tokenize_media(text, images) if images else None
        return Job(
            request_id=message.request_id,
            prompt=media.tokens if media is not None else self._tokenize_prompt(text),
            max_tokens=params.max_tokens,
            params=sampling,
            seed=overrides.seed if overrides else None,
            stops=list(overrides.stop or []) if overrides else [],
            grammar=grammar,
            prefix_keys=message.prefix_keys,
            tools=tools,
            starts_in_reasoning=tools is not None and prompt_opens_reasoning(text),
            parse_tool_calls=parse_calls,
            media=media,
            image_tokens=sum(i.n_pos for i in media.images.values()) if media is not None else 0,
        )

    def _tokenize_prompt(self, text: str) -> list[int]:
        """Tokens of a prompt; special-token text (``<|im_start|>``...) becomes the token."""
        bos_text = self.model.token_text(self.model.bos)
        add_special = not (bos_text and text.startswith(bos_text))
        tokens = self.model.tokenize(text, add_special=add_special, parse_special=True)
        if not tokens:
            if self.model.bos < 0:
                raise RequestError(GenerationError.SAMPLER_ERROR, "the prompt is empty")
            tokens = [self.model.bos]
        if len(tokens) >= self.gen.n_ctx_seq:
            raise RequestError(
                GenerationError.SAMPLER_ERROR,
                f"context full: the prompt has {len(tokens)} tokens and the agent's KV cache "
                f"(context_size, shared by its slots) holds {self.gen.n_ctx_seq}",
                ErrorKind.PROMPT_EXCEEDS_CONTEXT,
            )
        return tokens

    def _tokenize_media(self, text: str, images: list[DecodedImage]) -> MediaPrompt:
        """Tokens and image chunks of a prompt with images; raises RequestError."""
        projector = self.runtime.projector
        if projector is None:
            raise RequestError(GenerationError.MULTIMODAL_NOT_SUPPORTED, "this model has no multimodal projector")
        bos_text = self.model.token_text(self.model.bos)
        add_special = not (bos_text and text.startswith(bos_text))
        media = projector.tokenize(text, images, add_special=add_special, next_placeholder=self._next_placeholder)
        self._next_placeholder -= sum(image.n_pos for image in media.images.values())
        try:
            self._check_media(media, projector)
        except RequestError:
            media.free()
            raise
        return media

    def _check_media(self, media: MediaPrompt, projector: Projector) -> None:
        tokens = media.tokens
        if not tokens or is_placeholder(tokens[-1]):
            raise RequestError(
                GenerationError.MULTIMODAL_TOKENIZATION_FAILED,
                "the prompt ends with an image; text must follow it (a question)",
            )
        if len(tokens) >= self.gen.n_ctx_seq:
            raise RequestError(
                GenerationError.SAMPLER_ERROR,
                f"context full: the prompt has {len(tokens)} tokens (images included) and the agent's KV cache "
                f"(context_size, shared by its slots) holds {self.gen.n_ctx_seq}",
                ErrorKind.PROMPT_EXCEEDS_CONTEXT,
            )
        n_ubatch = int(llama_cpp.llama_n_ubatch(self.gen.handle))
        for image in media.images.values():
            if projector.non_causal and image.n_tokens > n_ubatch:
                raise RequestError(
                    GenerationError.MEDIA_EXCEEDS_MICRO_BATCH,
                    f"an image takes {image.n_tokens} tokens; this model decodes an image in one micro-batch "
                    f"of at most {n_ubatch} (raise n_batch or lower image_resize_to_fit)",
                )
