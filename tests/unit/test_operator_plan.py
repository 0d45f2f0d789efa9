"""Tables for the operator's pure planning functions (paddler_operator.plan)."""

from __future__ import annotations

from typing import Any

import pytest

from paddler_operator import plan, plan_agents, plan_autoscaling, plan_pool, plan_status
from paddler_operator.balancer_views import AgentView, BalancerSnapshot, RolloutView
from paddler_operator.crd_model_deployment import AutoscalingSpec, ModelDeploymentSpec
from paddler_operator.crd_models import Condition
from paddler_operator.crd_pool import LlmPoolSpec
from paddler_operator.objects import ObjRef, differences, status_patch
from paddler_operator.plan import Owner
from paddler_operator.plan_autoscaling import Load

POOL = Owner(kind="LlmPool", namespace="ns", name="p", uid="pool-uid", generation=3)
MD = Owner(kind="ModelDeployment", namespace="ns", name="m", uid="md-uid", generation=2)
HF = {"huggingFace": {"repoId": "org/repo", "filename": "model.gguf"}}


def pool_spec(**spec: Any) -> LlmPoolSpec:
    return LlmPoolSpec.model_validate(spec)


def md_spec(**spec: Any) -> ModelDeploymentSpec:
    return ModelDeploymentSpec.model_validate({"poolRef": {"name": "p"}, "model": HF, **spec})


