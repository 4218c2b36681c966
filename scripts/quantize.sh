#!/usr/bin/env bash
# Quantize the float model FROM to BITS (MLX affine, GROUP, RECIPE) -> OUT
# (default models/fused_<BITS>bit); prints bits per weight and disk size. FORCE=1 overwrites.
set -euo pipefail
QTOOLS=${QTOOLS:-.venv/bin/qtools}
BITS=${BITS:-5}
if [ "$(wc -w <<<"$BITS")" -ne 1 ]; then
  echo "quantize takes one bit-width (BITS=$BITS); use 'make sweep BITS=\"$BITS\"' for several" >&2; exit 2
fi
RECIPE=${RECIPE:-uniform}
if [ "$RECIPE" = uniform ]; then default_out="models/fused_${BITS}bit"; else default_out="models/fused_${RECIPE}"; fi
force=(); [ "${FORCE:-0}" = 1 ] && force=(--force)
"$QTOOLS" quantize --model "${FROM:-models/fused_f16}" --bits "$BITS" --group-size "${GROUP:-64}" \
  --recipe "$RECIPE" --out "${OUT:-$default_out}" ${force[@]+"${force[@]}"}
