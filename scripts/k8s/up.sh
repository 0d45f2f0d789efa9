#!/usr/bin/env bash
# Start a real, local Kubernetes control plane for tests: etcd,
# kube-apiserver, kube-controller-manager, kube-scheduler and kwok (fake
# nodes, so pods get scheduled and reach Running), all on 127.0.0.1 and free
# ports, as background processes. State lives in .k8s/ in the repo root:
#   .k8s/kubeconfig   admin kubeconfig (token auth, system:masters)
#   .k8s/bin/         kubectl, helm (links into the binary cache)
#   .k8s/pids/        one pid file per process (down.sh stops them)
#   .k8s/logs/        one log per process
#   .k8s/pki/         self-signed CA, serving cert, service-account keys
#   .k8s/cluster-id   changes each time a new control plane is started
# Idempotent: if the control plane is already up and healthy, it does nothing.
# Environment: PADDLER_K8S_DIR (default <repo>/.k8s), K8S_FAKE_NODES (2),
# K8S_UP_TIMEOUT (seconds, 120), K8S_HPA_SYNC_PERIOD (the HPA controller's loop, 1s:
# tests see an autoscaling decision within seconds; the upstream default is 15s), plus
# what build.sh reads. The API aggregator is set up (front-proxy certificates,
# --enable-aggregator-routing) so extension API servers such as prometheus-adapter
# (scripts/k8s/prometheus-adapter.sh) can be registered as APIServices.
# K8S_NODE_MODE=1 (scripts/k8s/cluster-up.sh): the apiserver also listens on the
# host's address and advertises it, so pods of a real node (scripts/k8s/node-up.sh)
# reach it through the `kubernetes` Service (10.96.0.1); no fake nodes.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$HERE/lib.sh"
REPO="$(cd "$HERE/../.." && pwd)"
K8S_VERSION="${K8S_VERSION:-v1.34.4}"
export K8S_VERSION
CACHE="${PADDLER_CACHE:-$HOME/.cache/paddler}"
BIN="$CACHE/k8s/$K8S_VERSION/bin"
STATE="${PADDLER_K8S_DIR:-$REPO/.k8s}"
FAKE_NODES="${K8S_FAKE_NODES:-2}"
TIMEOUT="${K8S_UP_TIMEOUT:-120}"
KUBECONFIG_FILE="$STATE/kubeconfig"
NODE_MODE="${K8S_NODE_MODE:-0}"
BIND_ADDRESS=127.0.0.1
ADVERTISE_ADDRESS=127.0.0.1
RECONCILER=none
if [[ "$NODE_MODE" == 1 ]]; then
  FAKE_NODES=0
  ADVERTISE_ADDRESS="$(bash "$HERE/host-ip.sh")"
  BIND_ADDRESS=0.0.0.0
  RECONCILER=lease
fi

log() { printf '[k8s-up %s] %s\n' "$(date -u +%H:%M:%S)" "$*"; }

# Is the process of pid file NAME running, and is it still NAME (pids recycle)?
alive() { pidfile_alive "$STATE/pids" "$1"; }
kctl() { "$BIN/kubectl" --kubeconfig "$KUBECONFIG_FILE" --request-timeout=10s "$@"; }
api_ready() { [[ "$(kctl get --raw /readyz 2>/dev/null)" == ok ]]; }

# Every process of a previous up.sh is still running?
processes_alive() {
  [[ -f "$KUBECONFIG_FILE" ]] || return 1
  local p
  for p in etcd kube-apiserver kube-controller-manager; do alive "$p" || return 1; done
  for p in kube-scheduler kwok; do
    if [[ -f "$STATE/pids/$p.pid" ]]; then alive "$p" || return 1; fi
  done
}

bash "$HERE/build.sh"

# Concurrent callers (several test sessions, make k8s-up) take turns; the
# lock fd is closed in the processes started below, so it dies with us.
mkdir -p "$STATE"
if [[ -z "${PADDLER_K8S_LOCKED:-}" ]]; then
  exec 9>"$STATE/.lock"
  flock -n 9 || { log "another up.sh/down.sh is running; waiting for it"; flock 9; }
  export PADDLER_K8S_LOCKED=1
fi

