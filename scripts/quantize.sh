#!/usr/bin/env bash
# Quantize the float model FROM to BITS (GROUP, RECIPE, DATA for the calibrated recipes) -> OUT
# (default models/fused_<BITS>bit, models/fused_<RECIPE>_<BITS>bit or models/fused_<RECIPE>);
# prints bits per weight and disk size. FORCE=1 overwrites.
set -euo pipefail
QTOOLS=${QTOOLS:-.venv/bin/qtools}
BITS=${BITS:-5}
if [ "$(wc -w <<<"$BITS")" -ne 1 ]; then
  echo "quantize takes one bit-width (BITS=$BITS); use 'make sweep BITS=\"$BITS\"' for several" >&2; exit 2
fi
RECIPE=${RECIPE:-uniform}
force=(); [ "${FORCE:-0}" = 1 ] && force=(--force)
# Without OUT, qtools names the output itself. No GROUP: each recipe's own group size (64; mxfp4/mxfp8
# 32, nvfp4 16). DATA: awq/gptq/dwq/dynamic's calibration file.
out=(); [ -n "${OUT:-}" ] && out=(--output "$OUT")
"$QTOOLS" quantize "${FROM:-models/fused_f16}" --bits "$BITS" ${GROUP:+--group-size "$GROUP"} \
  --recipe "$RECIPE" ${DATA:+--data "$DATA"} ${out[@]+"${out[@]}"} ${force[@]+"${force[@]}"}
