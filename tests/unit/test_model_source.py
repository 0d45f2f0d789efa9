"""model_source against real local HTTP servers (a plain file server and a fake hub)."""

from __future__ import annotations

import asyncio
import errno
import hashlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from paddler_agent.model_download import url_cache_path
from paddler_agent.model_files import DownloadProgress, FileProblem, ModelFileUnusable, ModelSourceError
from paddler_agent.model_hub import hub_file_error
from paddler_agent.model_source import resolve_model
from paddler_core.desired_state import ModelSource

FAKE_GGUF = b"GGUF" + b"\x03\x00\x00\x00" + bytes(range(256)) * 4096  # ~1 MiB
NOT_GGUF = b"<html>not a model</html>" * 100

ServerFactory = Callable[[web.Application], Awaitable[TestServer]]


@dataclass
class FileServer:
    """Serves byte blobs by path, honouring Range unless told not to."""

    files: dict[str, bytes]
    honour_range: bool = True
    truncate_first: bool = False
    hits: list[tuple[str, str | None]] = field(default_factory=list)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        rng = request.headers.get("Range")
        self.hits.append((name, rng))
        data = self.files.get(name)
        if data is None:
            raise web.HTTPNotFound()
        start = 0
        status = 200
        headers = {"Content-Type": "application/octet-stream"}
        if rng and self.honour_range:
            start = int(rng.removeprefix("bytes=").split("-")[0])
            status = 206
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        body = data[start:]
        if self.truncate_first and len(self.hits) == 1:
            resp = web.StreamResponse(status=status, headers=headers)
            resp.content_length = len(body)
            await resp.prepare(request)
            await resp.write(body[: len(body) // 2])
            assert request.transport is not None
            request.transport.close()
            return resp
        return web.Response(status=status, body=body, headers=headers)


async def start_file_server(aiohttp_server: ServerFactory, files: FileServer) -> TestServer:
    app = web.Application()
    app.router.add_get("/files/{name}", files.handle)
    return await aiohttp_server(app)


def url_source(url: str, sha256: str | None = None) -> ModelSource:
    value: dict[str, str] = {"url": url}
    if sha256 is not None:
        value["sha256"] = sha256
    return ModelSource.model_validate({"Url": value})


class Events:
    def __init__(self) -> None:
        self.items: list[DownloadProgress] = []

    def __call__(self, event: DownloadProgress) -> None:
        self.items.append(event)


# ---- local files ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("setup", "variant"),
    [
        ("missing", "ModelFileDoesNotExist"),
        ("directory", "ModelFileDoesNotExist"),
        ("not_gguf", "ModelCannotBeLoaded"),
        ("empty", "ModelCannotBeLoaded"),
    ],
)
async def test_local_file_errors(tmp_path: Path, setup: str, variant: str) -> None:
    path = tmp_path / "model.gguf"
    if setup == "directory":
        path.mkdir()
    elif setup == "not_gguf":
        path.write_bytes(NOT_GGUF)
    elif setup == "empty":
        path.write_bytes(b"")
    with pytest.raises(ModelSourceError) as info:
        await resolve_model(ModelSource.local(str(path)), tmp_path / "cache", Events())
    assert info.value.variant == variant
    assert str(path) in info.value.message
    issue = info.value.to_issue()
    assert issue.variant == variant
    assert issue.message == info.value.message


async def test_local_gguf_resolves_to_itself(tmp_path: Path) -> None:
    path = tmp_path / "model.gguf"
    path.write_bytes(FAKE_GGUF)
    assert await resolve_model(ModelSource.local(str(path)), tmp_path, Events()) == path


async def test_file_url(tmp_path: Path) -> None:
    path = tmp_path / "m o.gguf"
    path.write_bytes(FAKE_GGUF)
    digest = hashlib.sha256(FAKE_GGUF).hexdigest()
    got = await resolve_model(url_source(path.as_uri(), digest), tmp_path / "c", Events())
    assert got == path
    with pytest.raises(ModelSourceError) as info:
        await resolve_model(url_source(path.as_uri(), "0" * 64), tmp_path / "c", Events())
    assert info.value.variant == "ModelChecksumMismatch"
    with pytest.raises(ModelSourceError) as info:
        await resolve_model(url_source((tmp_path / "nope").as_uri()), tmp_path / "c", Events())
    assert info.value.variant == "ModelFileDoesNotExist"


async def test_none_source_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ModelSourceError):
        await resolve_model(ModelSource.none(), tmp_path, Events())


# ---- HTTP downloads ------------------------------------------------------------------------