# Already up: processes alive and the apiserver answers (a loaded machine
# may make /readyz slow, so it gets the deadline before we give up on it).
if processes_alive; then
  deadline=$((SECONDS + TIMEOUT))
  until api_ready; do
    if (( SECONDS >= deadline )) || ! processes_alive; then break; fi
    sleep 0.5
  done
  if processes_alive && api_ready; then
    log "already up: $(kctl config view -o jsonpath='{.clusters[0].cluster.server}')"
    exit 0
  fi
  log "control plane unhealthy: restarting it"
fi
# Anything half-started (stale pid files, dead processes) is cleaned first.
if [[ -d "$STATE/pids" ]] && compgen -G "$STATE/pids/*.pid" >/dev/null; then
  log "stale state found: stopping it first"
  bash "$HERE/down.sh"
fi

T0=$SECONDS
mkdir -p "$STATE"/{pids,logs,pki,bin,run}
# A new cluster: new id (test fixtures compare it to know who started it).
rm -f "$STATE/started-by-tests"
openssl rand -hex 8 >"$STATE/cluster-id"
grep -qs '^\*$' "$STATE/.gitignore" 2>/dev/null || echo '*' >"$STATE/.gitignore"
ln -sf "$BIN/kubectl" "$STATE/bin/kubectl"
[[ -x "$BIN/helm" ]] && ln -sf "$BIN/helm" "$STATE/bin/helm"

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'
}

