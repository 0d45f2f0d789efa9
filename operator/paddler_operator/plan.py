"""Pure planning: custom resource specs -> the Kubernetes objects that should exist.

Nothing here does I/O or reads a clock; every function is a value in, value out,
tested with tables (``tests/unit/test_operator_plan*.py``). The reconciler
(:mod:`paddler_operator.reconcile`) observes, calls these, and applies the
result through :mod:`paddler_operator.kube` (server-side apply).

This module holds what every plan shares: identities (names, labels, the owner),
the management token's Secret, pod security. What each renders lives beside it:
:mod:`~paddler_operator.plan_pool` (the balancer), :mod:`~paddler_operator.plan_agents`
(agents of a ModelDeployment), :mod:`~paddler_operator.plan_autoscaling` (HPA, KEDA,
the builtin scaler), :mod:`~paddler_operator.plan_monitoring` (a pool's PodMonitor and
NetworkPolicy) and :mod:`~paddler_operator.plan_status` (conditions, status).
"""

import base64
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from paddler_operator.crd_models import API_VERSION, MANAGEMENT_PORT
from paddler_operator.crd_pool import LlmPoolSpec
from paddler_operator.objects import Obj

MANAGED_BY = "paddler-operator"
OWNER_HEADER_KIND = "ModelDeployment"
"""Owner (``X-Paddler-Owner``) of a model group: ``ModelDeployment/<namespace>/<name>``."""
CONFIG_HASH_ANNOTATION = "paddler.dev/config-hash"
POOL_LABEL = "paddler.dev/pool"
COMPONENT_LABEL = "paddler.dev/component"
MD_LABEL = "paddler.dev/model-deployment"
RUN_AS_USER = 10001
MODEL_CACHE_VOLUME = "models"

# --- identities -----------------------------------------------------------------


@dataclass(frozen=True)
class Owner:
    """The custom resource that owns what a plan creates."""

    kind: Literal["LlmPool", "ModelDeployment"]
    namespace: str
    name: str
    uid: str
    generation: int = 1

    def reference(self) -> Obj:
        return {
            "apiVersion": API_VERSION,
            "kind": self.kind,
            "name": self.name,
            "uid": self.uid,
            "controller": True,
            "blockOwnerDeletion": True,
        }


def balancer_name(pool: str) -> str:
    return f"{pool}-balancer"


def inference_service_name(pool: str) -> str:
    return f"{pool}-inference"


def management_service_name(pool: str) -> str:
    """The management Service with a cluster IP: one ready balancer replica per connection (humans,
    KEDA, Prometheus)."""
    return f"{pool}-management"


def peers_service_name(pool: str) -> str:
    """The headless management Service: its DNS name resolves to every balancer replica's pod
    address, starting ones included (agents, the balancers' peers and the operator dial them all)."""
    return f"{pool}-management-peers"


def balancer_pdb_name(pool: str) -> str:
    return f"{pool}-balancer"


def agent_name(md: str) -> str:
    return f"{md}-agent"


def management_addr(pool: str, namespace: str, spec: LlmPoolSpec) -> str:
    """Where agents (and the balancers' peers) dial every balancer replica: the headless Service's
    name at the container port (a headless Service maps no ports: its addresses are the pods')."""
    return f"{peers_service_name(pool)}.{namespace}.svc:{MANAGEMENT_PORT}"


def balancer_url(template: str, pool: str, namespace: str, spec: LlmPoolSpec | None) -> str:
    """The operator's URL for a pool's balancers, from a template with ``{pool}``, ``{namespace}``,
    ``{service}`` and ``{port}`` fields: ``{service}`` is the headless Service and ``{port}`` the
    balancer container's management port, so the URL's host resolves to every replica."""
    return template.format(pool=pool, namespace=namespace, service=peers_service_name(pool), port=MANAGEMENT_PORT)


def metrics_url(template: str, pool: str, namespace: str, spec: LlmPoolSpec | None) -> str:
    """The same template for a reader that wants one answer for the whole pool (KEDA's metrics-api
    trigger, with ``scope=pool``): ``{service}`` is the cluster-IP management Service (ready replicas
    only) at its port."""
    port = spec.balancer.service.management_port if spec is not None else MANAGEMENT_PORT
    return template.format(pool=pool, namespace=namespace, service=management_service_name(pool), port=port)


MANAGEMENT_TOKEN_ENV = "PADDLER_MANAGEMENT_TOKEN"
TOKEN_SECRET_COMPONENT = "management-token"
"""``paddler.dev/component`` of a pool's generated token Secret (``kubectl get secret -l``)."""


