"""kube.py: credentials from kubeconfig / the in-cluster service account, and the HTTP
calls it makes (paths, merge-patch content type, error mapping) against a small fake
API server. The k8s tier exercises the same client against a real kube-apiserver."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import web
from aiohttp.test_utils import TestServer

from paddler_operator.kube import (
    KubeApi,
    KubeConfigError,
    KubeError,
    KubeSettings,
    collection_path,
    connection_from_kubeconfig,
    connection_in_cluster,
    load_connection,
    object_path,
)
from paddler_operator.plan import ObjRef


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


def test_kubeconfig_with_token(tmp_path: Path) -> None:
    conn = connection_from_kubeconfig([kubeconfig(tmp_path, {"token": "abc"}, {"insecure-skip-tls-verify": True})])
    assert conn.server == "https://127.0.0.1:6443"
    assert conn.headers() == {"Authorization": "Bearer abc"}


def test_kubeconfig_token_file_is_reread(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("one\n")
    conn = connection_from_kubeconfig(
        [kubeconfig(tmp_path, {"tokenFile": "token"}, {"insecure-skip-tls-verify": True})]
    )
    assert conn.headers() == {"Authorization": "Bearer one"}
    token.write_text("two")
    assert conn.headers() == {"Authorization": "Bearer two"}


def test_kubeconfig_exec_plugins_are_refused(tmp_path: Path) -> None:
    with pytest.raises(KubeConfigError, match="exec"):
        connection_from_kubeconfig([kubeconfig(tmp_path, {"exec": {"command": "aws"}})])


def test_in_cluster_service_account(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with pytest.raises(KubeConfigError, match="not running in a pod"):
        connection_in_cluster(tmp_path)
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.96.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "443")
    (tmp_path / "token").write_text("sa-token")
    (tmp_path / "ca.crt").write_text(_ca_pem())
    conn = connection_in_cluster(tmp_path)
    assert conn.server == "https://10.96.0.1:443"
    assert conn.headers() == {"Authorization": "Bearer sa-token"}


def _ca_pem() -> str:
    """Any valid CA bundle will do for load_verify_locations: certifi's (a dependency of httpx)."""
    import certifi

    return Path(certifi.where()).read_text()


def test_load_connection_prefers_explicit_kubeconfig(tmp_path: Path) -> None:
    path = kubeconfig(tmp_path, {"token": "t"}, {"insecure-skip-tls-verify": True})
    assert load_connection(str(path)).headers() == {"Authorization": "Bearer t"}


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
