"""Observe -> plan -> apply, one custom resource at a time.

Each LlmPool and ModelDeployment gets one worker task (:class:`Workers`) that
reconciles it, then sleeps until woken (a watch event on it or on an object it
owns) or until the resync interval (or, after a failure, the retry backoff)
passes. One worker per object serialises its reconciles; a reconcile reads
everything fresh, so any number of wake-ups collapse into one pass.

A pass observes (the resource, what it owns, its pool's balancers), decides (the pure
``plan*`` modules) and acts: owned objects, status and Events are written by
:class:`~paddler_operator.object_writer.ObjectWriter`, the balancers' desired states here.

This module never imports kopf: :mod:`paddler_operator.handlers` feeds it events.
It talks to Kubernetes only through :class:`~paddler_operator.kube.KubeApi` and
to balancers only through :class:`~paddler_operator.balancer_client.BalancerClient`.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Sequence

from pydantic import ValidationError

from paddler_core.desired_state import BalancerDesiredState
from paddler_operator import plan, plan_agents, plan_autoscaling, plan_monitoring, plan_pool, plan_status
from paddler_operator.balancer_client import BalancerClient, BalancerRejected, BalancerUnreachable
from paddler_operator.balancer_views import BalancerSnapshot
from paddler_operator.crd_model_deployment import AutoscalingMode, ModelDeploymentSpec
from paddler_operator.crd_models import API_VERSION, Condition
from paddler_operator.crd_pool import LlmPoolSpec
from paddler_operator.kube import KubeApi, KubeError
from paddler_operator.management_token import ManagementTokens, PoolToken, key_of
from paddler_operator.object_writer import ObjectWriter
from paddler_operator.objects import Obj, ObjRef
from paddler_operator.plan import Owner
from paddler_operator.plan_monitoring import ManagementReaders, Presence
from paddler_operator.resource_reads import (
    conditions_of,
    controller_uid,
    custom_resource_ref,
    format_timestamp,
    max_unavailable_text,
    owner_of,
    parse_timestamp,
    pool_members,
    rollout_of,
    utc_now_text,
    validation_message,
    watched_closely,
)
from paddler_operator.settings import OperatorSettings, Switch
from paddler_operator.workers import Key, Kind, Outcome

log = logging.getLogger(__name__)

Pool = tuple[LlmPoolSpec, PoolToken]
"""A pool's spec as its pods see it (its token Secret named) and its management token."""


