#!/usr/bin/env bash
# Stop node K8S_NODE_INDEX (default 0) of node-up.sh and leave nothing behind: pods are evicted first
# (so kubelet tears their sandboxes and CNI down), then kube-proxy, kubelet and
# containerd stop, kube-proxy's iptables chains go, and every mount under the
# kubelet root is released. Containerd's image store stays (cache).
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
K8S_VERSION="${K8S_VERSION:-v1.34.4}"
CACHE="${PADDLER_CACHE:-$HOME/.cache/paddler}"
BIN="$CACHE/k8s/$K8S_VERSION/bin"
STATE="${PADDLER_K8S_DIR:?set PADDLER_K8S_DIR to the state folder of the control plane}"
KUBECONFIG_FILE="$STATE/kubeconfig"
# shellcheck source=scripts/k8s/node-lib.sh
source "$HERE/node-lib.sh"
node_layout "${K8S_NODE_INDEX:-0}"
DRAIN_TIMEOUT="${K8S_DRAIN_TIMEOUT:-60}"
log() { printf '[node-down %s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }
kctl() { "$BIN/kubectl" --kubeconfig "$KUBECONFIG_FILE" --request-timeout=10s "$@"; }
ctr_() { ctr --address "$SOCK" -n k8s.io "$@"; }

[[ -d "$NODE" ]] || { log "no node state in $NODE"; exit 0; }

pid_of() {
  local f="$NODE/pids/$1.pid" pid exe
  [[ -f "$f" ]] || return 1
  pid="$(cat "$f")"
  [[ "$pid" =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null || return 1
  [[ "$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null)" != Z ]] || return 1
  exe="$(readlink "/proc/$pid/exe" 2>/dev/null || true)"
  [[ -z "$exe" || "$(basename "${exe% (deleted)}")" == "$1" ]] || return 1
  echo "$pid"
}
stop() {
  local name="$1" pid
  pid="$(pid_of "$name")" || { rm -f "$NODE/pids/$name.pid"; return 0; }
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 200); do pid_of "$name" >/dev/null || break; sleep 0.1; done
  if pid_of "$name" >/dev/null; then log "$name ignored SIGTERM: SIGKILL"; kill -KILL "$pid" 2>/dev/null || true; sleep 0.2; fi
  rm -f "$NODE/pids/$name.pid"
  log "stopped $name (pid $pid)"
}
running_tasks() { ctr_ tasks ls -q 2>/dev/null | grep -c . || true; }

# 1. Evict every pod while kubelet and containerd still run (kubelet stops their
#    sandboxes: CNI DEL, network namespaces removed); the taint keeps the
#    scheduler from placing replacements.
if pid_of kubelet >/dev/null && kctl get node "$NODE_NAME" >/dev/null 2>&1; then
  kctl taint node "$NODE_NAME" paddler.dev/down=:NoExecute --overwrite >/dev/null 2>&1 || true
  kctl delete pods -A --field-selector "spec.nodeName=$NODE_NAME" --grace-period=2 --wait=false >/dev/null 2>&1 || true
  deadline=$((SECONDS + DRAIN_TIMEOUT))
  while (( $(running_tasks) > 0 && SECONDS < deadline )); do sleep 0.5; done
  log "pods evicted ($(running_tasks) task(s) left)"
fi

# 2. Node processes.
stop kube-proxy
stop kubelet

# 3. Whatever kubelet did not stop: kill tasks and remove containers directly.
if pid_of containerd >/dev/null; then
  for t in $(ctr_ tasks ls -q 2>/dev/null || true); do
    ctr_ tasks kill -s SIGKILL "$t" >/dev/null 2>&1 || true
  done
  for _ in $(seq 50); do (( $(running_tasks) == 0 )) && break; sleep 0.1; done
  for t in $(ctr_ tasks ls -q 2>/dev/null || true); do ctr_ tasks rm -f "$t" >/dev/null 2>&1 || true; done
  for c in $(ctr_ containers ls -q 2>/dev/null || true); do ctr_ containers rm "$c" >/dev/null 2>&1 || true; done
fi
stop containerd

# 4. Leftovers: the bridge, mounts under the kubelet root and containerd's run state;
#    node 0 (stopped last) also the host-wide ones: kube-proxy's chains, CNI's chains
#    and pod network namespaces of CRI (cni-*).
ip link show "$BRIDGE" >/dev/null 2>&1 && ip link del "$BRIDGE" 2>/dev/null || true
{ findmnt -rn -o TARGET | grep -F -e "$NODE/kubelet" -e "$RUN" || true; } | sort -r | while read -r m; do
  umount -l "$m" 2>/dev/null || true
done
rm -rf "$NODE/kubelet" "$NODE/pids" "$RUN"
if [[ "$NODE_INDEX" != 0 ]]; then
  # Its pods' cgroups are gone with them; the empty root goes too (best effort).
  for d in /sys/fs/cgroup/*"$CGROUP_ROOT"; do
    [[ -d "$d" ]] && find "$d" -depth -type d -exec rmdir {} + 2>/dev/null || true
  done
  log "node $NODE_NAME stopped"
  exit 0
fi
if [[ -x "$BIN/kube-proxy" ]]; then "$BIN/kube-proxy" --cleanup >/dev/null 2>&1 || true; fi
for chain in $(iptables -t nat -S 2>/dev/null | awk '$1 == "-N" && $2 ~ /^CNI-/ {print $2}'); do
  # awk, not grep: a chain no rule jumps to any more must not fail the pipeline (pipefail).
  iptables -t nat -S POSTROUTING | awk -v c="$chain" '$0 ~ ("-j " c "($| )") {print}' | sed 's/^-A/-D/' | while read -r rule; do
    eval iptables -t nat "$rule" 2>/dev/null || true
  done
  iptables -t nat -F "$chain" 2>/dev/null || true
  iptables -t nat -X "$chain" 2>/dev/null || true
done
for ns in /run/netns/cni-*; do
  [[ -e "$ns" ]] || continue
  umount "$ns" 2>/dev/null || true; rm -f "$ns"
done
# What kube-proxy --cleanup leaves (KUBE-FIREWALL, kubelet's canaries, hints):
# every KUBE-* chain and the rules that jump to it.
for table in mangle nat filter; do
  chains="$(iptables -t "$table" -S 2>/dev/null | awk '$1 == "-N" && $2 ~ /^KUBE-/ {print $2}')"
  [[ -n "$chains" ]] || continue
  for chain in $chains; do
    iptables -t "$table" -S | awk -v c="$chain" '$1 == "-A" && $0 ~ ("-j " c "($| )") {print}' | sed 's/^-A/-D/' \
      | while read -r rule; do eval iptables -t "$table" "$rule" 2>/dev/null || true; done
  done
  for chain in $chains; do iptables -t "$table" -F "$chain" 2>/dev/null || true; done
  for chain in $chains; do iptables -t "$table" -X "$chain" 2>/dev/null || true; done
done
log "node $NODE_NAME stopped"
