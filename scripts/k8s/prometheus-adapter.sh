#!/usr/bin/env bash
# prometheus-adapter (sigs.k8s.io/prometheus-adapter, from the Go module proxy) as a host
# process serving external.metrics.k8s.io for the local control plane (scripts/k8s/up.sh),
# from a Prometheus started by scripts/k8s/prometheus.sh. docs/scaling.md has the picture.
#
#   prometheus-adapter.sh build          build (once) and cache the binary:
#                                        ${PADDLER_CACHE:-~/.cache/paddler}/prometheus-adapter/<version>/adapter
#   prometheus-adapter.sh --check        exit 0 if the binary is cached
#   prometheus-adapter.sh up [DIR]       start it and register it as the APIService
#                                        v1beta1.external.metrics.k8s.io (idempotent); waits
#                                        until the API answers
#   prometheus-adapter.sh down [DIR]     remove the APIService (and its Service), stop it
#
# DIR defaults to ${PADDLER_K8S_DIR:-<repo>/.k8s}/metrics (the same as prometheus.sh). `up` reads the
# Prometheus URL from DIR/prometheus.url unless PROMETHEUS_URL is set. The rules are the
# chart's, charts/paddler/files/prometheus-adapter-rules.yaml (ADAPTER_CONFIG to change).
# The kube-apiserver reaches the adapter through a Service without selector whose
# Endpoints name this host's own address (scripts/k8s/host-ip.sh; Endpoints may not be
# loopback), with --enable-aggregator-routing (up.sh sets it and the front-proxy flags).
# One external-metrics adapter per control plane: `up` replaces whatever APIService of
# that name exists, `down` deletes it.
#
# Environment: KUBECONFIG (default ${PADDLER_K8S_DIR:-<repo>/.k8s}/kubeconfig), PROMETHEUS_URL, ADAPTER_CONFIG,
# ADAPTER_RELIST (series re-list interval, default 2s), ADAPTER_UP_TIMEOUT (seconds, 90),
# PROMETHEUS_ADAPTER_VERSION (v0.12.0), GO, PADDLER_CACHE.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
STATE="${PADDLER_K8S_DIR:-$REPO/.k8s}"
VERSION="${PROMETHEUS_ADAPTER_VERSION:-v0.12.0}"
CACHE="${PADDLER_CACHE:-$HOME/.cache/paddler}"
ROOT="$CACHE/prometheus-adapter/$VERSION"
ADAPTER="$ROOT/adapter"
K8S_VERSION="${K8S_VERSION:-v1.34.4}"
KUBECTL="$CACHE/k8s/$K8S_VERSION/bin/kubectl"
KUBECONFIG_FILE="${KUBECONFIG:-$STATE/kubeconfig}"
CONFIG="${ADAPTER_CONFIG:-$REPO/charts/paddler/files/prometheus-adapter-rules.yaml}"
RELIST="${ADAPTER_RELIST:-2s}"
TIMEOUT="${ADAPTER_UP_TIMEOUT:-90}"
SVC_NS=kube-system
SVC=paddler-prometheus-adapter
APISERVICE=v1beta1.external.metrics.k8s.io

