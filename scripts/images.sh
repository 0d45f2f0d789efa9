#!/usr/bin/env bash
# Build the project's container images with `docker build` (make images):
#   $BALANCER_IMAGE  Dockerfile.balancer: paddler balancer + operator
#   $AGENT_IMAGE     Dockerfile.agent: paddler agent + portable llama.cpp
#   $MODEL_IMAGE     Dockerfile.agent-model: the agent image plus the SmolLM2 GGUF
#                    at /models/SmolLM2-135M-Instruct.Q4_1.gguf
#   $LLAMA_SERVER_IMAGE        Dockerfile.llama-server: llama.cpp's llama-server (the
#                              container beside the agent of `engine: llamaServer`)
#   $LLAMA_SERVER_MODEL_IMAGE  Dockerfile.agent-model on top of it: + the same GGUF
# Defaults are the chart's and the operator's image defaults (nothing is
# published: `make images` is where they come from). No registry is needed:
# BASE_IMAGE defaults to a Debian bookworm base made here (mmdebstrap | docker
# import); set BASE_IMAGE=python:3.11-slim-bookworm (or any Debian/Ubuntu image
# with python3) where a registry is reachable. The agent's llama.cpp comes from
# a portable wheel cached under $PADDLER_CACHE (scripts/llama-wheel-portable.sh),
# so an image build is an install, not a compile. llama-server is the binary that
# scripts/install-llama-server.sh built and cached for the tests (the same flags:
# portable, AMX off), copied in: no second compile.
#
# Usage: images.sh [all|balancer|agent|model|llama-server]
set -euo pipefail
cd "$(dirname "$0")/.."
CACHE="${PADDLER_CACHE:-$HOME/.cache/paddler}"
VERSION="$(sed -n 's/^appVersion: *"\{0,1\}\([^"]*\)"\{0,1\}$/\1/p' charts/paddler/Chart.yaml)"
TAG="${IMAGE_TAG:-$VERSION}"
BALANCER_IMAGE="${BALANCER_IMAGE:-ghcr.io/paddler-k8s/balancer:$TAG}"
AGENT_IMAGE="${AGENT_IMAGE:-ghcr.io/paddler-k8s/agent:$TAG}"
MODEL_IMAGE="${MODEL_IMAGE:-ghcr.io/paddler-k8s/agent:$TAG-smollm2}"
LLAMA_SERVER_IMAGE="${LLAMA_SERVER_IMAGE:-ghcr.io/paddler-k8s/llama-server:$TAG}"
LLAMA_SERVER_MODEL_IMAGE="${LLAMA_SERVER_MODEL_IMAGE:-ghcr.io/paddler-k8s/llama-server:$TAG-smollm2}"
LOCAL_BASE="paddler-local/debian-python:bookworm"
BASE_PACKAGES="python3,python3-venv,libgomp1,libstdc++6,ca-certificates"
DOCKER="${DOCKER:-docker}"
export DOCKER_BUILDKIT="${DOCKER_BUILDKIT:-0}"  # works with any daemon, no frontend image to pull
log() { printf '[images %s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }
timed() { local t0=$SECONDS; "$@"; log "$1 ${2:-}: $((SECONDS - t0))s"; }

# A Debian bookworm root filesystem with python3 from Debian's mirror, imported
# as an image. Rebuilt only when missing (or the package list changes).
base_image() {
  local label
  label="$($DOCKER image inspect -f '{{index .Config.Labels "paddler.packages"}}' "$LOCAL_BASE" 2>/dev/null || true)"
  if [[ "$label" == "$BASE_PACKAGES" ]]; then log "base image $LOCAL_BASE present"; return 0; fi
  command -v mmdebstrap >/dev/null || {
    log "installing mmdebstrap"
    if [[ "$(id -u)" == 0 ]]; then S=(); else S=(sudo); fi
    "${S[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends mmdebstrap >&2
  }
  log "building $LOCAL_BASE with mmdebstrap (Debian bookworm minbase + $BASE_PACKAGES)"
  mmdebstrap --variant=minbase --include="$BASE_PACKAGES" \
    --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*.bin' \
    bookworm - http://deb.debian.org/debian \
    | $DOCKER import \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'ENV LANG=C.UTF-8' \
        --change "LABEL paddler.packages=$BASE_PACKAGES" \
        --change 'CMD ["bash"]' - "$LOCAL_BASE" >/dev/null
}

# The build context gets the cached wheel (agent), the host's CA bundle (for a
# TLS-inspecting proxy in front of PyPI; build stage only) and the model, under
# build/ (ignored by git).
stage_context() {
  mkdir -p build/image
  rm -f build/image/*.whl build/image/ca.crt build/image/llama-server
  local ca="${PADDLER_BUILD_CA_BUNDLE:-${PIP_CERT:-/etc/ssl/certs/ca-certificates.crt}}"
  [[ -s "$ca" ]] && cp "$ca" build/image/ca.crt
  return 0
}
stage_wheel() {
  local wheelhouse
  wheelhouse="$(scripts/llama-wheel-portable.sh)"
  cp "$wheelhouse"/llama_cpp_python-*.whl build/image/
}
stage_llama_server() {
  local bin
  bin="$(scripts/install-llama-server.sh)"
  cp "$bin" build/image/llama-server
}
stage_model() {
  local model
  model="$(scripts/fetch-model.sh)"
  mkdir -p build/models
  cmp -s "$model" build/models/SmolLM2-135M-Instruct.Q4_1.gguf || cp "$model" build/models/
}

build() {  # build IMAGE DOCKERFILE [docker build args...]
  local image="$1" file="$2"; shift 2
  log "docker build -f $file -t $image"
  $DOCKER build -q --network host -f "$file" -t "$image" "$@" . >/dev/null
}

WHAT="${1:-all}"
BASE="${BASE_IMAGE:-}"
if [[ -z "$BASE" ]]; then timed base_image; BASE="$LOCAL_BASE"; fi
stage_context
case "$WHAT" in all|balancer)
  timed build "$BALANCER_IMAGE" Dockerfile.balancer --build-arg "BASE_IMAGE=$BASE" ;;
esac
case "$WHAT" in all|agent)
  timed stage_wheel
  timed build "$AGENT_IMAGE" Dockerfile.agent --build-arg "BASE_IMAGE=$BASE" ;;
esac
case "$WHAT" in all|agent|model)
  timed stage_model
  timed build "$MODEL_IMAGE" Dockerfile.agent-model --build-arg "AGENT_IMAGE=$AGENT_IMAGE" ;;
esac
case "$WHAT" in all|llama-server)
  timed stage_llama_server
  timed build "$LLAMA_SERVER_IMAGE" Dockerfile.llama-server \
    --build-arg "BASE_IMAGE=$BASE"
  timed stage_model
  timed build "$LLAMA_SERVER_MODEL_IMAGE" Dockerfile.agent-model --build-arg "AGENT_IMAGE=$LLAMA_SERVER_IMAGE" ;;
esac
echo "images (tag $TAG, base $BASE):"
for image in "$BALANCER_IMAGE" "$AGENT_IMAGE" "$MODEL_IMAGE" "$LLAMA_SERVER_IMAGE" "$LLAMA_SERVER_MODEL_IMAGE"; do
  $DOCKER image inspect -f "  $image  {{.Id}}  {{.Size}} bytes" "$image" 2>/dev/null || true
done
