"""Model files on this agent: the checks a GGUF passes, what this agent may load
(:class:`ModelAccess`), and the errors and progress events every model source reports.

Every failure is a :class:`ModelSourceError` whose ``variant`` is the agent-issue
name and whose ``message`` is meant for people.
"""

from __future__ import annotations

import hashlib
import os
import socket
import time
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

import aiohttp
import aiohttp.abc

from paddler_core.agent_issues import AgentIssueVariant
from paddler_core.desired_state import ModelSource
from paddler_core.model_access import ModelAccessDenied, ModelUrlPolicy, path_is_under
from paddler_core.protocol import AgentIssue

GGUF_MAGIC = b"GGUF"
PROGRESS_INTERVAL_S = 0.1
"""At most one progress report per this many seconds (plus the final one)."""
CHUNK_SIZE = 1 << 20
DEFAULT_DOWNLOAD_RETRIES = 3
"""Attempts after the first for transient failures (connection lost, truncated body, 5xx)."""
DEFAULT_RETRY_DELAY_S = 1.0

MAX_REDIRECTS = 10


@dataclass(frozen=True)
class DownloadProgress:
    """One progress report. ``total`` is 0 and ``indeterminate`` True when unknown."""

    filename: str
    current: int
    total: int
    indeterminate: bool


ProgressCallback = Callable[[DownloadProgress], None]


class ModelSourceError(Exception):
    """The model could not be resolved; ``variant`` names the agent issue."""

    def __init__(self, variant: AgentIssueVariant, message: str, **details: str) -> None:
        super().__init__(message)
        self.variant = variant
        self.message = message
        self.details: dict[str, str] = dict(details)

    def __str__(self) -> str:
        return f"{self.variant}: {self.message}"

    def to_issue(self) -> AgentIssue:
        """The agent issue to put on the status board: Paddler's ``{"model_path": ...}``
        (the local path, URL or Hugging Face file) and our ``message``."""
        model_path = self.details.get("model_path") or self.details.get("path") or self.details.get("url")
        params = {"model_path": model_path} if model_path else {}
        return AgentIssue(variant=self.variant, params={**params, "message": self.message})


class FileProblem(StrEnum):
    """Why a local model file cannot be used. Paddler's variants do not tell some of
    these apart (``ModelCannotBeLoaded`` is both unreadable and not GGUF), so code that
    words its own message asks this, never the variant."""

    MISSING = "missing"
    NOT_A_FILE = "not_a_file"
    UNREADABLE = "unreadable"
    NOT_GGUF = "not_gguf"


class ModelFileUnusable(ModelSourceError):
    """A local model file is missing or unusable; ``problem`` says why and ``reason`` is
    the operating system's word for an unreadable one."""

    def __init__(
        self, problem: FileProblem, variant: AgentIssueVariant, message: str, *, path: str, reason: str = ""
    ) -> None:
        super().__init__(variant, message, path=path)
        self.problem = problem
        self.reason = reason


class Transient(Exception):
    """A download failure worth another attempt (resuming from the ``.part`` file)."""

    def __init__(self, error: ModelSourceError) -> None:
        super().__init__(str(error))
        self.error = error


# ---- what this agent may load ---------------------------------------------------------------