def by_kind(objects: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {f"{o['kind']}/{o['metadata']['name']}": o for o in objects}


def container(deployment: dict[str, Any]) -> dict[str, Any]:
    c: dict[str, Any] = deployment["spec"]["template"]["spec"]["containers"][0]
    return c


def arg(args: list[str], flag: str) -> str | None:
    return args[args.index(flag) + 1] if flag in args else None


# --- LlmPool ------------------------------------------------------------------------


def test_pool_plan_objects_names_and_owner_references() -> None:
    objects = plan_pool.plan_pool(POOL, pool_spec())
    assert sorted(by_kind(objects)) == [
        "ConfigMap/p-balancer",
        "Deployment/p-balancer",
        "Service/p-inference",
        "Service/p-management",
        "Service/p-management-peers",
    ]
    for obj in objects:
        assert obj["metadata"]["namespace"] == "ns"
        assert obj["metadata"]["ownerReferences"] == [
            {
                "apiVersion": "paddler.dev/v1alpha1",
                "kind": "LlmPool",
                "name": "p",
                "uid": "pool-uid",
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ]
        assert obj["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "paddler-operator"


@pytest.mark.parametrize(
    ("spec", "flag", "value"),
    [
        ({}, "--management-addr", "0.0.0.0:8060"),
        ({}, "--inference-addr", "0.0.0.0:8061"),
        ({}, "--max-buffered-requests", "30"),
        ({}, "--buffered-request-timeout", "120s"),
        ({}, "--inference-item-timeout", "30s"),
        ({}, "--web-admin-panel-addr", None),
        ({"balancer": {"maxBufferedRequests": 0}}, "--max-buffered-requests", "0"),
        ({"balancer": {"bufferedRequestTimeout": "500ms"}}, "--buffered-request-timeout", "500ms"),
        ({"balancer": {"adminPanel": {"enabled": True}}}, "--web-admin-panel-addr", "0.0.0.0:8062"),
        ({"balancer": {"logLevel": "DEBUG"}}, "--log-level", "DEBUG"),
        ({}, "--drain-delay", "5s"),
        ({}, "--drain-timeout", "50s"),
        ({"balancer": {"drainTimeoutSeconds": 120}}, "--drain-timeout", "120s"),
        ({}, "--peer-management-addr", "p-management-peers.ns.svc:8060"),
        # The headless Service maps no ports: peers dial the pods' own port, whatever the Service port.
        (
            {"balancer": {"service": {"managementPort": 9000}}},
            "--peer-management-addr",
            "p-management-peers.ns.svc:8060",
        ),
    ],
)
def test_balancer_args(spec: dict[str, Any], flag: str, value: str | None) -> None:
    deployment = by_kind(plan_pool.plan_pool(POOL, pool_spec(**spec)))["Deployment/p-balancer"]
    c = container(deployment)
    assert c["command"] == ["paddler"]
    assert "balancer" in c["args"]
    assert arg(c["args"], flag) == value


@pytest.mark.parametrize(
    ("spec", "flag", "seconds"),
    [
        ({}, "--drain-delay", 5.0),
        ({"balancer": {"drainTimeoutSeconds": 120}}, "--drain-timeout", 120.0),
        ({"balancer": {"bufferedRequestTimeout": "3m"}}, "--buffered-request-timeout", 180.0),
        ({}, "--inference-item-timeout", 30.0),
    ],
)
def test_balancer_reads_each_rendered_duration_as_the_seconds_the_spec_means(
    spec: dict[str, Any], flag: str, seconds: float
) -> None:
    """The balancer reads a bare number as milliseconds (Paddler's flags): a duration the
    operator renders must say its unit, or a 5 s drain becomes 5 ms."""
    from paddler_balancer.settings import parse_duration

    deployment = by_kind(plan_pool.plan_pool(POOL, pool_spec(**spec)))["Deployment/p-balancer"]
    rendered = arg(container(deployment)["args"], flag)
    assert rendered is not None
    assert parse_duration(rendered) == seconds


@pytest.mark.parametrize(
    ("spec", "service", "check"),
    [
        ({}, "p-inference", lambda s: s["spec"]["type"] == "ClusterIP" and len(s["spec"]["ports"]) == 1),
        ({}, "p-management", lambda s: s["spec"]["ports"][0]["port"] == 8060),
        (
            {"balancer": {"service": {"type": "LoadBalancer", "inferencePort": 80, "annotations": {"a": "b"}}}},
            "p-inference",
            lambda s: (
                (s["spec"]["type"], s["spec"]["ports"][0]["port"], s["metadata"]["annotations"])
                == ("LoadBalancer", 80, {"a": "b"})
            ),
        ),
        (
            {"balancer": {"adminPanel": {"enabled": True}}},
            "p-inference",
            lambda s: [p["name"] for p in s["spec"]["ports"]] == ["inference", "admin"],
        ),
        (
            {"balancer": {"service": {"type": "NodePort"}}},
            "p-management",
            lambda s: s["spec"]["type"] == "ClusterIP",
        ),
    ],
)
def test_pool_services(spec: dict[str, Any], service: str, check: Any) -> None:
    svc = by_kind(plan_pool.plan_pool(POOL, pool_spec(**spec)))[f"Service/{service}"]
    assert svc["spec"]["selector"] == {"paddler.dev/pool": "p", "paddler.dev/component": "balancer"}
    assert check(svc)


def test_balancer_pod_is_non_root_read_only_with_probes() -> None:
    deployment = by_kind(plan_pool.plan_pool(POOL, pool_spec()))["Deployment/p-balancer"]
    pod = deployment["spec"]["template"]["spec"]
    c = container(deployment)
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert c["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert c["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "management"}
    assert c["livenessProbe"]["httpGet"] == {"path": "/health", "port": "management"}
    assert {"name": "tmp", "mountPath": "/tmp"} in c["volumeMounts"]
    assert deployment["spec"]["replicas"] == 1
    assert c["resources"] == {"requests": {"cpu": "100m", "memory": "128Mi"}}


def test_balancer_auth_secret_becomes_env() -> None:
    spec = pool_spec(balancer={"authSecretRef": {"name": "keys"}})
    env = container(by_kind(plan_pool.plan_pool(POOL, spec))["Deployment/p-balancer"])["env"]
    assert {"name": "PADDLER_API_KEY", "valueFrom": {"secretKeyRef": {"name": "keys", "key": "api-key"}}} in env


def test_config_change_rolls_the_balancer_pod() -> None:
    def annotation(spec: LlmPoolSpec) -> str:
        d = by_kind(plan_pool.plan_pool(POOL, spec))["Deployment/p-balancer"]
        value: str = d["spec"]["template"]["metadata"]["annotations"][plan.CONFIG_HASH_ANNOTATION]
        return value

    assert annotation(pool_spec()) == annotation(pool_spec())
    assert annotation(pool_spec()) != annotation(pool_spec(balancer={"maxBufferedRequests": 5}))
    # Agent defaults do not restart the balancer (that would drop every agent and buffered request).
    assert annotation(pool_spec()) == annotation(pool_spec(agent={"slotsPerAgent": 8, "image": "x"}))


# --- ModelDeployment --------------------------------------------------------------------


def test_model_deployment_plan_defaults() -> None:
    p = plan_agents.plan_model_deployment(MD, md_spec(), pool_spec())
    objs = by_kind(p.objects)
    assert list(objs) == ["Deployment/m-agent", "PodDisruptionBudget/m-agent"]
    d = objs["Deployment/m-agent"]
    c = container(d)
    assert d["spec"]["replicas"] == 1
    assert d["metadata"]["ownerReferences"][0]["kind"] == "ModelDeployment"
    assert d["metadata"]["ownerReferences"][0]["uid"] == "md-uid"
    assert d["spec"]["selector"]["matchLabels"] == {
        "paddler.dev/model-deployment": "m",
        "paddler.dev/component": "agent",
    }
    assert c["args"][2:] == [
        "agent",
        "--management-addr",
        "p-management-peers.ns.svc:8060",
        "--slots",
        "4",
        "--model-group",
        "m",
        "--name",
        "$(POD_NAME)",
        "--model-cache-dir",
        "/var/cache/paddler/models",
        "--health-addr",
        "0.0.0.0:8086",
        "--drain-timeout",
        "60s",
    ]
    assert d["spec"]["strategy"]["rollingUpdate"] == {"maxUnavailable": 1, "maxSurge": 0}
    assert [str(r) for r in p.absent] == [
        "HorizontalPodAutoscaler/ns/m-agent",
        "ScaledObject/ns/m-agent",
        "TriggerAuthentication/ns/m-agent",
    ]
    assert p.replicas == 1
    assert p.slots_per_agent == 4


@pytest.mark.parametrize(
    ("md", "pool", "slots"),
    [
        ({}, {}, "4"),
        ({}, {"agent": {"slotsPerAgent": 2}}, "2"),
        ({"slotsPerAgent": 8}, {"agent": {"slotsPerAgent": 2}}, "8"),
    ],
)
def test_slots_per_agent(md: dict[str, Any], pool: dict[str, Any], slots: str) -> None:
    p = plan_agents.plan_model_deployment(MD, md_spec(**md), pool_spec(**pool))
    assert arg(container(p.objects[0])["args"], "--slots") == slots


@pytest.mark.parametrize(
    ("md", "pool", "field", "expected"),
    [
        ({}, {}, "resources", {"requests": {"cpu": "1", "memory": "1Gi"}}),
        (
            {},
            {"agent": {"gpus": 1}},
            "resources",
            {"requests": {"cpu": "1", "memory": "1Gi"}, "limits": {"nvidia.com/gpu": 1}},
        ),
        (
            {"resources": {"limits": {"memory": "4Gi"}}},
            {"agent": {"gpus": 2, "gpuResourceName": "amd.com/gpu"}},
            "resources",
            {"limits": {"memory": "4Gi", "amd.com/gpu": 2}},
        ),
        ({}, {"agent": {"image": "img:1"}}, "image", "img:1"),
    ],
)
def test_agent_container_fields(md: dict[str, Any], pool: dict[str, Any], field: str, expected: Any) -> None:
    p = plan_agents.plan_model_deployment(MD, md_spec(**md), pool_spec(**pool))
    assert container(p.objects[0])[field] == expected


@pytest.mark.parametrize(
    ("pool", "field", "expected"),
    [
        ({}, "volumes", [{"name": "models", "emptyDir": {"sizeLimit": "20Gi"}}, {"name": "tmp", "emptyDir": {}}]),
        (
            {"agent": {"modelCache": {"persistentVolumeClaim": {"claimName": "models"}}}},
            "volumes",
            [{"name": "models", "persistentVolumeClaim": {"claimName": "models"}}, {"name": "tmp", "emptyDir": {}}],
        ),
        (
            {"agent": {"modelCache": {"hostPath": {"path": "/var/lib/paddler/models"}}}},
            "volumes",
            [
                {"name": "models", "hostPath": {"path": "/var/lib/paddler/models", "type": "DirectoryOrCreate"}},
                {"name": "tmp", "emptyDir": {}},
            ],
        ),
        ({"agent": {"nodeSelector": {"gpu": "yes"}}}, "nodeSelector", {"gpu": "yes"}),
        (
            {"agent": {"tolerations": [{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}]}},
            "tolerations",
            [{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}],
        ),
        ({}, "nodeSelector", None),
    ],
)
def test_agent_pod_fields(pool: dict[str, Any], field: str, expected: Any) -> None:
    p = plan_agents.plan_model_deployment(MD, md_spec(), pool_spec(**pool))
    assert p.objects[0]["spec"]["template"]["spec"].get(field) == expected


def test_model_cache_is_one_volume_kind() -> None:
    cache = {"persistentVolumeClaim": {"claimName": "m"}, "hostPath": {"path": "/m"}}
    with pytest.raises(ValueError, match="at most one of persistentVolumeClaim, hostPath"):
        pool_spec(agent={"modelCache": cache})


HPA, SO, TA, PDB = "HorizontalPodAutoscaler", "ScaledObject", "TriggerAuthentication", "PodDisruptionBudget"


@pytest.mark.parametrize(
    ("autoscaling", "builtin", "kinds", "absent", "replicas"),
    [
        ({"mode": "None"}, None, ["Deployment", PDB], [HPA, SO, TA], 1),
        ({"mode": "HPA", "minReplicas": 0}, None, ["Deployment", HPA, PDB], [SO, TA], None),
        ({"mode": "KEDA"}, None, ["Deployment", SO, TA, PDB], [HPA], None),
        ({"mode": "Builtin", "minReplicas": 0}, None, ["Deployment", PDB], [HPA, SO, TA], 0),
        ({"mode": "Builtin", "maxReplicas": 3}, 7, ["Deployment", PDB], [HPA, SO, TA], 3),
        ({"mode": "Builtin", "minReplicas": 2}, 1, ["Deployment", PDB], [HPA, SO, TA], 2),
    ],
)
def test_autoscaling_modes(
    autoscaling: dict[str, Any], builtin: int | None, kinds: list[str], absent: list[str], replicas: int | None
) -> None:
    p = plan_agents.plan_model_deployment(MD, md_spec(autoscaling=autoscaling), pool_spec(), builtin_replicas=builtin)
    assert [o["kind"] for o in p.objects] == kinds
    assert [r.kind for r in p.absent] == absent
    assert p.replicas == replicas
    assert p.objects[0]["spec"].get("replicas") == replicas


def test_hpa_scales_on_buffered_and_busy_slots() -> None:
    spec = md_spec(autoscaling={"mode": "HPA", "minReplicas": 0, "maxReplicas": 5, "scaleDownDelaySeconds": 60})
    hpa = plan_agents.plan_model_deployment(MD, spec, pool_spec()).objects[1]
    assert hpa["spec"]["minReplicas"] == 0
    assert hpa["spec"]["maxReplicas"] == 5
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "m-agent"}
    metrics = {m["external"]["metric"]["name"]: m["external"] for m in hpa["spec"]["metrics"]}
    assert metrics["paddler_requests_buffered"]["target"] == {"type": "AverageValue", "averageValue": "1"}
    assert metrics["paddler_requests_buffered"]["metric"]["selector"] == {"matchLabels": {"model_group": "m"}}
    assert metrics["paddler_slots_processing"]["target"]["averageValue"] == "3200m"  # 4 slots * 80 %
    assert hpa["spec"]["behavior"]["scaleDown"]["stabilizationWindowSeconds"] == 60


@pytest.mark.parametrize(("min_replicas", "gate", "expected"), [(0, True, 0), (0, False, 1), (2, False, 2)])
def test_hpa_min_replicas_without_the_scale_to_zero_gate_is_at_least_one(
    min_replicas: int, gate: bool, expected: int
) -> None:
    spec = md_spec(autoscaling={"mode": "HPA", "minReplicas": min_replicas, "maxReplicas": 5})
    hpa = plan_agents.plan_model_deployment(MD, spec, pool_spec(), hpa_scale_to_zero=gate).objects[1]
    assert hpa["spec"]["minReplicas"] == expected
    assert "replicas" not in plan_agents.plan_model_deployment(MD, spec, pool_spec()).objects[0]["spec"]


@pytest.mark.parametrize(
    ("autoscaling", "gate", "replicas_now", "buffered", "wakes"),
    [
        ({"mode": "HPA", "minReplicas": 0}, False, 0, 1, True),
        ({"mode": "HPA", "minReplicas": 0}, True, 0, 1, False),  # the HPA does it itself
        ({"mode": "HPA", "minReplicas": 0}, False, 0, 0, False),  # nothing waits
        ({"mode": "HPA", "minReplicas": 0}, False, 1, 5, False),  # 1 <-> N is the HPA's
        ({"mode": "HPA", "minReplicas": 0}, False, None, 1, False),  # no Deployment yet
        ({"mode": "HPA", "minReplicas": 1}, False, 0, 1, False),  # not a scale-to-zero group
        ({"mode": "Builtin", "minReplicas": 0}, False, 0, 1, False),
    ],
)
def test_operator_wakes_an_hpa_group_only_where_the_hpa_cannot(
    autoscaling: dict[str, Any], gate: bool, replicas_now: int | None, buffered: int, wakes: bool
) -> None:
    a = md_spec(autoscaling=autoscaling).autoscaling
    assert plan_autoscaling.hpa_wakes(a, gate, replicas_now, buffered) is wakes


def test_scale_to_zero_probe_is_an_hpa_with_min_replicas_zero() -> None:
    probe = plan_autoscaling.hpa_gate_probe("team-a")
    assert (probe["kind"], probe["metadata"]["namespace"], probe["spec"]["minReplicas"]) == (
        "HorizontalPodAutoscaler", "team-a", 0,
    )  # fmt: skip


def test_keda_reads_the_groups_buffered_requests_from_the_balancer_json() -> None:
    spec = md_spec(autoscaling={"mode": "KEDA", "minReplicas": 0, "scaleDownDelaySeconds": 60})
    so = plan_agents.plan_model_deployment(MD, spec, pool_spec()).objects[1]
    trigger = so["spec"]["triggers"][0]
    assert so["spec"]["minReplicaCount"] == 0
    assert (so["spec"]["cooldownPeriod"], so["spec"]["pollingInterval"]) == (60, 5)
    assert so["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"] == {
        "scaleDown": {"stabilizationWindowSeconds": 60}
    }
    assert trigger["type"] == "metrics-api"
    assert trigger["metadata"] == {
        "url": "http://p-management.ns.svc:8060/api/v1/buffered_requests?model_group=m&scope=pool",
        "valueLocation": "buffered_requests_current",
        "targetValue": "1",
        "activationTargetValue": "0",
        "authMode": "bearer",
    }


def test_keda_keeps_a_group_whose_slots_are_busy_with_nothing_buffered() -> None:
    """The second metrics-api trigger: the group's busy slots from the same pool-wide JSON, one
    agent per slots x targetSlotUtilization, active while any slot serves (so KEDA's cooldown
    never scales a group in while it streams)."""
    spec = md_spec(autoscaling={"mode": "KEDA", "minReplicas": 0, "targetSlotUtilization": 50}, slotsPerAgent=4)
    so = plan_agents.plan_model_deployment(MD, spec, pool_spec()).objects[1]
    buffered, busy = so["spec"]["triggers"]
    assert busy["type"] == "metrics-api"
    assert busy["metadata"] == {
        "url": buffered["metadata"]["url"],
        "valueLocation": "slots_processing",
        "targetValue": "2",
        "activationTargetValue": "0",
        "authMode": "bearer",
    }
    assert busy["authenticationRef"] == buffered["authenticationRef"]


def test_keda_metrics_api_trigger_reads_where_the_operator_reaches_the_balancer() -> None:
    spec = md_spec(autoscaling={"mode": "KEDA"})
    so = plan_agents.plan_model_deployment(MD, spec, pool_spec(), balancer_url="http://127.0.0.1:4321").objects[1]
    assert (
        so["spec"]["triggers"][0]["metadata"]["url"]
        == "http://127.0.0.1:4321/api/v1/buffered_requests?model_group=m&scope=pool"
    )


def test_keda_prometheus_trigger_queries_the_group_in_its_namespace() -> None:
    keda = {"trigger": "prometheus", "prometheusServerAddress": "http://prom.mon.svc:9090", "pollingIntervalSeconds": 2}
    spec = md_spec(autoscaling={"mode": "KEDA", "targetBufferedRequests": 2, "keda": keda})
    p = plan_agents.plan_model_deployment(MD, spec, pool_spec())
    so = p.objects[1]
    assert so["spec"]["pollingInterval"] == 2
    assert so["spec"]["triggers"] == [
        {
            "type": "prometheus",
            "metadata": {
                "serverAddress": "http://prom.mon.svc:9090",
                "query": 'sum(paddler_requests_buffered{model_group="m",namespace="ns"})',
                "threshold": "2",
                "activationThreshold": "0",
                "ignoreNullValues": "true",
            },
        },
        {
            "type": "prometheus",
            "metadata": {
                "serverAddress": "http://prom.mon.svc:9090",
                "query": 'sum(paddler_slots_processing{model_group="m",namespace="ns"})',
                "threshold": "3.2",  # 4 slots x 80 %, a float for KEDA
                "activationThreshold": "0",
                "ignoreNullValues": "true",
            },
        },
    ]
    # Prometheus needs no management token from KEDA: no TriggerAuthentication.
    assert [o["kind"] for o in p.objects] == ["Deployment", "ScaledObject", "PodDisruptionBudget"]
    assert "TriggerAuthentication" in [r.kind for r in p.absent]


def test_keda_trigger_kind_is_validated() -> None:
    with pytest.raises(ValueError, match="trigger"):
        md_spec(autoscaling={"mode": "KEDA", "keda": {"trigger": "cpu"}})


@pytest.mark.parametrize(
    ("slots", "percent", "target"),
    [(4, 80, "3200m"), (4, 100, "4"), (1, 50, "500m"), (10, 10, "1")],
)
def test_busy_slots_target(slots: int, percent: int, target: str) -> None:
    assert plan_autoscaling.busy_slots_target(AutoscalingSpec(target_slot_utilization=percent), slots) == target


@pytest.mark.parametrize(
    ("slots", "percent", "threshold"),
    [(4, 80, "3.2"), (4, 100, "4"), (1, 50, "0.5"), (10, 10, "1"), (3, 33, "0.99"), (1, 1, "0.01")],
)
def test_keda_busy_slot_threshold_is_a_plain_decimal(slots: int, percent: int, threshold: str) -> None:
    value = plan_autoscaling.busy_slots_threshold(AutoscalingSpec(target_slot_utilization=percent), slots)
    assert value == threshold
    float(value)  # what KEDA does with it


@pytest.mark.parametrize(
    ("model", "extra", "expected_model", "template"),
    [
        (HF, {}, {"HuggingFace": {"repo_id": "org/repo", "filename": "model.gguf", "revision": "main"}}, None),
        ({"url": "https://x.invalid/m.gguf"}, {}, {"Url": {"url": "https://x.invalid/m.gguf"}}, None),
        ({"localPath": "/models/m.gguf"}, {"chatTemplate": "{{ x }}"}, {"LocalToAgent": "/models/m.gguf"}, "{{ x }}"),
    ],
)
def test_desired_state_json(
    model: dict[str, Any], extra: dict[str, Any], expected_model: Any, template: str | None
) -> None:
    spec = ModelDeploymentSpec.model_validate(
        {"poolRef": {"name": "p"}, "model": model, "inferenceParameters": {"temperature": 0.1}, **extra}
    )
    state = plan_agents.plan_model_deployment(MD, spec, pool_spec()).desired_state.to_json_dict()
    assert state["model"] == expected_model
    assert state["inference_parameters"]["temperature"] == 0.1
    assert state["inference_parameters"]["context_size"] == 8192
    assert state["use_chat_template_override"] is (template is not None)
    assert (state["chat_template_override"] or {}).get("content") == template


def test_desired_state_carries_the_multimodal_projection_and_none_without_it() -> None:
    with_projector = ModelDeploymentSpec.model_validate(
        {
            "poolRef": {"name": "p"},
            "model": {"localPath": "/models/vlm.gguf"},
            "multimodalProjection": {"url": "https://x.invalid/mmproj.gguf"},
            "inferenceParameters": {"imageResizeToFit": 512},
        }
    )
    state = plan_agents.plan_model_deployment(MD, with_projector, pool_spec()).desired_state.to_json_dict()
    assert state["multimodal_projection"] == {"Url": {"url": "https://x.invalid/mmproj.gguf"}}
    assert state["inference_parameters"]["image_resize_to_fit"] == 512
    text_only = ModelDeploymentSpec.model_validate({"poolRef": {"name": "p"}, "model": {"localPath": "/m.gguf"}})
    assert (
        plan_agents.plan_model_deployment(MD, text_only, pool_spec()).desired_state.to_json_dict()[
            "multimodal_projection"
        ]
        == "None"
    )


@pytest.mark.parametrize(
    ("template", "url"),
    [
        ("http://{service}.{namespace}.svc:{port}", "http://p-management-peers.ns.svc:8060"),
        ("http://127.0.0.1:4321", "http://127.0.0.1:4321"),
        ("http://{pool}.{namespace}:{port}", "http://p.ns:8060"),
    ],
)
def test_balancer_url(template: str, url: str) -> None:
    assert plan.balancer_url(template, "p", "ns", pool_spec()) == url


# --- diff ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("desired", "actual", "diff"),
    [
        ({"a": 1}, {"a": 1, "b": 2}, []),
        ({"a": 1}, {"a": 2}, [".a"]),
        ({"a": {"b": [1, 2]}}, {"a": {"b": [1, 2]}}, []),
        ({"a": {"b": [1, 2]}}, {"a": {"b": [1]}}, [".a.b"]),
        ({"l": [{"x": 1}]}, {"l": [{"x": 1, "defaulted": True}]}, []),
        ({"cpu": 1}, {"cpu": "1"}, []),
        ({"cpu": "1000m"}, {"cpu": "1"}, []),
        ({"mem": "1024Mi"}, {"mem": "1Gi"}, []),
        ({"mem": "1Gi"}, {"mem": "1G"}, [".mem"]),
        ({"flag": True}, {"flag": "true"}, [".flag"]),
        ({"name": "x"}, {}, [".name"]),
        ({"a": {}}, {"a": None}, [".a"]),
    ],
)
def test_differences(desired: Any, actual: Any, diff: list[str]) -> None:
    assert differences(desired, actual) == diff


# --- Builtin scaler -------------------------------------------------------------------


def load(busy: int = 0, buffered: int = 0) -> Load:
    return Load(agents=0, ready=0, slots_total=0, slots_free=0, busy=busy, buffered=buffered)


A = AutoscalingSpec(min_replicas=0, max_replicas=4, target_slot_utilization=100, scale_down_delay_seconds=30)


@pytest.mark.parametrize(
    ("current", "reading", "low_since", "now", "replicas", "new_low_since"),
    [
        (0, load(), None, 100.0, 0, None),  # idle at zero stays at zero
        (0, load(buffered=1), None, 100.0, 1, None),  # 0 -> 1 at once on one buffered request
        (1, load(busy=4, buffered=3), None, 100.0, 2, None),  # 7 demand / 4 slots -> 2
        (2, load(busy=40), None, 100.0, 4, None),  # capped at maxReplicas
        (2, load(busy=1), None, 100.0, 2, 100.0),  # fewer would do: start the delay
        (2, load(busy=1), 100.0, 120.0, 2, 100.0),  # still within the delay
        (2, load(busy=1), 100.0, 130.0, 1, None),  # delay passed: scale down
        (1, load(), 100.0, 130.0, 0, None),  # back to zero after the idle delay
        (3, None, None, 100.0, 3, None),  # no reading (balancer unreachable): hold
        (2, load(busy=8), 100.0, 130.0, 2, None),  # demand back: the delay resets
    ],
)
def test_builtin_scale(
    current: int, reading: Load | None, low_since: float | None, now: float, replicas: int, new_low_since: float | None
) -> None:
    decision = plan_autoscaling.builtin_scale(A, 4, current, reading, low_since, now)
    assert (decision.replicas, decision.low_since) == (replicas, new_low_since)


def test_builtin_scale_respects_min_and_utilization() -> None:
    a = AutoscalingSpec(min_replicas=1, max_replicas=10, target_slot_utilization=50)
    assert plan_autoscaling.builtin_scale(a, 4, 0, load(), None, 0.0).replicas == 1
    assert plan_autoscaling.builtin_scale(a, 4, 1, load(busy=4), None, 0.0).replicas == 2  # 4 busy / (4 * 50 %) = 2


# --- status -------------------------------------------------------------------------


def agent(group: str = "m", state: str = "Applied", total: int = 4, busy: int = 0, issues: tuple[str, ...] = ()) -> Any:
    return AgentView(
        id=f"a-{group}-{state}", name=None, model_group=group, slots_total=total, slots_in_flight=busy,
        state=state, issues=issues,
    )  # fmt: skip


def snapshot(*agents: AgentView, groups: tuple[str, ...] = ("m",), buffered: int = 0) -> BalancerSnapshot:
    return BalancerSnapshot(
        agents=agents,
        buffered_total=buffered,
        buffered_by_group={"m": buffered},
        group_states={g: {} for g in groups},
    )


def md_conditions(**kw: Any) -> dict[str, tuple[str, str]]:
    args: dict[str, Any] = {
        "generation": 2,
        "pool_found": True,
        "desired_replicas": 1,
        "snapshot": snapshot(agent()),
        "balancer_error": None,
        "desired_state_error": None,
        "apply_errors": [],
        "previous": [],
        "now": "2026-01-01T00:00:00Z",
    }
    args.update(kw)
    if isinstance(args.get("rollout"), dict):  # the table writes rollouts as the balancer's JSON
        args["rollout"] = RolloutView.model_validate(args["rollout"])
    status = plan_status.model_deployment_status("m", md_spec(), **args)
    return {c.type: (c.status, c.reason) for c in status.conditions}


@pytest.mark.parametrize(
    ("kw", "ready", "progressing", "degraded"),
    [
        ({}, ("True", "AgentsReady"), ("False", "Complete"), ("False", "AsExpected")),
        ({"pool_found": False, "snapshot": None}, ("False", "PoolNotFound"), ("False", "PoolNotFound"), None),
        (
            {"snapshot": None, "balancer_error": "refused"},
            ("False", "BalancerUnreachable"),
            ("True", "BalancerUnreachable"),
            None,
        ),
        ({"desired_replicas": 2}, ("False", "AgentsNotReady"), ("True", "WaitingForAgents"), None),
        ({"snapshot": snapshot(agent(state="Fresh"))}, ("False", "AgentsNotReady"), None, None),
        ({"snapshot": snapshot(agent(), groups=())}, ("False", "AgentsNotReady"), None, None),
        ({"desired_replicas": 0, "snapshot": snapshot()}, ("True", "ScaledToZero"), None, None),
        ({"snapshot": snapshot(agent(state="Stuck"))}, None, None, ("True", "ModelNotAppliable")),
        ({"snapshot": snapshot(agent(issues=("disk full",)))}, None, None, ("True", "AgentIssues")),
        ({"apply_errors": ["Deployment m-agent: forbidden"]}, None, None, ("True", "ApplyFailed")),
        ({"desired_state_error": "HTTP 400"}, ("False", "AgentsNotReady"), None, ("True", "ApplyFailed")),
        (
            {"rollout": {"phase": "Progressing", "applied": 1, "total": 2, "max_unavailable": "1"}},
            ("False", "RollingOut"),
            ("True", "RollingOut"),
            ("False", "AsExpected"),
        ),
        (
            {"rollout": {"phase": "Failed", "applied": 0, "total": 2, "message": "a-0: not a GGUF"}},
            ("False", "RolloutFailed"),
            ("False", "RolloutFailed"),
            ("True", "RolloutFailed"),
        ),
        (
            {"rollout": {"phase": "Complete", "applied": 1, "total": 1}},
            ("True", "AgentsReady"),
            ("False", "Complete"),
            ("False", "AsExpected"),
        ),
    ],
)
def test_model_deployment_conditions(
    kw: dict[str, Any],
    ready: tuple[str, str] | None,
    progressing: tuple[str, str] | None,
    degraded: tuple[str, str] | None,
) -> None:
    conds = md_conditions(**kw)
    for type_, expected in (("Ready", ready), ("Progressing", progressing), ("Degraded", degraded)):
        if expected is not None:
            assert conds[type_] == expected, type_


def test_rollout_progress_and_failure_are_in_the_condition_messages() -> None:
    def message(rollout: dict[str, Any], type_: str) -> str:
        status = plan_status.model_deployment_status(
            "m", md_spec(), generation=1, pool_found=True, desired_replicas=2, snapshot=snapshot(agent()),
            balancer_error=None, desired_state_error=None, apply_errors=[], previous=[], now="t",
            rollout=RolloutView.model_validate(rollout),
        )  # fmt: skip
        return next(c.message for c in status.conditions if c.type == type_)

    progressing = {"phase": "Progressing", "applied": 1, "total": 3, "max_unavailable": "25%"}
    assert "1/3 agents switched, at most 25% at a time" in message(progressing, "Progressing")
    failed = {"phase": "Failed", "applied": 1, "total": 3, "message": "agent-2: not a GGUF file"}
    assert message(failed, "Degraded") == "agent-2: not a GGUF file"
    assert "stopped at 1/3 agents; the others keep serving" in message(failed, "Ready")


def test_model_deployment_status_counts_only_its_group() -> None:
    snap = snapshot(agent(busy=1), agent(state="Fresh", total=0), agent(group="other", total=8), buffered=2)
    status = plan_status.model_deployment_status(
        "m", md_spec(), generation=5, pool_found=True, desired_replicas=2, snapshot=snap, balancer_error=None,
        desired_state_error=None, apply_errors=[], previous=[], now="t",
    )  # fmt: skip
    assert (status.ready_agents, status.agents, status.slots_free, status.slots_total) == (1, 2, 3, 4)
    assert (status.slots, status.agents_summary, status.buffered_requests) == ("3/4", "1/2", 2)
    assert status.observed_generation == 5
    assert status.model == "org/repo/model.gguf"
    dumped = status.model_dump(mode="json", by_alias=True, exclude_none=True)
    assert {"readyAgents", "slotsFree", "agentsSummary", "observedGeneration"} <= set(dumped)


@pytest.mark.parametrize(
    ("kw", "ready"),
    [
        ({}, ("True", "BalancerReady")),
        ({"snapshot": None, "balancer_error": "timeout"}, ("False", "BalancerUnreachable")),
        ({"spec": pool_spec(balancer={"replicas": 0}), "snapshot": None}, ("False", "Stopped")),
    ],
)
def test_pool_conditions(kw: dict[str, Any], ready: tuple[str, str]) -> None:
    args: dict[str, Any] = {
        "spec": pool_spec(),
        "generation": 1,
        "snapshot": snapshot(agent(), agent(group="x")),
        "balancer_error": None,
        "apply_errors": [],
        "model_deployments": 2,
        "inference_url": "http://i",
        "management_url": "http://m",
        "previous": [],
        "now": "t",
    }
    args.update(kw)
    spec = args.pop("spec")
    status = plan_status.pool_status(spec, **args)
    conds = {c.type: (c.status, c.reason) for c in status.conditions}
    assert conds["Ready"] == ready
    if ready[0] == "True":
        assert (status.ready_agents, status.slots) == (2, "8/8")


def test_merge_conditions_keeps_transition_time_while_status_holds() -> None:
    before = [
        Condition(type="Ready", status="True", reason="A", last_transition_time="t0"),
        Condition(type="Degraded", status="False", reason="B", last_transition_time="t0"),
    ]
    now = [
        Condition(type="Ready", status="True", reason="A2", message="m"),
        Condition(type="Degraded", status="True", reason="C"),
        Condition(type="Progressing", status="False", reason="D"),
    ]
    merged = {c.type: c for c in plan_status.merge_conditions(before, now, "t1", 7)}
    assert merged["Ready"].last_transition_time == "t0"
    assert merged["Degraded"].last_transition_time == "t1"
    assert merged["Progressing"].last_transition_time == "t1"
    assert {c.observed_generation for c in merged.values()} == {7}


@pytest.mark.parametrize(
    ("previous", "new", "write"),
    [
        (None, {"a": 1}, True),
        ({"a": 1}, {"a": 1}, False),
        ({"a": 1, "conditions": [{"type": "Ready"}]}, {"a": 1, "conditions": [{"type": "Ready"}]}, False),
        ({"a": 1}, {"a": 2}, True),
        ({"a": 1, "b": 2}, {"a": 1}, True),
    ],
)
def test_status_patch_only_when_changed(previous: Any, new: Any, write: bool) -> None:
    assert (status_patch(previous, new) is not None) is write


def test_agent_view_from_balancer_json() -> None:
    view = AgentView.from_json(
        {
            "id": "a1", "name": "pod-1", "model_group": "m", "slots_total": 4, "slots_processing": 1,
            "slots_in_flight": 2, "model_path": "/m.gguf", "issues": [{"kind": "x"}],
            "state_application_status": "Applied",
        }
    )  # fmt: skip
    assert view.ready
    assert view.slots_in_flight == 2
    assert view.issues == ('{"kind": "x"}',)


# --- the management token (issue 10) ------------------------------------------------------

GENERATED_SECRET = "p-management-0123456789"
TOKEN_ENV = {
    "name": "PADDLER_MANAGEMENT_TOKEN",
    "valueFrom": {"secretKeyRef": {"name": GENERATED_SECRET, "key": "management-token"}},
}


def test_management_token_reaches_the_balancer_the_agents_and_keda() -> None:
    spec = plan.with_token_secret(pool_spec(), GENERATED_SECRET)  # as the reconciler plans (issue 20)
    balancer = by_kind(plan_pool.plan_pool(POOL, spec))["Deployment/p-balancer"]
    keda = plan_agents.plan_model_deployment(MD, md_spec(autoscaling={"mode": "KEDA"}), spec)
    objs = by_kind(keda.objects)
    trigger = objs["ScaledObject/m-agent"]["spec"]["triggers"][0]
    assert TOKEN_ENV in container(balancer)["env"]
    assert TOKEN_ENV in container(objs["Deployment/m-agent"])["env"]
    assert trigger["authenticationRef"] == {"name": "m-agent"}
    assert trigger["metadata"]["authMode"] == "bearer"
    assert objs["TriggerAuthentication/m-agent"]["spec"]["secretTargetRef"] == [
        {"parameter": "token", "name": GENERATED_SECRET, "key": "management-token"}
    ]


def test_a_pool_with_its_own_token_secret_or_none() -> None:
    own = plan.with_token_secret(pool_spec(balancer={"managementAuth": {"secretName": "mine", "secretKey": "t"}}), "x")
    off = plan.with_token_secret(pool_spec(balancer={"managementAuth": {"enabled": False}}), "x")
    own_env = container(by_kind(plan_pool.plan_pool(POOL, own))["Deployment/p-balancer"])["env"]
    off_env = container(by_kind(plan_pool.plan_pool(POOL, off))["Deployment/p-balancer"])["env"]
    assert {"name": "PADDLER_MANAGEMENT_TOKEN", "valueFrom": {"secretKeyRef": {"name": "mine", "key": "t"}}} in own_env
    assert all(e["name"] != "PADDLER_MANAGEMENT_TOKEN" for e in off_env)
    keda = plan_agents.plan_model_deployment(MD, md_spec(autoscaling={"mode": "KEDA"}), off)
    assert [o["kind"] for o in keda.objects] == ["Deployment", "ScaledObject", "PodDisruptionBudget"]
    assert "authenticationRef" not in keda.objects[1]["spec"]["triggers"][0]


def test_pool_model_access_and_cors_become_flags() -> None:
    spec = pool_spec(
        balancer={"corsAllowedOrigins": ["https://app.example"]},
        modelAccess={"urlAllow": ["https://", "http://models.ns.svc:8080/"], "localRoots": ["/models"]},
    )
    balancer_args = container(by_kind(plan_pool.plan_pool(POOL, spec))["Deployment/p-balancer"])["args"]
    agent_args = container(plan_agents.plan_model_deployment(MD, md_spec(), spec).objects[0])["args"]
    assert balancer_args[-6:] == [
        "--inference-cors-allowed-host", "https://app.example",
        "--model-url-allow", "https://",
        "--model-url-allow", "http://models.ns.svc:8080/",
    ]  # fmt: skip
    assert agent_args[-6:] == [
        "--model-url-allow", "https://",
        "--model-url-allow", "http://models.ns.svc:8080/",
        "--model-local-root", "/models",
    ]  # fmt: skip


def test_every_object_the_plans_name_has_an_api_path() -> None:
    from paddler_operator.kube import collection_path

    refs = [ObjRef.of(o) for o in plan_pool.plan_pool(POOL, pool_spec())]
    refs.append(ObjRef.of(plan.management_secret(POOL, GENERATED_SECRET, "management-token", "t")))
    for mode in ("None", "HPA", "KEDA", "Builtin"):
        md_plan = plan_agents.plan_model_deployment(MD, md_spec(autoscaling={"mode": mode}), pool_spec())
        refs += [ObjRef.of(o) for o in md_plan.objects] + list(md_plan.absent)
    for ref in refs:
        assert collection_path(ref.api_version, ref.kind, "ns").endswith(f"/namespaces/ns/{ref.kind.lower()}s")
