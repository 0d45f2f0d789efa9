#!/usr/bin/env bash
# Run KEDA (operator + metrics apiserver, built by keda-build.sh) as host
# processes against the control plane of scripts/k8s/up.sh (or cluster-up.sh),
# the way its pods would run in-cluster:
#   - KEDA's CRDs (from its module) installed, namespace `keda`;
#   - keda-operator: watches ScaledObjects in every namespace, scales 0 <-> 1
#     itself, writes the HPA (keda-hpa-<name>) that does 1 <-> N, and serves the
#     metric values over mTLS gRPC on 127.0.0.1;
#   - keda-adapter: the external.metrics.k8s.io server, registered as the
#     APIService v1beta1.external.metrics.k8s.io behind the Service
#     `keda/keda-metrics-apiserver` without selector, whose Endpoints name this
#     host's own address (Endpoints may not be loopback; up.sh runs the apiserver
#     with --enable-aggregator-routing and the front-proxy flags). The aggregator
#     checks the adapter's serving certificate against the APIService's caBundle
#     for keda-metrics-apiserver.keda.svc.
# KEDA's and prometheus-adapter's APIService have the same name: run one of the
# two at a time in one control plane (keda-down.sh removes KEDA's).
# State: .k8s/keda/ (certs, ports), .k8s/pids/keda-*.pid, .k8s/logs/keda-*.log,
# so scripts/k8s/down.sh stops KEDA with the control plane.
# Idempotent: already up and Available -> does nothing.
# Environment: PADDLER_K8S_DIR, KEDA_UP_TIMEOUT (seconds, 120), KEDA_LOG_LEVEL (info),
# KEDA_DNS (a cluster DNS address, e.g. 10.96.0.10 on the real node of cluster-up.sh:
# KEDA then runs in its own mount namespace whose /etc/resolv.conf asks that server
# with the cluster's search domains, so triggers may name Services as pods do, e.g.
# the operator's default http://p-management.NS.svc:8060; needs root), plus what
# keda-build.sh reads.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$HERE/lib.sh"
REPO="$(cd "$HERE/../.." && pwd)"
STATE="${PADDLER_K8S_DIR:-$REPO/.k8s}"
K8S_BIN="$(bash "$HERE/build.sh" --bin-dir)"
KUBECONFIG_FILE="$STATE/kubeconfig"
KSTATE="$STATE/keda"
TIMEOUT="${KEDA_UP_TIMEOUT:-120}"
LOG_LEVEL="${KEDA_LOG_LEVEL:-info}"
APISERVICE=v1beta1.external.metrics.k8s.io
NS=keda

log() { printf '[keda-up %s] %s\n' "$(date -u +%H:%M:%S)" "$*"; }
kctl() { "$K8S_BIN/kubectl" --kubeconfig "$KUBECONFIG_FILE" --request-timeout=10s "$@"; }

[[ -f "$KUBECONFIG_FILE" && "$(kctl get --raw /readyz 2>/dev/null)" == ok ]] \
  || { echo "keda-up.sh: no control plane answers at $KUBECONFIG_FILE (run scripts/k8s/up.sh first)" >&2; exit 1; }

bash "$HERE/keda-build.sh"
KEDA_DIR="$(bash "$HERE/keda-build.sh" --dir)"
KBIN="$KEDA_DIR/bin"

mkdir -p "$KSTATE"
exec 7>"$KSTATE/.lock"
flock -n 7 || { log "another keda-up.sh/keda-down.sh is running; waiting for it"; flock 7; }

alive() { pidfile_alive "$STATE/pids" "$1"; }
available() {
  [[ "$(kctl get apiservice "$APISERVICE" \
    -o jsonpath='{.spec.service.namespace}/{.status.conditions[?(@.type=="Available")].status}' 2>/dev/null)" == "$NS/True" ]]
}
if alive keda-operator && alive keda-adapter && available; then
  log "already up (APIService $APISERVICE Available)"
  exit 0
