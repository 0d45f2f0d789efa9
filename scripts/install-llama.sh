#!/usr/bin/env bash
# Install llama-cpp-python into the project venv from the one portable wheel that the
# agent image installs too (scripts/llama-wheel-portable.sh builds it once and caches
# it). Idempotent: a warm run takes seconds.
#
# Why one wheel: there is no binary wheel, and every llama.cpp compile costs ~12 min on
# 2 cores. The portable build (GGML_NATIVE=OFF, AVX2/FMA/F16C, AMX off, libmtmd for
# images) measured as fast as the -march=native one on this machine's AMD EPYC (SmolLM2,
# 512-token prompt + 128 tokens, three alternating rounds on a quiet machine: prompt
# 311-323 vs 260-306 tok/s, generation 90-93 vs 77-90 tok/s), so the host keeps no
# second, native build. --no-cache-dir keeps pip's own wheel cache out of it.
#
# Env: PADDLER_CACHE (default ~/.cache/paddler), LLAMA_CPP_PYTHON_VERSION (default 0.3.16),
#      VENV (default .venv).
set -euo pipefail
cd "$(dirname "$0")/.."

VENV="${VENV:-.venv}"
PIP="$VENV/bin/pip"
PY="$VENV/bin/python"

log() { echo "[install-llama] $*" >&2; }

if [[ ! -x "$PY" ]]; then
  log "no venv at $VENV; run 'make venv' first"
  exit 1
fi

# The wheel's Python tag must be the venv's: build it with the venv's own interpreter.
WHEELHOUSE="$(PYTHON="$(readlink -f "$PY")" scripts/llama-wheel-portable.sh)"
KEY="$(basename "$WHEELHOUSE")"

installed_key() {
  "$PY" - <<'PYEOF' 2>/dev/null || true
import importlib.metadata as m, pathlib
try:
    d = m.distribution("llama_cpp_python")
except m.PackageNotFoundError:
    raise SystemExit
f = pathlib.Path(str(d.locate_file("llama_cpp/.paddler-build-key")))
print(f.read_text().strip() if f.exists() else "")
PYEOF
}

if [[ "$(installed_key)" == "$KEY" ]] && "$PY" -c "import numpy, huggingface_hub, PIL" 2>/dev/null; then
  log "llama-cpp-python ($KEY) already installed"
  exit 0
fi

log "installing $KEY into $VENV"
"$PIP" install -q --no-index --find-links "$WHEELHOUSE" --force-reinstall --no-deps llama-cpp-python
# Runtime dependencies of llama-cpp-python and of the agent (from PyPI, cached by pip).
"$PIP" install -q "typing-extensions>=4.5" "numpy>=1.20" "diskcache>=5.6.1" "jinja2>=2.11.3" \
  huggingface_hub "pillow>=10.1"
SITE="$("$PY" -c 'import importlib.metadata as m; print(m.distribution("llama_cpp_python").locate_file("llama_cpp"))')"
printf '%s\n' "$KEY" >"$SITE/.paddler-build-key"
"$PY" -c "import llama_cpp; print('[install-llama] llama_cpp', llama_cpp.__version__, 'ok')" >&2