async def test_download_with_progress(aiohttp_server: ServerFactory, tmp_path: Path) -> None:
    files = FileServer({"model.gguf": FAKE_GGUF})
    server = await start_file_server(aiohttp_server, files)
    url = str(server.make_url("/files/model.gguf"))
    events = Events()
    path = await resolve_model(url_source(url), tmp_path, events)
    assert path == url_cache_path(url, tmp_path)
    assert path.parent.parent == tmp_path / "url"
    assert path.read_bytes() == FAKE_GGUF
    assert not path.with_name(path.name + ".part").exists()
    assert events.items[0] == DownloadProgress("model.gguf", 0, len(FAKE_GGUF), False)
    assert events.items[-1] == DownloadProgress("model.gguf", len(FAKE_GGUF), len(FAKE_GGUF), False)
    currents = [e.current for e in events.items]
    assert currents == sorted(currents)


async def test_cached_file_is_reused_without_network(aiohttp_server: ServerFactory, tmp_path: Path) -> None:
    files = FileServer({"model.gguf": FAKE_GGUF})
    server = await start_file_server(aiohttp_server, files)
    url = str(server.make_url("/files/model.gguf"))
    digest = hashlib.sha256(FAKE_GGUF).hexdigest()
    first = await resolve_model(url_source(url, digest), tmp_path, Events())
    assert len(files.hits) == 1
    second = await resolve_model(url_source(url, digest), tmp_path, Events())
    third = await resolve_model(url_source(url), tmp_path, Events())
    assert first == second == third
    assert len(files.hits) == 1


@pytest.mark.parametrize("honour_range", [True, False], ids=["range", "server-ignores-range"])
async def test_resume_after_truncated_attempt(
    aiohttp_server: ServerFactory, tmp_path: Path, honour_range: bool
) -> None:
    files = FileServer({"model.gguf": FAKE_GGUF}, honour_range=honour_range, truncate_first=True)
    server = await start_file_server(aiohttp_server, files)
    url = str(server.make_url("/files/model.gguf"))
    with pytest.raises(ModelSourceError) as info:
        await resolve_model(url_source(url), tmp_path, Events(), retries=0)
    assert info.value.variant == "DownloadInterrupted"
    part = url_cache_path(url, tmp_path).with_name("model.gguf.part")
    assert 0 < part.stat().st_size < len(FAKE_GGUF)
    have = part.stat().st_size
    path = await resolve_model(url_source(url), tmp_path, Events())
    assert path.read_bytes() == FAKE_GGUF
    assert files.hits == [("model.gguf", None), ("model.gguf", f"bytes={have}-")]


async def test_truncation_is_retried_within_one_call(aiohttp_server: ServerFactory, tmp_path: Path) -> None:
    files = FileServer({"model.gguf": FAKE_GGUF}, truncate_first=True)
    server = await start_file_server(aiohttp_server, files)
    url = str(server.make_url("/files/model.gguf"))
    path = await resolve_model(url_source(url), tmp_path, Events(), retry_delay_s=0.01)
    assert path.read_bytes() == FAKE_GGUF
    assert len(files.hits) == 2
    assert files.hits[1][1] is not None


@pytest.mark.parametrize(
    ("name", "sha256", "variant"),
    [
        ("missing.gguf", None, "ModelDoesNotExistAtUrl"),
        ("page.html", None, "ModelCannotBeLoaded"),
        ("model.gguf", "0" * 64, "ModelChecksumMismatch"),
    ],
)
async def test_download_errors(
    aiohttp_server: ServerFactory,
    tmp_path: Path,
    name: str,
    sha256: str | None,
    variant: str,
) -> None:
    files = FileServer({"model.gguf": FAKE_GGUF, "page.html": NOT_GGUF})
    server = await start_file_server(aiohttp_server, files)
    url = str(server.make_url(f"/files/{name}"))
    with pytest.raises(ModelSourceError) as info:
        await resolve_model(url_source(url, sha256), tmp_path, Events())
    assert info.value.variant == variant
    assert url in info.value.message
    target = url_cache_path(url, tmp_path)
    assert not target.exists()
    assert not target.with_name(target.name + ".part").exists()
    assert len(files.hits) == 1  # permanent errors are not retried


async def test_connection_refused(aiohttp_server: ServerFactory, tmp_path: Path) -> None:
    server = await start_file_server(aiohttp_server, FileServer({}))
    url = str(server.make_url("/files/model.gguf"))
    await server.close()
    with pytest.raises(ModelSourceError) as info:
        await resolve_model(url_source(url), tmp_path, Events(), retries=1, retry_delay_s=0.01)
    assert info.value.variant == "DownloadServerIsUnreachable"


