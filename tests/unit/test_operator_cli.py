"""``paddler operator`` flags and settings; kopf stays unimported until the operator runs."""

from __future__ import annotations

import subprocess
import sys

import pytest

from paddler_cli.main import build_parser
from paddler_operator.cli import add_subcommand, settings_from_args
from paddler_operator.settings import DEFAULT_BALANCER_URL_TEMPLATE, OperatorSettings


def parse(*argv: str) -> OperatorSettings:
    return settings_from_args(build_parser([add_subcommand]).parse_args(["operator", *argv]))


@pytest.mark.parametrize(
    ("argv", "namespaces", "all_namespaces"),
    [
        (["--namespace", "a"], ("a",), False),
        (["-n", "a", "--namespace", "b"], ("a", "b"), False),
        (["--all-namespaces"], (), True),
    ],
)
def test_scope_flags(argv: list[str], namespaces: tuple[str, ...], all_namespaces: bool) -> None:
    settings = parse(*argv)
    assert (settings.namespaces, settings.all_namespaces) == (namespaces, all_namespaces)
    assert settings.balancer_url_template == DEFAULT_BALANCER_URL_TEMPLATE


@pytest.mark.parametrize("argv", [[], ["--namespace", "a", "--all-namespaces"]])
def test_scope_is_required_and_exclusive(argv: list[str]) -> None:
    with pytest.raises(SystemExit):
        parse(*argv)


def test_balancer_url_template_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PADDLER_OPERATOR_BALANCER_URL_TEMPLATE", "http://127.0.0.1:1234")
    assert parse("-A").balancer_url_template == "http://127.0.0.1:1234"
    assert (
        parse("-A", "--balancer-url-template", "http://{pool}:{port}").balancer_url_template == "http://{pool}:{port}"
    )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "pass --namespace"),
        ({"namespaces": ("a",), "all_namespaces": True}, "exclude each other"),
        ({"all_namespaces": True, "balancer_url_template": "http://{nope}"}, "invalid balancer URL template"),
        ({"all_namespaces": True, "resync_interval": 0}, "intervals must be > 0"),
    ],
)
def test_invalid_settings(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        OperatorSettings(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("failures", "delay"), [(0, 0.0), (1, 1.0), (2, 2.0), (3, 4.0), (5, 16.0), (6, 30.0), (99, 30.0)]
)
def test_retry_backoff(failures: int, delay: float) -> None:
    assert OperatorSettings(all_namespaces=True).retry_delay(failures) == delay


def test_other_subcommands_do_not_import_kopf() -> None:
    code = (
        "import sys, paddler_cli.main as m\n"
        "m.build_parser(m._extensions()).parse_args(['balancer'])\n"
        "assert 'operator' in m.build_parser(m._extensions())._subparsers._group_actions[0].choices\n"
        "print('kopf' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_bad_settings_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    from paddler_operator.cli import run

    args = build_parser([add_subcommand]).parse_args(["operator", "-A", "--resync-interval", "-1"])
    assert run(args) == 2
    assert "intervals must be > 0" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "expected"),
    [([], None), (["--hpa-scale-to-zero", "on"], True), (["--hpa-scale-to-zero", "off"], False)],
)
def test_hpa_scale_to_zero_flag(argv: list[str], expected: bool | None) -> None:
    assert parse("-n", "a", *argv).hpa_scale_to_zero is expected
