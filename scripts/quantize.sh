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
case "$RECIPE" in
  uniform) default_out="models/fused_${BITS}bit" ;;
  survival) default_out="models/fused_survival_${BITS}bit" ;;  # BITS except layers whose delta dies
  awq|gptq|dwq|dynamic|adapter|compensated) default_out="models/fused_${RECIPE}_${BITS}bit" ;;
  *) default_out="models/fused_${RECIPE}" ;;  # mixed_*, mxfp4, nvfp4, mxfp8: bits fixed by the recipe
esac
force=(); [ "${FORCE:-0}" = 1 ] && force=(--force)
# No GROUP: each recipe's own group size (64; mxfp4/mxfp8 32, nvfp4 16). DATA: awq/gptq/dwq/dynamic's calibration file.
"$QTOOLS" quantize --model "${FROM:-models/fused_f16}" --bits "$BITS" ${GROUP:+--group-size "$GROUP"} \
  --recipe "$RECIPE" ${DATA:+--data "$DATA"} --out "${OUT:-$default_out}" ${force[@]+"${force[@]}"}
