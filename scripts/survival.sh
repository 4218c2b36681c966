#!/usr/bin/env bash
# Predict from the weights which bit-widths keep the fine-tune of FROM (qtools
# delta-survival): JSON to $LOGS/survival.json (read by compare), table on stdout.
set -euo pipefail
QTOOLS=${QTOOLS:-.venv/bin/qtools}
FROM=${FROM:-models/fused_f16}
BITS=${BITS:-2 3 4 5 6 8}
LOGS=${LOGS:-logs}
# shellcheck disable=SC2086  # BITS is a list of words
"$QTOOLS" delta-survival "$FROM" --bits $BITS --group-size "${GROUP:-64}" --output "$LOGS/survival.json"
echo "survival JSON: $LOGS/survival.json"