log() { printf '[prometheus-adapter %s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }
die() { echo "prometheus-adapter.sh: $*" >&2; exit 1; }

build() {
  [[ -x "$ADAPTER" ]] && return 0
  mkdir -p "$ROOT"
  exec 8>"$ROOT/.build.lock"
  flock 8
  [[ -x "$ADAPTER" ]] && return 0
  # The same toolchain, module and build caches as scripts/k8s/build.sh.
  source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
  go_env "$CACHE" || die "no Go toolchain"
  local t0=$SECONDS d="$ROOT/work"
  log "building sigs.k8s.io/prometheus-adapter $VERSION with $("$GO" version)"
  # A throwaway module that requires it (`go install pkg@version` would ask the proxy for
  # the module's version list, which it does not serve for this module).
  rm -rf "$d"; mkdir -p "$d"
  cat >"$d/go.mod" <<MOD
module paddler.local/prometheusadapterbuild

go 1.22.1

require sigs.k8s.io/prometheus-adapter $VERSION
MOD
  cat >"$d/tools.go" <<'SRC'
//go:build tools

package tools

import _ "sigs.k8s.io/prometheus-adapter/cmd/adapter"
SRC
  (cd "$d" && GOFLAGS="-trimpath -mod=mod" "$GO" mod tidy >/dev/null \
    && GOFLAGS="-trimpath -mod=mod" nice -n 10 "$GO" build -p "${K8S_BUILD_P:-2}" -ldflags "-s -w" \
      -o "$ADAPTER.tmp" sigs.k8s.io/prometheus-adapter/cmd/adapter \
    && mv "$ADAPTER.tmp" "$ADAPTER")
  rm -rf "$d"
  local dt=$((SECONDS - t0))
  printf '%s prometheus-adapter %ss %s\n' "$(date -u +%FT%TZ)" "$dt" "$VERSION" >>"$ROOT/build-times.txt"
  log "built in ${dt}s: $ADAPTER"
}

kctl() { "$KUBECTL" --kubeconfig "$KUBECONFIG_FILE" --request-timeout=10s "$@"; }

alive() {
  local f="$1/pids/prometheus-adapter.pid" pid
  [[ -f "$f" ]] || return 1
  pid="$(cat "$f")"
  [[ "$pid" =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null || return 1
  [[ "$(basename "$(readlink "/proc/$pid/exe" 2>/dev/null || echo adapter)")" == adapter ]]
}

# The APIService is Available and the API answers through the kube-apiserver. (Its list
# of metrics fills only once Prometheus has scraped a balancer with a namespace label.)
api_ready() {
  [[ "$(kctl get apiservice "$APISERVICE" \
    -o jsonpath='{.status.conditions[?(@.type=="Available")].status}' 2>/dev/null)" == True ]] || return 1
  kctl get --raw /apis/external.metrics.k8s.io/v1beta1 >/dev/null 2>&1
}

up() {
  local dir="$1"
  build
  [[ -f "$KUBECONFIG_FILE" ]] || die "no kubeconfig at $KUBECONFIG_FILE (make k8s-up first)"
  [[ -f "$CONFIG" ]] || die "no adapter config at $CONFIG"
  local prom="${PROMETHEUS_URL:-}"
  [[ -n "$prom" ]] || prom="$(cat "$dir/prometheus.url" 2>/dev/null)" \
    || die "no Prometheus: run scripts/k8s/prometheus.sh up $dir first (or set PROMETHEUS_URL)"
  mkdir -p "$dir"/{pids,logs}
  if alive "$dir" && [[ "$(cat "$dir/prometheus-adapter.args" 2>/dev/null)" == "$prom $CONFIG" ]] && api_ready; then
    log "already up"; return 0
  fi
  down "$dir"
  mkdir -p "$dir"/{pids,logs}
  local ip port
  ip="$(bash "$HERE/host-ip.sh")"
  port="$(python3 -c 'import socket,sys; s=socket.socket(); s.bind((sys.argv[1],0)); print(s.getsockname()[1]); s.close()' "$ip")"
  setsid "$ADAPTER" \
    --secure-port "$port" --bind-address "$ip" --cert-dir "$dir/adapter-certs" \
    --lister-kubeconfig "$KUBECONFIG_FILE" \
    --authentication-kubeconfig "$KUBECONFIG_FILE" --authorization-kubeconfig "$KUBECONFIG_FILE" \
    --prometheus-url "$prom" --config "$CONFIG" \
    --metrics-relist-interval "$RELIST" --metrics-max-age 10m --v 1 \
    </dev/null >"$dir/logs/prometheus-adapter.log" 2>&1 &
  echo $! >"$dir/pids/prometheus-adapter.pid"
  echo "$prom $CONFIG" >"$dir/prometheus-adapter.args"
  kctl apply -f - 2> >(grep -v "v1 Endpoints is deprecated" >&2) >/dev/null <<YML
apiVersion: v1
kind: Service
metadata: {name: $SVC, namespace: $SVC_NS, labels: {app.kubernetes.io/name: paddler-prometheus-adapter}}
spec:
  ports: [{name: https, port: 443, targetPort: $port, protocol: TCP}]
---
apiVersion: v1
kind: Endpoints
metadata: {name: $SVC, namespace: $SVC_NS, labels: {app.kubernetes.io/name: paddler-prometheus-adapter}}
subsets:
  - addresses: [{ip: "$ip"}]
    ports: [{name: https, port: $port, protocol: TCP}]
---
apiVersion: apiregistration.k8s.io/v1
kind: APIService
metadata: {name: $APISERVICE, labels: {app.kubernetes.io/name: paddler-prometheus-adapter}}
spec:
  group: external.metrics.k8s.io
  version: v1beta1
  service: {name: $SVC, namespace: $SVC_NS, port: 443}
  insecureSkipTLSVerify: true
  groupPriorityMinimum: 100
  versionPriority: 100
YML
  local deadline=$((SECONDS + TIMEOUT))
  until api_ready; do
    alive "$dir" || { tail -n 30 "$dir/logs/prometheus-adapter.log" >&2; down "$dir"; die "the adapter exited"; }
    if (( SECONDS >= deadline )); then
      tail -n 30 "$dir/logs/prometheus-adapter.log" >&2
      kctl get apiservice "$APISERVICE" -o yaml >&2 || true
      down "$dir"; die "external.metrics.k8s.io not served after ${TIMEOUT}s"
    fi
    sleep 0.5
  done
  log "up: $ip:$port (pid $(cat "$dir/pids/prometheus-adapter.pid")) serves $APISERVICE from $prom"
}

down() {
  local dir="$1" pid
  if [[ -f "$KUBECONFIG_FILE" ]] && kctl get --raw /readyz >/dev/null 2>&1; then
    kctl delete apiservice "$APISERVICE" --ignore-not-found --wait=false >/dev/null 2>&1 || true
    kctl -n "$SVC_NS" delete service,endpoints "$SVC" --ignore-not-found --wait=false >/dev/null 2>&1 || true
  fi
  if alive "$dir"; then
    pid="$(cat "$dir/pids/prometheus-adapter.pid")"
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 200); do kill -0 "$pid" 2>/dev/null || break; sleep 0.05; done
    kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null || true
    log "stopped (pid $pid)"
  fi
  rm -f "$dir/pids/prometheus-adapter.pid" "$dir/prometheus-adapter.args"
}

cmd="${1:-}"; shift || true
case "$cmd" in
  build) build ;;
  --check) [[ -x "$ADAPTER" ]] ;;
  up) up "${1:-$STATE/metrics}" ;;
  down) down "${1:-$STATE/metrics}" ;;
  *) echo "usage: prometheus-adapter.sh build | --check | up [DIR] | down [DIR]" >&2; exit 2 ;;
esac
