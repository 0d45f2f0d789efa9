"""Kubernetes objects as plain JSON: their references, and comparing two of them.

Pure (no I/O): :mod:`paddler_operator.kube` writes objects, :mod:`paddler_operator.plan` (and its ``plan_*`` siblings)
builds them, :mod:`paddler_operator.reconcile` skips status writes that change nothing.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any

Obj = dict[str, Any]


@dataclass(frozen=True)
class ObjRef:
    api_version: str
    kind: str
    namespace: str
    name: str

    @classmethod
    def of(cls, obj: Mapping[str, Any]) -> ObjRef:
        meta = obj["metadata"]
        return cls(obj["apiVersion"], obj["kind"], meta["namespace"], meta["name"])

    def __str__(self) -> str:
        return f"{self.kind}/{self.namespace}/{self.name}"


_QUANTITY = re.compile(r"^([+-]?[0-9]+(?:\.[0-9]*)?(?:[eE][+-]?[0-9]+)?)(n|u|m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$")
_QUANTITY_SUFFIX = {
    "n": "1e-9", "u": "1e-6", "m": "1e-3", "": "1", "k": "1e3", "M": "1e6", "G": "1e9", "T": "1e12", "P": "1e15",
    "E": "1e18", "Ki": "1024", "Mi": str(1024**2), "Gi": str(1024**3), "Ti": str(1024**4), "Pi": str(1024**5),
    "Ei": str(1024**6),
}  # fmt: skip


def quantity_value(text: str) -> Decimal | None:
    """The numeric value of a Kubernetes quantity (``500m`` -> 0.5), or None if it is not one."""
    match = _QUANTITY.match(text)
    if match is None:
        return None
    number, suffix = match.group(1), match.group(2) or ""
    try:
        return Decimal(number) * Decimal(_QUANTITY_SUFFIX[suffix])
    except (InvalidOperation, KeyError):
        return None


def _scalar_equal(want: Any, have: Any) -> bool:
    if want == have and type(want) is type(have):
        return True
    if isinstance(want, bool) or isinstance(have, bool):
        return False
    if isinstance(want, int | float | str) and isinstance(have, int | float | str):
        a, b = quantity_value(str(want)), quantity_value(str(have))
        return a is not None and a == b
    return False


def differences(desired: Any, actual: Any, path: str = "") -> list[str]:
    """Paths where ``actual`` does not carry ``desired`` (fields only in ``actual`` are fine:
    the API server adds defaults). Lists must match element by element."""
    if isinstance(desired, dict):
        if not isinstance(actual, dict):
            return [path or "."]
        out: list[str] = []
        for key, value in desired.items():
            out += differences(value, actual.get(key), f"{path}.{key}")
        return out
    if isinstance(desired, list):
        if not isinstance(actual, list) or len(actual) != len(desired):
            return [path or "."]
        out = []
        for i, (want, have) in enumerate(zip(desired, actual, strict=True)):
            out += differences(want, have, f"{path}[{i}]")
        return out
    return [] if _scalar_equal(desired, actual) else [path or "."]


def status_patch(previous: Mapping[str, Any] | None, new: Mapping[str, Any]) -> Obj | None:
    """The status to write, or None when nothing but timestamps would change."""
    if (
        previous is not None
        and not differences(dict(new), dict(previous))
        and not differences(dict(previous), dict(new))
    ):
        return None
    return dict(new)