async def test_progress_is_throttled(aiohttp_server: ServerFactory, tmp_path: Path) -> None:
    big = b"GGUF" + bytes(8 << 20)
    server = await start_file_server(aiohttp_server, FileServer({"big.gguf": big}))
    events = Events()
    await resolve_model(url_source(str(server.make_url("/files/big.gguf"))), tmp_path, events)
    assert events.items[-1].current == len(big)
    assert len(events.items) <= 3 + 10 * 10  # generous: a slow machine may take seconds


# ---- Hugging Face --------------------------------------------------------------------------

COMMIT = "a" * 40


@dataclass
class FakeHub:
    """The two hub behaviours hf_hub_download needs: HEAD and GET on /resolve/."""

    repos: dict[str, dict[str, bytes]]
    hits: list[str] = field(default_factory=list)
    slow_stopped: asyncio.Event = field(default_factory=asyncio.Event)

    async def resolve(self, request: web.Request) -> web.StreamResponse:
        repo = f"{request.match_info['owner']}/{request.match_info['name']}"
        filename = request.match_info["filename"]
        self.hits.append(f"{request.method} {repo} {filename}")
        if repo == "org/gated":
            return web.Response(status=401, headers={"X-Error-Code": "GatedRepo"})
        if repo == "org/slow":
            return await self.slow(request)
        files = self.repos.get(repo)
        if files is None:
            return web.Response(status=404, headers={"X-Error-Code": "RepoNotFound"})
        data = files.get(filename)
        if data is None:
            return web.Response(status=404, headers={"X-Error-Code": "EntryNotFound", "X-Repo-Commit": COMMIT})
        headers = {
            "X-Repo-Commit": COMMIT,
            "ETag": f'"{hashlib.sha256(data).hexdigest()}"',
            "Content-Type": "application/octet-stream",
        }
        return web.Response(body=data, headers=headers)

    async def slow(self, request: web.Request) -> web.StreamResponse:
        """A 64 MiB file sent in small, spaced chunks: slow enough to cancel."""
        chunk, count = b"GGUF" + bytes((64 << 10) - 4), 1024
        headers = {"X-Repo-Commit": COMMIT, "ETag": '"slow"', "X-Linked-Size": str(len(chunk) * count)}
        if request.method == "HEAD":
            return web.Response(headers=headers)
        resp = web.StreamResponse(headers=headers)
        resp.content_length = len(chunk) * count
        await resp.prepare(request)
        try:
            for _ in range(count):
                await resp.write(chunk)
                await asyncio.sleep(0.02)
        except (ConnectionError, asyncio.CancelledError):
            self.slow_stopped.set()
            raise
        return resp


