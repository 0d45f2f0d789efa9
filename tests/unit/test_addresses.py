from __future__ import annotations

import pytest

from paddler_core.addresses import is_ip_literal, join_host_port, split_host_port


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:8060", ("127.0.0.1", 8060)),
        ("p-management.ns.svc:8060", ("p-management.ns.svc", 8060)),
        ("[::1]:8060", ("::1", 8060)),
        (" localhost:1 ", ("localhost", 1)),
    ],
)
def test_splits_host_and_port(text: str, expected: tuple[str, int]) -> None:
    assert split_host_port(text) == expected


@pytest.mark.parametrize("text", ["localhost", ":8060", "host:port", "host:70000", ""])
def test_refuses_an_address_without_host_or_port(text: str) -> None:
    with pytest.raises(ValueError, match="invalid address"):
        split_host_port(text)


@pytest.mark.parametrize(
    ("host", "port", "expected"),
    [("10.244.0.5", 8060, "10.244.0.5:8060"), ("fd00::5", 8060, "[fd00::5]:8060"), ("b.ns.svc", 1, "b.ns.svc:1")],
)
def test_joins_host_and_port(host: str, port: int, expected: str) -> None:
    assert join_host_port(host, port) == expected


@pytest.mark.parametrize(
    ("host", "expected"), [("10.0.0.1", True), ("::1", True), ("localhost", False), ("b.ns.svc", False)]
)
def test_tells_an_ip_literal_from_a_name(host: str, expected: bool) -> None:
    assert is_ip_literal(host) is expected
