"""Embedding requests on the decode thread: a queue of them, a batch of documents a step.

:class:`EmbeddingQueue` belongs to the :class:`~paddler_agent.llama.decode_worker.DecodeWorker`
and runs on its thread, between generation steps; payloads (Paddler 4.1's ``Embedding``
variants, built by :mod:`paddler_core.generated_output`) leave through the worker's outbox.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable

from paddler_agent.llama.errors import RequestError
from paddler_agent.llama.jobs import EmbedJob
from paddler_agent.llama.native import EMBEDDING_MAX_SEQS, EmbedContext, Runtime
from paddler_core.embeddings import normalize_embedding
from paddler_core.generated_output import document_exceeds_batch_size, embedding, embedding_done, embedding_error
from paddler_core.inference import ResponsePayload
from paddler_core.protocol import EmbedMessage

logger = logging.getLogger(__name__)

Emit = Callable[[str, ResponsePayload, bool], None]
"""(request id, payload, final)."""


class EmbeddingQueue:
    def __init__(self, runtime: Runtime, emit: Emit) -> None:
        self.runtime = runtime
        self.model = runtime.model
        self.emit = emit
        self.queue: deque[EmbedJob | EmbedMessage] = deque()

    def __bool__(self) -> bool:
        return bool(self.queue)

    def append(self, message: EmbedMessage) -> None:
        self.queue.append(message)

    def cancel(self, request_id: str) -> None:
        self.queue = deque(e for e in self.queue if e.request_id != request_id)

    def run_one_batch(self) -> None:
        """Embed the next batch of the oldest request's documents (answered in full when done)."""
        item = self.queue[0]
        emb = self.runtime.emb
        try:
            if emb is None:
                raise RuntimeError(
                    "embeddings are not enabled for this model; set enable_embeddings in the inference parameters"
                )
            job = item if isinstance(item, EmbedJob) else self._prepare(item, emb)
            self.queue[0] = job
            self._run_batch(job, emb)
        except (RequestError, RuntimeError) as e:
            text = e.message if isinstance(e, RequestError) else str(e)
            logger.info("embedding failed request_id=%s error=%s", item.request_id, text)
            self.emit(item.request_id, embedding_error(text), True)
            self.queue.popleft()

    def _prepare(self, message: EmbedMessage, emb: EmbedContext) -> EmbedJob:
        """Tokenize the batch. A document over ``n_batch`` tokens is reported on its own
        (Paddler 4.1's ``DocumentExceedsBatchSize``) and the others are embedded."""
        params = message.params
        limit = min(emb.capacity, self.runtime.config.n_batch)
        documents: list[tuple[str, list[int]]] = []
        for doc in params.input_batch:
            tokens = self.model.tokenize(doc.content, add_special=True, parse_special=False)
            if not tokens:
                tokens = [max(self.model.bos, 0)]
            if len(tokens) > limit:
                logger.info(
                    "embedding document exceeds n_batch request_id=%s document=%s tokens=%d n_batch=%d",
                    message.request_id,
                    doc.id,
                    len(tokens),
                    limit,
                )
                self.emit(message.request_id, document_exceeds_batch_size(doc.id, len(tokens), limit), False)
                continue
            documents.append((doc.id, tokens))
        pooling = self.runtime.config.pooling_type
        return EmbedJob(message.request_id, documents, params.normalization_method, pooling.value)

    def _run_batch(self, job: EmbedJob, emb: EmbedContext) -> None:
        if not job.documents:  # every document was oversized (each already reported)
            self.emit(job.request_id, embedding_done(), True)
            self.queue.popleft()
            return
        group: list[tuple[str, list[int]]] = []
        total = 0
        for doc_id, tokens in job.documents[job.next_index :]:
            if group and (total + len(tokens) > emb.batch_tokens or len(group) >= EMBEDDING_MAX_SEQS):
                break
            group.append((doc_id, tokens))
            total += len(tokens)
        vectors = emb.embed([tokens for _, tokens in group])
        for (doc_id, _), vector in zip(group, vectors, strict=True):
            values = normalize_embedding(vector.tolist(), job.normalization)
            self.emit(job.request_id, embedding(doc_id, values, job.normalization, job.pooling_label), False)
        job.next_index += len(group)
        if job.next_index >= len(job.documents):
            self.emit(job.request_id, embedding_done(), True)
            self.queue.popleft()
