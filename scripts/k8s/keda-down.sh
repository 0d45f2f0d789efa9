#!/usr/bin/env bash
# Undo keda-up.sh: remove KEDA's APIService (so the control plane can serve
# external.metrics.k8s.io from something else: prometheus-adapter) and its CRDs
# (so keda.sh is not served any more: the operator's "KEDA mode without KEDA"
# path sees the cluster as before), then stop the processes keda-up.sh started
# (by their pid files only). The CRDs go while keda-operator still runs: it
# clears its finalizers from the ScaledObjects that go with them; finalizers
# left (operator already gone) are removed by hand.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
STATE="${PADDLER_K8S_DIR:-$REPO/.k8s}"
KSTATE="$STATE/keda"
TIMEOUT="${K8S_DOWN_TIMEOUT:-20}"
APISERVICE=v1beta1.external.metrics.k8s.io

log() { printf '[keda-down %s] %s\n' "$(date -u +%H:%M:%S)" "$*"; }

[[ -d "$STATE" ]] || { log "nothing was running"; exit 0; }
if [[ -z "${KEDA_LOCKED:-}" ]]; then
  mkdir -p "$KSTATE"
  exec 7>"$KSTATE/.lock"
  flock -n 7 || { log "another keda-up.sh/keda-down.sh is running; waiting for it"; flock 7; }
fi

# Remove the APIService first (only ours: it points at namespace keda), while the
# apiserver still answers.
if [[ -f "$STATE/kubeconfig" ]]; then
  K8S_BIN="$(bash "$HERE/build.sh" --bin-dir)"
  kctl() { "$K8S_BIN/kubectl" --kubeconfig "$STATE/kubeconfig" --request-timeout=10s "$@"; }
  if [[ "$(kctl get apiservice "$APISERVICE" -o jsonpath='{.spec.service.namespace}' 2>/dev/null)" == keda ]]; then
    kctl delete apiservice "$APISERVICE" --wait=false >/dev/null 2>&1 && log "removed APIService $APISERVICE" || true
  fi
  kctl -n keda delete service,endpoints keda-metrics-apiserver --ignore-not-found --wait=false >/dev/null 2>&1 || true
  crds=(scaledobjects.keda.sh scaledjobs.keda.sh triggerauthentications.keda.sh
        clustertriggerauthentications.keda.sh cloudeventsources.eventing.keda.sh
        clustercloudeventsources.eventing.keda.sh)
  if kctl get crd scaledobjects.keda.sh >/dev/null 2>&1; then
    kctl delete crd "${crds[@]}" --ignore-not-found --wait=false >/dev/null 2>&1 || true
    deadline=$((SECONDS + 30))
    while kctl get crd scaledobjects.keda.sh >/dev/null 2>&1 && (( SECONDS < deadline )); do sleep 0.5; done
    for kind in scaledobjects.keda.sh scaledjobs.keda.sh; do
      kctl get "$kind" -A -o jsonpath='{range .items[*]}{.metadata.namespace} {.metadata.name}{"\n"}{end}' 2>/dev/null \
        | while read -r ns name; do
            [[ -n "$name" ]] && kctl -n "$ns" patch "$kind" "$name" --type=merge -p '{"metadata":{"finalizers":null}}' >/dev/null 2>&1 || true
          done || true  # the kind is usually gone already
    done
    kctl wait --for=delete crd "${crds[@]}" --timeout=30s >/dev/null 2>&1 || log "KEDA CRDs still being removed"
    log "removed KEDA's CRDs"
  fi
fi

source "$HERE/lib.sh"
stop_pidfiles "$STATE/pids" "$TIMEOUT" keda-adapter keda-operator
