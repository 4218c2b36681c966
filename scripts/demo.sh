#!/usr/bin/env bash
# The built-in demo, end to end: build the tiny base + LoRA adapter (reused when
# present), fuse, predict survival from the weights, sweep bits 8 6 5 4 3 2 with
# validation, and compare. Everything lands in models/demo_* and logs/demo/.
set -euo pipefail
# Its own log folder, whatever LOGS the Makefile exports: the demo's logs never mix with yours.
export LOGS=${DEMO_LOGS:-logs/demo}
MODELS=${MODELS:-models}
FUSED="$MODELS/demo_fused_f16"
SUITE=${SUITE:-suites/demo.jsonl}

echo "== 1/5 demo base model and LoRA adapter"
MODELS="$MODELS" scripts/demo_models.sh

echo "== 2/5 fuse (float32 math, float16 on disk) -> $FUSED"
if [ -f "$FUSED/config.json" ] && [ "$FUSED/config.json" -nt "$MODELS/demo_adapter/adapters.safetensors" ] \
   && [ "${FORCE:-0}" != 1 ]; then
  echo "reusing $FUSED"
else
  BASE="$MODELS/demo_base" ADAPTER="$MODELS/demo_adapter" OUT="$FUSED" FORCE=1 scripts/fuse.sh
fi

echo "== 3/5 predict: delta-survival from the weights alone, the probe on what they leave open"
mkdir -p "$LOGS"
FROM="$FUSED" BITS="" scripts/survival.sh  # every supported bit-width
# The bit-widths the weights' bracket settles neither way, and both its ends (the smallest it keeps,
# the largest it calls rounded away): one teacher-forced pass decides them.
OPEN=$(.venv/bin/python -c 'import json, sys; r = json.load(open(sys.argv[1]))
print(" ".join(str(b) for b in (r.get("bracket") or {}).get("check", [])))' "$LOGS/survival.json")
rm -f "$LOGS/probe.json"
if [ -n "$OPEN" ]; then
  # shellcheck disable=SC2086  # OPEN is a list of words
  .venv/bin/qtools probe "$FUSED" --suite "$SUITE" --bits $OPEN --output "$LOGS/probe.json"
fi

echo "== 4/5 prove: quantize + validate 8 6 5 4 3 2 (one model in memory at a time)"
rm -f "$LOGS"/*-demo.json
FROM="$FUSED" PREFIX="$MODELS/demo_fused" BITS="8 6 5 4 3 2" SUITE="$SUITE" BATCH=${BATCH:-1} scripts/sweep.sh

echo "== 5/5 compare"
scripts/compare.sh
