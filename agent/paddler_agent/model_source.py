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
import fcntl
import hashlib
import logging
import os
import socket
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path, PurePosixPath
from typing import Any

import aiohttp
import aiohttp.abc

from paddler_core.agent_issues import AgentIssueVariant
from paddler_core.desired_state import ModelSource, UrlModelReference
from paddler_core.model_access import ModelAccessDenied, ModelUrlPolicy, path_is_under
from paddler_core.protocol import AgentIssue

logger = logging.getLogger(__name__)

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


class _Transient(Exception):
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


class _CheckingResolver(aiohttp.abc.AbstractResolver):
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
        return await _resolve_url(source.url, cache_dir, progress, retries, retry_delay_s, access)
    if source.kind == "HuggingFace" and source.huggingface is not None:
        ref = source.huggingface
        return await _resolve_huggingface(ref.repo_id, ref.filename, ref.revision, hf_cache_dir(cache_dir), progress)
    raise ModelSourceError(AgentIssueVariant.MODEL_SOURCE_IS_NONE, "No model is configured for this agent.")


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


# ---- URLs ---------------------------------------------------------------------------------


def url_cache_path(url: str, cache_dir: Path) -> Path:
    """Where a downloaded URL lives: ``<cache_dir>/url/<sha256(url)>/<basename>``."""
    key = hashlib.sha256(url.encode()).hexdigest()
    return cache_dir / "url" / key / url_basename(url)


def url_basename(url: str) -> str:
    name = urllib.parse.unquote(PurePosixPath(urllib.parse.urlsplit(url).path).name)
    if name in ("", ".", "..") or "/" in name or "\\" in name or "\0" in name:
        return "model.gguf"
    return name


async def _resolve_url(
    ref: UrlModelReference,
    cache_dir: Path,
    progress: ProgressCallback,
    retries: int,
    retry_delay_s: float,
    access: ModelAccess | None = None,
) -> Path:
    scheme = urllib.parse.urlsplit(ref.url).scheme.lower()
    if scheme == "file":
        return await asyncio.to_thread(_resolve_file_url, ref)
    if scheme not in ("http", "https"):
        raise ModelSourceError(
            AgentIssueVariant.DOWNLOAD_URL_IS_MALFORMED, f"Unsupported URL scheme {scheme!r} in {ref.url}.", url=ref.url
        )
    target = url_cache_path(ref.url, cache_dir)
    try:
        async with _DownloadLock(target):
            return await _resolve_http(ref, target, progress, retries, retry_delay_s, access)
    except OSError as e:
        raise ModelSourceError(
            AgentIssueVariant.CACHE_DIRECTORY_IS_NOT_WRITABLE,
            f"Cannot store the model from {ref.url} in the cache {cache_dir}: {e}",
            url=ref.url,
        ) from e


async def _resolve_http(
    ref: UrlModelReference,
    target: Path,
    progress: ProgressCallback,
    retries: int,
    retry_delay_s: float,
    access: ModelAccess | None,
) -> Path:
    if await asyncio.to_thread(_cached_file_is_usable, target, ref.sha256):
        logger.info("model cached url=%s path=%s", ref.url, target)
        size = await asyncio.to_thread(os.path.getsize, target)
        progress(DownloadProgress(target.name, size, size, indeterminate=False))
        return target
    attempt = 0
    while True:
        try:
            await _download(ref.url, target, progress, access)
            break
        except _Transient as e:
            if attempt >= retries:
                raise e.error from e
            attempt += 1
            delay = retry_delay_s * attempt
            logger.warning(
                "model download interrupted; resuming url=%s attempt=%d delay_s=%g error=%s",
                ref.url,
                attempt,
                delay,
                e.error.message,
            )
            await asyncio.sleep(delay)
    await asyncio.to_thread(_finish_download, _part_path(target), target, ref)
    logger.info("model downloaded url=%s path=%s", ref.url, target)
    return target


