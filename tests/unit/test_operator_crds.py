"""The CRDs in crds/ (and the chart) are generated from the pydantic models and stay in sync."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from paddler_operator import gen_crds
from paddler_operator.crd_model_deployment import ModelDeploymentSpec
from paddler_operator.crd_pool import LlmPoolSpec

REPO = Path(__file__).resolve().parents[2]


def test_crds_are_not_stale() -> None:
    stale = gen_crds.stale(REPO)
    assert not stale, f"regenerate with `python -m paddler_operator.gen_crds`: {stale}"


def test_check_mode_detects_a_stale_file(tmp_path: Path) -> None:
    assert gen_crds.main(["--root", str(tmp_path)]) == 0
    assert gen_crds.main(["--check", "--root", str(tmp_path)]) == 0
    target = tmp_path / "crds" / "paddler.dev_llmpools.yaml"
    target.write_text(target.read_text().replace("shortNames", "shortnames"))
    assert gen_crds.main(["--check", "--root", str(tmp_path)]) == 1


def _template_body(text: str) -> str:
    """A chart CRD template without its Helm actions (``{{- if .Values.crds.install }}`` … ``{{- end }}``)."""
    lines = text.splitlines(keepends=True)
    actions = [line for line in lines if line.lstrip().startswith("{{")]
    assert [a.strip() for a in actions] == ["{{- if .Values.crds.install }}", "{{- end }}"], actions
    return "".join(line for line in lines if line not in actions)


def test_chart_crds_are_the_top_level_ones_kept_on_uninstall() -> None:
    """The chart's CRDs are templates (``helm upgrade`` updates them) behind crds.install, the
    same objects as crds/ plus Helm's keep policy; nothing is left in the chart's old crds/."""
    plain = sorted(p.name for p in (REPO / "crds").glob("*.yaml"))
    assert plain == sorted(p.name for p in (REPO / gen_crds.CHART_DIR).glob("*.yaml"))
    assert not list((REPO / "charts/paddler/crds").glob("*.yaml"))  # Helm would install those too, never upgrade
    for name in plain:
        top = yaml.safe_load((REPO / "crds" / name).read_text())
        chart = yaml.safe_load(_template_body((REPO / gen_crds.CHART_DIR / name).read_text()))
        assert chart["metadata"].pop("annotations") == {"helm.sh/resource-policy": "keep"}
        assert chart == top


def test_write_removes_crds_left_in_the_charts_old_folder(tmp_path: Path) -> None:
    legacy = tmp_path / "charts/paddler/crds"
    legacy.mkdir(parents=True)
    (legacy / "paddler.dev_llmpools.yaml").write_text("kind: CustomResourceDefinition\n")
    assert gen_crds.stale(tmp_path)[-1] == legacy / "paddler.dev_llmpools.yaml"
    assert gen_crds.main(["--root", str(tmp_path)]) == 0
    assert not legacy.exists()
    assert gen_crds.stale(tmp_path) == []


def test_a_description_with_template_braces_is_refused() -> None:
    crd = next(iter(gen_crds.build_crds().values()))
    crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["description"] = "see {{ .Values }}"
    with pytest.raises(ValueError, match="description contains"):
        gen_crds.chart_template(crd)


def _walk(node: Any, path: str = "") -> list[tuple[str, dict[str, Any]]]:
    out: list[tuple[str, dict[str, Any]]] = []
    if isinstance(node, dict):
        out.append((path, node))
        for key in ("properties",):
            for name, child in (node.get(key) or {}).items():
                out += _walk(child, f"{path}.{name}")
        if isinstance(node.get("items"), dict):
            out += _walk(node["items"], f"{path}[]")
        if isinstance(node.get("additionalProperties"), dict):
            out += _walk(node["additionalProperties"], f"{path}{{}}")
    return out


@pytest.mark.parametrize("name", sorted(gen_crds.build_crds()))
def test_schema_is_structural(name: str) -> None:
    crd = gen_crds.build_crds()[name]
    version = crd["spec"]["versions"][0]
    assert version["subresources"] == {"status": {}}
    schema = version["schema"]["openAPIV3Schema"]
    text = yaml.safe_dump(schema)
    for banned in ("$ref", "anyOf", "title:", "$defs", "const:"):
        assert banned not in text, banned
    for path, node in _walk(schema):
        assert "type" in node or node.get("x-kubernetes-int-or-string"), f"{name}{path} has no type"
        if "exclusiveMinimum" in node:
            assert node["exclusiveMinimum"] is True


def apply_defaults(schema: dict[str, Any], value: Any) -> Any:
    """What the API server's structural defaulting does (enough for these schemas)."""
    if isinstance(value, dict) and schema.get("type") == "object":
        value = dict(value)
        for name, prop in (schema.get("properties") or {}).items():
            if name not in value and "default" in prop:
                value[name] = copy.deepcopy(prop["default"])
            if name in value:
                value[name] = apply_defaults(prop, value[name])
    return value


