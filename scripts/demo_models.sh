#!/usr/bin/env bash
# Build the demo models: models/demo_base (tiny Qwen3), models/demo_adapter (LoRA)
# and suites/demo.jsonl. Reuses complete outputs; FORCE=1 rebuilds.
set -euo pipefail
QTOOLS="${QTOOLS:-.venv/bin/qtools}"
args=(demo-models --output "${MODELS:-models}")
if [[ "${FORCE:-0}" == "1" ]]; then args+=(--force); fi
exec "$QTOOLS" "${args[@]}"