class _DownloadLock:
    """An exclusive ``flock`` on ``<target>.lock``, so agents (or calls) that share a
    cache never write the same ``.part`` file at once. Waiting polls, so it can be
    cancelled."""

    POLL_S = 0.25

    def __init__(self, target: Path) -> None:
        self.path = target.with_name(target.name + ".lock")
        self.fd: int | None = None

    async def __aenter__(self) -> None:
        await asyncio.to_thread(self.path.parent.mkdir, parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            logged = False
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if not logged:
                        logger.info("waiting for another download lock=%s", self.path)
                        logged = True
                    await asyncio.sleep(self.POLL_S)
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd

    async def __aexit__(self, *exc: object) -> None:
        if self.fd is not None:
            os.close(self.fd)  # releases the lock
            self.fd = None


def _resolve_file_url(ref: UrlModelReference) -> Path:
    parts = urllib.parse.urlsplit(ref.url)
    if parts.netloc not in ("", "localhost"):
        raise ModelSourceError(
            AgentIssueVariant.DOWNLOAD_URL_IS_MALFORMED,
            f"file:// URL {ref.url} names host {parts.netloc!r}; only local files are supported.",
            url=ref.url,
        )
    path = check_local_gguf(Path(urllib.request.url2pathname(parts.path)))
    if ref.sha256 is not None:
        actual = sha256_of_file(path)
        if actual != ref.sha256:
            raise _checksum_error(ref, actual)
    return path


def _size_or_zero(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _part_path(target: Path) -> Path:
    return target.with_name(target.name + ".part")


def _checksum_marker(target: Path) -> Path:
    return target.with_name(target.name + ".sha256")


def _cached_file_is_usable(target: Path, sha256: str | None) -> bool:
    """A complete cached download that is GGUF and matches the wanted checksum."""
    if not target.is_file():
        return False
    try:
        with target.open("rb") as f:
            if f.read(len(GGUF_MAGIC)) != GGUF_MAGIC:
                return False
        if sha256 is None:
            return True
        marker = _checksum_marker(target)
        if marker.is_file() and marker.read_text().strip() == sha256:
            return True
        if sha256_of_file(target) == sha256:
            marker.write_text(sha256)
            return True
    except OSError:
        return False
    logger.info("cached model has another checksum; downloading again path=%s", target)
    return False


def _finish_download(part: Path, target: Path, ref: UrlModelReference) -> None:
    """Check the completed ``.part`` file and rename it into place atomically."""
    try:
        with part.open("rb") as f:
            head = f.read(len(GGUF_MAGIC))
    except OSError as e:
        raise ModelSourceError(
            AgentIssueVariant.MODEL_CANNOT_BE_LOADED,
            f"Downloaded model from {ref.url} cannot be read: {e}.",
            url=ref.url,
        ) from e
    if head != GGUF_MAGIC:
        part.unlink(missing_ok=True)
        raise ModelSourceError(
            AgentIssueVariant.MODEL_CANNOT_BE_LOADED,
            f"The file at {ref.url} is not a GGUF model (it does not start with the GGUF signature).",
            url=ref.url,
        )
    if ref.sha256 is not None:
        actual = sha256_of_file(part)
        if actual != ref.sha256:
            part.unlink(missing_ok=True)
            raise _checksum_error(ref, actual)
    with part.open("rb") as f:
        os.fsync(f.fileno())
    os.replace(part, target)
    if ref.sha256 is not None:
        _checksum_marker(target).write_text(ref.sha256)
    else:
        _checksum_marker(target).unlink(missing_ok=True)


def _checksum_error(ref: UrlModelReference, actual: str) -> ModelSourceError:
    return ModelSourceError(
        AgentIssueVariant.MODEL_CHECKSUM_MISMATCH,
        f"The model from {ref.url} has sha256 {actual}, but {ref.sha256} was expected; the file was discarded.",
        url=ref.url,
    )


@dataclass
class _Throttle:
    """Forwards progress at most every ``interval_s`` seconds (or when forced)."""

    callback: ProgressCallback
    interval_s: float = PROGRESS_INTERVAL_S
    _last: float = field(default=float("-inf"))

    def report(self, event: DownloadProgress, *, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self._last >= self.interval_s:
            self._last = now
            self.callback(event)


def _parse_content_range(value: str | None) -> tuple[int, int | None] | None:
    """``bytes START-END/TOTAL`` -> (START, TOTAL or None)."""
    if not value or not value.startswith("bytes "):
        return None
    spec, _, total = value[len("bytes ") :].partition("/")
    start, _, _end = spec.partition("-")
    try:
        return int(start), (None if total in ("", "*") else int(total))
    except ValueError:
        return None


def _download_error(
    url: str, message: str, variant: AgentIssueVariant = AgentIssueVariant.DOWNLOAD_INTERRUPTED
) -> ModelSourceError:
    return ModelSourceError(variant, message, url=url)


async def _download(url: str, target: Path, progress: ProgressCallback, access: ModelAccess | None = None) -> None:
    """Download ``url`` into ``target``'s ``.part`` file, resuming what is there.

    Raises ``_Transient`` for failures a later attempt may get past, and
    ModelSourceError for those it will not.
    """
    part = _part_path(target)
    have = await asyncio.to_thread(_size_or_zero, part)
    headers = {"Accept-Encoding": "identity"}
    if have:
        headers["Range"] = f"bytes={have}-"
    throttle = _Throttle(progress)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=120)
    resolver = _CheckingResolver(access) if access is not None else None
    connector = aiohttp.TCPConnector(resolver=resolver) if resolver is not None else None
    try:
        async with (
            aiohttp.ClientSession(
                timeout=timeout, trust_env=True, auto_decompress=False, connector=connector
            ) as session,
            _FollowRedirects(session, url, headers, access, resolver) as resp,
        ):
            if resp.status == 416 and have:
                # Our .part is at least as long as the file: complete, or stale.
                cr = _parse_content_range(resp.headers.get("Content-Range"))
                if cr is not None and cr[1] == have:
                    throttle.report(DownloadProgress(target.name, have, have, False), force=True)
                    return
                await asyncio.to_thread(part.unlink, missing_ok=True)
                raise _Transient(_download_error(url, f"Cached partial download of {url} is stale."))
            if resp.status >= 400:
                raise _http_error(url, resp.status, resp.reason)
            start = 0
            total: int | None = None
            if resp.status == 206:
                cr = _parse_content_range(resp.headers.get("Content-Range"))
                if cr is None or cr[0] != have:
                    await asyncio.to_thread(part.unlink, missing_ok=True)
                    raise _Transient(_download_error(url, f"Server sent an unexpected byte range for {url}."))
                start, total = cr
                if total is None and resp.content_length is not None:
                    total = start + resp.content_length
            else:
                if have:
                    logger.info("server ignored Range; downloading from the start url=%s", url)
                total = resp.content_length
            received = await _write_body(resp, part, start, total, target.name, throttle)
    except aiohttp.ClientResponseError as e:
        raise _http_error(url, e.status, e.message) from e
    except aiohttp.ClientConnectorError as e:
        raise _Transient(
            _download_error(
                url, f"Downloading {url} failed: {_describe(e)}.", AgentIssueVariant.DOWNLOAD_SERVER_IS_UNREACHABLE
            )
        ) from e
    except (aiohttp.ClientError, TimeoutError) as e:
        raise _Transient(_download_error(url, f"Downloading {url} failed: {_describe(e)}.")) from e
    except OSError as e:
        raise _download_error(
            url, f"Cannot write the model to {part.parent}: {e}.", AgentIssueVariant.CACHE_DIRECTORY_IS_NOT_WRITABLE
        ) from e
    if total is not None and received != total:
        raise _Transient(
            _download_error(
                url,
                f"Download of {url} was cut short: got {received} of {total} bytes.",
            )
        )


async def _write_body(
    resp: aiohttp.ClientResponse,
    part: Path,
    start: int,
    total: int | None,
    name: str,
    throttle: _Throttle,
) -> int:
    """Write the response body at offset ``start``; returns the file's length after."""
    mode = "r+b" if start else "wb"
    f = await asyncio.to_thread(open, part, mode)
    try:
        if start:
            await asyncio.to_thread(f.seek, start)
            await asyncio.to_thread(f.truncate)
        current = start
        throttle.report(_event(name, current, total), force=True)
        async for chunk in resp.content.iter_chunked(CHUNK_SIZE):
            await asyncio.to_thread(f.write, chunk)
            current += len(chunk)
            throttle.report(_event(name, current, total))
        throttle.report(_event(name, current, total), force=True)
        return current
    finally:
        await asyncio.to_thread(f.close)


class _FollowRedirects:
    """GET ``url``; with an ``access`` policy, redirects are followed here, each hop's URL
    checked before it is dialled (aiohttp's own following would skip the check)."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        url: str,
        headers: dict[str, str],
        access: ModelAccess | None,
        resolver: _CheckingResolver | None,
    ) -> None:
        self.session, self.url, self.headers, self.access, self.resolver = session, url, headers, access, resolver
        self.resp: aiohttp.ClientResponse | None = None

    async def __aenter__(self) -> aiohttp.ClientResponse:
        if self.access is None or self.resolver is None:
            self.resp = await self.session.get(self.url, headers=self.headers)
            return self.resp
        hop = self.url
        for _ in range(MAX_REDIRECTS + 1):
            self.access.check_url(hop)
            self.resolver.url = hop
            resp = await self.session.get(hop, headers=self.headers, allow_redirects=False)
            location = resp.headers.get("Location")
            if resp.status not in (301, 302, 303, 307, 308) or not location:
                self.resp = resp
                return resp
            resp.release()
            hop = urllib.parse.urljoin(hop, location)
        raise _download_error(self.url, f"Downloading {self.url} followed more than {MAX_REDIRECTS} redirects.")

    async def __aexit__(self, *exc: object) -> None:
        if self.resp is not None:
            self.resp.release()


def _event(name: str, current: int, total: int | None) -> DownloadProgress:
    if total is None:
        return DownloadProgress(name, current, 0, indeterminate=True)
    return DownloadProgress(name, current, total, indeterminate=False)


def _http_error(url: str, status: int, reason: str | None) -> ModelSourceError | _Transient:
    """Paddler 4.1's names: 404 ModelDoesNotExistAtUrl, 401/403 DownloadServerDeniedAccess,
    5xx DownloadServerErrored (retried), other 4xx DownloadServerRejectedRequest
    (408/429 retried)."""
    if status == 404:
        return _download_error(
            url, f"Model URL {url} was not found (HTTP 404).", AgentIssueVariant.MODEL_DOES_NOT_EXIST_AT_URL
        )
    if status in (401, 403):
        return _download_error(
            url, f"Access to {url} was refused (HTTP {status}).", AgentIssueVariant.DOWNLOAD_SERVER_DENIED_ACCESS
        )
    message = f"Downloading {url} failed: HTTP {status} {reason or ''}".strip()
    if status >= 500:
        return _Transient(_download_error(url, message, AgentIssueVariant.DOWNLOAD_SERVER_ERRORED))
    error = _download_error(url, message, AgentIssueVariant.DOWNLOAD_SERVER_REJECTED_REQUEST)
    return _Transient(error) if status in (408, 429) else error


def _describe(error: BaseException) -> str:
    text = str(error)
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


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


async def _resolve_huggingface(
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
    throttle = _Throttle(progress)
    name = PurePosixPath(filename).name

    def on_loop(current: int, total: int | None) -> None:
        throttle.report(_event(name, current, total))

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
        f"Downloading {where} from Hugging Face failed: {_describe(error)}",
    )