def management_secret_name(pool: str) -> str:
    """The placeholder name of a pool's generated token Secret, in a spec planned without its
    real name. The operator derives the real one from the pool's uid
    (:func:`paddler_operator.management_token.secret_name`) and writes it into the spec before
    planning (:func:`with_token_secret`); only tables plan without it. (The operator before
    issue 20 created a Secret of this name with a random token: such a Secret is left alone.)"""
    return f"{pool}-management-token"


def with_token_secret(spec: LlmPoolSpec, secret: str | None) -> LlmPoolSpec:
    """The pool's spec as its pods see it: the generated token Secret's name in
    ``managementAuth.secretName`` (unchanged when ``secret`` is None: no token, or the pool's own).
    The pool's pods, its agents and KEDA's TriggerAuthentication all reference that one name."""
    auth = spec.balancer.management_auth
    if secret is None or not auth.enabled or auth.secret_name is not None:
        return spec
    named = auth.model_copy(update={"secret_name": secret})
    return spec.model_copy(update={"balancer": spec.balancer.model_copy(update={"management_auth": named})})


def management_token_ref(pool: str, spec: LlmPoolSpec) -> tuple[str, str] | None:
    """(Secret name, key) of the pool's management token; None when the pool turned it off."""
    auth = spec.balancer.management_auth
    if not auth.enabled:
        return None
    return auth.secret_name or management_secret_name(pool), auth.secret_key


def management_token_env(pool: str, spec: LlmPoolSpec) -> list[Obj]:
    ref = management_token_ref(pool, spec)
    if ref is None:
        return []
    return [{"name": MANAGEMENT_TOKEN_ENV, "valueFrom": {"secretKeyRef": {"name": ref[0], "key": ref[1]}}}]


def management_secret(owner: Owner, name: str, key: str, token: str) -> Obj:
    """The pool's generated token Secret (only when the pool names no Secret of its own). Created,
    never patched nor read: the operator derives the token again whenever it needs it."""
    labels = component_labels(owner, owner.name, TOKEN_SECRET_COMPONENT, "paddler-balancer")
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": object_meta(owner, name, labels),
        "type": "Opaque",
        "data": {key: base64.b64encode(token.encode()).decode()},
    }


def owner_header(namespace: str, name: str) -> str:
    """``X-Paddler-Owner`` value of a ModelDeployment's model group."""
    return f"{OWNER_HEADER_KIND}/{namespace}/{name}"


def owned_by_model_deployment(owner: str | None, namespace: str) -> str | None:
    """The name of the ModelDeployment of ``namespace`` that an owner header value names, else None."""
    kind, _, rest = (owner or "").partition("/")
    ns, _, name = rest.partition("/")
    if kind != OWNER_HEADER_KIND or ns != namespace or not name or "/" in name:
        return None
    return name


# --- shared pieces -------------------------------------------------------------------


def component_labels(owner: Owner, pool: str, component: str, app: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": app,
        "app.kubernetes.io/instance": owner.name,
        "app.kubernetes.io/managed-by": MANAGED_BY,
        "app.kubernetes.io/part-of": "paddler",
        POOL_LABEL: pool,
        COMPONENT_LABEL: component,
    }


def object_meta(owner: Owner, name: str, labels: dict[str, str], annotations: dict[str, str] | None = None) -> Obj:
    meta: Obj = {
        "name": name,
        "namespace": owner.namespace,
        "labels": labels,
        "ownerReferences": [owner.reference()],
    }
    if annotations:
        meta["annotations"] = annotations
    return meta


def container_security() -> Obj:
    return {
        "runAsNonRoot": True,
        "runAsUser": RUN_AS_USER,
        "runAsGroup": RUN_AS_USER,
        "readOnlyRootFilesystem": True,
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
    }


def pod_security() -> Obj:
    return {"runAsNonRoot": True, "fsGroup": RUN_AS_USER, "seccompProfile": {"type": "RuntimeDefault"}}


def config_hash(data: Mapping[str, str]) -> str:
    return hashlib.sha256(json.dumps(dict(data), sort_keys=True).encode()).hexdigest()[:16]


TERMINATION_SLACK_SECONDS = 10
"""Seconds of the pod's grace period beyond drain delay + drain timeout, before the SIGKILL."""


def spread_over_nodes(selector: dict[str, str]) -> list[Obj]:
    """Pods of one Deployment spread over the nodes (at most one more on any node than on another)
    when the scheduler can, never left Pending for it (``ScheduleAnyway``: one node still runs them
    all). ``pod-template-hash`` counts each revision apart, so a rollout's new pods spread too."""
    return [
        {
            "maxSkew": 1,
            "topologyKey": "kubernetes.io/hostname",
            "whenUnsatisfiable": "ScheduleAnyway",
            "labelSelector": {"matchLabels": selector},
            "matchLabelKeys": ["pod-template-hash"],
        }
    ]
