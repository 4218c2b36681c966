#!/usr/bin/env bash
# Predict from the weights which bit-widths keep the fine-tune of FROM (qtools
# delta-survival): JSON to $LOGS/survival.json (read by compare), table on stdout.
set -euo pipefail
QTOOLS=${QTOOLS:-.venv/bin/qtools}
FROM=${FROM:-models/fused_f16}
LOGS=${LOGS:-logs}
# Without BITS, every bit-width qtools supports.
# shellcheck disable=SC2086  # BITS is a list of words
"$QTOOLS" delta-survival "$FROM" ${BITS:+--bits $BITS} --group-size "${GROUP:-64}" --output "$LOGS/survival.json"
echo "survival JSON: $LOGS/survival.json"
