"""Pod settings (spec.balancer.pod, spec.agent.pod, ModelDeployment spec.pod), images from the
operator's flags, and tolerant parsing of specs: tables over the pure plan."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from paddler_cli.main import build_parser
from paddler_operator import gen_crds, plan, plan_agents, plan_pool
from paddler_operator.cli import add_subcommand, settings_from_args
from paddler_operator.crd_model_deployment import ModelDeploymentSpec
from paddler_operator.crd_models import (
    DEFAULT_AGENT_IMAGE,
    DEFAULT_BALANCER_IMAGE,
    DEFAULT_IMAGES,
    DEFAULT_LLAMA_SERVER_IMAGE,
    PREVIOUS_SCHEMA_DEFAULT_IMAGES,
    Images,
    resolve_image,
)
from paddler_operator.crd_pod import RESERVED_LABELS, PodSettings, apply_pod_settings
from paddler_operator.crd_pool import LlmPoolSpec
from paddler_operator.plan import Owner
from paddler_operator.settings import OperatorSettings

POOL = Owner(kind="LlmPool", namespace="ns", name="p", uid="pool-uid", generation=3)
MD = Owner(kind="ModelDeployment", namespace="ns", name="m", uid="md-uid", generation=2)
HF = {"huggingFace": {"repoId": "org/repo", "filename": "model.gguf"}}
HF_TOKEN = {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}}}


def pool_spec(**spec: Any) -> LlmPoolSpec:
    return LlmPoolSpec.model_validate(spec)


def md_spec(**spec: Any) -> ModelDeploymentSpec:
    return ModelDeploymentSpec.model_validate({"poolRef": {"name": "p"}, "model": HF, **spec})


def balancer_pod(spec: LlmPoolSpec, images: Images = DEFAULT_IMAGES) -> dict[str, Any]:
    deployment = next(o for o in plan_pool.plan_pool(POOL, spec, images) if o["kind"] == "Deployment")
    template: dict[str, Any] = deployment["spec"]["template"]
    return template


def agent_pod(md: ModelDeploymentSpec, pool: LlmPoolSpec, images: Images = DEFAULT_IMAGES) -> dict[str, Any]:
    planned = plan_agents.plan_model_deployment(MD, md, pool, images=images)
    template: dict[str, Any] = planned.objects[0]["spec"]["template"]
    return template


def containers(pod: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in [*pod["spec"].get("initContainers", []), *pod["spec"]["containers"]]}


# --- rendering ----------------------------------------------------------------------


def test_empty_pod_settings_change_no_template() -> None:
    for pod in (balancer_pod(pool_spec()), agent_pod(md_spec(engine="llamaServer"), pool_spec())):
        assert apply_pod_settings(pod, PodSettings(), main=("balancer", "agent", "llama-server")) == pod
        assert "imagePullSecrets" not in pod["spec"]


def test_env_from_a_secret_reaches_the_agent_and_the_llama_server_containers() -> None:
    pool = pool_spec(agent={"pod": {"env": [HF_TOKEN], "envFrom": [{"secretRef": {"name": "proxy"}}]}})
    found = containers(agent_pod(md_spec(engine="llamaServer"), pool))
    for name in ("agent", "llama-server"):
        assert HF_TOKEN in found[name]["env"]
        assert found[name]["envFrom"] == [{"secretRef": {"name": "proxy"}}]


def test_env_of_the_same_name_replaces_the_operators() -> None:
    pool = pool_spec(agent={"pod": {"env": [{"name": "HF_HOME", "value": "/hf"}]}})
    env = containers(agent_pod(md_spec(), pool))["agent"]["env"]
    assert [e for e in env if e["name"] == "HF_HOME"] == [{"name": "HF_HOME", "value": "/hf"}]
    assert env[0]["name"] == "POD_NAME"  # the operator's order kept


def test_an_image_pull_secret_reaches_every_pod() -> None:
    secrets = {"imagePullSecrets": [{"name": "regcred"}]}
    pool = pool_spec(balancer={"pod": secrets}, agent={"pod": secrets})
    assert balancer_pod(pool)["spec"]["imagePullSecrets"] == [{"name": "regcred"}]
    for engine in ("llama", "llamaServer"):
        assert agent_pod(md_spec(engine=engine), pool)["spec"]["imagePullSecrets"] == [{"name": "regcred"}]


@pytest.mark.parametrize(
    ("pod", "field", "expected"),
    [
        ({"priorityClassName": "high"}, "priorityClassName", "high"),
        ({"runtimeClassName": "nvidia"}, "runtimeClassName", "nvidia"),
        ({"affinity": {"nodeAffinity": {"x": 1}}}, "affinity", {"nodeAffinity": {"x": 1}}),
        ({"topologySpreadConstraints": []}, "topologySpreadConstraints", []),
        (
            {"tolerations": [{"key": "gpu", "operator": "Exists"}]},
            "tolerations",
            [{"key": "gpu", "operator": "Exists"}],
        ),
        ({"nodeSelector": {"zone": "a"}}, "nodeSelector", {"zone": "a"}),
        ({"podSecurityContext": {"runAsNonRoot": True}}, "securityContext", {"runAsNonRoot": True}),
        (
            {"volumes": [{"name": "models", "persistentVolumeClaim": {"claimName": "m"}}]},
            "volumes",
            [{"name": "models", "persistentVolumeClaim": {"claimName": "m"}}, {"name": "tmp", "emptyDir": {}}],
        ),
        (
            {"volumes": [{"name": "certs", "secret": {"secretName": "ca"}}]},
            "volumes",
            [
                {"name": "models", "emptyDir": {"sizeLimit": "20Gi"}},
                {"name": "tmp", "emptyDir": {}},
                {"name": "certs", "secret": {"secretName": "ca"}},
            ],
        ),
    ],
)
def test_pod_fields_of_the_agent_pod(pod: dict[str, Any], field: str, expected: Any) -> None:
    assert agent_pod(md_spec(pod=pod), pool_spec())["spec"][field] == expected


def test_security_contexts_replace_the_fixed_uid() -> None:
    """OpenShift's restricted policy picks the uid: the user's contexts replace the operator's whole."""
    settings = {"podSecurityContext": {"runAsNonRoot": True}, "securityContext": {"allowPrivilegeEscalation": False}}
    pod = balancer_pod(pool_spec(balancer={"pod": settings}))
    assert pod["spec"]["securityContext"] == {"runAsNonRoot": True}
    assert containers(pod)["balancer"]["securityContext"] == {"allowPrivilegeEscalation": False}
    assert "10001" not in str(pod)


