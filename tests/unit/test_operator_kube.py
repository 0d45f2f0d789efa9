"""kube.py: credentials from kubeconfig (exec plugins included) / the in-cluster service
account through kubernetes_asyncio, and the HTTP calls it makes (paths, server-side apply
and merge-patch content types, error mapping, re-login on 401, 429 Retry-After) against
a small fake API server. The k8s tier exercises the same client against a real kube-apiserver."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import web
from aiohttp.test_utils import TestServer

from paddler_operator import kube
from paddler_operator.kube import (
    KubeApi,
    KubeConfigError,
    KubeError,
    KubeSettings,
    collection_path,
    login,
    object_path,
)
from paddler_operator.objects import ObjRef


@pytest.mark.parametrize(
    ("api_version", "kind", "path"),
    [
        ("v1", "Service", "/api/v1/namespaces/ns/services"),
        ("apps/v1", "Deployment", "/apis/apps/v1/namespaces/ns/deployments"),
        ("paddler.dev/v1alpha1", "LlmPool", "/apis/paddler.dev/v1alpha1/namespaces/ns/llmpools"),
        ("keda.sh/v1alpha1", "ScaledObject", "/apis/keda.sh/v1alpha1/namespaces/ns/scaledobjects"),
    ],
)
def test_paths(api_version: str, kind: str, path: str) -> None:
    assert collection_path(api_version, kind, "ns") == path
    assert object_path(ObjRef(api_version, kind, "ns", "x")) == f"{path}/x"


def kubeconfig(tmp_path: Path, user: dict[str, Any], cluster: dict[str, Any] | None = None) -> Path:
    path = tmp_path / "config"
    path.write_text(
        yaml.safe_dump(
            {
                "clusters": [{"name": "c", "cluster": {"server": "https://127.0.0.1:6443/", **(cluster or {})}}],
                "users": [{"name": "u", "user": user}],
                "contexts": [{"name": "ctx", "context": {"cluster": "c", "user": "u"}}],
                "current-context": "ctx",
            }
        )
    )
    return path


def write_exec_plugin(tmp_path: Path, tokens: list[str], expiry: str | None = None) -> Path:
    """A fake client-go credential plugin: prints an ExecCredential with the next of ``tokens``
    (the last one again once they run out) and counts its runs in ``runs``."""
    script = tmp_path / "plugin.py"
    status: dict[str, Any] = {"expirationTimestamp": expiry} if expiry else {}
    script.write_text(
        "import json, pathlib, sys\n"
        f"runs = pathlib.Path({str(tmp_path / 'runs')!r})\n"
        "n = len(runs.read_text().splitlines()) if runs.exists() else 0\n"
        "runs.write_text(runs.read_text() + 'run\\n' if runs.exists() else 'run\\n')\n"
        f"tokens = {tokens!r}\n"
        f"status = {{**{status!r}, 'token': tokens[min(n, len(tokens) - 1)]}}\n"
        "json.dump({'apiVersion': 'client.authentication.k8s.io/v1', 'kind': 'ExecCredential',"
        " 'status': status}, sys.stdout)\n"
    )
    return script


def exec_user(script: Path) -> dict[str, Any]:
    return {
        "exec": {
            "apiVersion": "client.authentication.k8s.io/v1",
            "command": sys.executable,
            "args": [str(script)],
            "interactiveMode": "Never",
        }
    }


def plugin_runs(tmp_path: Path) -> int:
    runs = tmp_path / "runs"
    return len(runs.read_text().splitlines()) if runs.exists() else 0


async def test_kubeconfig_with_token(tmp_path: Path) -> None:
    credentials = await login(str(kubeconfig(tmp_path, {"token": "abc"}, {"insecure-skip-tls-verify": True})))
    assert credentials.server == "https://127.0.0.1:6443"
    assert credentials.insecure
    assert credentials.headers() == {"Authorization": "Bearer abc"}
    assert credentials.expires_at is None


async def test_kubeconfig_token_file_is_read_relative_to_the_kubeconfig(tmp_path: Path) -> None:
    (tmp_path / "token").write_text("one")
    path = kubeconfig(tmp_path, {"tokenFile": "token"}, {"insecure-skip-tls-verify": True})
    assert (await login(str(path))).headers() == {"Authorization": "Bearer one"}
    (tmp_path / "token").write_text("two")
    assert (await login(str(path))).headers() == {"Authorization": "Bearer two"}


async def test_kubeconfig_exec_plugin_gives_the_token_and_its_expiry(tmp_path: Path) -> None:
    script = write_exec_plugin(tmp_path, ["from-plugin"], expiry="2031-01-02T03:04:05Z")
    credentials = await login(str(kubeconfig(tmp_path, exec_user(script), {"insecure-skip-tls-verify": True})))
    assert credentials.headers() == {"Authorization": "Bearer from-plugin"}
    assert credentials.expires_at == dt.datetime(2031, 1, 2, 3, 4, 5, tzinfo=dt.UTC)
    assert plugin_runs(tmp_path) == 1


async def test_kubeconfig_exec_plugin_that_fails_is_a_config_error(tmp_path: Path) -> None:
    user = {"exec": {"apiVersion": "client.authentication.k8s.io/v1", "command": "false"}}
    with pytest.raises(KubeConfigError, match="exec: process returned 1"):
        await login(str(kubeconfig(tmp_path, user)))


async def test_in_cluster_service_account(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KUBECONFIG", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.kube/config
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with pytest.raises(KubeConfigError, match="in-cluster service account"):
        await login(service_account=tmp_path)
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.96.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "443")
    (tmp_path / "token").write_text("sa-token")
    (tmp_path / "ca.crt").write_text(_ca_pem())
    credentials = await login(service_account=tmp_path)
    assert credentials.server == "https://10.96.0.1:443"
    assert credentials.ca_file == str(tmp_path / "ca.crt")
    assert credentials.headers() == {"Authorization": "Bearer sa-token"}
    assert credentials.expires_at is not None  # the rotating token file is read again


def _ca_pem() -> str:
    """Any valid CA bundle will do for load_verify_locations: certifi's (a dependency of httpx)."""
    import certifi

    return Path(certifi.where()).read_text()


