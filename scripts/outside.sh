#!/usr/bin/env bash
# Fine-tunes the calibration study never saw, judged as the demo is: for each FAMILY:SEED in
# PAIRS, build the base and adapter, fuse, ask delta-survival (the study's bracket) and the probe
# (every bit-width; the bracket's check set read from it), prove with the real sweep 8 6 5 4 3 2
# and compare. FAMILY is a demo-task calibration family (qtools demo-models --family: the demo's
# adapter recipe trained with that seed, judged on SUITE) or a study family (agent-moe-g24,
# access-g24, ...: its cached base, a recipe the study's grid never ran, judged on its task's suite
# at its bar: python -m qtools.calibrate.outside --build; FAMILY:SEED:all puts that recipe on every
# linear layer, on qwen3_moe the experts too; FAMILY:SEED:KEYS:LR trains it at learning rate LR,
# KEYS empty for attention). Logs in logs/outside/FAMILY-sSEED/, one
# summary line per fine-tune on stdout (docs/outside.md). Reuses what is built; FORCE=1 rebuilds.
set -euo pipefail
QTOOLS=${QTOOLS:-.venv/bin/qtools}
PY=${PY:-.venv/bin/python}
PAIRS=${PAIRS-g12:1 g36:1 g24:2}  # given empty (make outside PAIRS=""): an error below, not these
SUITE=${SUITE:-suites/demo.jsonl}
root=${OUTSIDE_MODELS:-models/outside}
# every pair checked before anything is built or a log directory made
"$PY" -m qtools.calibrate.outside --check-pairs $PAIRS
field() { "$PY" -c 'import json, sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])' "$1" "$2"; }
for pair in $PAIRS; do
  # FAMILY:SEED, or FAMILY:SEED:all for a study family's recipe on every linear layer, :KEYS:LR at
  # another learning rate
  IFS=: read -r fam seed keys lr <<<"$pair"
  m="$root/$fam" logs="logs/outside/$fam-s$seed${keys:+-$keys}${lr:+-lr$lr}"
  echo "== $fam, adapter seed $seed${keys:+, LoRA on $keys}${lr:+, learning rate $lr}"
  # the log directory only for a fine-tune built: a failed build leaves none
  if "$PY" -m qtools.calibrate.outside --is-study "$fam"; then
    [ -z "${FORCE:-}" ] || rm -rf "$m/${fam}_adapter"
    mkdir -p "$logs"
    # JSON, not *.json (compare reads those); the judge reads the bar from it; written only whole
    "$PY" -m qtools.calibrate.outside --build "$fam" "$seed" "$m" "${keys:-}" "${lr:-}" > "$logs/outside.build.tmp" \
      || { rm -f "$logs/outside.build.tmp"; rmdir "$logs" 2>/dev/null || true; exit 1; }
    mv "$logs/outside.build.tmp" "$logs/outside.build"
    base=$(field "$logs/outside.build" base) adapter=$(field "$logs/outside.build" adapter)
    suite=$(field "$logs/outside.build" suite)
  else
    "$QTOOLS" demo-models --family "$fam" --seed "$seed" --output "$m" --suite '' ${FORCE:+--force}
    mkdir -p "$logs"
    base="$m/${fam}_base" adapter="$m/${fam}_adapter" suite="$SUITE"
  fi
  "$QTOOLS" fuse "$base" --adapter "$adapter" --output "$m/fused_f16" --force
  FROM="$m/fused_f16" BITS="" LOGS="$logs" scripts/survival.sh >/dev/null
  # every bit-width in one pass: the probe alone, and (read for the bracket's check set) the
  # bracket with the probe, as make demo answers; compare judges it bit-width by bit-width
  "$QTOOLS" probe "$m/fused_f16" --suite "$suite" --bits 2 3 4 5 6 8 --output "$logs/probe.json" >/dev/null
  rm -f "$logs"/fused_*.json
  FROM="$m/fused_f16" PREFIX="$m/fused" BITS="8 6 5 4 3 2" SUITE="$suite" BATCH=1 LOGS="$logs" FORCE=1 \
    scripts/sweep.sh >/dev/null
  LOGS="$logs" scripts/compare.sh > "$logs/compare.txt"
  "$PY" -m qtools.calibrate.outside "$logs"
done
echo "== every fine-tune judged so far (docs/outside.md)"
"$PY" -m qtools.calibrate.outside --all logs/outside
