"""The management token derived from one key, never read back (issue 20): derivation, the key
file, the flags, and the reconciler against an in-memory API (which records every read) and,
where the token matters, a real ``paddler balancer`` that requires it."""

from __future__ import annotations

import base64
import contextlib
import stat
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from paddler_cli.main import build_parser
from paddler_operator import plan
from paddler_operator.balancer_client import BalancerClient, BalancerClientSettings
from paddler_operator.cli import add_subcommand, run, settings_from_args, with_token_key
from paddler_operator.crd_pool import LlmPoolSpec
from paddler_operator.management_token import (
    ENSURE_AGAIN_S,
    MIN_KEY_BYTES,
    TokenKeyError,
    TokenSource,
    create_local_key,
    derive_token,
    load_key,
    local_key_path,
    pool_token,
    secret_name,
)
from paddler_operator.objects import Obj, ObjRef
from paddler_operator.plan import Owner
from paddler_operator.reconcile import Reconciler
from paddler_operator.settings import OperatorSettings, Switch
from tests.harness import Processes
from tests.unit.test_operator_reconcile import NS, UNREACHABLE, FakeKube, model_deployment, pool

KEY = b"k" * MIN_KEY_BYTES
POOL = Owner(kind="LlmPool", namespace="ns", name="p", uid="uid-1")


# --- derivation and the key file ----------------------------------------------------------------


def test_the_token_is_derived_from_the_key_and_the_pools_identity() -> None:
    token = derive_token(KEY, "ns", "p", "uid-1")
    assert token == derive_token(KEY, "ns", "p", "uid-1")  # an operator restart derives it again
    assert len(token) == 43
    assert "=" not in token
    others = {
        derive_token(KEY, "other", "p", "uid-1"),
        derive_token(KEY, "ns", "q", "uid-1"),
        derive_token(KEY, "ns", "p", "uid-2"),  # the same pool created again
        derive_token(b"j" * MIN_KEY_BYTES, "ns", "p", "uid-1"),
    }
    assert token not in others
    assert len(others) == 4


def test_the_secret_name_follows_the_pools_uid_and_the_key() -> None:
    name = secret_name(KEY, "ns", "p", "uid-1")
    assert name.startswith("p-management-")
    assert len(name) == len("p-management-") + 10
    assert name != plan.management_secret_name("p")  # never the Secret of the operator before issue 20
    assert name != secret_name(KEY, "ns", "p", "uid-2")
    assert name != secret_name(b"j" * MIN_KEY_BYTES, "ns", "p", "uid-1")
    assert name.removeprefix("p-management-") not in derive_token(KEY, "ns", "p", "uid-1")


def test_the_key_file(tmp_path: Path) -> None:
    path = tmp_path / "key"
    path.write_bytes(KEY + b"\n")
    assert load_key(path) == KEY  # a mounted Secret's trailing newline is no part of it
    path.write_bytes(b"short")
    with pytest.raises(TokenKeyError, match="5 bytes, at least 32"):
        load_key(path)
    with pytest.raises(TokenKeyError, match="No such file"):
        load_key(tmp_path / "missing")


