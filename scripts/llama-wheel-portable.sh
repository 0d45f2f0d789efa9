#!/usr/bin/env bash
# Build (once) and cache a portable llama-cpp-python wheel for the agent image:
# GGML_NATIVE=OFF (AVX2/FMA/F16C baseline, no -march=native, AMX off), built by
# scripts/image-install.sh llama-wheel with the host's python3 (Debian bookworm's
# CPython 3.11, the same ABI as the image's python3). Prints the wheelhouse folder.
# Cached under $PADDLER_CACHE/wheels/llama-cpp-python-<v>-portable-<key>/, keyed by
# version + flags + compiler + python tag, so a warm run is instant.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
CACHE="${PADDLER_CACHE:-$HOME/.cache/paddler}"
VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.16}"
PYTHON="${PYTHON:-python3}"
log() { echo "[llama-wheel-portable] $*" >&2; }

# Must match what image-install.sh llama-wheel uses (the key says which flags built it).
FLAGS="$(sed -n 's/^ *export \(CFLAGS\|CMAKE_ARGS\)=\(.*\)$/\1=\2/p' "$HERE/image-install.sh" | tr '\n' '|')"
PYTAG="$("$PYTHON" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')"
KEY_SRC="v=$VERSION|$FLAGS|cuda=${GGML_CUDA:-OFF}|cc=$(gcc -dumpfullversion 2>/dev/null || echo none)|py=$PYTAG|arch=$(uname -m)"
KEY="$(printf '%s' "$KEY_SRC" | sha256sum | cut -c1-16)"
WHEELHOUSE="$CACHE/wheels/llama-cpp-python-$VERSION-portable-$KEY"
mkdir -p "$WHEELHOUSE"
exec 7>"$WHEELHOUSE/.lock"
flock -n 7 || { log "another build of this wheel is running; waiting for it"; flock 7; }
if ! ls "$WHEELHOUSE"/llama_cpp_python-*.whl >/dev/null 2>&1; then
  log "building portable llama-cpp-python $VERSION (a compile: ~12 min on 2 cores)"
  TMP="$(mktemp -d)"
  trap 'rm -rf "$TMP"' EXIT
  t0=$SECONDS
  # A copy: bash reads a script as it runs, and this one runs for minutes.
  cp "$HERE/image-install.sh" "$TMP/image-install.sh"
  LLAMA_CPP_PYTHON_VERSION="$VERSION" PYTHON="$PYTHON" bash "$TMP/image-install.sh" llama-wheel "$TMP/out" >&2
  mv "$TMP"/out/llama_cpp_python-*.whl "$TMP"/
  mv "$TMP"/llama_cpp_python-*.whl "$WHEELHOUSE"/
  printf '%s\n' "$KEY_SRC" >"$WHEELHOUSE/BUILD_KEY.txt"
  log "built in $((SECONDS - t0))s: $WHEELHOUSE"
fi
echo "$WHEELHOUSE"
