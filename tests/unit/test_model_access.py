"""The model URL allow-list and local roots (paddler_core.model_access): tables."""

from __future__ import annotations

import pytest

from paddler_core.model_access import AllowEntry, ModelAccessDenied, ModelUrlPolicy, host_is_internal, path_is_under


@pytest.mark.parametrize(
    ("entries", "url", "allowed"),
    [
        ([], "https://huggingface.co/org/repo/resolve/main/m.gguf", True),
        ([], "https://10.0.0.5/m.gguf", True),  # private ranges are fine over https (in-cluster mirrors)
        ([], "http://models.example.com/m.gguf", False),  # default is https only
        ([], "https://169.254.169.254/latest/meta-data/", False),
        ([], "https://[fe80::1]/m.gguf", False),
        ([], "https://[::ffff:127.0.0.1]/m.gguf", False),
        ([], "https://0.0.0.0/m.gguf", False),
        ([], "https://0x7f.0.0.1/m.gguf", False),
        ([], "https://100.100.100.200/m.gguf", False),
        ([], "https://metadata.google.internal/m.gguf", False),
        ([], "https://app.localhost/m.gguf", False),
        ([], "https://user:pw@example.com/m.gguf", False),
        ([], "file:///models/m.gguf", False),
        (["http://127.0.0.1:8080/gguf/"], "http://127.0.0.1:8080/gguf/m.gguf", True),
        (["http://127.0.0.1:8080/gguf/"], "http://127.0.0.1:8080/other/m.gguf", False),
        (["http://127.0.0.1:8080/gguf/"], "http://127.0.0.1:9090/gguf/m.gguf", False),
        (["http://127.0.0.1/"], "http://127.0.0.1:9090/m.gguf", True),  # no port in the entry: any port
        (["http://"], "http://127.0.0.1/m.gguf", False),  # a scheme-only entry never opens loopback
        (["https://*.example.com"], "https://models.example.com/m.gguf", True),
        (["https://*.example.com"], "https://example.com.evil.net/m.gguf", False),
        (["file://"], "file:///models/m.gguf", True),
    ],
)
def test_check_url(entries: list[str], url: str, allowed: bool) -> None:
    policy = ModelUrlPolicy.from_entries(entries)
    if allowed:
        policy.check_url(url)
    else:
        with pytest.raises(ModelAccessDenied):
            policy.check_url(url)


def test_check_address_opens_internal_addresses_only_for_named_hosts() -> None:
    named = ModelUrlPolicy.from_entries(["http://models.internal/"])
    scheme_only = ModelUrlPolicy.from_entries(["https://"])
    named.check_address("http://models.internal/m.gguf", "127.0.0.1")
    scheme_only.check_address("https://example.com/m.gguf", "93.184.216.34")
    with pytest.raises(ModelAccessDenied, match=r"internal address 169\.254\.169\.254"):
        scheme_only.check_address("https://example.com/m.gguf", "169.254.169.254")


@pytest.mark.parametrize("text", ["ftp://x", "example.com", "https:/x", "http://host:99999/"])
def test_bad_allow_entries_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="model URL allow entry"):
        AllowEntry.parse(text)


@pytest.mark.parametrize(
    ("host", "internal"),
    [("localhost", True), ("LOCALHOST.", True), ("2130706433", True), ("10.1.2.3", False), ("example.com", False)],
)
def test_host_is_internal(host: str, internal: bool) -> None:
    assert host_is_internal(host) is internal


@pytest.mark.parametrize(
    ("path", "roots", "inside"),
    [
        ("/models/m.gguf", ("/models",), True),
        ("/models", ("/models",), True),
        ("/models-other/m.gguf", ("/models",), False),
        ("/models/../etc/passwd", ("/models",), False),
        ("relative/m.gguf", ("/models",), False),
        ("/data/m.gguf", ("/models", "/data"), True),
    ],
)
def test_path_is_under(path: str, roots: tuple[str, ...], inside: bool) -> None:
    assert path_is_under(path, roots) is inside
