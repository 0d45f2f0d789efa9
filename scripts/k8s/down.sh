#!/usr/bin/env bash
# Stop everything scripts/k8s/up.sh started (by its pid files only), then
# remove the etcd data dir, so the next up.sh starts from an empty cluster.
# Certificates and the kubeconfig stay in .k8s/ (regenerated as needed).
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
STATE="${PADDLER_K8S_DIR:-$REPO/.k8s}"
TIMEOUT="${K8S_DOWN_TIMEOUT:-20}"

log() { printf '[k8s-down %s] %s\n' "$(date -u +%H:%M:%S)" "$*"; }

[[ -d "$STATE" ]] || { log "nothing was running"; exit 0; }
# Take turns with up.sh (it exports PADDLER_K8S_LOCKED when it calls us).
if [[ -z "${PADDLER_K8S_LOCKED:-}" ]]; then
  exec 9>"$STATE/.lock"
  flock -n 9 || { log "another up.sh/down.sh is running; waiting for it"; flock 9; }
fi

source "$HERE/lib.sh"

# The metrics pipeline of `make metrics-up` (scripts/k8s/prometheus*.sh), if running.
if [[ -d "$STATE/metrics/pids" ]]; then
  KUBECONFIG="$STATE/kubeconfig" bash "$HERE/prometheus-adapter.sh" down "$STATE/metrics" || true
  bash "$HERE/prometheus.sh" down "$STATE/metrics" || true
fi

# Stop clients before servers: KEDA (keda-up.sh), kwok, scheduler, controller-manager,
# apiserver, etcd; then any other pid file (should not happen).
order=(keda-adapter keda-operator kwok kube-scheduler kube-controller-manager kube-apiserver etcd)
if [[ -d "$STATE/pids" ]]; then
  for f in "$STATE"/pids/*.pid; do
    [[ -f "$f" ]] || continue
    name="$(basename "$f" .pid)"
    [[ " ${order[*]} " == *" $name "* ]] || order+=("$name")
  done
fi
stop_pidfiles "$STATE/pids" "$TIMEOUT" "${order[@]}"
rm -rf "$STATE/pids" "$STATE/run/etcd" "$STATE/started-by-tests"
