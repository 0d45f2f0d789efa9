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

# Is PID still the process we started (and not a recycled pid)?
ours() {
  local pid="$1" name="$2" exe
  kill -0 "$pid" 2>/dev/null || return 1
  # A zombie (exited, not yet reaped by its new parent) counts as stopped.
  [[ "$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null)" != Z ]] || return 1
  exe="$(readlink "/proc/$pid/exe" 2>/dev/null || true)"
  [[ -z "$exe" || "$(basename "${exe% (deleted)}")" == "$name" ]]
}

# The metrics pipeline of `make metrics-up` (scripts/k8s/prometheus*.sh), if running.
if [[ -d "$STATE/metrics/pids" ]]; then
  KUBECONFIG="$STATE/kubeconfig" bash "$HERE/prometheus-adapter.sh" down "$STATE/metrics" || true
  bash "$HERE/prometheus.sh" down "$STATE/metrics" || true
fi

# Stop clients before servers: KEDA (keda-up.sh), kwok, scheduler, controller-manager, apiserver, etcd.
order=(keda-adapter keda-operator kwok kube-scheduler kube-controller-manager kube-apiserver etcd)
stopped=()
for name in "${order[@]}"; do
  f="$STATE/pids/$name.pid"
  [[ -f "$f" ]] || continue
  pid="$(cat "$f")"
  if [[ "$pid" =~ ^[0-9]+$ ]] && ours "$pid" "$name"; then
    kill -TERM "$pid" 2>/dev/null || true
    stopped+=("$name:$pid")
  fi
done
# Any other pid file (should not happen) is stopped too.
if [[ -d "$STATE/pids" ]]; then
  for f in "$STATE"/pids/*.pid; do
    [[ -f "$f" ]] || continue
    name="$(basename "$f" .pid)"
    [[ " ${order[*]} " == *" $name "* ]] && continue
    pid="$(cat "$f")"
    if [[ "$pid" =~ ^[0-9]+$ ]] && ours "$pid" "$name"; then
      kill -TERM "$pid" 2>/dev/null || true; stopped+=("$name:$pid")
    fi
  done
fi

deadline=$((SECONDS + TIMEOUT))
for entry in "${stopped[@]+"${stopped[@]}"}"; do
  name="${entry%%:*}"; pid="${entry##*:}"
  while ours "$pid" "$name"; do
    if (( SECONDS >= deadline )); then
      log "$name (pid $pid) ignored SIGTERM, sending SIGKILL"
      kill -KILL "$pid" 2>/dev/null || true
      for _ in $(seq 100); do ours "$pid" "$name" || break; sleep 0.05; done
      break
    fi
    sleep 0.05
  done
  log "stopped $name (pid $pid)"
done

rm -rf "$STATE/pids" "$STATE/run/etcd" "$STATE/started-by-tests"
[[ ${#stopped[@]} -gt 0 ]] || log "nothing was running"
