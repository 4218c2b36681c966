#!/usr/bin/env bash
# For each bit-width in BITS: quantize FROM (reusing an existing models/fused_<b>bit
# newer than FROM unless FORCE=1), then validate it; the float model FROM is validated too, as the
# reference. One model in memory at a time; a failed verdict (exit 3) does not stop the
# sweep, an error (bad input, exit 1) does.
set -euo pipefail
QTOOLS=${QTOOLS:-.venv/bin/qtools}
PY=${PY:-.venv/bin/python}
FROM=${FROM:-models/fused_f16}
BITS=${BITS:-8 6 5 4 3}
PREFIX=${PREFIX:-models/fused}
export LOGS=${LOGS:-logs}
failed=()
models=("$FROM")
for b in $BITS; do
  # the name qtools quantize gives, with PREFIX for models/fused
  out=$("$PY" -c 'import sys; from qtools.pipeline.quantize import default_output as d; print(d(*sys.argv[1:]))' "$b" uniform "$PREFIX")
  if [ -d "$out" ] && [ "${FORCE:-0}" != 1 ] && [ "$out/config.json" -nt "$FROM/config.json" ]; then
    echo "== reusing $out (FORCE=1 re-quantizes)"
  else
    echo "== quantize $b-bit -> $out"
    # a quantized model older than FROM is stale: replace it
    FROM="$FROM" BITS="$b" RECIPE=uniform OUT="$out" FORCE=1 scripts/quantize.sh
  fi
  models+=("$out")
done
for m in "${models[@]}"; do
  echo "== validate $m"
  rc=0; MODEL="$m" scripts/validate.sh || rc=$?
  if [ "$rc" -eq 3 ]; then failed+=("$m"); elif [ "$rc" -ne 0 ]; then exit "$rc"; fi
done
echo "== logs in $LOGS/; failed verdicts: ${failed[*]:-none}"
