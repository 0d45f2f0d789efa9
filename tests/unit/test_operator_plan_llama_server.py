"""Tables for ``engine: llamaServer`` in the operator's plan: llama-server as a container
beside the agent in each agent pod."""

from __future__ import annotations

from typing import Any

import pytest

from paddler_operator import plan_agents
from paddler_operator.crd_model_deployment import ModelDeploymentSpec
from paddler_operator.crd_models import DEFAULT_BALANCER_IMAGE
from paddler_operator.crd_pool import LlmPoolSpec
from paddler_operator.plan import Owner

MD = Owner(kind="ModelDeployment", namespace="ns", name="m", uid="md-uid", generation=2)
LOCAL = {"localPath": "/models/smollm2.gguf"}


def md_spec(**spec: Any) -> ModelDeploymentSpec:
    return ModelDeploymentSpec.model_validate({"poolRef": {"name": "p"}, "model": LOCAL, **spec})


def containers(md: ModelDeploymentSpec, pool: LlmPoolSpec | None = None) -> dict[str, dict[str, Any]]:
    """The pod's containers by name, the native sidecars (init containers) first."""
    planned = plan_agents.plan_model_deployment(MD, md, pool or LlmPoolSpec())
    deployment = planned.objects[0]
    assert deployment["kind"] == "Deployment"
    pod = deployment["spec"]["template"]["spec"]
    return {c["name"]: c for c in [*pod.get("initContainers", []), *pod["containers"]]}


def flag(args: list[str], name: str) -> str | None:
    return args[args.index(name) + 1] if name in args else None


def test_default_engine_is_the_agent_alone() -> None:
    assert list(containers(md_spec())) == ["agent"]


def test_llama_server_is_a_native_sidecar_that_outlives_the_agents_drain() -> None:
    planned = plan_agents.plan_model_deployment(MD, md_spec(engine="llamaServer"), LlmPoolSpec())
    pod = planned.objects[0]["spec"]["template"]["spec"]
    assert [c["name"] for c in pod["containers"]] == ["agent"]
    assert [(c["name"], c["restartPolicy"]) for c in pod["initContainers"]] == [("llama-server", "Always")]


def test_llama_server_pod_grace_covers_the_agents_drain_and_the_servers_stop() -> None:
    planned = plan_agents.plan_model_deployment(
        MD, md_spec(engine="llamaServer", rollout={"drainTimeoutSeconds": 90}), LlmPoolSpec()
    )
    assert planned.objects[0]["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == 100


def test_llama_server_engine_adds_the_server_beside_the_agent_on_pod_loopback() -> None:
    found = containers(md_spec(engine="llamaServer", slotsPerAgent=3))
    assert list(found) == ["llama-server", "agent"]
    agent, server = found["agent"], found["llama-server"]
    assert flag(agent["args"], "--engine") == "llama-server"
    assert flag(agent["args"], "--llama-server-url") == "http://127.0.0.1:8080"
    assert flag(agent["args"], "--slots") == "3"
    assert agent["image"] == DEFAULT_BALANCER_IMAGE  # no llama.cpp in the agent container
    args = server["args"]
    assert (flag(args, "--host"), flag(args, "--port"), flag(args, "--parallel")) == ("127.0.0.1", "8080", "3")
    assert flag(args, "--model") == "/models/smollm2.gguf"
    assert server["image"] == "ghcr.io/paddler-k8s/llama-server:0.2.0"
    # Probed from inside the pod (the kubelet's HTTP probes come from the node, which cannot
    # reach the pod's loopback): the agent's own /ready asks llama-server's /health.
    assert "readinessProbe" not in server
    assert agent["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "health"}
    assert server["securityContext"]["readOnlyRootFilesystem"] is True
    assert {m["name"] for m in server["volumeMounts"]} == {"models", "tmp"}


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        ({"localPath": "/m/a.gguf"}, ["--model", "/m/a.gguf"]),
        ({"huggingFace": {"repoId": "org/r", "filename": "a.gguf"}}, ["--hf-repo", "org/r", "--hf-file", "a.gguf"]),
        ({"url": "https://models.example/a.gguf"}, ["--model-url", "https://models.example/a.gguf"]),
    ],
)
def test_model_source_becomes_llama_server_model_flags(model: dict[str, Any], expected: list[str]) -> None:
    md = ModelDeploymentSpec.model_validate({"poolRef": {"name": "p"}, "model": model, "engine": "llamaServer"})
    args = containers(md)["llama-server"]["args"]
    start = args.index(expected[0])
    assert args[start : start + len(expected)] == expected


def test_inference_parameters_become_server_flags_and_spec_args_come_last() -> None:
    md = md_spec(
        engine="llamaServer",
        inferenceParameters={
            "contextSize": 4096,
            "nBatch": 256,
            "nGpuLayers": 99,
            "enableEmbeddings": True,
            "poolingType": "Mean",
        },
        llamaServer={
            "image": "registry.local/llama-server:cuda",
            "args": ["--flash-attn", "on", "--ctx-size", "8192"],
            "port": 9000,
        },
    )
    found = containers(md)
    args = found["llama-server"]["args"]
    assert (flag(args, "--batch-size"), flag(args, "--n-gpu-layers"), flag(args, "--pooling")) == ("256", "99", "mean")
    assert "--embeddings" in args
    assert args[-4:] == ["--flash-attn", "on", "--ctx-size", "8192"]  # later flags win in llama-server
    assert args[args.index("--ctx-size") + 1] == "4096"
    assert found["llama-server"]["image"] == "registry.local/llama-server:cuda"
    assert flag(found["agent"]["args"], "--llama-server-url") == "http://127.0.0.1:9000"


def test_gpus_go_on_the_server_container_not_the_agent() -> None:
    pool = LlmPoolSpec.model_validate({"agent": {"gpus": 1, "resources": {"requests": {"cpu": "2", "memory": "8Gi"}}}})
    found = containers(md_spec(engine="llamaServer"), pool)
    assert found["llama-server"]["resources"]["limits"] == {"nvidia.com/gpu": 1}
    assert found["llama-server"]["resources"]["requests"] == {"cpu": "2", "memory": "8Gi"}
    assert "nvidia.com/gpu" not in found["agent"]["resources"].get("limits", {})
    assert found["agent"]["resources"]["requests"] == {"cpu": "100m", "memory": "128Mi"}


def test_server_gpus_and_resources_override_the_pools() -> None:
    md = md_spec(
        engine="llamaServer",
        llamaServer={"gpus": 2, "resources": {"limits": {"memory": "16Gi"}}},
    )
    resources = containers(md)["llama-server"]["resources"]
    assert resources["limits"] == {"memory": "16Gi", "nvidia.com/gpu": 2}


def test_desired_state_of_a_llama_server_deployment_names_the_servers_model() -> None:
    planned = plan_agents.plan_model_deployment(MD, md_spec(engine="llamaServer"), LlmPoolSpec())
    assert planned.desired_state.model.describe() == "/models/smollm2.gguf"


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"engine": "llamaCpp"}, "engine"),
        ({"engine": "llamaServer", "llamaServer": {"port": 0}}, "port"),
    ],
)
def test_invalid_llama_server_specs_are_rejected(spec: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        md_spec(**spec)
