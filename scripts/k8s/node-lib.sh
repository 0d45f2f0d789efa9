# Where node <i> of this machine keeps its things (sourced by node-up.sh and
# node-down.sh). Node 0 keeps the single-node names (paddler-node, .k8s/cluster/node,
# paddler0), so a one-node cluster of an earlier checkout is still found and stopped.
node_layout() {
  local i="$1"
  [[ "$i" =~ ^[0-9]+$ && "$i" -lt 200 ]] || { echo "K8S_NODE_INDEX must be 0..199, not '$i'" >&2; exit 1; }
  NODE_INDEX="$i"
  if [[ "$i" == 0 ]]; then
    NODE_NAME=paddler-node
    NODE="$STATE/node"
    CTR_ROOT="$CACHE/node/containerd"
    CGROUP_ROOT=""                       # the host's root cgroup, as before
  else
    NODE_NAME="paddler-node-$((i + 1))"
    NODE="$STATE/node-$((i + 1))"
    CTR_ROOT="$CACHE/node-$((i + 1))/containerd"
    CGROUP_ROOT="/$NODE_NAME"            # its pods' cgroups apart from node 0's
  fi
  RUN="/run/$NODE_NAME"                  # short: containerd's sockets live here
  SOCK="$RUN/containerd.sock"
  BRIDGE="paddler$i"
  POD_CIDR="10.244.$i.0/24"
  CNI_NETWORK="paddler"; [[ "$i" == 0 ]] || CNI_NETWORK="paddler-$i"
}