fi
if [[ -f "$STATE/pids/keda-operator.pid" || -f "$STATE/pids/keda-adapter.pid" ]]; then
  log "stale KEDA processes: stopping them first"
  KEDA_LOCKED=1 bash "$HERE/keda-down.sh"
fi
T0=$SECONDS

# --- certificates: one key pair for the gRPC mTLS (both ends) and the adapter's
# serving certificate, signed by the control plane's CA ---------------------------
PKI="$STATE/pki"
CERTS="$KSTATE/certs"
if [[ ! -f "$CERTS/tls.crt" || "$CERTS/ca.crt" -ot "$PKI/ca.crt" ]]; then
  mkdir -p "$CERTS"
  (
    cd "$CERTS"
    cp "$PKI/ca.crt" ca.crt
    openssl req -newkey rsa:2048 -nodes -keyout tls.key -out tls.csr -subj "/CN=keda" >/dev/null 2>&1
    cat >tls.ext <<EXT
subjectAltName=DNS:keda-metrics-apiserver.keda.svc,DNS:keda-operator.keda.svc,DNS:localhost,IP:127.0.0.1
extendedKeyUsage=serverAuth,clientAuth
keyUsage=digitalSignature,keyEncipherment
EXT
    openssl x509 -req -in tls.csr -CA "$PKI/ca.crt" -CAkey "$PKI/ca.key" -CAcreateserial \
      -CAserial "$CERTS/ca.srl" -days 3650 -extfile tls.ext -out tls.crt >/dev/null 2>&1
    chmod 600 tls.key
  )
fi

# --- CRDs and namespace ------------------------------------------------------------
kctl apply --server-side --force-conflicts -f "$KEDA_DIR/crds" >/dev/null
established() {
  kctl wait --for=condition=Established crd/scaledobjects.keda.sh crd/triggerauthentications.keda.sh \
    crd/clustertriggerauthentications.keda.sh crd/scaledjobs.keda.sh --timeout=5s >/dev/null 2>&1
}
for _ in $(seq 24); do established && break; sleep 0.5; done
established || { echo "keda-up.sh: KEDA's CRDs are not Established" >&2; exit 1; }
kctl get namespace "$NS" >/dev/null 2>&1 || kctl create namespace "$NS" >/dev/null

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'
}
HOST_IP="$(bash "$HERE/host-ip.sh")"
ADAPTER_PORT="$(python3 -c 'import socket,sys; s=socket.socket(); s.bind((sys.argv[1],0)); print(s.getsockname()[1]); s.close()' "$HOST_IP")"
GRPC_PORT="$(free_port)"; PROBE_PORT="$(free_port)"
OP_METRICS_PORT="$(free_port)"; AD_METRICS_PORT="$(free_port)"
cat >"$KSTATE/ports.env" <<ENV
KEDA_GRPC_ADDR=127.0.0.1:$GRPC_PORT
KEDA_ADAPTER_ADDR=$HOST_IP:$ADAPTER_PORT
KEDA_OPERATOR_PROBE=http://127.0.0.1:$PROBE_PORT
KEDA_OPERATOR_METRICS=http://127.0.0.1:$OP_METRICS_PORT/metrics
ENV

WRAP=()
if [[ -n "${KEDA_DNS:-}" ]]; then
  printf 'nameserver %s\nsearch %s.svc.cluster.local svc.cluster.local cluster.local\noptions ndots:5\n' \
    "$KEDA_DNS" "$NS" >"$KSTATE/resolv.conf"
  # unshare and sh exec in turn: the pid started below ends up being KEDA's own binary.
  WRAP=(unshare --mount --propagation private sh -c 'mount --bind "$0" /etc/resolv.conf && exec "$@"' "$KSTATE/resolv.conf")