@pytest.fixture
async def hub(aiohttp_server: ServerFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeHub:
    fake = FakeHub({"org/tiny-GGUF": {"tiny.gguf": FAKE_GGUF, "README.md": b"# hi"}})
    app = web.Application()
    app.router.add_get("/{owner}/{name}/resolve/{revision}/{filename:.+}", fake.resolve)
    server = await aiohttp_server(app)
    monkeypatch.setenv("HF_ENDPOINT", str(server.make_url("")).rstrip("/"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    return fake


def hf_source(repo_id: str, filename: str) -> ModelSource:
    return ModelSource.model_validate({"HuggingFace": {"repo_id": repo_id, "filename": filename, "revision": "main"}})


async def test_huggingface_download(hub: FakeHub, tmp_path: Path) -> None:
    events = Events()
    path = await resolve_model(hf_source("org/tiny-GGUF", "tiny.gguf"), tmp_path / "c", events)
    assert path.read_bytes() == FAKE_GGUF
    assert (tmp_path / "hf" / "hub") in path.parents
    assert events.items[-1] == DownloadProgress("tiny.gguf", len(FAKE_GGUF), len(FAKE_GGUF), False)
    assert any(h.startswith("GET") for h in hub.hits)


async def test_huggingface_cached_and_offline(hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = hf_source("org/tiny-GGUF", "tiny.gguf")
    first = await resolve_model(source, tmp_path, Events())
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hits = len(hub.hits)
    assert await resolve_model(source, tmp_path, Events()) == first
    assert len(hub.hits) == hits
    with pytest.raises(ModelSourceError) as info:
        await resolve_model(hf_source("org/other", "x.gguf"), tmp_path, Events())
    assert info.value.variant == "ModelDownloadFailed"


@pytest.mark.parametrize(
    ("repo_id", "filename", "variant"),
    [
        ("org/missing", "tiny.gguf", "HuggingFaceModelDoesNotExist"),
        ("org/tiny-GGUF", "absent.gguf", "HuggingFaceModelDoesNotExist"),
        ("org/tiny-GGUF", "README.md", "ModelCannotBeLoaded"),
    ],
)
async def test_huggingface_errors(hub: FakeHub, tmp_path: Path, repo_id: str, filename: str, variant: str) -> None:
    with pytest.raises(ModelSourceError) as info:
        await resolve_model(hf_source(repo_id, filename), tmp_path, Events())
    assert info.value.variant == variant
    assert repo_id in info.value.message


async def test_huggingface_file_the_agent_cannot_read_is_not_called_not_gguf(
    hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = hf_source("org/tiny-GGUF", "tiny.gguf")
    downloaded = await resolve_model(source, tmp_path, Events())
    opens = Path.open

    def refuse(self: Path, *args: Any, **kwargs: Any) -> Any:
        if self == downloaded:
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return opens(self, *args, **kwargs)

    monkeypatch.setattr(Path, "open", refuse)
    with pytest.raises(ModelSourceError) as info:
        await resolve_model(source, tmp_path, Events())
    assert info.value.variant == "ModelCannotBeLoaded"
    assert "not a GGUF" not in info.value.message
    assert "cannot read its file" in info.value.message
    assert "Permission denied" in info.value.message


@pytest.mark.parametrize(
    ("problem", "variant", "says"),
    [
        (FileProblem.NOT_GGUF, "ModelCannotBeLoaded", "is not a GGUF model file"),
        (FileProblem.UNREADABLE, "ModelCannotBeLoaded", "the agent cannot read its file /m.gguf: Input/output error"),
        (FileProblem.MISSING, "ModelDownloadFailed", "left no model file at /m.gguf"),
        (FileProblem.NOT_A_FILE, "ModelDownloadFailed", "left no model file at /m.gguf"),
    ],
)
def test_hub_file_error_says_what_happened(problem: FileProblem, variant: str, says: str) -> None:
    error = ModelFileUnusable(problem, "Any", "local wording", path="/m.gguf", reason="Input/output error")
    mapped = hub_file_error(error, "org/repo/m.gguf@main")
    assert mapped.variant == variant
    assert says in mapped.message


async def test_huggingface_gated_repo(hub: FakeHub, tmp_path: Path) -> None:
    with pytest.raises(ModelSourceError) as info:
        await resolve_model(hf_source("org/gated", "tiny.gguf"), tmp_path, Events())
    assert info.value.variant == "HuggingFacePermissions"
    assert "HF_TOKEN" in info.value.message


async def test_huggingface_cancel_stops_the_download(hub: FakeHub, tmp_path: Path) -> None:
    got_bytes = asyncio.Event()

    def on_progress(event: DownloadProgress) -> None:
        if event.current > 0:
            got_bytes.set()

    task = asyncio.create_task(resolve_model(hf_source("org/slow", "big.gguf"), tmp_path, on_progress))
    await asyncio.wait_for(got_bytes.wait(), 30)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    # The hub's worker thread stops at its next chunk and drops the connection.
    await asyncio.wait_for(hub.slow_stopped.wait(), 30)


async def test_concurrent_downloads_of_one_url_share_the_file(aiohttp_server: ServerFactory, tmp_path: Path) -> None:
    files = FileServer({"model.gguf": FAKE_GGUF})
    server = await start_file_server(aiohttp_server, files)
    source = url_source(str(server.make_url("/files/model.gguf")))
    paths = await asyncio.gather(*(resolve_model(source, tmp_path, Events()) for _ in range(3)))
    assert len(set(paths)) == 1
    assert paths[0].read_bytes() == FAKE_GGUF
    assert len(files.hits) == 1


async def test_huggingface_cache_defaults_to_the_agent_cache(
    hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("HF_HOME")
    path = await resolve_model(hf_source("org/tiny-GGUF", "tiny.gguf"), tmp_path / "c", Events())
    assert (tmp_path / "c" / "huggingface") in path.parents


async def test_unusable_cache_dir(aiohttp_server: ServerFactory, tmp_path: Path) -> None:
    server = await start_file_server(aiohttp_server, FileServer({"model.gguf": FAKE_GGUF}))
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    with pytest.raises(ModelSourceError) as info:
        await resolve_model(url_source(str(server.make_url("/files/model.gguf"))), not_a_dir, Events())
    assert info.value.variant == "CacheDirectoryIsNotWritable"
    assert str(not_a_dir) in info.value.message
