"""LlamaEngine: the agent's Engine on llama.cpp (model swaps, held requests, the status
board); the decode thread does the work."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections import deque
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from paddler_agent.chat_template import ChatTemplateError, TemplateRenderer, compile_chat_template
from paddler_agent.engine import Engine, EngineHost, StatusBoard
from paddler_agent.images import DecodedImage, ImageError, decode_images, image_urls, with_image_markers
from paddler_agent.llama.decode_worker import DecodeWorker
from paddler_agent.llama.errors import RequestError
from paddler_agent.llama.jobs import Emit, Settings, StatusDelta, template_for
from paddler_agent.llama.native import MAX_SLOTS, LoadConfig, ModelLoadError, NativeModel, Runtime
from paddler_agent.llama.native_thread import NativeThread
from paddler_agent.model_files import DownloadProgress, ModelAccess, ModelSourceError
from paddler_agent.model_source import resolve_model
from paddler_core.agent_issues import AgentIssueVariant
from paddler_core.desired_state import (
    BalancerDesiredState,
    InferenceParameters,
    ModelSource,
)
from paddler_core.generated_output import RequestFamily, generation_error, request_failed
from paddler_core.inference import GenerationError
from paddler_core.protocol import (
    AgentIssue,
    EmbedMessage,
    GenerateConversation,
    GenerateMessage,
    StateApplicationStatus,
)

logger = logging.getLogger(__name__)


def default_threads() -> int:
    """``PADDLER_THREADS`` or the machine's CPU count."""
    value = os.environ.get("PADDLER_THREADS", "").strip()
    if value:
        try:
            return max(1, int(value))
        except ValueError:
            logger.warning("ignoring invalid PADDLER_THREADS value=%r", value)
    return max(1, os.cpu_count() or 1)


def default_cache_dir() -> Path:
    root = os.environ.get("PADDLER_CACHE") or os.path.join(Path.home(), ".cache", "paddler")
    return Path(root) / "models"


