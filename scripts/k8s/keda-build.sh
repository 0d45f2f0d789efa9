#!/usr/bin/env bash
# Build (once) and cache KEDA's operator and metrics apiserver from the Go
# module proxy, and keep the CRDs of that same module version beside them:
#   ${PADDLER_CACHE:-$HOME/.cache/paddler}/keda/<version>/bin/keda-operator
#   ${PADDLER_CACHE:-$HOME/.cache/paddler}/keda/<version>/bin/keda-adapter
#   ${PADDLER_CACHE:-$HOME/.cache/paddler}/keda/<version>/crds/*.yaml
# KEDA's go.mod has replace/exclude directives, which `go install pkg@version`
# refuses: a small local module requires github.com/kedacore/keda/v2 and copies
# them (read from that version's own go.mod, not hard-coded), then builds the two
# cmd/ packages. Go module and build caches are the ones scripts/k8s/build.sh uses.
# A warm run finds both binaries and exits at once; concurrent runs take turns
# on a lock. The cold build compiles every KEDA scaler (all cloud SDKs): it is
# by far the largest Go build of the project (times land in build-times.txt).
#
# Environment: PADDLER_CACHE, KEDA_VERSION, GO, K8S_BUILD_P (parallel packages, 2).
# Usage: keda-build.sh            build what is missing
#        keda-build.sh --check    exit 0 if everything is cached, 1 otherwise
#        keda-build.sh --dir      print the cache directory (bin/, crds/)
set -euo pipefail
MODE="${1:-build}"

KEDA_VERSION="${KEDA_VERSION:-v2.21.0}"
BUILD_P="${K8S_BUILD_P:-2}"
CACHE="${PADDLER_CACHE:-$HOME/.cache/paddler}"
ROOT="$CACHE/keda/$KEDA_VERSION"
BIN="$ROOT/bin"
CRDS="$ROOT/crds"
WORK="$ROOT/work"

log() { printf '[keda-build %s] %s\n' "$(date -u +%H:%M:%S)" "$*"; }
complete() { [[ -x "$BIN/keda-operator" && -x "$BIN/keda-adapter" && -s "$CRDS/keda.sh_scaledobjects.yaml" ]]; }

case "$MODE" in
  --dir) echo "$ROOT"; exit 0 ;;
  --check) complete; exit $? ;;
  build) ;;
  *) echo "usage: keda-build.sh [--check|--dir]" >&2; exit 2 ;;
esac

mkdir -p "$BIN" "$CRDS" "$WORK"
exec 8>"$ROOT/.build.lock"
flock -n 8 || { log "another keda-build.sh is running; waiting for it"; flock 8; }
if complete; then
  log "KEDA $KEDA_VERSION cached in $ROOT"
  exit 0
fi

source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
go_env "$CACHE"
log "go: $("$GO" version); building KEDA $KEDA_VERSION into $BIN"
T0=$SECONDS

# --- the module: KEDA's own go line, replace and exclude directives ------------
SRC="$(cd "$WORK" && GOFLAGS= "$GO" mod download -json "github.com/kedacore/keda/v2@$KEDA_VERSION" \
  | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')"
[[ -f "$SRC/go.mod" ]] || { echo "keda-build.sh: cannot fetch github.com/kedacore/keda/v2@$KEDA_VERSION" >&2; exit 1; }
"$GO" mod edit -json "$SRC/go.mod" >"$WORK/upstream.json"
python3 - "$WORK/upstream.json" "$KEDA_VERSION" >"$WORK/go.mod" <<'PY'
import json, sys

mod = json.load(open(sys.argv[1]))
print("module paddler.local/kedabuild\n")
print(f"go {mod['Go']}\n")
print(f"require github.com/kedacore/keda/v2 {sys.argv[2]}\n")
for r in mod.get("Replace") or []:
    old, new = r["Old"], r["New"]
    if new["Path"].startswith((".", "/")):
        sys.exit(f"keda-build.sh: KEDA replaces {old['Path']} with a local path; cannot build it as a dependency")
    lhs = old["Path"] + (f" {old['Version']}" if old.get("Version") else "")
    print(f"replace {lhs} => {new['Path']} {new['Version']}")
for e in mod.get("Exclude") or []:
    print(f"exclude {e['Path']} {e['Version']}")
PY
cat >"$WORK/tools.go" <<'GO'
//go:build tools

package tools

import (
	_ "github.com/kedacore/keda/v2/cmd/adapter"
	_ "github.com/kedacore/keda/v2/cmd/operator"
)
GO
(cd "$WORK" && "$GO" mod tidy)
log "module ready after $((SECONDS - T0))s ($(grep -c '^replace ' "$WORK/go.mod") replace, $(grep -c '^exclude ' "$WORK/go.mod") exclude)"

# --- CRDs of the same version ------------------------------------------------------
for f in "$SRC"/config/crd/bases/*.yaml; do
  install -m 0644 "$f" "$CRDS/$(basename "$f")"
done

# --- binaries ---------------------------------------------------------------------
LDFLAGS="-s -w -X github.com/kedacore/keda/v2/version.Version=${KEDA_VERSION#v} -X github.com/kedacore/keda/v2/version.GitCommit=proxy"
build_cmd() {
  local name="$1" pkg="$2" t=$SECONDS
  [[ -x "$BIN/$name" ]] && return 0
  log "building $name ($pkg)"
  (cd "$WORK" && "$GO" build -p "$BUILD_P" -ldflags "$LDFLAGS" -o "$BIN/$name.tmp" "$pkg")
  mv "$BIN/$name.tmp" "$BIN/$name"
  log "built $name in $((SECONDS - t))s"
  printf '%s %s %ss %s\n' "$(date -u +%FT%TZ)" "$name" "$((SECONDS - t))" "$KEDA_VERSION" >>"$ROOT/build-times.txt"
}
build_cmd keda-operator github.com/kedacore/keda/v2/cmd/operator
build_cmd keda-adapter github.com/kedacore/keda/v2/cmd/adapter
printf '%s total %ss %s\n' "$(date -u +%FT%TZ)" "$((SECONDS - T0))" "$KEDA_VERSION" >>"$ROOT/build-times.txt"
log "done in $((SECONDS - T0))s: $(cd "$BIN" && ls | tr '\n' ' ')"
du -sh "$BIN" | sed 's/^/[keda-build] bin size: /'