async def test_explicit_kubeconfig_wins_over_kubeconfig_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    other = tmp_path / "other"
    other.mkdir()
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig(other, {"token": "env"}, {"insecure-skip-tls-verify": True})))
    path = kubeconfig(tmp_path, {"token": "t"}, {"insecure-skip-tls-verify": True})
    assert (await login(str(path))).headers() == {"Authorization": "Bearer t"}
    assert (await login()).headers() == {"Authorization": "Bearer env"}


@pytest.fixture
async def fake_api(tmp_path: Path) -> AsyncIterator[tuple[KubeApi, list[dict[str, Any]]]]:
    seen: list[dict[str, Any]] = []

    async def handler(request: web.Request) -> web.Response:
        body = await request.text()
        seen.append(
            {
                "method": request.method,
                "path": request.path,
                "query": dict(request.query),
                "type": request.headers.get("Content-Type"),
                "auth": request.headers.get("Authorization"),
                "body": json.loads(body) if body else None,
            }
        )
        if request.path.endswith("/missing"):
            return web.json_response({"kind": "Status", "reason": "NotFound", "message": "not here"}, status=404)
        if request.method == "POST" and request.path.endswith("/configmaps"):
            return web.json_response(
                {"kind": "Status", "reason": "Invalid", "message": 'ConfigMap "x" is invalid: bad'}, status=422
            )
        if request.method == "GET" and request.path.endswith("/deployments"):
            return web.json_response({"items": [{"metadata": {"name": "a"}}]})
        return web.json_response({"ok": True, **(json.loads(body) if body else {})})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    path = tmp_path / "config"
    path.write_text(
        yaml.safe_dump(
            {
                "clusters": [{"name": "c", "cluster": {"server": f"http://127.0.0.1:{server.port}"}}],
                "users": [{"name": "u", "user": {"token": "tok"}}],
                "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}],
                "current-context": "x",
            }
        )
    )
    api = KubeApi(KubeSettings(kubeconfig=str(path), request_timeout=5))
    try:
        yield api, seen
    finally:
        await api.close()
        await server.close()


