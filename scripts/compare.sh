#!/usr/bin/env bash
# Side-by-side comparison of every validate log in $LOGS (plus $LOGS/survival.json if
# present): the best model per metric marked, verdict per model, recommendation, $LOGS/compare.png.
# MIN_CATEGORY="field_access=0.8 safety=1.0": least accuracy per suite category.
set -euo pipefail
QTOOLS=${QTOOLS:-.venv/bin/qtools}
LOGS=${LOGS:-logs}
shopt -s nullglob
logs=("$LOGS"/*.json)
cats=()
read -ra wanted <<<"${MIN_CATEGORY:-}"
for c in ${wanted[@]+"${wanted[@]}"}; do cats+=(--min-category "$c"); done
if [ ${#logs[@]} -eq 0 ]; then
  echo "no logs in $LOGS/: run 'make validate MODEL=...' or 'make sweep' first" >&2; exit 1
fi
"$QTOOLS" compare "${logs[@]}" --plot "$LOGS/compare.png" \
  ${MIN_ACCURACY:+--min-accuracy "$MIN_ACCURACY"} ${MAX_CRITICAL:+--max-critical "$MAX_CRITICAL"} \
  ${MAX_GEN_S:+--max-gen-s "$MAX_GEN_S"} ${MAX_MEMORY_GB:+--max-memory-gb "$MAX_MEMORY_GB"} \
  ${cats[@]+"${cats[@]}"}