fi
start() {
  local name="$1"; shift
  mkdir -p "$STATE/pids" "$STATE/logs"
  setsid env KUBECONFIG="$KUBECONFIG_FILE" WATCH_NAMESPACE="" POD_NAMESPACE="$NS" \
    KEDA_CLUSTER_OBJECT_NAMESPACE="$NS" "${WRAP[@]+"${WRAP[@]}"}" "$@" </dev/null >"$STATE/logs/$name.log" 2>&1 7>&- &
  echo $! >"$STATE/pids/$name.pid"
  local i; for i in $(seq 40); do alive "$name" && break; sleep 0.05; done  # the wrapper's execs
  log "started $name (pid $!)"
}
fail() {
  echo "keda-up: $1; last log lines:" >&2
  local f; for f in "$STATE"/logs/keda-*.log; do echo "== $f" >&2; tail -n 20 "$f" >&2; done
  KEDA_LOCKED=1 bash "$HERE/keda-down.sh" >&2 || true
  exit 1
}
DEADLINE=$((SECONDS + TIMEOUT))
wait_for() {
  local desc="$1"; shift
  until "$@" >/dev/null 2>&1; do
    alive keda-operator || fail "keda-operator exited while waiting for $desc"
    alive keda-adapter || [[ ! -f "$STATE/pids/keda-adapter.pid" ]] || fail "keda-adapter exited while waiting for $desc"
    (( SECONDS < DEADLINE )) || fail "timed out after ${TIMEOUT}s waiting for $desc"
    sleep 0.5
  done
}

start keda-operator "$KBIN/keda-operator" \
  --metrics-bind-address "127.0.0.1:$OP_METRICS_PORT" \
  --health-probe-bind-address "127.0.0.1:$PROBE_PORT" \
  --metrics-service-bind-address "127.0.0.1:$GRPC_PORT" \
  --enable-cert-rotation=false --cert-dir "$CERTS" --ca-dir "$CERTS" \
  --zap-log-level "$LOG_LEVEL" --zap-encoder console
probe_ready() { python3 -c 'import sys,urllib.request; urllib.request.urlopen(sys.argv[1], timeout=3)' "http://127.0.0.1:$PROBE_PORT/readyz"; }
wait_for "keda-operator /readyz" probe_ready

start keda-adapter "$KBIN/keda-adapter" \
  --secure-port "$ADAPTER_PORT" --bind-address "$HOST_IP" \
  --cert-dir "$CERTS" --tls-cert-file "$CERTS/tls.crt" --tls-private-key-file "$CERTS/tls.key" \
  --lister-kubeconfig "$KUBECONFIG_FILE" \
  --authentication-kubeconfig "$KUBECONFIG_FILE" --authorization-kubeconfig "$KUBECONFIG_FILE" \
  --metrics-service-address "127.0.0.1:$GRPC_PORT" \
  --port "$AD_METRICS_PORT" \
  --zap-log-level "$LOG_LEVEL" --zap-encoder console

# --- the APIService: the aggregator proxies external.metrics.k8s.io to the adapter
kctl apply -f - >/dev/null <<YAML
apiVersion: v1
kind: Service
metadata: {name: keda-metrics-apiserver, namespace: $NS}
spec:
  ports: [{name: https, port: 443, targetPort: $ADAPTER_PORT, protocol: TCP}]
---
apiVersion: v1
kind: Endpoints
metadata: {name: keda-metrics-apiserver, namespace: $NS}
subsets:
  - addresses: [{ip: "$HOST_IP"}]
    ports: [{name: https, port: $ADAPTER_PORT, protocol: TCP}]
---
apiVersion: apiregistration.k8s.io/v1
kind: APIService
metadata:
  name: $APISERVICE
  labels: {app.kubernetes.io/managed-by: paddler-keda-up}
spec:
  group: external.metrics.k8s.io
  version: v1beta1
  groupPriorityMinimum: 100
  versionPriority: 100
  service: {name: keda-metrics-apiserver, namespace: $NS, port: 443}
  caBundle: $(base64 -w0 "$CERTS/ca.crt")
YAML
wait_for "APIService $APISERVICE Available" available
log "KEDA up in $((SECONDS - T0))s: operator gRPC 127.0.0.1:$GRPC_PORT, metrics apiserver $HOST_IP:$ADAPTER_PORT"
