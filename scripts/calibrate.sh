#!/usr/bin/env bash
# Calibrate delta-survival against behaviour: train a grid of demo fine-tunes,
# measure each one's behavioural threshold, fit the rule, write docs/calibration.md
# and qtools/survival/calibration.json. Resumable (cached per fine-tune in models/calibration).
set -euo pipefail
QTOOLS=${QTOOLS:-.venv/bin/qtools}
scripts/demo_models.sh
"$QTOOLS" calibrate --base "${MODELS:-models}/demo_base" --suite "${SUITE:-suites/demo.jsonl}"