def test_volume_mounts_reach_the_main_containers() -> None:
    mount = {"name": "certs", "mountPath": "/etc/ssl/extra", "readOnly": True}
    found = containers(agent_pod(md_spec(engine="llamaServer", pod={"volumeMounts": [mount]}), pool_spec()))
    for name in ("agent", "llama-server"):
        assert found[name]["volumeMounts"][-1] == mount


def test_labels_and_annotations_reach_the_template_beside_the_operators() -> None:
    pod = balancer_pod(pool_spec(balancer={"pod": {"labels": {"team": "ml"}, "annotations": {"a": "b"}}}))
    assert pod["metadata"]["labels"]["team"] == "ml"
    assert pod["metadata"]["labels"][plan.COMPONENT_LABEL] == "balancer"
    assert pod["metadata"]["annotations"]["a"] == "b"
    assert plan.CONFIG_HASH_ANNOTATION in pod["metadata"]["annotations"]


def test_pod_template_patch_is_applied_last_and_cannot_move_the_selector() -> None:
    patch = {
        "metadata": {"labels": {plan.COMPONENT_LABEL: "other", "extra": "1"}},
        "spec": {
            "dnsPolicy": "None",
            "containers": [{"name": "agent", "env": [{"name": "HOME", "$patch": "delete"}]}],
            "hostAliases": [{"ip": "10.0.0.1", "hostnames": ["models.local"]}],
        },
    }
    deployment = plan_agents.plan_model_deployment(MD, md_spec(pod={"podTemplatePatch": patch}), pool_spec()).objects[0]
    pod = deployment["spec"]["template"]
    assert pod["spec"]["dnsPolicy"] == "None"
    assert pod["spec"]["hostAliases"] == [{"ip": "10.0.0.1", "hostnames": ["models.local"]}]
    assert all(e["name"] != "HOME" for e in containers(pod)["agent"]["env"])
    assert pod["metadata"]["labels"]["extra"] == "1"
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert {k: pod["metadata"]["labels"][k] for k in selector} == selector


def test_an_env_item_with_a_value_and_a_value_from_is_an_invalid_spec() -> None:
    with pytest.raises(ValidationError, match="set at most one of value, valueFrom"):
        md_spec(pod={"env": [{**HF_TOKEN, "value": "x"}]})


def test_a_bad_pod_template_patch_is_an_invalid_spec() -> None:
    with pytest.raises(ValidationError, match="every item needs its merge key 'name'"):
        md_spec(pod={"podTemplatePatch": {"spec": {"containers": [{"image": "x"}]}}})


# --- merge rule: pool's agent.pod, then the ModelDeployment's pod ----------------------


POOL_POD = {
    "labels": {"team": "ml", "tier": "a"},
    "annotations": {"a": "1"},
    "nodeSelector": {"gpu": "yes"},
    "env": [{"name": "A", "value": "pool"}, {"name": "B", "value": "pool"}],
    "tolerations": [{"key": "gpu", "operator": "Exists"}],
    "priorityClassName": "pool",
    "imagePullSecrets": [{"name": "pool"}],
}


