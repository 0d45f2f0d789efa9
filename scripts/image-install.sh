#!/usr/bin/env bash
# Install steps of the container images (Dockerfile.balancer, Dockerfile.agent,
# Dockerfile.llama-server).
# The Dockerfiles only call this script, and CI runs it too (the balancer
# variant, into a temporary prefix: tests/unit/test_operator_image.py), so the
# install steps are tested even where Docker cannot run.
#
# Usage:
#   image-install.sh system-deps venv|build|runtime|runtime-light|llama-server
#                                                apt packages that the base lacks (python3 + venv,
#                                                compilers, libgomp; llama-server: its shared
#                                                libraries, no Python); none when all are there
#   image-install.sh user UID                    a system user and group UID named paddler
#   image-install.sh llama-wheel DIR             build a portable llama-cpp-python wheel into DIR
#   image-install.sh balancer PREFIX             venv at PREFIX with paddler[operator] (balancer + operator)
#   image-install.sh agent PREFIX                venv at PREFIX with paddler[agent], llama from $PADDLER_WHEELHOUSE
#
# Env: PADDLER_SRC (project source, default: this repository), PADDLER_WHEELHOUSE
# (agent: folder with the llama_cpp_python wheel), GGML_CUDA (ON|OFF, llama-wheel),
# LLAMA_CPP_PYTHON_VERSION (default 0.3.16), PADDLER_PIP_CACHE=1 (use pip's cache;
# images leave it off to stay small), PYTHON (default python3).
set -euo pipefail

MODE="${1:?usage: image-install.sh system-deps|user|llama-wheel|balancer|agent ARG}"
ARG="${2:?missing argument (prefix, directory or build|runtime)}"
SRC="${PADDLER_SRC:-$(cd "$(dirname "$0")/.." && pwd)}"
PYTHON="${PYTHON:-python3}"
LLAMA_VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.16}"
PIP_CACHE=(--no-cache-dir)
[[ "${PADDLER_PIP_CACHE:-0}" == 1 ]] && PIP_CACHE=()

log() { echo "[image-install $MODE] $*" >&2; }
# The Dockerfiles point PIP_CERT at an optional CA bundle of the build host.
if [[ -n "${PIP_CERT:-}" && ! -s "$PIP_CERT" ]]; then unset PIP_CERT; fi

# Installs only the packages the base image lacks: a base that has them all (the
# Debian one `make images` builds here) needs no mirror at all.
apt_install() {
  local missing=() p
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
  done
  [[ ${#missing[@]} -gt 0 ]] || { log "all of $* present"; return 0; }
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q --no-install-recommends "${missing[@]}"
  rm -rf /var/lib/apt/lists/*
}

make_venv() {
  local prefix="$1"
  "$PYTHON" -m venv "$prefix"
  "$prefix/bin/pip" install -q "${PIP_CACHE[@]}" --upgrade pip
}

# Small and read-only-root friendly: bytecode compiled now, no pip left behind.
finish_venv() {
  local prefix="$1"
  "$prefix/bin/python" -m compileall -q -j 0 "$prefix/lib" >/dev/null || true
  "$prefix/bin/pip" uninstall -q -y pip >/dev/null
  find "$prefix" -name '*.pyi' -delete
  log "installed into $prefix ($(du -sh "$prefix" | cut -f1))"
}

case "$MODE" in
  system-deps)
    has_python() { command -v "$PYTHON" >/dev/null && "$PYTHON" -c 'import sys; assert sys.version_info >= (3, 11)' 2>/dev/null; }
    pkgs=()
    case "$ARG" in
      venv|build)
        has_python || pkgs+=(python3 python3-dev)
        "$PYTHON" -c "import venv, ensurepip" 2>/dev/null || pkgs+=(python3-venv)
        [[ "$ARG" == build ]] && pkgs+=(build-essential cmake git ca-certificates)
        ;;
      runtime|runtime-light)
        has_python || pkgs+=(python3)
        [[ "$ARG" == runtime ]] && pkgs+=(libgomp1 libstdc++6)
        pkgs+=(ca-certificates)
        ;;
      llama-server) pkgs+=(libgomp1 libstdc++6 libssl3 ca-certificates) ;;
      *) echo "system-deps: venv, build, runtime, runtime-light or llama-server" >&2; exit 2 ;;
    esac
    [[ ${#pkgs[@]} -eq 0 ]] || apt_install "${pkgs[@]}"
    ;;

  user)
    # Written directly (no useradd: minimal bases may lack the passwd package).
    grep -q "^paddler:" /etc/group || echo "paddler:x:$ARG:" >>/etc/group
    grep -q "^paddler:" /etc/passwd || echo "paddler:x:$ARG:$ARG:paddler:/tmp:/usr/sbin/nologin" >>/etc/passwd
    ;;

  llama-wheel)
    # Portable: no -march=native (GGML_NATIVE=OFF); AMX off (gcc 12 miscompiles ggml's
    # AMX tile set-up). LLAVA_BUILD=ON builds libmtmd (multimodal projectors, images).
    # GGML_CUDA=ON for the CUDA variant. The host venv installs this same wheel
    # (scripts/install-llama.sh): one llama.cpp compile for host and image.
    mkdir -p "$ARG"
    export CFLAGS="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
    export CXXFLAGS="$CFLAGS"
    export CMAKE_ARGS="-DGGML_NATIVE=OFF -DLLAVA_BUILD=ON -DGGML_CUDA=${GGML_CUDA:-OFF}"
    export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}"
    TMPV="$(mktemp -d)"
    trap 'rm -rf "$TMPV"' EXIT
    "$PYTHON" -m venv "$TMPV/venv"
    log "building llama-cpp-python $LLAMA_VERSION (CMAKE_ARGS=$CMAKE_ARGS)"
    "$TMPV/venv/bin/pip" wheel -q --no-cache-dir --no-deps --no-binary llama-cpp-python \
      -w "$ARG" "llama-cpp-python==$LLAMA_VERSION"
    ls "$ARG"/llama_cpp_python-*.whl >&2
    ;;

  balancer)
    make_venv "$ARG"
    "$ARG/bin/pip" install -q "${PIP_CACHE[@]}" "$SRC[operator]"
    "$ARG/bin/paddler" balancer --help >/dev/null
    "$ARG/bin/paddler" operator --help >/dev/null
    "$ARG/bin/python" -c "import kopf, paddler_operator.handlers"
    finish_venv "$ARG"
    ;;

  agent)
    WHEELHOUSE="${PADDLER_WHEELHOUSE:?set PADDLER_WHEELHOUSE to a folder with the llama_cpp_python wheel}"
    make_venv "$ARG"
    # --only-binary: never fall back to a (non-portable) source build of llama-cpp-python.
    "$ARG/bin/pip" install -q "${PIP_CACHE[@]}" --find-links "$WHEELHOUSE" --only-binary llama-cpp-python \
      "$SRC[agent]"
    "$ARG/bin/paddler" agent --help >/dev/null
    "$ARG/bin/python" -c "import llama_cpp, paddler_agent.runtime"
    finish_venv "$ARG"
    ;;

  *)
    echo "unknown mode $MODE (system-deps, user, llama-wheel, balancer, agent)" >&2
    exit 2
    ;;
esac