def test_a_local_key_is_made_once_private(tmp_path: Path) -> None:
    path = local_key_path({"XDG_STATE_HOME": str(tmp_path)})
    assert path == tmp_path / "paddler" / "operator-token-key"
    assert local_key_path({"HOME": "/home/u"}) == Path("/home/u/.local/state/paddler/operator-token-key")
    assert create_local_key(path)
    key = load_key(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert not create_local_key(path)
    assert load_key(path) == key
    assert [p.name for p in path.parent.iterdir()] == ["operator-token-key"]  # nothing left aside


@pytest.mark.parametrize(
    ("auth", "source", "secret"),
    [
        ({}, TokenSource.GENERATED, secret_name(KEY, "ns", "p", "uid-1")),
        ({"secretName": "mine"}, TokenSource.NAMED, "mine"),
        ({"enabled": False}, TokenSource.OFF, None),
    ],
)
def test_where_a_pools_token_comes_from(auth: dict[str, Any], source: TokenSource, secret: str | None) -> None:
    spec = LlmPoolSpec.model_validate({"balancer": {"managementAuth": auth}})
    token = pool_token(KEY, POOL, spec)
    assert (token.source, token.secret) == (source, secret)
    assert (token.value is not None) == (source == TokenSource.GENERATED)
    assert token.value is None or token.value not in repr(token)
    seen = plan.management_token_ref("p", plan.with_token_secret(spec, token.secret))
    assert seen == (None if secret is None else (secret, "management-token"))


# --- flags ----------------------------------------------------------------------------------------


def parse(*argv: str) -> OperatorSettings:
    return settings_from_args(build_parser([add_subcommand]).parse_args(["operator", "-n", "a", *argv]))


def test_token_and_reader_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("POD_NAMESPACE", raising=False)
    monkeypatch.delenv("PADDLER_TOKEN_KEY_FILE", raising=False)
    default = parse()
    assert (default.token_key_file, default.pod_monitors, default.network_policy) == (None, Switch.AUTO, Switch.OFF)
    assert default.monitoring_namespaces == ("monitoring",)
    chosen = parse(
        "--token-key-file", "/k", "--pod-monitors", "off", "--pod-monitor-label", "release=prom",
        "--network-policy", "on", "--operator-namespace", "ops", "--operator-pod-label", "app=paddler",
        "--monitoring-namespace", "mon", "--monitoring-namespace", "keda",
    )  # fmt: skip
    assert chosen.token_key_file == "/k"
    assert (chosen.pod_monitors, chosen.pod_monitor_labels) == (Switch.OFF, (("release", "prom"),))
    assert (chosen.network_policy, chosen.operator_namespace) == (Switch.ON, "ops")
    assert chosen.operator_pod_labels == (("app", "paddler"),)
    assert chosen.monitoring_namespaces == ("mon", "keda")
    monkeypatch.setenv("POD_NAMESPACE", "from-downward-api")
    monkeypatch.setenv("PADDLER_TOKEN_KEY_FILE", "/mounted/key")
    from_env = parse("--network-policy", "on")
    assert (from_env.operator_namespace, from_env.token_key_file) == ("from-downward-api", "/mounted/key")


def test_bad_reader_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("POD_NAMESPACE", raising=False)
    with pytest.raises(ValueError, match="needs --operator-namespace"):
        parse("--network-policy", "on")
    with pytest.raises(SystemExit):
        parse("--pod-monitor-label", "no-equals-sign")


def test_the_key_file_is_checked_at_start_up(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    settings = OperatorSettings(namespaces=("a",))
    with pytest.raises(ValueError, match="in a pod, pass --token-key-file"):
        with_token_key(settings, {"KUBERNETES_SERVICE_HOST": "10.0.0.1"})
    in_a_pod_with_a_kubeconfig = {
        "KUBERNETES_SERVICE_HOST": "10.0.0.1",
        "KUBECONFIG": "/k",
        "XDG_STATE_HOME": str(tmp_path),
    }
    local = with_token_key(settings, in_a_pod_with_a_kubeconfig)  # a test runner in a pod: a local operator
    assert local.token_key_file == str(tmp_path / "paddler" / "operator-token-key")
    assert "made a management token key" in capsys.readouterr().err
    (tmp_path / "short").write_text("short")
    args = build_parser([add_subcommand]).parse_args(
        ["operator", "-n", "a", "--token-key-file", str(tmp_path / "short")]
    )
    assert run(args) == 2
    assert "at least 32 needed" in capsys.readouterr().err


# --- the reconciler -------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def operator(
    kube: FakeKube, tmp_path: Path, url: str = UNREACHABLE, **settings: Any
) -> AsyncIterator[tuple[Reconciler, list[float]]]:
    """A reconciler with the key ``KEY`` and a clock the test moves."""
    key_file = tmp_path / "token-key"
    key_file.write_bytes(KEY)
    now = [1000.0]
    balancers = BalancerClient(BalancerClientSettings(request_timeout=2.0))
    config = OperatorSettings(namespaces=(NS,), balancer_url_template=url, token_key_file=str(key_file), **settings)
    try:
        yield Reconciler(kube, balancers, config, clock=lambda: now[0]), now  # type: ignore[arg-type]
    finally:
        await balancers.close()


def pool_uid(kube: FakeKube, name: str = "p") -> str:
    uid: str = kube.objects[ObjRef("paddler.dev/v1alpha1", "LlmPool", NS, name)]["metadata"]["uid"]
    return uid


def token_env(deployment: Obj) -> Any:
    env = deployment["spec"]["template"]["spec"]["containers"][0]["env"]
    return next(e["valueFrom"]["secretKeyRef"] for e in env if e["name"] == "PADDLER_MANAGEMENT_TOKEN")


async def test_the_operator_creates_the_token_secret_and_never_reads_one(tmp_path: Path) -> None:
    kube = FakeKube()
    kube.add(pool())
    kube.add(model_deployment())
    async with operator(kube, tmp_path) as (r, _):
        await r.reconcile_pool(NS, "p")
        await r.reconcile_model_deployment(NS, "m")
        name = secret_name(KEY, NS, "p", pool_uid(kube))
        secret = kube.objects[ObjRef("v1", "Secret", NS, name)]
        token = base64.b64decode(secret["data"]["management-token"]).decode()
        assert token == derive_token(KEY, NS, "p", pool_uid(kube))
        assert secret["metadata"]["labels"]["paddler.dev/component"] == "management-token"
        assert secret["metadata"]["ownerReferences"][0]["kind"] == "LlmPool"
        ref = {"name": name, "key": "management-token"}
        assert token_env(kube.objects[ObjRef("apps/v1", "Deployment", NS, "p-balancer")]) == ref
        assert token_env(kube.objects[ObjRef("apps/v1", "Deployment", NS, "m-agent")]) == ref
        kube.calls.clear()
        await r.reconcile_pool(NS, "p")
        await r.reconcile_model_deployment(NS, "m")
    assert kube.writes() == []  # the Secret is remembered: a steady pass creates nothing
    assert not [read for read in kube.reads if read[1].startswith("Secret/")]


async def test_an_old_secret_is_left_alone_and_a_pool_created_again_gets_another(tmp_path: Path) -> None:
    kube = FakeKube()
    kube.add(pool())
    legacy = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "p-management-token"}, "data": {"x": "eQ=="}}
    kube.add(legacy)
    async with operator(kube, tmp_path) as (r, _):
        await r.reconcile_pool(NS, "p")
        old_uid = pool_uid(kube)
        first = secret_name(KEY, NS, "p", old_uid)
        # Deleted and created again; the garbage collector took all but the old token's Secret so far.
        for ref, obj in list(kube.objects.items()):
            owners = {o["uid"] for o in obj["metadata"].get("ownerReferences") or []}
            if ref.kind == "LlmPool" or (old_uid in owners and ref.kind != "Secret"):
                del kube.objects[ref]
        kube.add(pool())
        await r.reconcile_pool(NS, "p")
        second = secret_name(KEY, NS, "p", pool_uid(kube))
    assert first != second
    assert ("create", f"Secret/{NS}/{second}") in kube.calls
    assert token_env(kube.objects[ObjRef("apps/v1", "Deployment", NS, "p-balancer")])["name"] == second
    assert kube.objects[ObjRef("v1", "Secret", NS, "p-management-token")]["data"] == {"x": "eQ=="}


