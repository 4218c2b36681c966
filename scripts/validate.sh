#!/usr/bin/env bash
# Run the behavioural suite SUITE on MODEL -> $LOGS/<model>-<suite>.json and a table.
# Exits 3 when the verdict fails (a critical error, or accuracy below MIN_ACCURACY), 1 on an error.
# BATCH=1 batches all but the first query (faster; mean time is then amortized).
set -euo pipefail
QTOOLS=${QTOOLS:-.venv/bin/qtools}
: "${MODEL:?MODEL=path/to/model is required}"
"$QTOOLS" validate "$MODEL" --suite "${SUITE:-suites/demo.jsonl}" --logs-dir "${LOGS:-logs}" \
  ${MAX_TOKENS:+--max-tokens "$MAX_TOKENS"} ${MIN_ACCURACY:+--min-accuracy "$MIN_ACCURACY"} \
  $( [ "${BATCH:-0}" = 1 ] && echo --batch )