@pytest.mark.parametrize(
    ("md_pod", "field", "expected"),
    [
        ({}, "priority_class_name", "pool"),
        ({"priorityClassName": "md"}, "priority_class_name", "md"),
        ({"labels": {"tier": "b"}}, "labels", {"team": "ml", "tier": "b"}),
        ({"annotations": {"b": "2"}}, "annotations", {"a": "1", "b": "2"}),
        ({"nodeSelector": {"zone": "z"}}, "node_selector", {"gpu": "yes", "zone": "z"}),
        (
            {"env": [{"name": "B", "value": "md"}, {"name": "C", "value": "md"}]},
            "env",
            [{"name": "A", "value": "pool"}, {"name": "B", "value": "md"}, {"name": "C", "value": "md"}],
        ),
        ({"tolerations": []}, "tolerations", []),
        ({"imagePullSecrets": [{"name": "md"}]}, "image_pull_secrets", [{"name": "md"}]),
    ],
)
def test_a_model_deployments_pod_over_the_pools(md_pod: dict[str, Any], field: str, expected: Any) -> None:
    merged = plan_agents.agent_pod_settings(md_spec(pod=md_pod), pool_spec(agent={"pod": POOL_POD}))
    value = getattr(merged, field)
    dumped = [v.model_dump(by_alias=True, exclude_none=True) for v in value] if isinstance(value, list) else value
    assert dumped == expected


def test_the_pool_agent_node_selector_and_tolerations_still_apply() -> None:
    pool = pool_spec(agent={"nodeSelector": {"gpu": "yes"}, "tolerations": [{"key": "gpu", "operator": "Exists"}]})
    spec = agent_pod(md_spec(pod={"nodeSelector": {"zone": "z"}}), pool)["spec"]
    assert spec["nodeSelector"] == {"gpu": "yes", "zone": "z"}
    assert spec["tolerations"] == [{"key": "gpu", "operator": "Exists"}]


# --- the operator's labels -------------------------------------------------------------


@pytest.mark.parametrize("key", RESERVED_LABELS)
def test_pod_labels_may_not_set_the_operators_labels(key: str) -> None:
    with pytest.raises(ValidationError, match="may not set the operator's own labels"):
        md_spec(pod={"labels": {key: "x"}})
    with pytest.raises(ValidationError, match="may not set the operator's own labels"):
        pool_spec(balancer={"pod": {"labels": {key: "x"}}})


def test_reserved_labels_are_every_label_the_operator_puts_on_pods() -> None:
    agent_labels = agent_pod(md_spec(), pool_spec())["metadata"]["labels"]
    balancer_labels = balancer_pod(pool_spec())["metadata"]["labels"]
    assert set(agent_labels) | set(balancer_labels) == set(RESERVED_LABELS)


