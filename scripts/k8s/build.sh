#!/usr/bin/env bash
# Build (once) and cache the binaries of a real local Kubernetes control plane:
# kube-apiserver, kube-controller-manager, kube-scheduler, kubectl, etcd, kwok
# and helm, plus those of a real node (kubelet, kube-proxy, CoreDNS for cluster
# DNS; see node-up.sh), all from source through the Go module proxy (no image
# registry is reachable here). Everything lands under
#   ${PADDLER_CACHE:-$HOME/.cache/paddler}/k8s/<k8s-version>/bin/
# and every binary that already exists is skipped, so a warm run is instant.
# The Go module and build caches also live under the paddler cache, so a
# rebuild after deleting one binary only recompiles what changed.
#
# Environment overrides: PADDLER_CACHE, K8S_VERSION, ETCD_VERSION,
# KWOK_VERSION, HELM_VERSION, COREDNS_VERSION, GO (path to the go binary), K8S_BUILD_P
# (parallel packages, default 2), K8S_SKIP_KWOK=1, K8S_SKIP_HELM=1, K8S_SKIP_NODE=1.
#
# Usage: build.sh            build what is missing
#        build.sh --check    exit 0 if everything is cached, 1 otherwise
#        build.sh --bin-dir  print the cache bin directory
set -euo pipefail
MODE="${1:-build}"

K8S_VERSION="${K8S_VERSION:-v1.34.4}"
ETCD_VERSION="${ETCD_VERSION:-v3.5.35}"
KWOK_VERSION="${KWOK_VERSION:-v0.8.0}"
HELM_VERSION="${HELM_VERSION:-v3.22.0}"
COREDNS_VERSION="${COREDNS_VERSION:-v1.12.4}"
BUILD_P="${K8S_BUILD_P:-2}"

CACHE="${PADDLER_CACHE:-$HOME/.cache/paddler}"
ROOT="$CACHE/k8s/$K8S_VERSION"
BIN="$ROOT/bin"
WORK="$ROOT/work"
mkdir -p "$BIN" "$WORK"

log() { printf '[k8s-build %s] %s\n' "$(date -u +%H:%M:%S)" "$*"; }

# --- Go toolchain and caches ------------------------------------------------
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
go_env "$CACHE"

have() { [[ -x "$BIN/$1" ]]; }
# Time one step and remember it in $ROOT/build-times.txt (for reports).
timed() {
  local name="$1"; shift
  local t0=$SECONDS
  "$@"
  local dt=$((SECONDS - t0))
  log "built $name in ${dt}s"
  printf '%s %s %ss %s\n' "$(date -u +%FT%TZ)" "$name" "$dt" "$K8S_VERSION" >>"$ROOT/build-times.txt"
}

wanted=(etcd kube-apiserver kube-controller-manager kube-scheduler kubectl)
[[ "${K8S_SKIP_KWOK:-0}" == 1 ]] || wanted+=(kwok)
[[ "${K8S_SKIP_HELM:-0}" == 1 ]] || wanted+=(helm)
[[ "${K8S_SKIP_NODE:-0}" == 1 ]] || wanted+=(kubelet kube-proxy coredns)
# One build at a time (concurrent test sessions call this through up.sh).
if [[ "$MODE" == build ]]; then
  exec 8>"$ROOT/.build.lock"
  flock -n 8 || { log "another build.sh is running; waiting for it"; flock 8; }
fi
missing=()
for b in "${wanted[@]}"; do have "$b" || missing+=("$b"); done
if [[ "${K8S_SKIP_KWOK:-0}" != 1 && ! -s "$ROOT/kwok-stages.yaml" ]]; then
  missing+=(kwok-stages.yaml)
