"""Kubernetes strategic merge patch, for pod templates (``podTemplatePatch``).

No maintained Python library implements it (``kubectl`` and the API server do it in Go,
from the Go types' ``patchMergeKey`` tags), and the operator must apply a user's patch to
the pod template it renders *before* server-side apply, so the rules are written out here
for the fields of a pod template:

- maps merge recursively; a ``null`` value deletes the key;
- a list whose field has a Kubernetes ``patchMergeKey`` (:data:`PATCH_MERGE_KEYS`) merges
  item by item on that key: a matching item merges into the original one, a new item is
  appended, ``{"<key>": ..., "$patch": "delete"}`` removes the item;
- any other list replaces the original one;
- ``"$patch": "replace"`` in a map replaces the original map; a list item
  ``{"$patch": "replace"}`` makes the rest of the list replace the original list.

Not supported (rejected by :func:`check_patch`): ``$retainKeys``, ``$setElementOrder``,
``$deleteFromPrimitiveList``. Lists keep the original order, new items last.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

PATCH_MERGE_KEYS: Mapping[str, str] = {
    "containers": "name",
    "initContainers": "name",
    "ephemeralContainers": "name",
    "volumes": "name",
    "env": "name",
    "volumeMounts": "mountPath",
    "ports": "containerPort",
    "imagePullSecrets": "name",
    "topologySpreadConstraints": "topologyKey",
    "hostAliases": "ip",
}
"""Field name -> merge key, as the Go types of a pod template declare them (``patchMergeKey``)."""

DIRECTIVE = "$patch"
_REPLACE = "replace"
_DELETE = "delete"


def strategic_merge(original: Mapping[str, Any], patch: Mapping[str, Any]) -> dict[str, Any]:
    """``original`` with ``patch`` applied (neither is modified)."""
    check_patch(patch)
    return _merge_map(original, patch)


def merge_list_by_key(original: list[Any], patch: list[Any], key: str) -> list[Any]:
    """A keyed list's merge: items of ``patch`` merge into the original item with the same ``key``
    value, or are appended; ``$patch: delete`` items remove theirs."""
    if _replaces_list(patch):
        return [_clean(item) for item in patch if not _is_replace_item(item)]
    out = [copy.deepcopy(item) for item in original]
    for item in patch:
        index = next(
            (i for i, have in enumerate(out) if isinstance(have, Mapping) and have.get(key) == item[key]), None
        )
        if item.get(DIRECTIVE) == _DELETE:
            if index is not None:
                del out[index]
        elif index is None:
            out.append(_clean(item))
        else:
            out[index] = _merge_map(out[index], item)
    return out


def check_patch(patch: Any, field: str = "") -> None:
    """Raise ValueError where ``patch`` uses a directive this module does not apply, or has a keyed
    list item without its merge key (so that a bad patch is an invalid spec, not a failing pass)."""
    if isinstance(patch, Mapping):
        for key, value in patch.items():
            if key == DIRECTIVE:
                if value not in (_REPLACE, _DELETE):
                    raise ValueError(f"{field or 'patch'}: unknown $patch directive {value!r}")
            elif isinstance(key, str) and key.startswith("$"):
                raise ValueError(f"{field or 'patch'}: unsupported strategic merge directive {key!r}")
            else:
                check_patch(value, f"{field}.{key}" if field else str(key))
    elif isinstance(patch, list):
        merge_key = PATCH_MERGE_KEYS.get(field.rsplit(".", 1)[-1])
        for item in patch:
            keyed = isinstance(item, Mapping) and merge_key in item
            if merge_key is not None and not keyed and not _is_replace_item(item):
                raise ValueError(f"{field}: every item needs its merge key {merge_key!r}")
            check_patch(item, f"{field}[]")


def _merge_map(original: Mapping[str, Any], patch: Mapping[str, Any]) -> dict[str, Any]:
    if patch.get(DIRECTIVE) == _REPLACE:
        replaced: dict[str, Any] = _clean(patch)
        return replaced
    out = copy.deepcopy(dict(original))
    for key, value in patch.items():
        if key == DIRECTIVE:
            continue
        if value is None or (isinstance(value, Mapping) and value.get(DIRECTIVE) == _DELETE):
            out.pop(key, None)
        elif key in out:
            out[key] = _merge_value(key, out[key], value)
        else:
            out[key] = _clean(value)
    return out


def _merge_value(field: str, original: Any, patch: Any) -> Any:
    if isinstance(original, Mapping) and isinstance(patch, Mapping):
        return _merge_map(original, patch)
    if isinstance(original, list) and isinstance(patch, list) and field in PATCH_MERGE_KEYS:
        return merge_list_by_key(original, patch, PATCH_MERGE_KEYS[field])
    return _clean(patch)


def _is_replace_item(item: Any) -> bool:
    return isinstance(item, Mapping) and dict(item) == {DIRECTIVE: _REPLACE}


def _replaces_list(items: list[Any]) -> bool:
    return any(_is_replace_item(item) for item in items)


def _clean(value: Any) -> Any:
    """Patch content that lands as is: without directives and ``null`` values."""
    if isinstance(value, Mapping):
        return {k: _clean(v) for k, v in value.items() if k != DIRECTIVE and v is not None}
    if isinstance(value, list):
        return [_clean(item) for item in value if not _is_replace_item(item)]
    return value
