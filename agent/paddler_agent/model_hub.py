"""``HuggingFace`` model sources: ``huggingface_hub.hf_hub_download`` in a worker
thread, so the usual ``HF_ENDPOINT``, ``HF_HOME``/``HF_HUB_CACHE``, ``HF_TOKEN`` and
``HF_HUB_OFFLINE`` variables behave as users expect (read at call time). With neither
``HF_HOME`` nor ``HF_HUB_CACHE`` set, the hub cache is ``<cache_dir>/huggingface``, so
one volume holds every download.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import Any

from paddler_agent.model_files import (
    DownloadProgress,
    FileProblem,
    ModelFileUnusable,
    ModelSourceError,
    ProgressCallback,
    Throttle,
    check_local_gguf,
    describe_error,
    progress_event,
)
from paddler_core.agent_issues import AgentIssueVariant

logger = logging.getLogger(__name__)


# ---- Hugging Face -------------------------------------------------------------------------


def hf_cache_dir(cache_dir: Path) -> Path:
    """The hub cache: the one the user configured (``HF_HUB_CACHE``, ``HF_HOME``),
    read now since the hub reads them only at import; else ``<cache_dir>/huggingface``,
    so the agent's model cache holds every download."""
    if value := os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE"):
        return Path(os.path.expandvars(os.path.expanduser(value)))
    if value := os.environ.get("HF_HOME"):
        return Path(os.path.expandvars(os.path.expanduser(value))) / "hub"
    return cache_dir / "huggingface"


def _hf_offline() -> bool:
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.strip().upper() in ("1", "ON", "YES", "TRUE")


class _HubCancelled(Exception):
    """Raised inside the hub's download thread to stop it."""


def _hub_progress_class(filename: str, publish: Callable[[int, int | None], None], cancelled: threading.Event) -> type:
    """A tqdm stand-in for ``hf_hub_download(tqdm_class=...)`` that reports bytes.

    It is duck-typed (not a tqdm subclass) so the hub calls it with plain keyword
    arguments; ``update_transfer`` makes the Xet path use one bar, not two.
    """

    class _HubProgress:
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            self.n: int = int(kwargs.get("initial") or 0)
            self._total: int | None = kwargs.get("total")
            self.desc = str(kwargs.get("desc") or filename)
            self.disable = True
            self.format_dict: dict[str, Any] = {}
            publish(self.n, self._total)

        @property
        def total(self) -> int | None:
            return self._total

        @total.setter
        def total(self, value: int | None) -> None:
            self._total = value

        def update(self, n: float | None = 1) -> bool:
            if cancelled.is_set():
                raise _HubCancelled(filename)
            self.n += int(n or 0)
            publish(self.n, self._total)
            return True

        def update_transfer(self, n: float | None = 1) -> None:
            if cancelled.is_set():
                raise _HubCancelled(filename)

        def set_postfix_str(self, *args: Any, **kwargs: Any) -> None:
            pass

        def set_transfer_postfix_str(self, *args: Any, **kwargs: Any) -> None:
            pass

        def set_description(self, *args: Any, **kwargs: Any) -> None:
            pass

        def refresh(self, *args: Any, **kwargs: Any) -> None:
            pass

        def reset(self, total: int | None = None) -> None:
            self.n = 0
            self._total = total

        def close(self) -> None:
            pass

        def __enter__(self) -> _HubProgress:
            return self

        def __exit__(self, *args: object) -> None:
            self.close()

    return _HubProgress


async def resolve_huggingface(
    repo_id: str, filename: str, revision: str, cache: Path, progress: ProgressCallback
) -> Path:
    try:
        import huggingface_hub
    except ImportError as e:
        raise ModelSourceError(
            AgentIssueVariant.MODEL_DOWNLOAD_FAILED,
            "This agent cannot download from Hugging Face: the huggingface_hub package is "
            "not installed (install the 'agent' extra).",
        ) from e
    loop = asyncio.get_running_loop()
    throttle = Throttle(progress)
    name = PurePosixPath(filename).name

    def on_loop(current: int, total: int | None) -> None:
        throttle.report(progress_event(name, current, total))

    def publish(current: int, total: int | None) -> None:  # called in the hub's thread
        loop.call_soon_threadsafe(on_loop, current, total)

    cancelled = threading.Event()
    kwargs: dict[str, Any] = {
        "repo_id": repo_id,
        "filename": filename,
        "revision": revision or "main",
        "cache_dir": str(cache),
        "local_files_only": _hf_offline(),
        "tqdm_class": _hub_progress_class(name, publish, cancelled),
    }
    if endpoint := os.environ.get("HF_ENDPOINT"):
        kwargs["endpoint"] = endpoint.rstrip("/")
    where = f"{repo_id}/{filename}@{kwargs['revision']}"
    logger.info("downloading model from Hugging Face model=%s", where)

    def download() -> str:
        return str(huggingface_hub.hf_hub_download(**kwargs))

    try:
        local = await asyncio.to_thread(download)
    except asyncio.CancelledError:
        cancelled.set()
        raise
    except Exception as e:
        raise _map_hub_error(e, where) from e
    path = Path(local)
    size = await asyncio.to_thread(os.path.getsize, path)
    throttle.report(DownloadProgress(name, size, size, indeterminate=False), force=True)
    try:
        return await asyncio.to_thread(check_local_gguf, path)
    except ModelFileUnusable as e:
        raise hub_file_error(e, where) from e