@dataclass(frozen=True)
class ModelAccess:
    """The agent's own limits on model sources (``--model-url-allow``, ``--model-local-root``).

    URLs are checked before the download, on every redirect hop, and on every address a
    host name resolves to (so a name that points at a metadata address is refused too).
    Local paths (``LocalToAgent``, ``file://``) must lie under a root once symlinks are
    resolved; the refusal reads the same whether the file exists or not.
    """

    url_policy: ModelUrlPolicy = field(default_factory=ModelUrlPolicy)
    local_roots: tuple[str, ...] = ()
    """Empty: any local path."""

    def check_source(self, source: ModelSource) -> None:
        """Raises ModelSourceError(ModelSourceNotAllowed) for a refused source. Touches the
        file system only to resolve symlinks of a local path."""
        if source.kind == "LocalToAgent" and source.local_path is not None:
            self.check_local(Path(source.local_path))
        elif source.kind == "Url" and source.url is not None:
            self.check_url(source.url.url)
            parts = urllib.parse.urlsplit(source.url.url)
            if parts.scheme.lower() == "file":
                self.check_local(Path(urllib.request.url2pathname(parts.path)))

    def check_url(self, url: str) -> None:
        try:
            self.url_policy.check_url(url)
        except ModelAccessDenied as e:
            raise ModelSourceError(
                AgentIssueVariant.MODEL_SOURCE_NOT_ALLOWED, f"This agent refuses {e}", url=url
            ) from e

    def check_address(self, url: str, address: str) -> None:
        try:
            self.url_policy.check_address(url, address)
        except ModelAccessDenied as e:
            raise ModelSourceError(
                AgentIssueVariant.MODEL_SOURCE_NOT_ALLOWED, f"This agent refuses {e}", url=url
            ) from e

    def check_local(self, path: Path) -> Path:
        if not self.local_roots:
            return path
        shown = str(path)
        roots = tuple(os.path.realpath(r) for r in self.local_roots)
        if not path.is_absolute() or not path_is_under(os.path.realpath(path), roots):
            raise ModelSourceError(
                AgentIssueVariant.MODEL_SOURCE_NOT_ALLOWED,
                f"Model path {shown} is outside this agent's model roots ({', '.join(self.local_roots)}); "
                "add a root with --model-local-root.",
                path=shown,
            )
        return path


class CheckingResolver(aiohttp.abc.AbstractResolver):
    """Resolves like aiohttp, then refuses addresses the policy forbids for ``url``: the
    connection goes only to an address that was checked."""

    def __init__(self, access: ModelAccess) -> None:
        self.access = access
        self.url = ""
        self._inner = aiohttp.ThreadedResolver()

    async def resolve(self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET) -> list[Any]:
        found = await self._inner.resolve(host, port, family)
        for entry in found:
            self.access.check_address(self.url, str(entry["host"]))
        return found

    async def close(self) -> None:
        await self._inner.close()


# ---- local files -------------------------------------------------------------------------


def check_local_gguf(path: Path) -> Path:
    """``path`` if it is an existing, readable GGUF file; raises ModelSourceError."""
    shown = str(path)
    if not path.exists():
        raise ModelFileUnusable(
            FileProblem.MISSING,
            AgentIssueVariant.MODEL_FILE_DOES_NOT_EXIST,
            f"Model file {shown} does not exist on the agent.",
            path=shown,
        )
    if not path.is_file():
        raise ModelFileUnusable(
            FileProblem.NOT_A_FILE,
            AgentIssueVariant.MODEL_FILE_DOES_NOT_EXIST,
            f"Model path {shown} exists on the agent but is not a regular file.",
            path=shown,
        )
    try:
        with path.open("rb") as f:
            head = f.read(len(GGUF_MAGIC))
    except OSError as e:
        reason = str(e.strerror or e)
        raise ModelFileUnusable(
            FileProblem.UNREADABLE,
            AgentIssueVariant.MODEL_CANNOT_BE_LOADED,
            f"Model file {shown} cannot be read: {reason}.",
            path=shown,
            reason=reason,
        ) from e
    if head != GGUF_MAGIC:
        raise ModelFileUnusable(
            FileProblem.NOT_GGUF,
            AgentIssueVariant.MODEL_CANNOT_BE_LOADED,
            f"Model file {shown} is not a GGUF file (it does not start with the GGUF signature).",
            path=shown,
        )
    return path


def sha256_of_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK_SIZE):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass
class Throttle:
    """Forwards progress at most every ``interval_s`` seconds (or when forced)."""

    callback: ProgressCallback
    interval_s: float = PROGRESS_INTERVAL_S
    _last: float = field(default=float("-inf"))

    def report(self, event: DownloadProgress, *, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self._last >= self.interval_s:
            self._last = now
            self.callback(event)


def progress_event(name: str, current: int, total: int | None) -> DownloadProgress:
    if total is None:
        return DownloadProgress(name, current, 0, indeterminate=True)
    return DownloadProgress(name, current, total, indeterminate=False)


def describe_error(error: BaseException) -> str:
    text = str(error)
    return f"{type(error).__name__}: {text}" if text else type(error).__name__
