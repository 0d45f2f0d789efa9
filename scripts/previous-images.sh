#!/usr/bin/env bash
# The images of the previous release, for the cluster tier's `helm upgrade` test:
# the project's tree at PREVIOUS_RELEASE_COMMIT (chart 0.1.0, appVersion 0.1.0: main
# as it landed before chart 0.2.0), exported with `git archive` into
# build/previous-release/ and built by its own scripts/images.sh, so the operator,
# balancer and agent pods that the upgrade replaces run that release's code.
# Tags: ghcr.io/paddler-k8s/{balancer,agent}:0.1.0 (+ agent:0.1.0-smollm2, which
# its images.sh builds with the agent). Same caches as `make images` (base image,
# llama wheel, model): the two trees' build scripts and Dockerfiles are identical,
# so this is two image installs, not a compile.
#
# Prints the chart folder of that release (build/previous-release/charts/paddler).
# Needs the git history (a clone, not a source tarball).
set -euo pipefail
cd "$(dirname "$0")/.."
COMMIT="${PREVIOUS_RELEASE_COMMIT:-4be76f480ce96d44e2c2a1bf62075272fc411813}"
OUT="build/previous-release"
log() { printf '[previous-images %s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }

git cat-file -e "$COMMIT^{commit}" 2>/dev/null || {
  echo "previous-images: commit $COMMIT is not in this clone's history (a shallow clone?): git fetch --unshallow" >&2
  exit 1
}
if [[ "$(cat "$OUT/.commit" 2>/dev/null || true)" != "$COMMIT" ]]; then
  log "exporting $COMMIT into $OUT"
  rm -rf "$OUT"
  mkdir -p "$OUT"
  git archive "$COMMIT" | tar -x -C "$OUT"
  echo "$COMMIT" >"$OUT/.commit"
fi
grep -q '^appVersion: "0.1.0"' "$OUT/charts/paddler/Chart.yaml" || {
  echo "previous-images: $COMMIT's chart is not appVersion 0.1.0" >&2
  exit 1
}
bash "$OUT/scripts/images.sh" balancer >&2
bash "$OUT/scripts/images.sh" agent >&2
echo "$PWD/$OUT/charts/paddler"
