#!/usr/bin/env bash
# Quantization recipes side by side on the fused demo model, in one run: uniform 5 and
# 4 bits, mlx-lm's mixed_3_6 and mixed_4_6, and qtools' survival recipe at 3 and 4 bits.
# Each is quantized (a uniform or mixed one newer than FROM is reused unless FORCE=1), validated
# on SUITE, scored with `qtools retention` against FROM and BASE, and one compare table
# (accuracy, critical errors, logit_retention, bits/weight) is printed. Logs: $LOGS/recipes/.
set -euo pipefail
QTOOLS=${QTOOLS:-.venv/bin/qtools}
PY=${PY:-.venv/bin/python}
FROM=${FROM:-models/demo_fused_f16}
BASE=${BASE:-models/demo_base}
SUITE=${SUITE:-suites/demo.jsonl}
PREFIX=${PREFIX:-models/demo_fused}
export LOGS="${LOGS:-logs}/recipes"
for need in "$FROM" "$BASE"; do
  [ -f "$need/config.json" ] || { echo "$need does not exist: run 'make demo' first (or give FROM=/BASE=)" >&2; exit 1; }
done
mkdir -p "$LOGS"
# Only this run's models in the comparison: logs of models an older recipe list made would mix in.
rm -f "$LOGS"/*-"$(basename "$SUITE" .jsonl)".json "$LOGS"/retention-*.json
models=()
for spec in uniform:5 uniform:4 mixed_4_6:4 mixed_3_6:3 survival:4 survival:3; do
  recipe=${spec%%:*} b=${spec##*:}
  # the name qtools quantize gives, with PREFIX for models/fused
  out=$("$PY" -c 'import sys; from qtools.pipeline.quantize import default_output as d; print(d(*sys.argv[1:]))' "$b" "$recipe" "$PREFIX")
  # The survival plan follows qtools' code and its calibrated rule, not only FROM: always re-plan it
  # (seconds). Uniform and mixed-recipe models depend on FROM alone.
  if [ "$recipe" != survival ] && [ -d "$out" ] && [ "${FORCE:-0}" != 1 ] && [ "$out/config.json" -nt "$FROM/config.json" ]; then
    echo "== reusing $out (FORCE=1 re-quantizes)"
  else
    echo "== quantize $recipe $b-bit -> $out"
    FROM="$FROM" BITS="$b" RECIPE="$recipe" OUT="$out" FORCE=1 scripts/quantize.sh
  fi
  models+=("$out")
done
failed=()
for m in "$FROM" "${models[@]}"; do
  echo "== validate $m"
  rc=0; MODEL="$m" SUITE="$SUITE" BATCH=${BATCH:-1} scripts/validate.sh >/dev/null || rc=$?
  # a failed verdict (3) is a result to compare; an error (1) stops the run
  if [ "$rc" -eq 3 ]; then failed+=("$m"); elif [ "$rc" -ne 0 ]; then exit "$rc"; fi
done
echo "== retention (KL from $FROM, relative to $BASE)"
"$QTOOLS" retention --reference "$FROM" --base "$BASE" --suite "$SUITE" --logs-dir "$LOGS" "$FROM" "${models[@]}"
echo "== compare (failed verdicts: ${failed[*]:-none})"
"$QTOOLS" compare "$LOGS"/*.json
