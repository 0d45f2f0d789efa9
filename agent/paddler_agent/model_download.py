"""``Url`` model sources: ``http(s)://`` downloaded with aiohttp into
``<cache_dir>/url/<sha256(url)>/<basename>`` through a ``.part`` file that a later
attempt resumes with a ``Range`` request; an optional sha256 is checked; the file is
renamed into place atomically, and a complete cached file is reused without touching
the network. ``file://`` URLs are read in place. Every redirect and resolved address
is checked against the agent's :class:`~paddler_agent.model_files.ModelAccess`.
"""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import logging
import os
import urllib.parse
import urllib.request
from pathlib import Path, PurePosixPath

import aiohttp
import aiohttp.abc

from paddler_agent.model_files import (
    CHUNK_SIZE,
    GGUF_MAGIC,
    MAX_REDIRECTS,
    CheckingResolver,
    DownloadProgress,
    ModelAccess,
    ModelSourceError,
    ProgressCallback,
    Throttle,
    Transient,
    check_local_gguf,
    describe_error,
    progress_event,
    sha256_of_file,
)
from paddler_core.agent_issues import AgentIssueVariant
from paddler_core.desired_state import UrlModelReference

logger = logging.getLogger(__name__)


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


async def resolve_url(
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
        except Transient as e:
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

    Raises ``Transient`` for failures a later attempt may get past, and
    ModelSourceError for those it will not.
    """
    part = _part_path(target)
    have = await asyncio.to_thread(_size_or_zero, part)
    headers = {"Accept-Encoding": "identity"}
    if have:
        headers["Range"] = f"bytes={have}-"
    throttle = Throttle(progress)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=120)
    resolver = CheckingResolver(access) if access is not None else None
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
                raise Transient(_download_error(url, f"Cached partial download of {url} is stale."))
            if resp.status >= 400:
                raise _http_error(url, resp.status, resp.reason)
            start = 0
            total: int | None = None
            if resp.status == 206:
                cr = _parse_content_range(resp.headers.get("Content-Range"))
                if cr is None or cr[0] != have:
                    await asyncio.to_thread(part.unlink, missing_ok=True)
                    raise Transient(_download_error(url, f"Server sent an unexpected byte range for {url}."))
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
        raise Transient(
            _download_error(
                url, f"Downloading {url} failed: {describe_error(e)}.", AgentIssueVariant.DOWNLOAD_SERVER_IS_UNREACHABLE
            )
        ) from e
    except (aiohttp.ClientError, TimeoutError) as e:
        raise Transient(_download_error(url, f"Downloading {url} failed: {describe_error(e)}.")) from e
    except OSError as e:
        raise _download_error(
            url, f"Cannot write the model to {part.parent}: {e}.", AgentIssueVariant.CACHE_DIRECTORY_IS_NOT_WRITABLE
        ) from e
    if total is not None and received != total:
        raise Transient(
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
    throttle: Throttle,
) -> int:
    """Write the response body at offset ``start``; returns the file's length after."""
    mode = "r+b" if start else "wb"
    f = await asyncio.to_thread(open, part, mode)
    try:
        if start:
            await asyncio.to_thread(f.seek, start)
            await asyncio.to_thread(f.truncate)
        current = start
        throttle.report(progress_event(name, current, total), force=True)
        async for chunk in resp.content.iter_chunked(CHUNK_SIZE):
            await asyncio.to_thread(f.write, chunk)
            current += len(chunk)
            throttle.report(progress_event(name, current, total))
        throttle.report(progress_event(name, current, total), force=True)
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
        resolver: CheckingResolver | None,
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


def _http_error(url: str, status: int, reason: str | None) -> ModelSourceError | Transient:
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
        return Transient(_download_error(url, message, AgentIssueVariant.DOWNLOAD_SERVER_ERRORED))
    error = _download_error(url, message, AgentIssueVariant.DOWNLOAD_SERVER_REJECTED_REQUEST)
    return Transient(error) if status in (408, 429) else error