async def test_the_secret_is_created_again_after_a_while(tmp_path: Path) -> None:
    kube = FakeKube()
    kube.add(pool())
    async with operator(kube, tmp_path) as (r, now):
        await r.reconcile_pool(NS, "p")
        name = secret_name(KEY, NS, "p", pool_uid(kube))
        del kube.objects[ObjRef("v1", "Secret", NS, name)]  # deleted by hand
        kube.calls.clear()
        await r.reconcile_pool(NS, "p")
        assert kube.writes() == []
        now[0] += ENSURE_AGAIN_S
        await r.reconcile_pool(NS, "p")
    assert kube.writes() == [("create", f"Secret/{NS}/{name}")]


async def test_a_401_creates_the_secret_again(tmp_path: Path, paddler: Processes) -> None:
    balancer = paddler.balancer("--management-token", "not-the-derived-one")
    kube = FakeKube()
    kube.add(pool())
    async with operator(kube, tmp_path, balancer.management_url) as (r, _):
        outcome = await r.reconcile_pool(NS, "p")
        assert "HTTP 401" in outcome.message
        kube.calls.clear()
        await r.reconcile_pool(NS, "p")
    name = secret_name(KEY, NS, "p", pool_uid(kube))
    assert ("create", f"Secret/{NS}/{name}") in kube.calls  # answered 409: it is there