class LlamaEngine(Engine):
    """Slots on llama.cpp; see the module docstring."""

    publishes_prefix_hashes = True

    def __init__(
        self,
        host: EngineHost,
        board: StatusBoard,
        slots: int,
        *,
        model_cache_dir: Path | None = None,
        n_threads: int | None = None,
        model_access: ModelAccess | None = None,
    ) -> None:
        if slots < 1:
            raise ValueError(f"slots must be at least 1, got {slots}")
        super().__init__(host, board, slots)
        self.cache_dir = model_cache_dir or default_cache_dir()
        self.n_threads = n_threads or default_threads()
        self.model_access = model_access
        self._runtime: Runtime | None = None
        self._native: NativeThread | None = None
        self._settings = Settings(InferenceParameters())
        self._serving = False
        self._applying = False
        """A desired state is being applied: requests that cannot run yet are held."""
        self._held: deque[GenerateMessage | EmbedMessage] = deque()
        self._inflight: set[str] = set()
        self._drained = asyncio.Event()
        self._drained.set()
        self._swap_task: asyncio.Task[None] | None = None
        self._issue_variants: set[str] = set()
        self._projector_issue: AgentIssue | None = None
        """MultimodalProjectionCannotBeLoaded of the state being applied, or None."""
        self._loop_dead = False
        """The decode loop of the loaded model died; requests are refused until a reload."""
        self._renderer = TemplateRenderer()
        self._rendering: dict[str, asyncio.Task[None]] = {}
        """Conversation requests whose prompt is being rendered (before the decode thread)."""
        if slots > MAX_SLOTS:
            # Paddler 4.1: the agent registers and reports it instead of exiting.
            board.issues.append(slot_cannot_start(slots))

    # -- requests -----------------------------------------------------------------------------

    def generate(self, message: GenerateMessage) -> None:
        self._submit(message)

    def embed(self, message: EmbedMessage) -> None:
        self._submit(message)

    def _submit(
        self,
        message: GenerateMessage | EmbedMessage,
        rendered: str | None = None,
        images: list[DecodedImage] | None = None,
    ) -> None:
        rid = message.request_id
        if self._native is not None and (self._loop_dead or not self._native.alive):
            self._reject(message, "the engine's decode loop stopped after an error; see the agent log")
        elif self._worker is not None and self._serving:
            self._inflight.add(rid)
            self._drained.clear()
            if rendered is None and isinstance(message, GenerateConversation):
                task = asyncio.get_running_loop().create_task(self._render_then_submit(message), name=f"render-{rid}")
                self._rendering[rid] = task
                task.add_done_callback(lambda _t: self._rendering.pop(rid, None))
                return
            self._worker.submit(message, rendered, images)
        elif self._applying or self._native is not None:
            logger.info("request held while the model is not serving request_id=%s", rid)
            self._held.append(message)
        else:
            self._reject_unserved(message)

    async def _render_then_submit(self, message: GenerateConversation) -> None:
        """Render a conversation's prompt in the renderer process (time, memory and size
        limited), then queue it for the decode thread; a template failure fails this
        request only."""
        rid = message.request_id
        runtime = self._runtime
        params = message.params
        text: str | None = None
        images: list[DecodedImage] | None = None
        if runtime is not None:
            model = runtime.model
            try:
                template = template_for(params, self._settings, model)
                messages = params.conversation_history
                urls = image_urls(messages)
                if urls:
                    images = await self._decode_images(runtime, urls)
                    assert runtime.projector is not None
                    messages = with_image_markers(messages, runtime.projector.marker)
                text = await self._renderer.render(
                    template,
                    messages,
                    add_generation_prompt=params.add_generation_prompt,
                    enable_thinking=params.enable_thinking,
                    tools=params.tools,
                    bos_token=model.token_text(model.bos),
                    eos_token=model.token_text(model.eos),
                )
            except (RequestError, ChatTemplateError) as e:
                kind, text_ = (
                    (e.kind, e.message)
                    if isinstance(e, RequestError)
                    else (GenerationError.CHAT_TEMPLATE_ERROR, str(e))
                )
                logger.info("request rejected request_id=%s kind=%s message=%s", rid, kind, text_)
                self._deliver([(rid, generation_error(kind, text_), True, None)], None)
                return
        if rid not in self._inflight:
            return  # stopped while rendering
        self._inflight.discard(rid)
        if not self._inflight:
            self._drained.set()
        # No runtime to render with (the model went away): _submit holds or refuses it.
        self._submit(message, text, images)

    async def _decode_images(self, runtime: Runtime, urls: list[str]) -> list[DecodedImage]:
        """The request's images, decoded off the event loop; raises RequestError when the
        model takes no images or one cannot be decoded."""
        if runtime.projector is None:
            problem = self._projector_problem(runtime.config.path)
            if problem is not None:
                reason = f"its multimodal projection could not be loaded ({problem.message})"
            else:
                reason = "it has no multimodal projector (set multimodal_projection in the desired state)"
            raise RequestError(
                GenerationError.MULTIMODAL_NOT_SUPPORTED,
                f"the request has {len(urls)} image(s), but this model takes no images: {reason}",
            )
        try:
            return await asyncio.to_thread(decode_images, urls, self._settings.defaults.image_resize_to_fit)
        except ImageError as e:
            raise RequestError(e.kind, e.message) from None

    def _reject_unserved(self, message: GenerateMessage | EmbedMessage) -> None:
        self._reject(message, "no model is loaded on this agent")

    def _reject(self, message: GenerateMessage | EmbedMessage, text: str) -> None:
        family = RequestFamily.EMBEDDING if isinstance(message, EmbedMessage) else RequestFamily.GENERATION
        self.host.emit(message.request_id, request_failed(family, text), True)

    def stop(self, request_id: str) -> None:
        before = len(self._held)
        self._held = deque(m for m in self._held if m.request_id != request_id)
        if len(self._held) != before:
            return
        if request_id in self._inflight:
            self._inflight.discard(request_id)
            rendering = self._rendering.pop(request_id, None)
            if rendering is not None:
                rendering.cancel()
            elif self._worker is not None:
                self._worker.cancel(request_id)
            if not self._inflight:
                self._drained.set()

    def _deliver(self, out: list[Emit], delta: StatusDelta | None) -> None:
        for rid, payload, final, error_kind in out:
            if rid not in self._inflight:
                continue
            if final:
                self._inflight.discard(rid)
            self.host.emit(rid, payload, final, error_kind)
        if delta is not None and delta.loop_stopped is not None:
            self._loop_stopped(delta.loop_stopped)
        if delta is not None:
            if delta.kv_cache_tokens_used is not None and self._native is not None:
                # Changes every step: the runtime's periodic snapshot carries it.
                self.board.kv_cache_tokens_used = delta.kv_cache_tokens_used
            if delta.prompt_tokens is not None:
                reused, evaluated = delta.prompt_tokens
                self.board.prompt_tokens_reused += reused
                self.board.prompt_tokens_evaluated += evaluated
            if delta.slots_processing is not None:
                self.board.slots_processing = delta.slots_processing
            if delta.prefix_hashes is not None:
                self.board.prefix_hashes = delta.prefix_hashes
            if delta.slots_processing is not None or delta.prefix_hashes is not None:
                self.host.status_changed()
        if not self._inflight:
            self._drained.set()

    def model_metadata(self) -> dict[str, str] | None:
        return dict(self._runtime.model.metadata) if self._runtime is not None else None

    def decode_heartbeat(self) -> float | None:
        """The decode thread's last turn while a model is loaded; a loop that died (or hangs)
        stops stamping it, so ``/live`` fails and the kubelet restarts the agent, which reloads."""
        worker = self._worker
        return worker.heartbeat if worker is not None else None

    def decode_steps(self) -> int:
        """``llama_decode`` calls since the model loaded (0 without one): sequences decoded
        together share a step, which is what slots buy."""
        worker = self._worker
        return worker.steps if worker is not None else 0

    def _loop_stopped(self, error: str) -> None:
        """The decode loop died: say so (an issue, not Applied, no slots) instead of
        taking requests it can only fail. A new desired state reloads the model."""
        logger.error("decode loop stopped; the agent serves nothing until the model is reloaded error=%s", error)
        self._fail(
            AgentIssueVariant.DECODE_LOOP_STOPPED,
            f"The inference loop stopped after an error ({error}); apply the desired state again to reload the model.",
        )
        self._serving = False
        self._loop_dead = True
        self.board.slots_total = 0
        self.board.state_application_status = StateApplicationStatus.STUCK
        self.host.status_changed()

    # -- desired state ------------------------------------------------------------------------

    async def apply_desired_state(self, state: BalancerDesiredState) -> None:
        """Resolving and downloading can be cancelled (a newer state supersedes this
        one); unloading and swapping cannot: they run shielded, and the next call
        waits for them to finish."""
        previous = self._swap_task
        if previous is not None and not previous.done():
            await asyncio.wait([previous])
        await self._apply(state)

    async def _shielded(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(work)
        self._swap_task = task
        await asyncio.shield(task)

    async def _apply(self, state: BalancerDesiredState) -> None:
        self._applying = True  # stays set when cancelled: a newer state is on its way
        try:
            await self._apply_unguarded(state)
        except Exception as e:
            logger.exception("applying desired state failed")
            self._fail(AgentIssueVariant.STATE_APPLICATION_FAILED, f"Applying the desired state failed: {e}")
        self._applying = False
        self._answer_held_if_nothing_serves()

    async def _apply_unguarded(self, state: BalancerDesiredState) -> None:
        settings = _settings_of(state)
        if self.slots > MAX_SLOTS and not state.model.is_none:
            logger.warning("desired state not appliable: %d slots, llama.cpp runs at most %d", self.slots, MAX_SLOTS)
            self.board.state_application_status = StateApplicationStatus.ATTEMPTED_AND_NOT_APPLIABLE
            self.board.slots_total = 0
            self.host.status_changed()
            self._answer_held_if_nothing_serves()
            return
        if state.model.is_none:
            await self._shielded(self._unload())
            self._settings = settings
            self._set_applied(None, settings)
            return
        try:
            path = await resolve_model(state.model, self.cache_dir, self._on_download, access=self.model_access)
        except ModelSourceError as e:
            self._fail(e.variant, e.message, **e.details)
            self._answer_held_if_nothing_serves()
            return
        projector = await self._resolve_projector(state.multimodal_projection)
        config = LoadConfig.build(str(path), self.slots, state.inference_parameters, self.n_threads, projector)
        if self._runtime is not None and self._runtime.config == config and self._native_alive():
            self._update_settings(settings)
            self._set_applied(config.path, settings)
            return
        if not await self._probe(config):
            self._answer_held_if_nothing_serves()
            return
        await self._shielded(self._swap(config, settings))

    async def _resolve_projector(self, source: ModelSource) -> str | None:
        """The local path of the desired state's ``multimodal_projection`` (resolved,
        downloaded and cached like the model), or None: none is set, or it cannot be had,
        which is Paddler's ``MultimodalProjectionCannotBeLoaded`` (the model still serves
        text)."""
        self._projector_issue = None
        if source.is_none:
            return None
        try:
            path = await resolve_model(source, self.cache_dir, self._on_download, access=self.model_access)
        except ModelSourceError as e:
            self._projector_issue = projector_issue(source.describe(), f"{e.variant}: {e.message}")
            return None
        return str(path)

    def _answer_held_if_nothing_serves(self) -> None:
        """No model will serve held requests (the first one failed): end them."""
        if self._native is None:
            self._flush_held_with_error()

    async def _probe(self, config: LoadConfig) -> bool:
        """Check that llama.cpp can read the file (vocabulary only) before unloading."""
        try:
            await asyncio.to_thread(_probe_model_file, config.path)
        except ModelLoadError as e:
            self._fail(AgentIssueVariant.MODEL_CANNOT_BE_LOADED, str(e), path=config.path)
            return False
        return True

    async def _swap(self, config: LoadConfig, settings: Settings) -> None:
        old_config = self._runtime.config if self._runtime is not None else None
        await self._stop_serving()
        try:
            await self._load(config, settings)
        except ModelLoadError as e:
            self._fail(AgentIssueVariant.MODEL_CANNOT_BE_LOADED, str(e), path=config.path)
            if old_config is not None:
                await self._restore(old_config)
            return
        self._set_applied(config.path, settings)

    async def _load(self, config: LoadConfig, settings: Settings) -> None:
        """Load on a new native thread and serve from it; raises ModelLoadError."""
        native = NativeThread(config, settings, asyncio.get_running_loop(), self._deliver)
        native.start()
        try:
            runtime = await native.ready()
        finally:
            if not native.alive or native.worker is None:
                await asyncio.to_thread(native.shutdown)
        self._settings = settings
        self._serve(native, runtime)

    async def _restore(self, config: LoadConfig) -> None:
        logger.warning("reloading the previous model path=%s", config.path)
        try:
            await self._load(config, self._settings)
        except ModelLoadError:
            logger.exception("the previous model cannot be reloaded path=%s", config.path)
            self._flush_held_with_error()
            return
        self.board.model_path = config.path

    async def _stop_serving(self) -> None:
        """slots_total = 0, finish in-flight requests, free the loaded model."""
        self._serving = False
        if self.board.slots_total != 0:
            self.board.slots_total = 0
            self.host.status_changed()
        if self._native is None:
            return
        logger.info("draining in-flight requests count=%d", len(self._inflight))
        await self._drained.wait()
        native, runtime = self._native, self._runtime
        self._native, self._runtime = None, None
        await asyncio.to_thread(native.shutdown)
        self.board.slots_processing = 0
        self.board.prefix_hashes = []
        self.board.kv_cache_tokens_used = 0
        self.board.kv_cache_tokens_total = 0
        logger.info("model unloaded path=%s", runtime.config.path if runtime else None)

    def _native_alive(self) -> bool:
        return self._native is not None and self._native.alive and not self._loop_dead

    @property
    def _worker(self) -> DecodeWorker | None:
        return self._native.worker if self._native is not None else None

    def _serve(self, native: NativeThread, runtime: Runtime) -> None:
        self._native = native
        self._runtime = runtime
        self._serving = True
        self._loop_dead = False
        self.board.slots_total = self.slots
        self.board.kv_cache_tokens_used = 0
        self.board.kv_cache_tokens_total = runtime.gen.n_ctx_seq
        held, self._held = list(self._held), deque()
        for message in held:
            self._submit(message)

    async def _unload(self) -> None:
        await self._stop_serving()
        self._flush_held_with_error()

    def _flush_held_with_error(self) -> None:
        held, self._held = list(self._held), deque()
        for message in held:
            self._reject_unserved(message)

    def _update_settings(self, settings: Settings) -> None:
        self._settings = settings
        if self._worker is not None:
            self._worker.settings = settings

    def _on_download(self, event: DownloadProgress) -> None:
        board = self.board
        board.download_filename = event.filename
        board.download_current = event.current
        board.download_total = event.total
        board.download_indeterminate = event.indeterminate
        self.host.status_changed()

    def _set_applied(self, path: str | None, settings: Settings) -> None:
        board = self.board
        board.issues = [i for i in board.issues if i.variant not in self._issue_variants]
        self._issue_variants.clear()
        template_issue = _template_issue(settings.chat_template_override, path)
        if template_issue is not None:  # reported when applied; a good template clears it
            board.issues.append(template_issue)
            self._issue_variants.add(template_issue.variant)
        board.model_path = path
        board.uses_chat_template_override = settings.chat_template_override is not None
        board.state_application_status = StateApplicationStatus.APPLIED
        projector_problem = self._projector_problem(path)
        if projector_problem is not None:
            # Paddler 4.1 reports the state as not appliable; the model serves text.
            board.issues.append(projector_problem)
            self._issue_variants.add(projector_problem.variant)
            board.state_application_status = StateApplicationStatus.ATTEMPTED_AND_NOT_APPLIABLE
        if path is None:
            board.slots_total = 0
        self.host.status_changed()
        logger.info("desired state applied model_path=%s slots_total=%d", path, board.slots_total)

    def _projector_problem(self, path: str | None) -> AgentIssue | None:
        if path is None:
            return None
        if self._projector_issue is not None:
            return self._projector_issue
        runtime = self._runtime
        if runtime is not None and runtime.config.projector is not None and runtime.projector_error is not None:
            return projector_issue(runtime.config.projector, runtime.projector_error)
        return None

    def _fail(self, variant: AgentIssueVariant, message: str, **details: str) -> None:
        logger.warning("desired state not appliable issue=%s message=%s", variant, message)
        board = self.board
        issue = ModelSourceError(variant, message, **details).to_issue()
        board.issues = [i for i in board.issues if i.variant not in self._issue_variants]
        board.issues.append(issue)
        self._issue_variants = {variant}
        board.state_application_status = StateApplicationStatus.ATTEMPTED_AND_NOT_APPLIABLE
        if self._worker is not None and not self._serving:
            self._serving = True
        board.slots_total = self.slots if self._serving else 0
        self.host.status_changed()

    async def close(self) -> None:
        task = self._swap_task
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._serving = False
        for rid in list(self._inflight):
            self.stop(rid)
        for rendering in list(self._rendering.values()):
            rendering.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await rendering
        await self._renderer.close()
        native = self._native
        self._native, self._runtime = None, None
        if native is not None:
            await asyncio.to_thread(native.shutdown)


def projector_issue(model_path: str, message: str) -> AgentIssue:
    """Paddler 4.1's ``MultimodalProjectionCannotBeLoaded {model_path}`` (and our
    ``message``)."""
    return AgentIssue(
        variant=AgentIssueVariant.MULTIMODAL_PROJECTION_CANNOT_BE_LOADED,
        params={"model_path": model_path, "message": f"The multimodal projection cannot be loaded: {message}"},
    )


def slot_cannot_start(slots: int) -> AgentIssue:
    """Paddler 4.1's ``SlotCannotStart {error, slot_index}``: the first slot beyond
    llama.cpp's sequence limit."""
    error = f"llama.cpp runs at most {MAX_SLOTS} sequences per context; this agent was started with {slots} slots"
    return AgentIssue(variant=AgentIssueVariant.SLOT_CANNOT_START, params={"error": error, "slot_index": MAX_SLOTS})


def _template_issue(template: str | None, model_path: str | None) -> AgentIssue | None:
    """Paddler 4.1's ``ChatTemplateDoesNotCompile`` for an override that does not
    compile (requests then fail with ChatTemplateError), or None."""
    if template is None:
        return None
    try:
        compile_chat_template(template)
    except ChatTemplateError as e:
        logger.warning("chat template override does not compile: %s", e)
        params = {"error": str(e), "model_path": {"model_path": model_path or ""}, "template_content": template}
        return AgentIssue(variant=AgentIssueVariant.CHAT_TEMPLATE_DOES_NOT_COMPILE, params=params)
    return None


def _probe_model_file(path: str) -> None:
    """Load the vocabulary and metadata only, then free them (one call: nothing leaks
    when the caller is cancelled). Runs no compute, so it may use any thread."""
    NativeModel.load(path, 0, vocab_only=True).free()


def _settings_of(state: BalancerDesiredState) -> Settings:
    override = state.chat_template_override
    use = state.use_chat_template_override and override is not None
    return Settings(
        defaults=state.inference_parameters,
        chat_template_override=override.content if use and override is not None else None,
    )