fi
case "$MODE" in
  --bin-dir) echo "$BIN"; exit 0 ;;
  --check) [[ ${#missing[@]} -eq 0 ]]; exit $? ;;
  build) ;;
  *) echo "usage: build.sh [--check|--bin-dir]" >&2; exit 2 ;;
esac
if [[ ${#missing[@]} -eq 0 ]]; then
  log "all binaries cached in $BIN"
  exit 0
fi
log "go: $("$GO" version); cache: $CACHE; missing: ${missing[*]}"

# --- etcd -------------------------------------------------------------------
build_etcd() {
  local d="$WORK/etcd-$ETCD_VERSION"
  mkdir -p "$d"
  cat >"$d/go.mod" <<MOD
module paddler.local/etcdbuild

go 1.24.0

require go.etcd.io/etcd/server/v3 $ETCD_VERSION
MOD
  cat >"$d/tools.go" <<'SRC'
//go:build tools

package tools

import _ "go.etcd.io/etcd/server/v3"
SRC
  (cd "$d" && "$GO" mod tidy >/dev/null \
    && "$GO" build -p "$BUILD_P" -ldflags "-s -w" -o "$BIN/etcd.tmp" go.etcd.io/etcd/server/v3 \
    && mv "$BIN/etcd.tmp" "$BIN/etcd")
}
have etcd || { log "building etcd $ETCD_VERSION"; timed etcd build_etcd; }

# --- Kubernetes ---------------------------------------------------------------
K8S_DIR="$WORK/kubernetes"
prepare_k8s_module() {
  [[ -f "$K8S_DIR/.ready" ]] && return 0
  mkdir -p "$K8S_DIR"
  local staging_ver="v0.${K8S_VERSION#v1.}"
  log "resolving k8s.io/kubernetes $K8S_VERSION (staging modules at $staging_ver)"
  # The staging modules are the ones the tag's own go.mod replaces with
  # ./staging/src/k8s.io/<m>; read that list instead of hard-coding it.
  local upstream
  upstream="$(cd "$K8S_DIR" && "$GO" mod download -json "k8s.io/kubernetes@$K8S_VERSION" \
    | sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",$/\1/p')"
  [[ -f "$upstream" ]] || { echo "build.sh: cannot fetch go.mod of k8s.io/kubernetes@$K8S_VERSION" >&2; return 1; }
  {
    echo "module paddler.local/k8sbuild"
    echo
    sed -n 's/^go \(.*\)$/go \1/p' "$upstream" | head -1
    grep -E '^godebug ' "$upstream" || true
    echo
    echo "require k8s.io/kubernetes $K8S_VERSION"
    echo
    echo "replace ("
    grep -E '^[[:space:]]*k8s\.io/[^ ]+ => \./staging/src/k8s\.io/' "$upstream" \
      | awk -v v="$staging_ver" '{print "\t" $1 " => " $1 " " v}'
    echo ")"
  } >"$K8S_DIR/go.mod"
  log "$(grep -c ' => k8s.io/' "$K8S_DIR/go.mod") staging modules replaced"
  cat >"$K8S_DIR/tools.go" <<'SRC'
//go:build tools

package tools

import (
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
	_ "k8s.io/kubernetes/cmd/kube-scheduler"
	_ "k8s.io/kubernetes/cmd/kubectl"
	_ "k8s.io/kubernetes/cmd/kubelet"
	_ "k8s.io/kubernetes/cmd/kube-proxy"
)
SRC
  (cd "$K8S_DIR" && "$GO" mod tidy)
  touch "$K8S_DIR/.ready"
}

k8s_ldflags() {
  local minor="${K8S_VERSION#v1.}"; minor="${minor%%.*}"
  local date; date="$(date -u +%Y-%m-%dT%H:%M:%SZ)"
  local f="-s -w"
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    f+=" -X $pkg.gitVersion=$K8S_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
    f+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=$date"
  done
  echo "$f"
}

build_k8s_cmd() {
  local name="$1"
  (cd "$K8S_DIR" && "$GO" build -p "$BUILD_P" -ldflags "$(k8s_ldflags)" \
    -o "$BIN/$name.tmp" "k8s.io/kubernetes/cmd/$name" && mv "$BIN/$name.tmp" "$BIN/$name")
}

node_cmds=(kubelet kube-proxy)
[[ "${K8S_SKIP_NODE:-0}" == 1 ]] && node_cmds=()
for name in kube-apiserver kube-controller-manager kube-scheduler kubectl "${node_cmds[@]+"${node_cmds[@]}"}"; do
  have "$name" && continue
  prepare_k8s_module
  log "building $name $K8S_VERSION"
  timed "$name" build_k8s_cmd "$name"
done

# --- kwok and helm (their own go.mod, no replace directives: go install works)
go_install() {
  local name="$1" pkg="$2" ldflags="${3:-}"
  local tmpbin="$WORK/gobin-$name"
  rm -rf "$tmpbin"; mkdir -p "$tmpbin"
  GOFLAGS=-trimpath GOBIN="$tmpbin" "$GO" install -p "$BUILD_P" -ldflags "-s -w $ldflags" "$pkg"
  mv "$tmpbin/$name" "$BIN/$name"
  rm -rf "$tmpbin"
}
# The kwok binary has no built-in stages (kwokctl adds them): keep the
# upstream default ones next to it. The node heartbeat is made frequent
# (5-6 s instead of 20-45 s) so the node lifecycle controller of
# kube-controller-manager never sees a stale fake node.
kwok_stages() {
  local src="$GOMODCACHE/sigs.k8s.io/kwok@$KWOK_VERSION/kustomize/stage"
  local out="$ROOT/kwok-stages.yaml" f
  [[ -d "$src" ]] || (cd "$WORK" && GOFLAGS= "$GO" mod download "sigs.k8s.io/kwok@$KWOK_VERSION")
  {
    for f in node/fast/node-initialize.yaml node/heartbeat/node-heartbeat.yaml \
             pod/fast/pod-ready.yaml pod/fast/pod-complete.yaml pod/fast/pod-delete.yaml; do
      echo "---"
      sed -e 's/durationMilliseconds: 20000/durationMilliseconds: 5000/' \
          -e 's/jitterDurationMilliseconds: 25000/jitterDurationMilliseconds: 6000/' "$src/$f"
    done
  } >"$out.tmp"
  mv "$out.tmp" "$out"
}
if [[ "${K8S_SKIP_KWOK:-0}" != 1 ]]; then
  if ! have kwok; then
    log "building kwok $KWOK_VERSION"
    timed kwok go_install kwok "sigs.k8s.io/kwok/cmd/kwok@$KWOK_VERSION" \
      "-X sigs.k8s.io/kwok/pkg/consts.Version=$KWOK_VERSION"
  fi
  [[ -s "$ROOT/kwok-stages.yaml" ]] || kwok_stages
fi
if [[ "${K8S_SKIP_HELM:-0}" != 1 ]] && ! have helm; then
  log "building helm $HELM_VERSION"
  timed helm go_install helm "helm.sh/helm/v3/cmd/helm@$HELM_VERSION" \
    "-X helm.sh/helm/v3/internal/version.version=$HELM_VERSION"
fi

# CoreDNS with only the plugins the node's Corefile uses (node-up.sh): the full
# build compiles every cloud SDK of its plugin list and takes several times longer.
build_coredns() {
  local d="$WORK/coredns-$COREDNS_VERSION"
  mkdir -p "$d"
  cat >"$d/go.mod" <<MOD
module paddler.local/corednsbuild

go 1.24.0

require github.com/coredns/coredns $COREDNS_VERSION
MOD
  cat >"$d/main.go" <<'SRC'
// CoreDNS for the local node: cluster DNS (kubernetes plugin) and nothing else.
package main

import (
	_ "github.com/coredns/coredns/core/dnsserver" // the server type; plugins run in its default order
	"github.com/coredns/coredns/coremain"

	_ "github.com/coredns/coredns/plugin/cache"
	_ "github.com/coredns/coredns/plugin/errors"
	_ "github.com/coredns/coredns/plugin/health"
	_ "github.com/coredns/coredns/plugin/kubernetes"
	_ "github.com/coredns/coredns/plugin/loadbalance"
	_ "github.com/coredns/coredns/plugin/log"
	_ "github.com/coredns/coredns/plugin/ready"
)

func main() { coremain.Run() }
SRC
  (cd "$d" && "$GO" mod tidy >/dev/null \
    && "$GO" build -p "$BUILD_P" -ldflags "-s -w" -o "$BIN/coredns.tmp" . \
    && mv "$BIN/coredns.tmp" "$BIN/coredns")
}
if [[ "${K8S_SKIP_NODE:-0}" != 1 ]] && ! have coredns; then
  log "building coredns $COREDNS_VERSION (cluster DNS plugins only)"
  timed coredns build_coredns
fi

log "done: $(cd "$BIN" && ls | tr '\n' ' ')"
du -sh "$BIN" | sed 's/^/[k8s-build] bin size: /'