def spec_schema(kind_file: str) -> dict[str, Any]:
    crd = gen_crds.build_crds()[kind_file]
    schema: dict[str, Any] = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    return schema


def test_empty_pool_spec_defaults_to_the_models_defaults() -> None:
    schema = spec_schema("paddler.dev_llmpools.yaml")
    defaulted = apply_defaults(schema, apply_defaults({"type": "object", "properties": {"spec": schema}}, {})["spec"])
    assert LlmPoolSpec.model_validate(defaulted) == LlmPoolSpec()
    assert defaulted["balancer"]["maxBufferedRequests"] == 30
    assert defaulted["balancer"]["resources"]["requests"] == {"cpu": "100m", "memory": "128Mi"}
    assert defaulted["agent"]["slotsPerAgent"] == 4


def test_minimal_model_deployment_defaults() -> None:
    schema = spec_schema("paddler.dev_modeldeployments.yaml")
    minimal = {"poolRef": {"name": "p"}, "model": {"localPath": "/m.gguf"}}
    defaulted = apply_defaults(schema, minimal)
    assert ModelDeploymentSpec.model_validate(defaulted) == ModelDeploymentSpec.model_validate(minimal)
    assert defaulted["inferenceParameters"]["contextSize"] == 8192
    assert defaulted["autoscaling"]["mode"] == "None"
    assert sorted(schema["required"]) == ["model", "poolRef"]


def test_one_model_source_rule_is_in_the_schema() -> None:
    model = spec_schema("paddler.dev_modeldeployments.yaml")["properties"]["model"]
    rules = model["x-kubernetes-validations"]
    assert rules[0]["message"] == "exactly one of huggingFace, url, localPath must be set"
    auto = spec_schema("paddler.dev_modeldeployments.yaml")["properties"]["autoscaling"]
    assert auto["x-kubernetes-validations"][0]["message"] == "minReplicas must be <= maxReplicas"


@pytest.mark.parametrize(
    "model",
    [
        {},
        {"url": "https://x.invalid/m.gguf", "localPath": "/m.gguf"},
        {"huggingFace": {"repoId": "a/b", "filename": "f.gguf"}, "url": "https://x.invalid/m.gguf"},
    ],
)
def test_pydantic_rejects_not_exactly_one_source(model: dict[str, Any]) -> None:
    with pytest.raises(ValidationError, match="exactly one of"):
        ModelDeploymentSpec.model_validate({"poolRef": {"name": "p"}, "model": model})


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"autoscaling": {"minReplicas": 5, "maxReplicas": 2}}, "minReplicas must be <= maxReplicas"),
        ({"replicas": -1}, "greater than or equal to 0"),
        ({"slotsPerAgent": 0}, "greater than or equal to 1"),
    ],
)
def test_pydantic_rejects_bad_specs(spec: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        ModelDeploymentSpec.model_validate({"poolRef": {"name": "p"}, "model": {"localPath": "/m"}, **spec})


def test_printer_columns() -> None:
    crds = gen_crds.build_crds()

    def columns(name: str) -> list[str]:
        return [c["name"] for c in crds[name]["spec"]["versions"][0]["additionalPrinterColumns"]]

    pool_cols, md_cols = columns("paddler.dev_llmpools.yaml"), columns("paddler.dev_modeldeployments.yaml")
    assert pool_cols == ["Ready", "Balancers", "Agents", "Slots", "Buffered", "Models", "Age"]
    assert md_cols == ["Pool", "Ready", "Agents", "Slots", "Buffered", "Model", "Age"]
    assert crds["paddler.dev_llmpools.yaml"]["spec"]["names"]["shortNames"] == ["lp"]
    assert crds["paddler.dev_modeldeployments.yaml"]["spec"]["names"]["shortNames"] == ["md"]


@pytest.mark.parametrize("name", sorted(gen_crds.build_crds()))
def test_every_spec_field_is_described(name: str) -> None:
    """`kubectl explain` has something to say about every field."""
    spec = gen_crds.build_crds()[name]["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    nodes = _walk(spec, "spec")
    missing = [p for p, node in nodes if p != "spec" and not p.endswith(("{}", "[]")) and "description" not in node]
    assert not missing
