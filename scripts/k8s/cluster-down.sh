#!/usr/bin/env bash
# Stop what cluster-up.sh started: the nodes (pods evicted first), the control
# plane, and the Docker daemon if scripts/docker.sh started it. Idempotent.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
export PADDLER_K8S_DIR="${PADDLER_K8S_DIR:-$REPO/.k8s/cluster}"
if [[ -z "${PADDLER_K8S_LOCKED:-}" && -d "$PADDLER_K8S_DIR" ]]; then
  exec 9>"$PADDLER_K8S_DIR/.lock"
  flock -n 9 || { echo "[cluster-down] another cluster-up/down is running; waiting" >&2; flock 9; }
  export PADDLER_K8S_LOCKED=1
fi
# Every node this state folder holds, the extra ones first (node 0 clears the
# host-wide rules last).
for dir in $(ls -d "$PADDLER_K8S_DIR"/node-* 2>/dev/null | sort -rV); do
  n="${dir##*/node-}"
  [[ "$n" =~ ^[0-9]+$ ]] && K8S_NODE_INDEX=$((n - 1)) bash "$HERE/node-down.sh"
done
bash "$HERE/node-down.sh"
bash "$HERE/down.sh"
[[ "${CLUSTER_KEEP_DOCKER:-0}" == 1 ]] || bash "$REPO/scripts/docker.sh" down
