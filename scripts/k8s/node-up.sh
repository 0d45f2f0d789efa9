#!/usr/bin/env bash
# Join a real node to the control plane of up.sh (K8S_NODE_MODE=1): Debian's
# containerd (CRI, its own config and socket), Debian's CNI plugins (bridge +
# host-local + portmap), kubelet and kube-proxy (iptables) built from the Go proxy,
# a pause image compiled here and CoreDNS (also from the Go proxy) for cluster DNS.
# Called by cluster-up.sh once per node; idempotent.
#
# Several nodes on one machine (K8S_NODE_INDEX=0, 1, ...): each node is its own
# kubelet + containerd with its own root, sockets, bridge (paddler<i>), pod range
# (10.244.<i>.0/24), cgroup root and pod-log folder, so the two kubelets never touch
# each other's containers. What is host-wide is started once, by node 0: kube-proxy
# (one set of iptables rules serves every node, they share the host's network) and
# CoreDNS (a Deployment; the scheduler places it). Pods on one node reach pods on
# another through the host's routes to each bridge (docs/development.md, "Cluster tier").
#
# State: $STATE/node/ (node 0) or $STATE/node-<i+1>/ (config, logs, pids, kubelet
# root), containerd's image store in $PADDLER_CACHE/node[-<i+1>]/containerd (imported
# images survive cluster-down).
# Runs as root (or through sudo): containerd, kubelet and kube-proxy need it.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
K8S_VERSION="${K8S_VERSION:-v1.34.4}"
CACHE="${PADDLER_CACHE:-$HOME/.cache/paddler}"
BIN="$CACHE/k8s/$K8S_VERSION/bin"
STATE="${PADDLER_K8S_DIR:?set PADDLER_K8S_DIR to the state folder of the control plane}"
KUBECONFIG_FILE="$STATE/kubeconfig"
TIMEOUT="${K8S_NODE_TIMEOUT:-180}"
# shellcheck source=scripts/k8s/node-lib.sh
source "$HERE/node-lib.sh"
node_layout "${K8S_NODE_INDEX:-0}"
CLUSTER_CIDR=10.244.0.0/16
DNS_IP=10.96.0.10
CNI_BIN=/usr/lib/cni
PAUSE_IMAGE=paddler-local/pause:3.10
COREDNS_IMAGE=paddler-local/coredns:local
DOCKER="${DOCKER:-docker}"