async def test_the_derived_token_opens_the_balancer(tmp_path: Path, paddler: Processes) -> None:
    kube = FakeKube()
    kube.add(pool())
    async with operator(kube, tmp_path, UNREACHABLE) as (r, _):
        await r.reconcile_pool(NS, "p")  # the pool's uid, hence its token, exists now
    token = derive_token(KEY, NS, "p", pool_uid(kube))
    balancer = paddler.balancer("--management-token", token)
    async with operator(kube, tmp_path, balancer.management_url) as (restarted, _):
        assert (await restarted.reconcile_pool(NS, "p")).ok  # another process, the same token
    assert kube.condition("LlmPool", "p") == ("True", "BalancerReady")


async def test_a_pools_own_secret_is_read_by_its_name_only(tmp_path: Path, paddler: Processes) -> None:
    balancer = paddler.balancer("--management-token", "s3cret")
    kube = FakeKube()
    kube.add(pool(balancer={"managementAuth": {"secretName": "mine", "secretKey": "t"}}))
    async with operator(kube, tmp_path, balancer.management_url) as (r, _):
        await r.reconcile_pool(NS, "p")
        status = kube.objects[ObjRef("paddler.dev/v1alpha1", "LlmPool", NS, "p")]["status"]
        degraded = next(c for c in status["conditions"] if c["type"] == "Degraded")
        assert "Secret mine with the management token does not exist" in degraded["message"]
        secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "mine"}, "data": {"t": "czNjcmV0"}}
        kube.add(secret)
        assert (await r.reconcile_pool(NS, "p")).ok
    assert not [c for c in kube.calls if "Secret/" in c[1]]
    assert {read[1] for read in kube.reads if read[1].startswith("Secret/")} == {f"Secret/{NS}/mine"}


async def test_pod_monitors_where_served_asked_once(tmp_path: Path) -> None:
    kube = FakeKube()
    kube.served.add(("monitoring.coreos.com/v1", "PodMonitor"))
    kube.add(pool())
    kube.add(pool("q"))
    async with operator(kube, tmp_path) as (r, _):
        await r.reconcile_pool(NS, "p")
        await r.reconcile_pool(NS, "q")
    monitor = kube.objects[ObjRef("monitoring.coreos.com/v1", "PodMonitor", NS, "p-balancer")]
    credentials = monitor["spec"]["podMetricsEndpoints"][0]["authorization"]["credentials"]
    assert credentials["name"] == secret_name(KEY, NS, "p", pool_uid(kube))
    assert [read for read in kube.reads if read[0] == "discovery"] == [
        ("discovery", "monitoring.coreos.com/v1/PodMonitor")
    ]


@pytest.mark.parametrize(
    ("served", "settings", "kinds"),
    [
        (False, {}, []),
        (False, {"pod_monitors": Switch.ON}, ["PodMonitor"]),  # on: written (an error if not served)
        (True, {"pod_monitors": Switch.OFF}, []),
        (False, {"network_policy": Switch.ON, "operator_namespace": "ops"}, ["NetworkPolicy"]),
    ],
)
async def test_readers_follow_the_settings(
    tmp_path: Path, served: bool, settings: dict[str, Any], kinds: list[str]
) -> None:
    kube = FakeKube()
    if served:
        kube.served.add(("monitoring.coreos.com/v1", "PodMonitor"))
    kube.add(pool())
    async with operator(kube, tmp_path, **settings) as (r, _):
        await r.reconcile_pool(NS, "p")
    assert sorted(ref.kind for ref in kube.objects if ref.kind in ("PodMonitor", "NetworkPolicy")) == kinds
    asked = [read for read in kube.reads if read[0] == "discovery"]
    assert len(asked) == (1 if "pod_monitors" not in settings else 0)