class Reconciler:
    def __init__(
        self,
        kube: KubeApi,
        balancers: BalancerClient,
        settings: OperatorSettings,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.kube = kube
        self.writer = ObjectWriter(kube)
        self.balancers = balancers
        self.settings = settings
        self.clock = clock
        """Wall-clock seconds: the Builtin scaler's low-demand timestamp lives in the
        ModelDeployment's status (``lowDemandSince``), so it survives an operator restart."""
        self._hpa_gate: bool | None = settings.hpa_scale_to_zero
        self.tokens = ManagementTokens(kube, balancers, key_of(settings.token_key_file), clock)
        self._pod_monitors: Presence | None = {Switch.ON: Presence.WANTED, Switch.OFF: Presence.UNWANTED}.get(
            settings.pod_monitors
        )

    async def hpa_scale_to_zero(self, namespace: str) -> bool:
        """Does this cluster's HPA accept ``minReplicas: 0``? The setting, else asked once with a
        dry-run create (the answer is kept; an inconclusive error is asked again next time)."""
        if self._hpa_gate is not None:
            return self._hpa_gate
        try:
            await self.kube.dry_run_create(plan_autoscaling.hpa_gate_probe(namespace))
            self._hpa_gate = True
        except KubeError as err:
            if err.status != 422:
                log.warning("HPAScaleToZero probe failed (assuming the gate is on for now): %s", err)
                return True
            self._hpa_gate = False
        log.info("HPA scale to zero (feature gate HPAScaleToZero): %s", "on" if self._hpa_gate else "off")
        return self._hpa_gate

    async def readers(self) -> ManagementReaders:
        """Who reads a pool's management port: the settings, and (``--pod-monitors auto``) whether
        the cluster serves PodMonitor, asked once (an inconclusive error is asked again next time)."""
        if self._pod_monitors is None:
            try:
                served = await self.kube.serves(*plan_monitoring.POD_MONITOR_API)
            except KubeError as err:
                log.warning("PodMonitor discovery failed (none for now): %s", err)
                served = None
            if served is not None:
                self._pod_monitors = Presence.WANTED if served else Presence.UNSERVED
                log.info("PodMonitors (monitoring.coreos.com/v1): %s", "served" if served else "not served")
        s = self.settings
        return ManagementReaders(
            pod_monitor=self._pod_monitors or Presence.UNSERVED,
            pod_monitor_labels=s.pod_monitor_labels,
            network_policy=Presence.WANTED if s.network_policy == Switch.ON else Presence.UNWANTED,
            operator_namespace=s.operator_namespace,
            operator_pod_labels=s.operator_pod_labels,
            monitoring_namespaces=s.monitoring_namespaces,
        )

    async def _snapshot(self, url: str, group: str | None = None) -> tuple[BalancerSnapshot | None, str | None]:
        try:
            return await self.balancers.snapshot(url, group), None
        except (BalancerUnreachable, BalancerRejected) as err:
            if isinstance(err, BalancerRejected) and err.status == 401:
                self.tokens.rejected(url)
            return None, str(err)

    def balancer_url(self, pool: str, namespace: str, spec: LlmPoolSpec | None) -> str:
        """Where the operator reaches every balancer replica of a pool (the headless Service)."""
        return plan.balancer_url(self.settings.balancer_url_template, pool, namespace, spec)

    def metrics_url(self, pool: str, namespace: str, spec: LlmPoolSpec | None) -> str:
        """Where KEDA reads the pool's pool-wide counts (the cluster-IP management Service)."""
        return plan.metrics_url(self.settings.balancer_url_template, pool, namespace, spec)

    async def _invalid(self, obj: Obj, kind: Kind, err: ValidationError) -> Outcome:
        message = f"invalid spec: {validation_message(err)}"
        previous = conditions_of(obj)
        gen = int(obj["metadata"].get("generation") or 1)
        conds = plan_status.merge_conditions(
            previous,
            [
                Condition(type="Ready", status="False", reason="InvalidSpec", message=message),
                Condition(type="Progressing", status="False", reason="InvalidSpec", message=message),
                Condition(type="Degraded", status="True", reason="InvalidSpec", message=message),
            ],
            utc_now_text(),
            gen,
        )
        status = {**(obj.get("status") or {}), "observedGeneration": gen}
        status["conditions"] = [c.model_dump(mode="json", by_alias=True, exclude_none=True) for c in conds]
        await self.writer.write_status(obj, kind, status, previous)
        return Outcome(ok=False, message=message)

    # --- LlmPool ---------------------------------------------------------------------

    async def reconcile_pool(self, namespace: str, name: str) -> Outcome:
        obj = await self.kube.get(custom_resource_ref("LlmPool", namespace, name))
        if obj is None or obj["metadata"].get("deletionTimestamp"):
            return Outcome(ok=True, message="gone")
        try:
            spec = LlmPoolSpec.model_validate(obj.get("spec") or {})
        except ValidationError as err:
            return await self._invalid(obj, "LlmPool", err)
        owner = owner_of(obj)
        spec, token = self.tokens.of(owner, spec)
        # The token's Secret first: the pods that reference it start without waiting for it.
        secret_error = await self.tokens.ensure(obj, token)
        errors = [secret_error] if secret_error else []
        errors += await self.writer.apply(
            obj, *plan_pool.pool_plan(owner, spec, await self.readers(), self.settings.images)
        )
        balancers_ready = await self._ready_balancers(namespace, name)
        url = self.balancer_url(name, namespace, spec)
        token_error = await self.tokens.use(url, token)
        errors += [token_error] if token_error else []
        snapshot: BalancerSnapshot | None = None
        balancer_error: str | None = "balancer.replicas is 0"
        if spec.balancer.replicas > 0:
            snapshot, balancer_error = await self._snapshot(url)
        model_deployments = await self.kube.list(API_VERSION, "ModelDeployment", namespace)
        members = pool_members(model_deployments, name)
        if snapshot is not None:
            await self._remove_orphan_groups(obj, url, snapshot, members)
        previous = conditions_of(obj)
        status = plan_status.pool_status(
            spec,
            generation=owner.generation,
            snapshot=snapshot,
            balancer_error=balancer_error,
            apply_errors=errors,
            model_deployments=len(members),
            inference_url=f"http://{plan.inference_service_name(name)}.{namespace}.svc:"
            f"{spec.balancer.service.inference_port}",
            management_url=url,
            previous=previous,
            now=utc_now_text(),
            balancers_ready=balancers_ready,
        )
        await self.writer.write_status(
            obj, "LlmPool", status.model_dump(mode="json", by_alias=True, exclude_none=True), previous
        )
        partial = snapshot.partial if snapshot is not None else None
        transient = bool(errors) or (spec.balancer.replicas > 0 and snapshot is None) or partial is not None
        return Outcome(ok=not transient, retry=transient, message=balancer_error or partial or "; ".join(errors))

    async def _ready_balancers(self, namespace: str, pool: str) -> int:
        """Ready pods of the pool's balancer Deployment, from its status (0 when it cannot be read)."""
        try:
            deployment = await self.kube.get(ObjRef("apps/v1", "Deployment", namespace, plan.balancer_name(pool)))
        except KubeError as err:
            log.info("balancer deployment not read pool=%s/%s err=%s", namespace, pool, err)
            return 0
        return int(((deployment or {}).get("status") or {}).get("readyReplicas") or 0)

    async def _remove_orphan_groups(
        self, pool_obj: Obj, url: str, snapshot: BalancerSnapshot, members: Sequence[str]
    ) -> None:
        """Level-based clean-up: drop the model groups that a ModelDeployment of this namespace set
        on this pool's balancer, when no ModelDeployment of that name names this pool any more
        (deleted, or moved to another pool, while the operator was down or the balancer unreachable).
        Groups set by anyone else (no owner, another namespace, by hand) are left alone."""
        namespace = pool_obj["metadata"]["namespace"]
        for group, owner in sorted(snapshot.group_owners.items()):
            md = plan.owned_by_model_deployment(owner, namespace)
            if md is None or md in members:
                continue
            try:
                removed = await self.balancers.delete_desired_state(url, group)
            except (BalancerUnreachable, BalancerRejected) as err:
                log.info("orphan model group not removed group=%s owner=%s err=%s", group, owner, err)
                continue
            if removed:
                log.info("orphan model group removed group=%s owner=%s url=%s", group, owner, url)
                await self.kube.event(
                    pool_obj,
                    "Normal",
                    "ModelGroupRemoved",
                    f"Model group {group!r} removed from the balancer: ModelDeployment {md!r} no longer uses this pool",
                )

    # --- ModelDeployment ---------------------------------------------------------------

    async def reconcile_model_deployment(self, namespace: str, name: str) -> Outcome:
        obj = await self.kube.get(custom_resource_ref("ModelDeployment", namespace, name))
        if obj is None or obj["metadata"].get("deletionTimestamp"):
            return Outcome(ok=True, message="gone")
        try:
            spec = ModelDeploymentSpec.model_validate(obj.get("spec") or {})
        except ValidationError as err:
            return await self._invalid(obj, "ModelDeployment", err)
        owner = owner_of(obj)
        previous = conditions_of(obj)
        pool, previous_pool = await self._md_pool(obj, spec)
        if pool is None:
            return await self._md_without_pool(obj, owner, spec, previous, previous_pool)
        pool_spec = pool[0]
        url = await self._reach(namespace, spec.pool_ref.name, pool)
        snapshot, balancer_error = await self._snapshot(url, name)
        deployment_ref = ObjRef("apps/v1", "Deployment", namespace, plan.agent_name(name))
        current: Obj | None = None
        if spec.autoscaling.mode != AutoscalingMode.NONE:
            current = await self.kube.get(deployment_ref)
        builtin, low_demand_since = self._builtin_scale(obj, spec, pool_spec, snapshot, current)
        hpa_gate = True
        if spec.autoscaling.mode == AutoscalingMode.HPA:
            hpa_gate = await self.hpa_scale_to_zero(namespace)
        md_plan = plan_agents.plan_model_deployment(
            owner,
            spec,
            pool_spec,
            builtin_replicas=builtin,
            balancer_url=self.metrics_url(spec.pool_ref.name, namespace, pool_spec),
            hpa_scale_to_zero=hpa_gate,
            images=self.settings.images,
        )
        read = {deployment_ref: current} if spec.autoscaling.mode != AutoscalingMode.NONE else {}
        errors = await self.writer.apply(obj, md_plan.objects, md_plan.absent, read)
        buffered = snapshot.buffered_by_group.get(name, 0) if snapshot else 0
        woke, wake_errors = await self._wake_hpa_from_zero(obj, spec, hpa_gate, current, buffered, deployment_ref)
        errors += wake_errors

        desired_state_error: str | None = None
        if snapshot is not None:
            desired_state_error, snapshot, push_error = await self._push_desired_state(
                obj, url, name, md_plan.desired_state, snapshot, max_unavailable_text(spec.rollout.max_unavailable)
            )
            balancer_error = balancer_error or push_error
        desired_replicas = md_plan.replicas
        if desired_replicas is None:  # HPA / KEDA own the count: as read above (one read a pass)
            if current is None:  # created by this pass: the API server's default
                current = await self.kube.get(deployment_ref)
            desired_replicas = 1 if woke else int(((current or {}).get("spec") or {}).get("replicas") or 0)
        rollout = rollout_of(snapshot, name, md_plan.desired_state)
        status = plan_status.model_deployment_status(
            name,
            spec,
            generation=owner.generation,
            pool_found=True,
            desired_replicas=desired_replicas,
            snapshot=snapshot,
            balancer_error=balancer_error,
            desired_state_error=desired_state_error,
            apply_errors=errors,
            previous=previous,
            now=utc_now_text(),
            rollout=rollout,
            low_demand_since=low_demand_since,
        )
        status = status.model_copy(
            update={"pool": spec.pool_ref.name if status.desired_state_applied else previous_pool}
        )
        await self.writer.write_status(
            obj, "ModelDeployment", status.model_dump(mode="json", by_alias=True, exclude_none=True), previous
        )
        transient = bool(errors) or snapshot is None or desired_state_error is not None or snapshot.partial is not None
        return Outcome(
            ok=not transient,
            retry=transient,
            message=balancer_error or desired_state_error or "; ".join(errors),
            resync_after=self.settings.builtin_poll_interval if watched_closely(spec, rollout, hpa_gate) else None,
        )

    async def _pool(self, namespace: str, name: str) -> Pool | None:
        """A pool's spec as its pods see it and its token; None: missing or invalid (the pool
        reports its own InvalidSpec)."""
        pool_obj = await self.kube.get(custom_resource_ref("LlmPool", namespace, name))
        if pool_obj is None:
            return None
        try:
            spec = LlmPoolSpec.model_validate(pool_obj.get("spec") or {})
        except ValidationError:
            return None
        return self.tokens.of(owner_of(pool_obj), spec)

    async def _reach(self, namespace: str, name: str, pool: Pool | None) -> str:
        """The URL of a pool's balancers, its token handed to the balancer client (pool found)."""
        url = self.balancer_url(name, namespace, pool[0] if pool else None)
        if pool is not None:
            await self.tokens.use(url, pool[1])
        return url

    async def _md_pool(self, obj: Obj, spec: ModelDeploymentSpec) -> tuple[Pool | None, str | None]:
        """The pool (None: missing or invalid) and the pool the status names; a ModelDeployment
        moved to another pool leaves the old one first."""
        pool = await self._pool(obj["metadata"]["namespace"], spec.pool_ref.name)
        previous_pool = (obj.get("status") or {}).get("pool")
        if previous_pool and previous_pool != spec.pool_ref.name:
            await self._leave_pool(obj, previous_pool)
            previous_pool = None
        return pool, previous_pool

    async def _md_without_pool(
        self,
        obj: Obj,
        owner: Owner,
        spec: ModelDeploymentSpec,
        previous: list[Condition],
        previous_pool: str | None,
    ) -> Outcome:
        """No pool to serve in: agents parked at 0, the status says so."""
        await self._park(obj, owner)
        status = plan_status.model_deployment_status(
            owner.name,
            spec,
            generation=owner.generation,
            pool_found=False,
            desired_replicas=0,
            snapshot=None,
            balancer_error=None,
            desired_state_error=None,
            apply_errors=[],
            previous=previous,
            now=utc_now_text(),
        )
        status = status.model_copy(update={"pool": previous_pool})
        await self.writer.write_status(
            obj, "ModelDeployment", status.model_dump(mode="json", by_alias=True, exclude_none=True), previous
        )
        # Woken when the pool appears (handlers wake a namespace's deployments on pool events).
        return Outcome(ok=False, retry=False, message="pool not found")

    def _builtin_scale(
        self,
        obj: Obj,
        spec: ModelDeploymentSpec,
        pool_spec: LlmPoolSpec,
        snapshot: BalancerSnapshot | None,
        current: Obj | None,
    ) -> tuple[int | None, str | None]:
        """The Builtin scaler's replicas and the start of its low-demand timer (both None in
        other modes); the timer lives in the status, so it survives an operator restart."""
        if spec.autoscaling.mode != AutoscalingMode.BUILTIN:
            return None, None
        name = obj["metadata"]["name"]
        replicas_now = int(((current or {}).get("spec") or {}).get("replicas") or 0)
        load = (
            plan_autoscaling.load_of(snapshot.in_group(name), snapshot.buffered_by_group.get(name, 0))
            if snapshot
            else None
        )
        decision = plan_autoscaling.builtin_scale(
            spec.autoscaling,
            plan_agents.slots_per_agent(spec, pool_spec),
            replicas_now,
            load,
            parse_timestamp((obj.get("status") or {}).get("lowDemandSince")),
            self.clock(),
        )
        if decision.replicas != replicas_now and current is not None:
            log.info(
                "builtin scale md=%s/%s %d->%d %s",
                obj["metadata"]["namespace"],
                name,
                replicas_now,
                decision.replicas,
                decision.reason,
            )
        low_demand_since = format_timestamp(decision.low_since) if decision.low_since is not None else None
        return decision.replicas, low_demand_since

    async def _wake_hpa_from_zero(
        self,
        obj: Obj,
        spec: ModelDeploymentSpec,
        hpa_gate: bool,
        current: Obj | None,
        buffered: int,
        deployment_ref: ObjRef,
    ) -> tuple[bool, list[str]]:
        """Without HPAScaleToZero the HPA cannot leave 0: the operator takes the one step
        (docs/scaling.md). Returns whether it did, and the errors of the write."""
        replicas_now = int(((current or {}).get("spec") or {}).get("replicas") or 0)
        if current is None or not plan_autoscaling.hpa_wakes(spec.autoscaling, hpa_gate, replicas_now, buffered):
            return False, []
        try:
            await self.kube.patch(deployment_ref, {"spec": {"replicas": 1}})
        except KubeError as err:
            return False, [f"Deployment {deployment_ref.name}: {err.message}"]
        log.info(
            "hpa wake md=%s/%s 0->1: requests buffered, HPA cannot scale from zero",
            deployment_ref.namespace,
            obj["metadata"]["name"],
        )
        await self.kube.event(obj, "Normal", "ScaledFromZero", "Requests buffered: agent replicas 0 -> 1")
        return True, []

    async def _push_desired_state(
        self,
        obj: Obj,
        url: str,
        group: str,
        desired: BalancerDesiredState,
        snapshot: BalancerSnapshot,
        max_unavailable: str,
    ) -> tuple[str | None, BalancerSnapshot | None, str | None]:
        """(rejection message, snapshot with the new state and its rollout, unreachable message).

        The balancer rolls the state over the group's agents, ``max_unavailable`` at a time."""
        want = desired.to_json_dict()
        have = snapshot.group_states.get(group)
        rollout_have = snapshot.group_rollouts.get(group)
        if have is not None and (rollout_have is None or rollout_have.max_unavailable == max_unavailable):
            try:
                if BalancerDesiredState.model_validate(have).to_json_dict() == want:
                    return None, snapshot, None
            except ValidationError:
                pass
        meta = obj["metadata"]
        owner = plan.owner_header(meta["namespace"], meta["name"])
        try:
            missed = await self.balancers.put_desired_state(url, group, want, owner, max_unavailable)
            rollout = await self.balancers.rollout(url, group)
        except BalancerRejected as err:
            await self.kube.event(obj, "Warning", "DesiredStateRejected", str(err))
            return str(err), snapshot, None
        except BalancerUnreachable as err:
            return None, None, str(err)
        log.info("desired state applied group=%s model=%s url=%s replicas_missed=%d", group, desired.model.describe(),
                 url, len(missed))  # fmt: skip
        await self.kube.event(
            obj,
            "Normal",
            "DesiredStateApplied",
            f"Balancer model group {group!r} rolls over to {desired.model.describe()}, "
            f"at most {max_unavailable} agent(s) at a time",
        )
        states = {**snapshot.group_states, group: want}
        rollouts = {k: v for k, v in snapshot.group_rollouts.items() if k != group}
        if rollout is not None:
            rollouts[group] = rollout
        updated = dataclasses.replace(
            snapshot,
            group_states=states,
            group_rollouts=rollouts,
            group_owners={**snapshot.group_owners, group: owner},
            # A replica that missed the PUT gets it on the next pass (the status says partial meanwhile).
            replicas=tuple(r for r in snapshot.replicas if r not in missed),
            unreachable={**snapshot.unreachable, **missed},
        )
        return None, updated, None

    async def _park(self, obj: Obj, owner: Owner) -> None:
        """The pool is gone: scale the agents to zero and drop the autoscaler until it is back."""
        ref, patch, absent = plan_agents.parked(owner)
        try:
            have = await self.kube.get(ref)
            if have is not None and controller_uid(have) == owner.uid and (have.get("spec") or {}).get("replicas"):
                await self.kube.patch(ref, patch)
                log.info("parked object=%s pool=%s", ref, (obj.get("spec") or {}).get("poolRef"))
                await self.kube.event(
                    obj, "Normal", "AgentsParked", f"Scaled {ref.kind} {ref.name} to 0 until the pool exists"
                )
        except KubeError as err:
            log.warning("park failed object=%s err=%s", ref, err)
        await self.writer.apply(obj, [], absent)

    async def _leave_pool(self, obj: Obj, old_pool: str) -> None:
        """poolRef changed: the old pool's balancer forgets this model group (best effort)."""
        meta = obj["metadata"]
        await self.forget_model_deployment(meta["namespace"], meta["name"], old_pool)
        await self.kube.event(obj, "Normal", "PoolChanged", f"Model group removed from LlmPool {old_pool!r}")

    async def forget_model_deployment(self, namespace: str, name: str, pool: str | None) -> None:
        """Best effort on deletion: drop the model group's desired state from the balancer."""
        if not pool:
            return
        url = await self._reach(namespace, pool, await self._pool(namespace, pool))
        try:
            if await self.balancers.delete_desired_state(url, name):
                log.info("desired state removed group=%s url=%s", name, url)
        except (BalancerUnreachable, BalancerRejected) as err:
            log.info("desired state not removed group=%s err=%s", name, err)

    async def reconcile(self, key: Key) -> Outcome:
        kind, namespace, name = key
        if kind == "LlmPool":
            return await self.reconcile_pool(namespace, name)
        return await self.reconcile_model_deployment(namespace, name)