async def test_calls_paths_content_types_and_errors(fake_api: tuple[KubeApi, list[dict[str, Any]]]) -> None:
    api, seen = fake_api
    ref = ObjRef("apps/v1", "Deployment", "ns", "d")
    assert await api.get(ObjRef("apps/v1", "Deployment", "ns", "missing")) is None
    items = await api.list("apps/v1", "Deployment", "ns", "a=b")
    assert items == [{"metadata": {"name": "a"}, "apiVersion": "apps/v1", "kind": "Deployment"}]
    await api.patch(ref, {"spec": {"replicas": 2}})
    await api.apply({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "s", "namespace": "ns"}})
    await api.patch_status(ObjRef("paddler.dev/v1alpha1", "LlmPool", "ns", "p"), {"slots": "1/2"})
    with pytest.raises(KubeError) as err:
        await api.create({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x", "namespace": "ns"}})
    assert (err.value.status, err.value.message) == (422, 'ConfigMap "x" is invalid: bad')
    assert await api.delete(ObjRef("v1", "Service", "ns", "missing")) is False
    await api.event(
        {"apiVersion": "paddler.dev/v1alpha1", "kind": "LlmPool", "metadata": {"name": "p", "namespace": "ns"}},
        "Normal", "Created", "Created Deployment d",
    )  # fmt: skip

    assert {s["auth"] for s in seen} == {"Bearer tok"}
    by = {(s["method"], s["path"]): s for s in seen}
    assert by[("GET", "/apis/apps/v1/namespaces/ns/deployments")]["query"] == {"labelSelector": "a=b"}
    patch = by[("PATCH", "/apis/apps/v1/namespaces/ns/deployments/d")]
    assert patch["type"] == "application/merge-patch+json"
    assert patch["query"] == {"fieldManager": "paddler-operator"}
    applied = by[("PATCH", "/api/v1/namespaces/ns/services/s")]
    assert applied["type"] == "application/apply-patch+yaml"
    assert applied["query"] == {"fieldManager": "paddler-operator", "force": "true"}
    assert applied["body"]["metadata"] == {"name": "s", "namespace": "ns"}
    status = by[("PATCH", "/apis/paddler.dev/v1alpha1/namespaces/ns/llmpools/p/status")]
    assert status["body"] == {"status": {"slots": "1/2"}}
    event = by[("POST", "/api/v1/namespaces/ns/events")]["body"]
    assert (event["reason"], event["involvedObject"]["kind"], event["type"]) == ("Created", "LlmPool", "Normal")


async def test_unreachable_api_server_is_a_kube_error(tmp_path: Path) -> None:
    path = kubeconfig(tmp_path, {"token": "t"})
    text = path.read_text().replace("https://127.0.0.1:6443/", "http://127.0.0.1:9")
    path.write_text(text)
    api = KubeApi(KubeSettings(kubeconfig=str(path), request_timeout=2))
    try:
        with pytest.raises(KubeError) as err:
            await api.get(ObjRef("v1", "Service", "ns", "x"))
        assert err.value.status == 0
    finally:
        await api.close()


@pytest.fixture
async def strict_api(tmp_path: Path) -> AsyncIterator[tuple[str, dict[str, Any]]]:
    """A fake API server that accepts only ``state["token"]`` and answers the first
    ``state["throttle"]`` requests with 429 and ``Retry-After: state["retry_after"]``."""
    state: dict[str, Any] = {"token": "t2", "throttle": 0, "retry_after": "1", "seen": []}

    async def handler(request: web.Request) -> web.Response:
        state["seen"].append((time.monotonic(), request.headers.get("Authorization")))
        if request.headers.get("Authorization") != f"Bearer {state['token']}":
            return web.json_response(
                {"kind": "Status", "reason": "Unauthorized", "message": "Unauthorized"}, status=401
            )
        if state["throttle"] > 0:
            state["throttle"] -= 1
            return web.json_response(
                {"kind": "Status", "reason": "TooManyRequests", "message": "slow down"},
                status=429,
                headers={"Retry-After": state["retry_after"]},
            )
        return web.json_response({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "x"}})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        yield f"http://127.0.0.1:{server.port}", state
    finally:
        await server.close()


SERVICE = ObjRef("v1", "Service", "ns", "x")


async def test_logs_in_again_on_401_and_repeats_the_request(
    tmp_path: Path, strict_api: tuple[str, dict[str, Any]]
) -> None:
    url, state = strict_api
    script = write_exec_plugin(tmp_path, ["t1", "t2"])  # the first token is already revoked
    api = KubeApi(KubeSettings(kubeconfig=str(kubeconfig(tmp_path, exec_user(script), {"server": url}))))
    try:
        assert (await api.get(SERVICE)) == {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "x"}}
        assert [auth for _, auth in state["seen"]] == ["Bearer t1", "Bearer t2"]
        assert (plugin_runs(tmp_path), api.logins) == (2, 2)
        await api.get(SERVICE)  # the new token is kept
        assert (plugin_runs(tmp_path), api.logins) == (2, 2)
    finally:
        await api.close()


