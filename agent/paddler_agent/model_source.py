"""Resolve a desired-state model source to a local GGUF file, reporting progress.

Three sources (see :class:`paddler_core.desired_state.ModelSource`):

* ``LocalToAgent(path)``: the file must exist, be a regular file and be GGUF.
* ``Url``: ``http(s)://`` is downloaded with aiohttp into
  ``<cache_dir>/url/<sha256(url)>/<basename>`` through a ``.part`` file that a later
  attempt resumes with a ``Range`` request; an optional sha256 is checked; the file
  is renamed into place atomically, and a complete cached file is reused without
  touching the network. ``file://`` URLs are read in place.
* ``HuggingFace``: ``huggingface_hub.hf_hub_download`` in a worker thread, so the
  usual ``HF_ENDPOINT``, ``HF_HOME``/``HF_HUB_CACHE``, ``HF_TOKEN`` and
  ``HF_HUB_OFFLINE`` variables behave as users expect (read at call time). With
  neither ``HF_HOME`` nor ``HF_HUB_CACHE`` set, the hub cache is
  ``<cache_dir>/huggingface``, so one volume holds every download.

Every failure is a :class:`ModelSourceError` whose ``variant`` is the agent-issue
name and whose ``message`` is meant for people. ``progress`` is always called on
the event loop thread, at most about ten times a second, plus once at the end.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from paddler_agent.model_download import resolve_url
from paddler_agent.model_files import (
    DEFAULT_DOWNLOAD_RETRIES,
    DEFAULT_RETRY_DELAY_S,
    ModelAccess,
    ModelSourceError,
    ProgressCallback,
    check_local_gguf,
)
from paddler_agent.model_hub import hf_cache_dir, resolve_huggingface
from paddler_core.agent_issues import AgentIssueVariant
from paddler_core.desired_state import ModelSource

# ---- public entry point ------------------------------------------------------------------


async def resolve_model(
    source: ModelSource,
    cache_dir: Path,
    progress: ProgressCallback,
    *,
    retries: int = DEFAULT_DOWNLOAD_RETRIES,
    retry_delay_s: float = DEFAULT_RETRY_DELAY_S,
    access: ModelAccess | None = None,
) -> Path:
    """The local GGUF path for ``source``, downloading it first when needed.

    Raises :class:`ModelSourceError`. Cancelling the call stops a download; what was
    received stays in the cache's ``.part`` file (URL) or the hub's incomplete blob
    (Hugging Face) and the next call resumes from there. ``access`` (None: no limits)
    is checked first and again on every redirect and resolved address of a download.
    """
    if access is not None:
        await asyncio.to_thread(access.check_source, source)
    if source.kind == "LocalToAgent" and source.local_path is not None:
        return await asyncio.to_thread(check_local_gguf, Path(source.local_path))
    if source.kind == "Url" and source.url is not None:
        return await resolve_url(source.url, cache_dir, progress, retries, retry_delay_s, access)
    if source.kind == "HuggingFace" and source.huggingface is not None:
        ref = source.huggingface
        return await resolve_huggingface(ref.repo_id, ref.filename, ref.revision, hf_cache_dir(cache_dir), progress)
    raise ModelSourceError(AgentIssueVariant.MODEL_SOURCE_IS_NONE, "No model is configured for this agent.")
