#!/usr/bin/env bash
# A real cluster on this machine (make cluster-up): the control plane of up.sh in
# node mode plus K8S_NODES real nodes (default 2; node-up.sh: containerd, CNI,
# kubelet each; kube-proxy and CoreDNS once), with the images of `make images`
# loaded into every node.
# Idempotent. State in $PADDLER_K8S_DIR (make: .k8s/cluster/):
#   kubeconfig, bin/kubectl, bin/helm, logs/ (control plane), node/, node-2/ (nodes).
# Env: CLUSTER_IMAGES (images to load; default: the five of scripts/images.sh),
# CLUSTER_EXTRA_IMAGES (loaded too: e.g. the test tier's client image).
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
export PADDLER_K8S_DIR="${PADDLER_K8S_DIR:-$REPO/.k8s/cluster}"
export K8S_NODE_MODE=1
mkdir -p "$PADDLER_K8S_DIR"
exec 9>"$PADDLER_K8S_DIR/.lock"
flock -n 9 || { echo "[cluster-up] another cluster-up/down is running; waiting" >&2; flock 9; }
export PADDLER_K8S_LOCKED=1
VERSION="$(sed -n 's/^appVersion: *"\{0,1\}\([^"]*\)"\{0,1\}$/\1/p' "$REPO/charts/paddler/Chart.yaml")"
TAG="${IMAGE_TAG:-$VERSION}"
DEFAULT_IMAGES="ghcr.io/paddler-k8s/balancer:$TAG ghcr.io/paddler-k8s/agent:$TAG ghcr.io/paddler-k8s/agent:$TAG-smollm2"
DEFAULT_IMAGES+=" ghcr.io/paddler-k8s/llama-server:$TAG ghcr.io/paddler-k8s/llama-server:$TAG-smollm2"
export NODE_IMAGES="${CLUSTER_IMAGES:-$DEFAULT_IMAGES} ${CLUSTER_EXTRA_IMAGES:-}"
t0=$SECONDS
bash "$REPO/scripts/docker.sh" up
bash "$HERE/up.sh"
NODES="${K8S_NODES:-2}"
[[ "$NODES" =~ ^[1-9]$ ]] || { echo "[cluster-up] K8S_NODES must be 1..9, not '$NODES'" >&2; exit 1; }
for ((i = 0; i < NODES; i++)); do
  if ! K8S_NODE_INDEX=$i bash "$HERE/node-up.sh"; then
    echo "[cluster-up] node $i did not come up; stopping what started" >&2
    bash "$HERE/cluster-down.sh" >&2 || true
    exit 1
  fi
done
echo "[cluster-up] $NODES node(s) up in $((SECONDS - t0))s: KUBECONFIG=$PADDLER_K8S_DIR/kubeconfig" \
  "kubectl=$PADDLER_K8S_DIR/bin/kubectl helm=$PADDLER_K8S_DIR/bin/helm" >&2