def test_the_api_server_rejects_reserved_labels_by_a_cel_rule() -> None:
    """CEL on the CRD, not a status condition: kubectl apply fails at once with the message, and
    the object never holds a spec the operator cannot render."""
    crds = gen_crds.build_crds()
    pool = crds["paddler.dev_llmpools.yaml"]["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]
    md = crds["paddler.dev_modeldeployments.yaml"]["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]
    for labels in (
        pool["spec"]["properties"]["balancer"]["properties"]["pod"]["properties"]["labels"],
        pool["spec"]["properties"]["agent"]["properties"]["pod"]["properties"]["labels"],
        md["spec"]["properties"]["pod"]["properties"]["labels"],
    ):
        (rule,) = labels["x-kubernetes-validations"]
        assert all(f"!('{key}' in self)" in rule["rule"] for key in RESERVED_LABELS)
        assert "self.all" not in rule["rule"]  # one lookup per key: within the CEL cost budget


# --- images ----------------------------------------------------------------------------


OPERATOR_IMAGES = Images(balancer="reg/balancer:2", agent="reg/agent:2", llama_server="reg/llama-server:2")


@pytest.mark.parametrize(
    ("written", "expected"),
    [
        (None, "reg/agent:2"),
        ("ghcr.io/paddler-k8s/agent:0.1.0", "reg/agent:2"),  # stored by the old CRD's default: unset
        ("ghcr.io/paddler-k8s/agent:0.2.0-smollm2", "ghcr.io/paddler-k8s/agent:0.2.0-smollm2"),
        ("mine/agent:1", "mine/agent:1"),
    ],
)
def test_agent_image_from_the_spec_or_the_operator(written: str | None, expected: str) -> None:
    pool = pool_spec(agent={"image": written} if written else {})
    assert containers(agent_pod(md_spec(), pool, OPERATOR_IMAGES))["agent"]["image"] == expected
    assert resolve_image(written, "reg/agent:2") == expected


def test_unset_images_of_every_container_are_the_operators() -> None:
    old = {
        "balancer": {"image": PREVIOUS_SCHEMA_DEFAULT_IMAGES[0]},
        "agent": {"image": PREVIOUS_SCHEMA_DEFAULT_IMAGES[1]},
    }
    for pool in (pool_spec(), pool_spec(**old)):
        assert containers(balancer_pod(pool, OPERATOR_IMAGES))["balancer"]["image"] == "reg/balancer:2"
        found = containers(agent_pod(md_spec(engine="llamaServer"), pool, OPERATOR_IMAGES))
        assert found["agent"]["image"] == "reg/balancer:2"  # the agent beside llama-server needs no llama.cpp
        assert found["llama-server"]["image"] == "reg/llama-server:2"


def image_fields(node: Any, path: str = "") -> dict[str, Any]:
    found: dict[str, Any] = {}
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "image" and isinstance(value, dict) and value.get("type") == "string":
                found[path] = value
            found.update(image_fields(value, f"{path}.{key}"))
    elif isinstance(node, list):
        for index, item in enumerate(node):
            found.update(image_fields(item, f"{path}[{index}]"))
    return found


def test_no_image_has_a_schema_default() -> None:
    """The API server would store it on create: pools would keep it across operator upgrades."""
    fields = image_fields(gen_crds.build_crds())
    assert len(fields) == 3  # balancer, agent, llamaServer
    assert all("default" not in field for field in fields.values())


@pytest.mark.parametrize(
    ("images", "registry", "expected"),
    [
        (Images(), None, Images()),
        (
            Images(),
            "mirror.local:5000/",
            Images(
                balancer="mirror.local:5000/paddler-k8s/balancer:0.2.0",
                agent="mirror.local:5000/paddler-k8s/agent:0.2.0",
                llama_server="mirror.local:5000/paddler-k8s/llama-server:0.2.0",
            ),
        ),
        (
            Images(agent="mine/agent:cuda"),
            "mirror.local",
            Images(
                balancer="mirror.local/paddler-k8s/balancer:0.2.0",
                agent="mine/agent:cuda",
                llama_server="mirror.local/paddler-k8s/llama-server:0.2.0",
            ),
        ),
    ],
)
def test_image_registry_moves_only_the_builtin_images(images: Images, registry: str | None, expected: Images) -> None:
    assert images.with_registry(registry) == expected
    assert Images() == Images(DEFAULT_BALANCER_IMAGE, DEFAULT_AGENT_IMAGE, DEFAULT_LLAMA_SERVER_IMAGE)


def operator_settings(*argv: str) -> OperatorSettings:
    return settings_from_args(build_parser([add_subcommand]).parse_args(["operator", "-n", "ns", *argv]))


def test_image_flags_become_the_operators_images() -> None:
    assert operator_settings().images == Images()
    settings = operator_settings("--agent-image", "mine/agent:cuda", "--image-registry", "mirror.local")
    assert settings.images == Images(
        balancer="mirror.local/paddler-k8s/balancer:0.2.0",
        agent="mine/agent:cuda",
        llama_server="mirror.local/paddler-k8s/llama-server:0.2.0",
    )


@pytest.mark.parametrize("registry", ["https://mirror.local", "", "mirror local", "mirror.local@sha256"])
def test_image_registry_must_be_a_host(registry: str) -> None:
    with pytest.raises(SystemExit):
        operator_settings("--image-registry", registry)


# --- tolerant parsing ------------------------------------------------------------------


def test_a_spec_with_unknown_fields_plans_the_same_objects() -> None:
    """A CRD newer than the operator: its fields are ignored, reconciling goes on."""
    newer_pool = {"futureField": 1, "balancer": {"future": {"x": 1}}, "agent": {"pod": {"future": True}}}
    newer_md = {"futureField": [1], "autoscaling": {"future": 2}, "inferenceParameters": {"future": 3}}
    assert plan_pool.plan_pool(POOL, pool_spec(**newer_pool)) == plan_pool.plan_pool(POOL, pool_spec())
    newer = plan_agents.plan_model_deployment(MD, md_spec(**newer_md), pool_spec(**newer_pool))
    same = plan_agents.plan_model_deployment(MD, md_spec(), pool_spec())
    assert newer == same


def test_pod_settings_do_not_restart_a_balancer_through_its_config_hash() -> None:
    """A pool written before pod settings existed keeps its ConfigMap (no restart on an operator
    upgrade); the pod settings reach the template themselves."""
    with_env = pool_spec(balancer={"pod": {"env": [{"name": "X", "value": "1"}]}})
    config = plan_pool.balancer_config(POOL, with_env)
    assert config == plan_pool.balancer_config(POOL, pool_spec())
    assert '"pod"' not in config["balancer.json"]