async def test_401_after_logging_in_again_is_an_error_not_a_loop(
    tmp_path: Path, strict_api: tuple[str, dict[str, Any]]
) -> None:
    url, state = strict_api
    state["token"] = "never-issued"
    script = write_exec_plugin(tmp_path, ["t1", "t2"])
    api = KubeApi(KubeSettings(kubeconfig=str(kubeconfig(tmp_path, exec_user(script), {"server": url}))))
    try:
        with pytest.raises(KubeError) as err:
            await api.get(SERVICE)
        assert err.value.status == 401
        assert [auth for _, auth in state["seen"]] == ["Bearer t1", "Bearer t2"]
    finally:
        await api.close()


async def test_expired_exec_credentials_are_renewed_before_a_request(
    tmp_path: Path, strict_api: tuple[str, dict[str, Any]]
) -> None:
    url, state = strict_api
    state["token"] = "t1"
    script = write_exec_plugin(tmp_path, ["t1"], expiry="2020-01-01T00:00:00Z")
    api = KubeApi(KubeSettings(kubeconfig=str(kubeconfig(tmp_path, exec_user(script), {"server": url}))))
    try:
        await api.get(SERVICE)
        await api.get(SERVICE)
        assert plugin_runs(tmp_path) == 2  # expired: the plugin runs again, without waiting for a 401
        assert [auth for _, auth in state["seen"]] == ["Bearer t1", "Bearer t1"]
    finally:
        await api.close()


async def test_429_is_retried_after_the_retry_after_seconds(
    tmp_path: Path, strict_api: tuple[str, dict[str, Any]]
) -> None:
    url, state = strict_api
    state.update(token="t", throttle=1, retry_after="1")
    api = KubeApi(KubeSettings(kubeconfig=str(kubeconfig(tmp_path, {"token": "t"}, {"server": url}))))
    try:
        assert (await api.get(SERVICE)) is not None
        (first, _), (second, _) = state["seen"]
        assert second - first >= 0.9
    finally:
        await api.close()


async def test_429_retries_are_bounded_in_count_and_wait(
    tmp_path: Path, strict_api: tuple[str, dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    url, state = strict_api
    state.update(token="t", throttle=100, retry_after="3600")
    monkeypatch.setattr(kube, "MAX_RETRY_AFTER_S", 0.05)
    api = KubeApi(KubeSettings(kubeconfig=str(kubeconfig(tmp_path, {"token": "t"}, {"server": url}))))
    try:
        async with asyncio.timeout(5):
            with pytest.raises(KubeError) as err:
                await api.get(SERVICE)
        assert (err.value.status, err.value.message) == (429, "slow down")
        assert len(state["seen"]) == kube.MAX_THROTTLED_RETRIES + 1
    finally:
        await api.close()
