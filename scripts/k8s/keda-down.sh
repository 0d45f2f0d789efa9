#!/usr/bin/env bash
# Stop what keda-up.sh started (by its pid files only) and remove KEDA's
# APIService, so the control plane can serve external.metrics.k8s.io from
# something else (prometheus-adapter). KEDA's CRDs and namespace stay.
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
fi

ours() {
  local pid="$1" name="$2" exe
  kill -0 "$pid" 2>/dev/null || return 1
  [[ "$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null)" != Z ]] || return 1
  exe="$(readlink "/proc/$pid/exe" 2>/dev/null || true)"
  [[ -z "$exe" || "$(basename "${exe% (deleted)}")" == "$name" ]]
}
stopped=()
for name in keda-adapter keda-operator; do
  f="$STATE/pids/$name.pid"
  [[ -f "$f" ]] || continue
  pid="$(cat "$f")"
  if [[ "$pid" =~ ^[0-9]+$ ]] && ours "$pid" "$name"; then
    kill -TERM "$pid" 2>/dev/null || true
    stopped+=("$name:$pid")
  fi
done
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
rm -f "$STATE/pids/keda-operator.pid" "$STATE/pids/keda-adapter.pid"
[[ ${#stopped[@]} -gt 0 ]] || log "nothing was running"
