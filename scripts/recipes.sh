#!/usr/bin/env bash
# Quantization recipes side by side on the fused demo model, in one run (SPECS, recipe:bits): uniform
# 5 and 4 bits, mlx-lm's mixed_3_6 and mixed_4_6, qtools' survival recipe, MLX's mxfp4/nvfp4/mxfp8,
# mlx_lm.quant's awq/gptq/dwq/dynamic (calibrated on DATA, default the fine-tune's training data),
# the unfused adapter on a quantized base and the compensated recipe, at 4 and 3 bits (gptq packs 4
# only). Each is quantized (reused when newer than FROM unless FORCE=1; survival and compensated
# follow qtools' code and are always redone), timed, validated on SUITE, scored with `qtools
# retention` against FROM and BASE; then `qtools compare` and one table per recipe (bits/weight,
# accuracy, critical errors, retention, verdict, seconds). Logs: $LOGS/recipes/. A validation or
# retention log newer than its model and SUITE is kept, so a run cut short, or one with recipes
# added to SPECS, measures only what is missing (FORCE=1 redoes everything).
#
# FAMILY=g12 (a calibration family, SEED the adapter's seed) runs it on another fine-tune than the
# demo's: models/FAMILY_base, the demo's adapter recipe trained on it and fused (built when missing),
# logs in $LOGS/recipes-FAMILY; FAMILY takes the place of FROM, BASE and PREFIX.
set -euo pipefail
QTOOLS=${QTOOLS:-.venv/bin/qtools}
PY=${PY:-.venv/bin/python}
SUITE=${SUITE:-suites/demo.jsonl}
if [ -n "${FAMILY:-}" ]; then
  "$QTOOLS" demo-models --family "$FAMILY" ${SEED:+--seed "$SEED"} --suite "" --output models >/dev/null
  FROM=models/${FAMILY}_fused_f16 BASE=models/${FAMILY}_base PREFIX=models/${FAMILY}_fused
  # fused again when the adapter is newer than the fused model
  if [ ! -f "$FROM/config.json" ] || [ "models/${FAMILY}_adapter/adapters.safetensors" -nt "$FROM/config.json" ]; then
    "$QTOOLS" fuse "$BASE" --adapter "models/${FAMILY}_adapter" --output "$FROM" --force
  fi
  export LOGS="${LOGS:-logs}/recipes-$FAMILY"
else
  FROM=${FROM:-models/demo_fused_f16}
  BASE=${BASE:-models/demo_base}
  PREFIX=${PREFIX:-models/demo_fused}
  export LOGS="${LOGS:-logs}/recipes"
fi
for need in "$FROM" "$BASE"; do
  [ -f "$need/config.json" ] || { echo "$need does not exist: run 'make demo' first (or give FROM=/BASE=)" >&2; exit 1; }
done
mkdir -p "$LOGS"
stem=$(basename "$SUITE" .jsonl)
SPECS=${SPECS:-uniform:5 uniform:4 mixed_4_6:4 mixed_3_6:3 survival:4 survival:3 mxfp4:4 nvfp4:4 mxfp8:8
  awq:4 awq:3 gptq:4 dwq:4 dwq:3 dynamic:4 dynamic:3 adapter:4 adapter:3 compensated:4 compensated:3}
models=()
times="$LOGS/quantize-seconds.tsv"
[ -f "$times" ] || : > "$times"
for spec in $SPECS; do
  recipe=${spec%%:*} b=${spec##*:}
  # the name qtools quantize gives, with PREFIX for models/fused
  out=$("$PY" -c 'import sys; from qtools.pipeline.quantize import default_output as d; print(d(*sys.argv[1:]))' "$b" "$recipe" "$PREFIX")
  # The survival plan and the compensated correction follow qtools' code, not only FROM: always redo
  # them. The others depend on FROM (and mlx-lm) alone.
  if [ "$recipe" != survival ] && [ "$recipe" != compensated ] && [ -d "$out" ] && [ "${FORCE:-0}" != 1 ] \
     && [ "$out/config.json" -nt "$FROM/config.json" ]; then
    echo "== reusing $out (FORCE=1 re-quantizes)"
  else
    echo "== quantize $recipe $b-bit -> $out"
    t0=$(date +%s.%N)
    # GROUP empty: each recipe's own group size (the fixed formats take only theirs).
    FROM="$FROM" BITS="$b" RECIPE="$recipe" OUT="$out" GROUP="" FORCE=1 scripts/quantize.sh
    printf '%s\t%.1f\n' "$(basename "$out")" "$(echo "$(date +%s.%N) - $t0" | bc)" >> "$times"
  fi
  models+=("$out")
done
# Only this run's models in the comparison: logs of models an older recipe list made would mix in.
keep=" $(for m in "$FROM" "${models[@]}"; do printf '%s ' "$(basename "$m")"; done)"
for log in "$LOGS"/*-"$stem".json "$LOGS"/retention-*.json; do
  [ -e "$log" ] || continue
  name=$(basename "$log" .json); name=${name%-"$stem"}; name=${name#retention-}
  case "$keep" in *" $name "*) ;; *) rm -f "$log" ;; esac
done
# A log newer than its model and the suite is this model's result: a run cut short (or one that
# adds recipes) takes up where it stopped. FORCE=1 measures everything again.
fresh() { [ "${FORCE:-0}" != 1 ] && [ "$1" -nt "$2/config.json" ] && [ "$1" -nt "$SUITE" ]; }
failed=()
for m in "$FROM" "${models[@]}"; do
  log="$LOGS/$(basename "$m")-$stem.json"
  if fresh "$log" "$m"; then
    echo "== validated $m already ($log)"
    rc=0; "$PY" -c 'import json, sys; sys.exit(json.load(open(sys.argv[1]))["verdict"] != "pass")' "$log" || rc=3
  else
    echo "== validate $m"
    rc=0; MODEL="$m" SUITE="$SUITE" BATCH=${BATCH:-1} scripts/validate.sh >/dev/null || rc=$?
  fi
  # a failed verdict (3) is a result to compare; an error (1) stops the run
  if [ "$rc" -eq 3 ]; then failed+=("$m"); elif [ "$rc" -ne 0 ]; then exit "$rc"; fi
done
stale=()
for m in "$FROM" "${models[@]}"; do
  fresh "$LOGS/retention-$(basename "$m").json" "$m" || stale+=("$m")
done
if [ ${#stale[@]} -gt 0 ]; then
  echo "== retention of ${#stale[@]} model(s) (KL from $FROM, relative to $BASE)"
  "$QTOOLS" retention --reference "$FROM" --base "$BASE" --suite "$SUITE" --logs-dir "$LOGS" "${stale[@]}"
fi
echo "== compare (failed verdicts: ${failed[*]:-none})"
rc=0
"$QTOOLS" compare "$LOGS"/*.json || rc=$?
echo "== per recipe"
"${PYTHON:-.venv/bin/python}" scripts/recipes_table.py "$LOGS" "$FROM" "${models[@]}"
exit $rc
