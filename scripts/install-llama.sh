#!/usr/bin/env bash
# Build llama-cpp-python from source once into our own wheelhouse, then install it into
# the project venv. Idempotent: a warm run takes seconds.
#
# Why a wheelhouse of our own: there is no binary wheel, the source build takes minutes,
# and the default build (-march=native) segfaults on these AMX CPUs with Debian's gcc 12
# in any llama_decode of 2+ tokens. We build with AMX disabled and key the cached wheel
# by version + flags, so changing a flag rebuilds. --no-cache-dir keeps pip's own wheel
# cache from handing back a wheel built with other flags.
#
# Env: PADDLER_CACHE (default ~/.cache/paddler), LLAMA_CPP_PYTHON_VERSION (default 0.3.16),
#      VENV (default .venv), PADDLER_LLAMA_EXTRA_CMAKE_ARGS (appended to CMAKE_ARGS).
set -euo pipefail
cd "$(dirname "$0")/.."

CACHE="${PADDLER_CACHE:-$HOME/.cache/paddler}"
VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.16}"
VENV="${VENV:-.venv}"
PIP="$VENV/bin/pip"
PY="$VENV/bin/python"

AMX_OFF="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
export CFLAGS="$AMX_OFF"
export CXXFLAGS="$AMX_OFF"
export CMAKE_ARGS="-DLLAVA_BUILD=OFF -DGGML_NATIVE=ON ${PADDLER_LLAMA_EXTRA_CMAKE_ARGS:-}"
export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}"

log() { echo "[install-llama] $*" >&2; }

if [[ ! -x "$PY" ]]; then
  log "no venv at $VENV; run 'make venv' first"
  exit 1
fi

# The key covers everything that changes the binary.
KEY_SRC="v=$VERSION|cflags=$CFLAGS|cxxflags=$CXXFLAGS|cmake=$CMAKE_ARGS|cc=$(gcc -dumpfullversion 2>/dev/null || echo none)|arch=$(uname -m)"
KEY="$(printf '%s' "$KEY_SRC" | sha256sum | cut -c1-16)"
WHEELHOUSE="$CACHE/wheels/llama-cpp-python-$VERSION-$KEY"
mkdir -p "$WHEELHOUSE"

installed_key() {
  "$PY" - <<'EOF' 2>/dev/null || true
import importlib.metadata as m, pathlib
try:
    d = m.distribution("llama_cpp_python")
except m.PackageNotFoundError:
    raise SystemExit
f = pathlib.Path(str(d.locate_file("llama_cpp/.paddler-build-key")))
print(f.read_text().strip() if f.exists() else "")
EOF
}

if [[ "$(installed_key)" == "$KEY" ]] && "$PY" -c "import numpy, huggingface_hub" 2>/dev/null; then
  log "llama-cpp-python $VERSION (build key $KEY) already installed"
  exit 0
fi

if ! ls "$WHEELHOUSE"/llama_cpp_python-*.whl >/dev/null 2>&1; then
  log "building llama-cpp-python $VERSION from source (several minutes on 2 cores)"
  log "  CMAKE_ARGS=$CMAKE_ARGS"
  log "  CFLAGS=$CFLAGS"
  TMP="$(mktemp -d)"
  trap 'rm -rf "$TMP"' EXIT
  "$PIP" wheel --no-cache-dir --no-deps --no-binary llama-cpp-python \
    -w "$TMP" "llama-cpp-python==$VERSION" 2>&1 | sed -u 's/^/[install-llama]   /' >&2
  mv "$TMP"/llama_cpp_python-*.whl "$WHEELHOUSE"/
  printf '%s\n' "$KEY_SRC" >"$WHEELHOUSE/BUILD_KEY.txt"
  log "cached wheel in $WHEELHOUSE"
else
  log "using cached wheel in $WHEELHOUSE"
fi

log "installing into $VENV"
"$PIP" install -q --no-index --find-links "$WHEELHOUSE" --force-reinstall --no-deps \
  "llama-cpp-python==$VERSION"
# Runtime dependencies of llama-cpp-python and of the agent (from PyPI, cached by pip).
"$PIP" install -q "typing-extensions>=4.5" "numpy>=1.20" "diskcache>=5.6.1" "jinja2>=2.11.3" \
  huggingface_hub
SITE="$("$PY" -c 'import importlib.metadata as m; print(m.distribution("llama_cpp_python").locate_file("llama_cpp"))')"
printf '%s\n' "$KEY" >"$SITE/.paddler-build-key"
"$PY" -c "import llama_cpp; print('[install-llama] llama_cpp', llama_cpp.__version__, 'ok')" >&2
