"""Tables for the strategic merge patch of pod templates (paddler_operator.strategic_merge)."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from paddler_operator.strategic_merge import check_patch, merge_list_by_key, strategic_merge

POD: dict[str, Any] = {
    "metadata": {"labels": {"a": "1"}, "annotations": {"x": "y"}},
    "spec": {
        "containers": [
            {
                "name": "agent",
                "image": "agent:1",
                "env": [{"name": "HOME", "value": "/tmp"}, {"name": "A", "value": "a"}],
                "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],
                "ports": [{"name": "health", "containerPort": 8086}],
            }
        ],
        "volumes": [{"name": "tmp", "emptyDir": {}}],
        "tolerations": [{"key": "gpu", "operator": "Exists"}],
        "topologySpreadConstraints": [{"topologyKey": "kubernetes.io/hostname", "maxSkew": 1}],
        "nodeSelector": {"pool": "cpu"},
    },
}


def agent(pod: dict[str, Any]) -> dict[str, Any]:
    found: dict[str, Any] = next(c for c in pod["spec"]["containers"] if c["name"] == "agent")
    return found


@pytest.mark.parametrize(
    ("patch", "path", "expected"),
    [
        # maps merge recursively; null deletes a key
        ({"metadata": {"labels": {"b": "2"}}}, ("metadata", "labels"), {"a": "1", "b": "2"}),
        ({"metadata": {"annotations": {"x": None}}}, ("metadata", "annotations"), {}),
        ({"spec": {"nodeSelector": None}}, ("spec", "nodeSelector"), None),
        ({"spec": {"hostNetwork": True}}, ("spec", "hostNetwork"), True),
        # $patch: replace on a map
        ({"spec": {"nodeSelector": {"$patch": "replace", "gpu": "a100"}}}, ("spec", "nodeSelector"), {"gpu": "a100"}),
        # a list without a merge key is replaced
        ({"spec": {"tolerations": [{"key": "x"}]}}, ("spec", "tolerations"), [{"key": "x"}]),
        # volumes merge by name: a new one is appended, a known one merged
        (
            {"spec": {"volumes": [{"name": "data", "emptyDir": {}}]}},
            ("spec", "volumes"),
            [{"name": "tmp", "emptyDir": {}}, {"name": "data", "emptyDir": {}}],
        ),
        (
            {"spec": {"volumes": [{"name": "tmp", "emptyDir": {"medium": "Memory"}}]}},
            ("spec", "volumes"),
            [{"name": "tmp", "emptyDir": {"medium": "Memory"}}],
        ),
        # $patch: delete on an item of a keyed list
        ({"spec": {"volumes": [{"name": "tmp", "$patch": "delete"}]}}, ("spec", "volumes"), []),
        # $patch: replace as a list item: the rest of the list replaces the original
        (
            {"spec": {"volumes": [{"$patch": "replace"}, {"name": "only", "emptyDir": {}}]}},
            ("spec", "volumes"),
            [{"name": "only", "emptyDir": {}}],
        ),
        # topologySpreadConstraints merge by topologyKey
        (
            {"spec": {"topologySpreadConstraints": [{"topologyKey": "topology.kubernetes.io/zone", "maxSkew": 2}]}},
            ("spec", "topologySpreadConstraints"),
            [
                {"topologyKey": "kubernetes.io/hostname", "maxSkew": 1},
                {"topologyKey": "topology.kubernetes.io/zone", "maxSkew": 2},
            ],
        ),
        # hostAliases and imagePullSecrets are keyed too (new list: added as written)
        (
            {"spec": {"imagePullSecrets": [{"name": "regcred"}]}},
            ("spec", "imagePullSecrets"),
            [{"name": "regcred"}],
        ),
    ],
)
def test_pod_template_patch(patch: dict[str, Any], path: tuple[str, ...], expected: Any) -> None:
    node: Any = strategic_merge(POD, patch)
    for key in path:
        node = node.get(key) if isinstance(node, dict) else None
    assert node == expected


@pytest.mark.parametrize(
    ("container_patch", "field", "expected"),
    [
        # containers merge by name, env by name, volumeMounts by mountPath, ports by containerPort
        ({"image": "agent:2"}, "image", "agent:2"),
        (
            {"env": [{"name": "A", "value": "b"}, {"name": "B", "value": "c"}]},
            "env",
            [{"name": "HOME", "value": "/tmp"}, {"name": "A", "value": "b"}, {"name": "B", "value": "c"}],
        ),
        ({"env": [{"name": "HOME", "$patch": "delete"}]}, "env", [{"name": "A", "value": "a"}]),
        (
            {"volumeMounts": [{"name": "scratch", "mountPath": "/tmp"}]},
            "volumeMounts",
            [{"name": "scratch", "mountPath": "/tmp"}],
        ),
        (
            {"ports": [{"containerPort": 8086, "protocol": "TCP"}]},
            "ports",
            [{"name": "health", "containerPort": 8086, "protocol": "TCP"}],
        ),
        ({"args": ["--x"]}, "args", ["--x"]),
    ],
)
def test_container_patch_merges_by_name(container_patch: dict[str, Any], field: str, expected: Any) -> None:
    merged = strategic_merge(POD, {"spec": {"containers": [{"name": "agent", **container_patch}]}})
    assert agent(merged)[field] == expected
    assert [c["name"] for c in merged["spec"]["containers"]] == ["agent"]


def test_a_new_container_is_appended_and_one_can_be_deleted() -> None:
    added = strategic_merge(POD, {"spec": {"containers": [{"name": "proxy", "image": "envoy"}]}})
    assert [c["name"] for c in added["spec"]["containers"]] == ["agent", "proxy"]
    deleted = strategic_merge(added, {"spec": {"containers": [{"name": "proxy", "$patch": "delete"}]}})
    assert [c["name"] for c in deleted["spec"]["containers"]] == ["agent"]


def test_the_original_and_the_patch_are_not_modified() -> None:
    original, patch = copy.deepcopy(POD), {"spec": {"containers": [{"name": "agent", "env": [{"name": "Z"}]}]}}
    before = copy.deepcopy(patch)
    strategic_merge(original, patch)
    assert original == POD
    assert patch == before


def test_new_content_lands_without_directives_or_nulls() -> None:
    merged = strategic_merge(POD, {"spec": {"affinity": {"$patch": "replace", "nodeAffinity": {"x": None, "y": 1}}}})
    assert merged["spec"]["affinity"] == {"nodeAffinity": {"y": 1}}


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        ({"spec": {"$retainKeys": ["a"]}}, "unsupported strategic merge directive"),
        ({"spec": {"$setElementOrder/containers": []}}, "unsupported strategic merge directive"),
        ({"spec": {"x": {"$patch": "merge-ish"}}}, "unknown \\$patch directive"),
        ({"spec": {"containers": [{"image": "no-name"}]}}, "spec.containers: every item needs its merge key 'name'"),
        (
            {"spec": {"containers": [{"name": "a", "volumeMounts": [{"name": "v"}]}]}},
            "volumeMounts: every item needs its merge key 'mountPath'",
        ),
    ],
)
def test_unsupported_patches_are_rejected(patch: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        check_patch(patch)
    with pytest.raises(ValueError, match=message):
        strategic_merge(POD, patch)


def test_merge_list_by_key_keeps_the_original_order() -> None:
    original = [{"name": "a", "v": 1}, {"name": "b", "v": 2}]
    assert merge_list_by_key(original, [{"name": "c"}, {"name": "a", "v": 3}], "name") == [
        {"name": "a", "v": 3},
        {"name": "b", "v": 2},
        {"name": "c"},
    ]