def hub_file_error(error: ModelFileUnusable, where: str) -> ModelSourceError:
    """What is wrong with the file ``hf_hub_download`` returned, said for ``where`` (the
    repo, file and revision): not GGUF, unreadable on the agent, or gone."""
    path = error.details["path"]
    match error.problem:
        case FileProblem.NOT_GGUF:
            return ModelSourceError(
                AgentIssueVariant.MODEL_CANNOT_BE_LOADED,
                f"{where} on Hugging Face is not a GGUF model file (it does not start with the GGUF signature).",
                path=path,
            )
        case FileProblem.UNREADABLE:
            return ModelSourceError(
                AgentIssueVariant.MODEL_CANNOT_BE_LOADED,
                f"{where} was downloaded from Hugging Face, but the agent cannot read its file {path}: {error.reason}.",
                path=path,
            )
        case FileProblem.MISSING | FileProblem.NOT_A_FILE:
            return ModelSourceError(
                AgentIssueVariant.MODEL_DOWNLOAD_FAILED,
                f"Downloading {where} from Hugging Face left no model file at {path}.",
                path=path,
            )


def _map_hub_error(error: Exception, where: str) -> ModelSourceError:
    """Turn a huggingface_hub exception into the agent issue people see."""
    # Imported here: huggingface_hub is an optional dependency and slow to import.
    from huggingface_hub import errors as hf

    if isinstance(error, hf.GatedRepoError):
        return ModelSourceError(
            AgentIssueVariant.HUGGINGFACE_PERMISSIONS,
            f"{where} is a gated repository: accept its terms on Hugging Face and give the "
            "agent a token (HF_TOKEN) with access.",
        )
    if isinstance(error, hf.RepositoryNotFoundError):
        return ModelSourceError(
            AgentIssueVariant.HUGGINGFACE_MODEL_DOES_NOT_EXIST,
            f"Hugging Face repository for {where} does not exist, or it is private and the "
            "agent's token (HF_TOKEN) cannot see it.",
        )
    if isinstance(error, hf.RevisionNotFoundError):
        return ModelSourceError(
            AgentIssueVariant.HUGGINGFACE_MODEL_DOES_NOT_EXIST, f"Revision of {where} does not exist on Hugging Face."
        )
    if isinstance(error, hf.RemoteEntryNotFoundError):
        return ModelSourceError(
            AgentIssueVariant.HUGGINGFACE_MODEL_DOES_NOT_EXIST,
            f"File {where} does not exist in that Hugging Face repository.",
        )
    if isinstance(error, hf.LocalEntryNotFoundError):
        return ModelSourceError(
            AgentIssueVariant.MODEL_DOWNLOAD_FAILED,
            f"{where} is not in the local Hugging Face cache and the hub cannot be reached (or HF_HUB_OFFLINE is set).",
        )
    if isinstance(error, hf.HFValidationError):
        return ModelSourceError(
            AgentIssueVariant.HUGGINGFACE_MODEL_DOES_NOT_EXIST, f"Invalid Hugging Face reference {where}: {error}"
        )
    if isinstance(error, hf.HfHubHTTPError):
        status = getattr(getattr(error, "response", None), "status_code", None)
        if status in (401, 403):
            return ModelSourceError(
                AgentIssueVariant.HUGGINGFACE_PERMISSIONS,
                f"Hugging Face refused access to {where} (HTTP {status}); check HF_TOKEN.",
            )
        return ModelSourceError(
            AgentIssueVariant.MODEL_DOWNLOAD_FAILED, f"Downloading {where} from Hugging Face failed: {error}"
        )
    return ModelSourceError(
        AgentIssueVariant.MODEL_DOWNLOAD_FAILED,
        f"Downloading {where} from Hugging Face failed: {describe_error(error)}",
    )