log() { printf '[node-up %s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }
kctl() { "$BIN/kubectl" --kubeconfig "$KUBECONFIG_FILE" --request-timeout=15s "$@"; }
ctr_() { ctr --address "$SOCK" -n k8s.io "$@"; }
[[ "$(id -u)" == 0 ]] || { echo "node-up.sh runs as root (sudo make cluster-up)" >&2; exit 1; }
mkdir -p "$NODE"/{pids,logs,cni/net.d,kubelet,certs} "$CTR_ROOT" "$RUN"

alive() {
  local f="$NODE/pids/$1.pid" pid exe
  [[ -f "$f" ]] || return 1
  pid="$(cat "$f")"
  [[ "$pid" =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null || return 1
  exe="$(readlink "/proc/$pid/exe" 2>/dev/null || true)"
  [[ -z "$exe" || "$(basename "${exe% (deleted)}")" == "$1" ]]
}
start() {
  local name="$1"; shift
  setsid "$@" </dev/null >"$NODE/logs/$name.log" 2>&1 6>&- 7>&- 8>&- 9>&- &
  echo $! >"$NODE/pids/$name.pid"
  log "started $name (pid $!)"
}
fail() {
  echo "node-up: $1; last log lines:" >&2
  local f; for f in "$NODE"/logs/*.log; do [[ -f "$f" ]] && { echo "== $f" >&2; tail -n 20 "$f" >&2; }; done
  exit 1
}
DEADLINE=$((SECONDS + TIMEOUT))
wait_for() {
  local desc="$1"; shift
  until "$@" >/dev/null 2>&1; do
    (( SECONDS < DEADLINE )) || fail "timed out after ${TIMEOUT}s waiting for $desc"
    sleep 0.5
  done
}
make_cgroup_root() {
  local root="$1" fs=/sys/fs/cgroup d
  if [[ -f "$fs/cgroup.controllers" ]]; then   # cgroup v2: one tree
    mkdir -p "$fs$root"
    return 0
  fi
  for d in "$fs"/*/; do
    d="${d%/}"
    [[ -L "$d" || ! -w "$d" ]] && continue
    mkdir -p "$d$root" 2>/dev/null || continue
    if [[ -f "$d/cpuset.cpus" && ! -s "$d$root/cpuset.cpus" ]]; then
      cat "$d/cpuset.cpus" >"$d$root/cpuset.cpus"
      cat "$d/cpuset.mems" >"$d$root/cpuset.mems"
    fi
  done
}
free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'
}

# --- host packages and binaries ------------------------------------------------
need=()
command -v containerd >/dev/null || need+=(containerd)
command -v runc >/dev/null || need+=(runc)
[[ -x "$CNI_BIN/bridge" ]] || need+=(containernetworking-plugins)
command -v iptables >/dev/null || need+=(iptables)
command -v conntrack >/dev/null || need+=(conntrack)
if [[ ${#need[@]} -gt 0 ]]; then
  log "installing ${need[*]} (Debian)"
  DEBIAN_FRONTEND=noninteractive apt-get update -q >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${need[@]}" >&2
fi
for b in kubelet kube-proxy coredns kubectl; do
  [[ -x "$BIN/$b" ]] || { echo "node-up: $BIN/$b missing (make k8s-build)" >&2; exit 1; }
done

# --- kernel: forwarding, bridged traffic through iptables (Services) ---------
[[ -d /proc/sys/net/bridge ]] || modprobe br_netfilter 2>/dev/null || true
sysctl -qw net.ipv4.ip_forward=1
[[ -e /proc/sys/net/bridge/bridge-nf-call-iptables ]] && sysctl -qw net.bridge.bridge-nf-call-iptables=1

HOST_IP="$(bash "$HERE/host-ip.sh")"

# --- containerd --------------------------------------------------------------
cat >"$NODE/containerd.toml" <<TOML
version = 2
root = "$CTR_ROOT"
state = "$RUN/containerd"
disabled_plugins = ["io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs",
                    "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.aufs"]
[grpc]
  address = "$SOCK"
[ttrpc]
  address = "$RUN/containerd.sock.ttrpc"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "$PAUSE_IMAGE"
  # No CAP_SYS_RESOURCE in these sandboxes: never ask runc for a negative oom_score_adj.
  restrict_oom_score_adj = true
  enable_selinux = false
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "$CNI_BIN"
    conf_dir = "$NODE/cni/net.d"
TOML
cat >"$NODE/cni/net.d/10-paddler.conflist" <<JSON
{
  "cniVersion": "0.4.0",
  "name": "$CNI_NETWORK",
  "plugins": [
    {
      "type": "bridge", "bridge": "$BRIDGE", "isGateway": true, "ipMasq": true, "hairpinMode": true,
      "ipam": {"type": "host-local", "ranges": [[{"subnet": "$POD_CIDR"}]],
               "routes": [{"dst": "0.0.0.0/0"}], "dataDir": "$RUN/cni-ipam"}
    },
    {"type": "portmap", "capabilities": {"portMappings": true}}
  ]
}
JSON
if alive containerd && ctr --address "$SOCK" version >/dev/null 2>&1; then
  log "containerd already running"
else
  start containerd containerd --config "$NODE/containerd.toml"
  wait_for "containerd socket" ctr --address "$SOCK" version
fi

# --- images: pause and CoreDNS made here, the project's from Docker ----------
# Built once into Docker (cached there); imported when containerd lacks them or
# Docker's copy changed (the imported image id is remembered per name).
pause_image() {
  $DOCKER image inspect "$PAUSE_IMAGE" >/dev/null 2>&1 && return 0
  log "building $PAUSE_IMAGE (a static C program)"
  local d; d="$(mktemp -d)"
  cat >"$d/pause.c" <<'C'
/* The pod sandbox's process: hold the namespaces, reap orphans, exit on a signal. */
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>
static void stop(int sig) { (void)sig; _exit(0); }
static void reap(int sig) { (void)sig; while (waitpid(-1, 0, WNOHANG) > 0) {} }
int main(void) {
  signal(SIGINT, stop);
  signal(SIGTERM, stop);
  signal(SIGCHLD, reap);
  for (;;) pause();
}
C
  mkdir -p "$d/root"
  gcc -Os -static -o "$d/root/pause" "$d/pause.c"
  strip "$d/root/pause"
  tar -C "$d/root" -c pause | $DOCKER import --change 'ENTRYPOINT ["/pause"]' --change 'USER 65535:65535' - "$PAUSE_IMAGE" >/dev/null
  rm -rf "$d"
}
coredns_image() {
  local have
  have="$($DOCKER image inspect -f '{{index .Config.Labels "paddler.binary"}}' "$COREDNS_IMAGE" 2>/dev/null || true)"
  local sum; sum="$(sha256sum "$BIN/coredns" | cut -c1-16)"
  [[ "$have" == "$sum" ]] && return 0
  log "building $COREDNS_IMAGE from $BIN/coredns"
  local d; d="$(mktemp -d)"
  mkdir -p "$d/root/etc/coredns"
  cp "$BIN/coredns" "$d/root/coredns"
  tar -C "$d/root" -c . | $DOCKER import --change 'ENTRYPOINT ["/coredns"]' \
    --change "LABEL paddler.binary=$sum" - "$COREDNS_IMAGE" >/dev/null
  rm -rf "$d"
}
import_image() {
  local image="$1" id mark present
  id="$($DOCKER image inspect -f '{{.Id}}' "$image" 2>/dev/null)" || { echo "node-up: image $image not in Docker (make images)" >&2; return 1; }
  mark="$CTR_ROOT/imported-$(printf '%s' "$image" | tr '/:' '__')"
  case "$image" in */*) ref="$image" ;; *) ref="library/$image" ;; esac
  case "${ref%%/*}" in *.*|*:*|localhost) ;; *) ref="docker.io/$ref" ;; esac
  present="$(ctr_ images ls -q 2>/dev/null | grep -Fx "$ref" || true)"
  if [[ -n "$present" && -f "$mark" && "$(cat "$mark")" == "$id" ]]; then return 0; fi
  log "importing $image into containerd"
  $DOCKER save "$image" | ctr_ images import --no-unpack=false - >/dev/null
  echo "$id" >"$mark"
}
pause_image
coredns_image
for image in "$PAUSE_IMAGE" "$COREDNS_IMAGE" ${NODE_IMAGES:-}; do import_image "$image"; done

# --- kubelet -------------------------------------------------------------------
KUBELET_PORT_FILE="$NODE/kubelet.port"
if alive kubelet; then
  log "kubelet already running"
else
  KUBELET_PORT="$(free_port)"
  echo "$KUBELET_PORT" >"$KUBELET_PORT_FILE"
  NODE_EXTRA_CONFIG=""
  if [[ -n "$CGROUP_ROOT" ]]; then
    # A second kubelet on this host: its own cgroup root (kubelet wants it to exist in
    # every hierarchy; cgroup v1's cpuset children start empty, so give it the parent's)
    # and its own pod-log folder (each kubelet removes log folders of pods it does not know).
    make_cgroup_root "$CGROUP_ROOT"
    NODE_EXTRA_CONFIG="cgroupRoot: $CGROUP_ROOT
podLogsDir: $NODE/pod-logs"
  fi
  cat >"$NODE/kubelet.yaml" <<YAML
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: $HOST_IP
port: $KUBELET_PORT
readOnlyPort: 0
healthzPort: 0
# Local single-user node: the API server reaches it (logs, exec) without client certs.
authentication: {anonymous: {enabled: true}, webhook: {enabled: false}}
authorization: {mode: AlwaysAllow}
cgroupDriver: cgroupfs
containerRuntimeEndpoint: unix://$SOCK
failSwapOn: false
clusterDNS: [$DNS_IP]
clusterDomain: cluster.local
resolvConf: ""
# Images come from \`docker save | ctr import\` and cannot be pulled again: never GC them.
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard: {memory.available: 100Mi, nodefs.available: 1%, imagefs.available: 1%, nodefs.inodesFree: 1%}
serializeImagePulls: false
maxPods: 110
$NODE_EXTRA_CONFIG
YAML
  start kubelet "$BIN/kubelet" --config "$NODE/kubelet.yaml" --kubeconfig "$KUBECONFIG_FILE" \
    --root-dir "$NODE/kubelet" --cert-dir "$NODE/certs" \
    --hostname-override "$NODE_NAME" --node-ip "$HOST_IP" \
    --node-labels "paddler.dev/local-node=true"
fi
node_ready() {
  [[ "$(kctl get node "$NODE_NAME" -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}')" == True ]]
}
wait_for "node $NODE_NAME Ready" node_ready

if [[ "$NODE_INDEX" != 0 ]]; then
  log "node $NODE_NAME Ready ($HOST_IP, pods $POD_CIDR; kube-proxy and DNS are node 0's)"
  exit 0
fi

# --- kube-proxy (iptables): node 0 only, its rules serve every node of this host ---
if alive kube-proxy; then
  log "kube-proxy already running"
else
  cat >"$NODE/kube-proxy.yaml" <<YAML
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clientConnection: {kubeconfig: $KUBECONFIG_FILE}
mode: iptables
clusterCIDR: $CLUSTER_CIDR
hostnameOverride: $NODE_NAME
bindAddress: $HOST_IP
healthzBindAddress: 127.0.0.1:$(free_port)
metricsBindAddress: 127.0.0.1:$(free_port)
conntrack: {maxPerCore: 0, tcpEstablishedTimeout: 0s, tcpCloseWaitTimeout: 0s}
YAML
  start kube-proxy "$BIN/kube-proxy" --config "$NODE/kube-proxy.yaml"
fi
proxy_synced() { iptables -t nat -S KUBE-SERVICES 2>/dev/null | grep -q 'default/kubernetes:https'; }
wait_for "kube-proxy's rules for default/kubernetes" proxy_synced

# --- CoreDNS: kube-dns at $DNS_IP ------------------------------------------------
kctl apply -f - >/dev/null <<YAML
apiVersion: v1
kind: ServiceAccount
metadata: {name: coredns, namespace: kube-system}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: "system:coredns"}
rules:
- apiGroups: [""]
  resources: [endpoints, services, pods, namespaces]
  verbs: [list, watch]
- apiGroups: [discovery.k8s.io]
  resources: [endpointslices]
  verbs: [list, watch]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: "system:coredns"}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: "system:coredns"}
subjects: [{kind: ServiceAccount, name: coredns, namespace: kube-system}]
---
apiVersion: v1
kind: ConfigMap
metadata: {name: coredns, namespace: kube-system}
data:
  Corefile: |
    .:1053 {
        errors
        health :8080
        ready :8181
        kubernetes cluster.local in-addr.arpa ip6.arpa {
            pods insecure
            fallthrough in-addr.arpa ip6.arpa
        }
        cache 30
        loadbalance
    }
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: coredns, namespace: kube-system, labels: {k8s-app: kube-dns}}
spec:
  replicas: 1
  selector: {matchLabels: {k8s-app: kube-dns}}
  template:
    metadata: {labels: {k8s-app: kube-dns}}
    spec:
      serviceAccountName: coredns
      dnsPolicy: Default
      securityContext: {runAsNonRoot: true, runAsUser: 65534, runAsGroup: 65534}
      containers:
      - name: coredns
        image: $COREDNS_IMAGE
        imagePullPolicy: Never
        args: [-conf, /etc/coredns/Corefile]
        ports:
        - {name: dns, containerPort: 1053, protocol: UDP}
        - {name: dns-tcp, containerPort: 1053, protocol: TCP}
        readinessProbe: {httpGet: {path: /ready, port: 8181}, periodSeconds: 2}
        securityContext: {allowPrivilegeEscalation: false, readOnlyRootFilesystem: true, capabilities: {drop: [ALL]}}
        resources: {requests: {cpu: 50m, memory: 64Mi}, limits: {memory: 170Mi}}
        volumeMounts: [{name: config, mountPath: /etc/coredns, readOnly: true}]
      volumes: [{name: config, configMap: {name: coredns}}]
---
apiVersion: v1
kind: Service
metadata: {name: kube-dns, namespace: kube-system, labels: {k8s-app: kube-dns}}
spec:
  clusterIP: $DNS_IP
  selector: {k8s-app: kube-dns}
  ports:
  - {name: dns, port: 53, targetPort: 1053, protocol: UDP}
  - {name: dns-tcp, port: 53, targetPort: 1053, protocol: TCP}
YAML
dns_ready() { [[ "$(kctl -n kube-system get deploy coredns -o jsonpath='{.status.readyReplicas}')" == 1 ]]; }
wait_for "CoreDNS ready" dns_ready
log "node $NODE_NAME Ready ($HOST_IP, pods $POD_CIDR), DNS at $DNS_IP"