# --- certificates and keys (kept between runs) ------------------------------
PKI="$STATE/pki"
if [[ ! -f "$PKI/serving.crt" ]]; then
  log "generating certificates in $PKI"
  (
    cd "$PKI"
    openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -keyout ca.key -out ca.crt \
      -subj "/CN=paddler-local-ca" >/dev/null 2>&1
    openssl req -newkey rsa:2048 -nodes -keyout serving.key -out serving.csr \
      -subj "/CN=kube-apiserver" >/dev/null 2>&1
    cat >serving.ext <<EXT
subjectAltName=IP:127.0.0.1,IP:10.96.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local
extendedKeyUsage=serverAuth
keyUsage=digitalSignature,keyEncipherment
EXT
    openssl x509 -req -in serving.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 3650 \
      -extfile serving.ext -out serving.crt >/dev/null 2>&1
    openssl genrsa -out sa.key 2048 >/dev/null 2>&1
    openssl rsa -in sa.key -pubout -out sa.pub >/dev/null 2>&1
    # Admin client certificate too, for tools that prefer cert auth.
    openssl req -newkey rsa:2048 -nodes -keyout admin.key -out admin.csr \
      -subj "/O=system:masters/CN=admin" >/dev/null 2>&1
    printf 'extendedKeyUsage=clientAuth\n' >admin.ext
    openssl x509 -req -in admin.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 3650 \
      -extfile admin.ext -out admin.crt >/dev/null 2>&1
    TOKEN="$(openssl rand -hex 24)"
    echo "$TOKEN,admin,admin,system:masters" >tokens.csv
    chmod 600 ./*.key tokens.csv
  )
fi
# Front proxy (the API aggregator's client certificate toward extension API servers such
# as prometheus-adapter, scripts/k8s/prometheus-adapter.sh): its own CA, kept like the rest.
if [[ ! -f "$PKI/front-proxy-client.crt" ]]; then
  (
    cd "$PKI"
    openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -keyout front-proxy-ca.key -out front-proxy-ca.crt \
      -subj "/CN=paddler-front-proxy-ca" >/dev/null 2>&1
    openssl req -newkey rsa:2048 -nodes -keyout front-proxy-client.key -out front-proxy-client.csr \
      -subj "/CN=front-proxy-client" >/dev/null 2>&1
    printf 'extendedKeyUsage=clientAuth\n' >front-proxy-client.ext
    openssl x509 -req -in front-proxy-client.csr -CA front-proxy-ca.crt -CAkey front-proxy-ca.key \
      -CAcreateserial -days 3650 -extfile front-proxy-client.ext -out front-proxy-client.crt >/dev/null 2>&1
    chmod 600 front-proxy-ca.key front-proxy-client.key
  )
fi
TOKEN="$(cut -d, -f1 "$PKI/tokens.csv")"

ETCD_PORT="$(free_port)"; ETCD_PEER_PORT="$(free_port)"; API_PORT="$(free_port)"
while [[ "$ETCD_PEER_PORT" == "$ETCD_PORT" ]]; do ETCD_PEER_PORT="$(free_port)"; done
while [[ "$API_PORT" == "$ETCD_PORT" || "$API_PORT" == "$ETCD_PEER_PORT" ]]; do API_PORT="$(free_port)"; done
SERVER="https://127.0.0.1:$API_PORT"

write_kubeconfig() {
  local file="$1" user="$2"
  cat >"$file" <<KC
apiVersion: v1
kind: Config
clusters:
- name: paddler-local
  cluster:
    server: $SERVER
    certificate-authority-data: $(base64 -w0 "$PKI/ca.crt")
users:
- name: $user
  user:
    token: $TOKEN
contexts:
- name: paddler-local
  context:
    cluster: paddler-local
    user: $user
    namespace: default
current-context: paddler-local
KC
  chmod 600 "$file"
}
write_kubeconfig "$KUBECONFIG_FILE.tmp" admin
mv "$KUBECONFIG_FILE.tmp" "$KUBECONFIG_FILE"

# start NAME CMD...: detached (own session), stdin/out/err away from the
# caller, so a pytest subprocess.run() of this script does not wait on them.
start() {
  local name="$1"; shift
  setsid "$@" </dev/null >"$STATE/logs/$name.log" 2>&1 9>&- &
  echo $! >"$STATE/pids/$name.pid"
  log "started $name (pid $!)"
}
fail() {
  echo "k8s-up: $1; last log lines:" >&2
  local f; for f in "$STATE"/logs/*.log; do echo "== $f" >&2; tail -n 15 "$f" >&2; done
  bash "$HERE/down.sh" >&2 || true
  exit 1
}
# wait_for DESC CMD...: poll until CMD succeeds, bounded by the deadline.
DEADLINE=$((SECONDS + TIMEOUT))
wait_for() {
  local desc="$1"; shift
  local delay=0.05
  until "$@" >/dev/null 2>&1; do
    local p; for p in "$STATE"/pids/*.pid; do
      alive "$(basename "$p" .pid)" || fail "$(basename "$p" .pid) exited while waiting for $desc"
    done
    (( SECONDS < DEADLINE )) || fail "timed out after ${TIMEOUT}s waiting for $desc"
    sleep "$delay"
    delay=$(awk -v d="$delay" 'BEGIN{d*=2; if (d>0.5) d=0.5; print d}')
  done
}

# --- etcd ---------------------------------------------------------------------
rm -rf "$STATE/run/etcd"
start etcd "$BIN/etcd" --name paddler --data-dir "$STATE/run/etcd" \
  --listen-client-urls "http://127.0.0.1:$ETCD_PORT" \
  --advertise-client-urls "http://127.0.0.1:$ETCD_PORT" \
  --listen-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" \
  --initial-advertise-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" \
  --initial-cluster "paddler=http://127.0.0.1:$ETCD_PEER_PORT" \
  --unsafe-no-fsync --log-level warn
etcd_ok() {
  python3 - "http://127.0.0.1:$ETCD_PORT/health" <<'PY'
import sys, urllib.request
with urllib.request.urlopen(sys.argv[1], timeout=5) as r:
    sys.exit(0 if b'"health":"true"' in r.read() else 1)
PY
}
wait_for "etcd health" etcd_ok

# --- kube-apiserver -----------------------------------------------------------
start kube-apiserver "$BIN/kube-apiserver" \
  --etcd-servers "http://127.0.0.1:$ETCD_PORT" \
  --bind-address "$BIND_ADDRESS" --advertise-address "$ADVERTISE_ADDRESS" --secure-port "$API_PORT" \
  --cert-dir "$STATE/run/apiserver-certs" \
  --tls-cert-file "$PKI/serving.crt" --tls-private-key-file "$PKI/serving.key" \
  --client-ca-file "$PKI/ca.crt" --token-auth-file "$PKI/tokens.csv" \
  --authorization-mode Node,RBAC \
  --service-account-issuer https://kubernetes.default.svc.cluster.local \
  --service-account-key-file "$PKI/sa.pub" \
  --service-account-signing-key-file "$PKI/sa.key" \
  --service-cluster-ip-range 10.96.0.0/16 \
  --endpoint-reconciler-type "$RECONCILER" \
  --kubelet-preferred-address-types InternalIP,Hostname \
  --allow-privileged=true \
  --requestheader-client-ca-file "$PKI/front-proxy-ca.crt" \
  --requestheader-allowed-names front-proxy-client \
  --requestheader-username-headers X-Remote-User \
  --requestheader-group-headers X-Remote-Group \
  --requestheader-extra-headers-prefix X-Remote-Extra- \
  --proxy-client-cert-file "$PKI/front-proxy-client.crt" \
  --proxy-client-key-file "$PKI/front-proxy-client.key" \
  --enable-aggregator-routing=true \
  --feature-gates HPAScaleToZero=true
wait_for "kube-apiserver /readyz" api_ready
log "kube-apiserver ready at $SERVER after $((SECONDS - T0))s"

# --- kube-controller-manager, kube-scheduler ----------------------------------
start kube-controller-manager "$BIN/kube-controller-manager" \
  --kubeconfig "$KUBECONFIG_FILE" \
  --authentication-kubeconfig "$KUBECONFIG_FILE" --authorization-kubeconfig "$KUBECONFIG_FILE" \
  --bind-address 127.0.0.1 --secure-port "$(free_port)" \
  --cert-dir "$STATE/run/kcm-certs" \
  --authentication-skip-lookup=true \
  --leader-elect=false \
  --service-account-private-key-file "$PKI/sa.key" --root-ca-file "$PKI/ca.crt" \
  --cluster-signing-cert-file "$PKI/ca.crt" --cluster-signing-key-file "$PKI/ca.key" \
  --service-cluster-ip-range 10.96.0.0/16 \
  --controllers '*' \
  --horizontal-pod-autoscaler-sync-period "${K8S_HPA_SYNC_PERIOD:-1s}" \
  --feature-gates HPAScaleToZero=true
if [[ -x "$BIN/kube-scheduler" ]]; then
  start kube-scheduler "$BIN/kube-scheduler" \
    --kubeconfig "$KUBECONFIG_FILE" \
    --authentication-kubeconfig "$KUBECONFIG_FILE" --authorization-kubeconfig "$KUBECONFIG_FILE" \
    --bind-address 127.0.0.1 --secure-port "$(free_port)" \
    --cert-dir "$STATE/run/scheduler-certs" \
    --authentication-skip-lookup=true \
    --leader-elect=false
fi

# --- kwok: fake nodes, pods on them go Running ---------------------------------
KWOK_STAGES="$CACHE/k8s/$K8S_VERSION/kwok-stages.yaml"
if [[ -x "$BIN/kwok" && -s "$KWOK_STAGES" && -x "$BIN/kube-scheduler" && "$FAKE_NODES" -gt 0 ]]; then
  start kwok "$BIN/kwok" \
    --config "$KWOK_STAGES" \
    --kubeconfig "$KUBECONFIG_FILE" \
    --manage-all-nodes=false \
    --manage-nodes-with-annotation-selector kwok.x-k8s.io/node=fake \
    --node-ip 127.0.0.1 --node-port "$(free_port)" \
    --server-address "127.0.0.1:$(free_port)" \
    --cidr 10.244.0.1/16
  for i in $(seq 0 $((FAKE_NODES - 1))); do
    cat <<NODE
apiVersion: v1
kind: Node
metadata:
  name: kwok-node-$i
  annotations:
    node.alpha.kubernetes.io/ttl: "0"
    kwok.x-k8s.io/node: fake
  labels:
    type: kwok
    kubernetes.io/os: linux
    kubernetes.io/arch: amd64
    kubernetes.io/hostname: kwok-node-$i
    node-role.kubernetes.io/agent: ""
status:
  allocatable: {cpu: "32", memory: 256Gi, pods: "110"}
  capacity: {cpu: "32", memory: 256Gi, pods: "110"}
  nodeInfo: {architecture: amd64, kubeletVersion: fake, kubeProxyVersion: fake, operatingSystem: linux}
---
NODE
  done >"$STATE/run/nodes.yaml"
  wait_for "fake nodes created" kctl apply -f "$STATE/run/nodes.yaml"
  nodes_ready() {
    [[ "$(kctl get nodes -l type=kwok -o jsonpath='{range .items[*]}{.status.conditions[?(@.type=="Ready")].status}{"\n"}{end}' \
      | grep -c True)" -ge "$FAKE_NODES" ]]
  }
  wait_for "fake nodes Ready" nodes_ready
fi

# --- ready for tests: default namespace and its service account ----------------
wait_for "namespace default" kctl get namespace default
wait_for "serviceaccount default/default" kctl -n default get serviceaccount default
log "control plane up in $((SECONDS - T0))s: $SERVER (KUBECONFIG=$KUBECONFIG_FILE)"
