#!/usr/bin/env bash
# Fuse the LoRA/DoRA adapter ADAPTER into BASE (float32 math, float16 on disk) -> OUT,
# with qtools_provenance.json so delta-survival can find the delta. FORCE=1 overwrites.
set -euo pipefail
QTOOLS=${QTOOLS:-.venv/bin/qtools}
: "${BASE:?BASE=path/to/base model is required}" "${ADAPTER:?ADAPTER=path/to/adapters is required}"
force=(); [ "${FORCE:-0}" = 1 ] && force=(--force)
"$QTOOLS" fuse "$BASE" --adapter "$ADAPTER" --output "${OUT:-models/fused_f16}" \
  --dtype "${DTYPE:-float16}" ${force[@]+"${force[@]}"}
