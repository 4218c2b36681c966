#!/usr/bin/env bash
# Calibrate delta-survival against behaviour: build the families' bases (one shared pretraining
# per recipe), train a grid of fine-tunes on each, measure each one's behavioural threshold,
# judge the rule leave-one-family-out, write docs/calibration.md and qtools/survival/calibration.json.
# Resumable (cached per fine-tune in models/calibration). TASK=agent (or access): the same
# families on that task (qtools/demo/tasks.py), measured on suites/<task>.jsonl.
set -euo pipefail
QTOOLS=${QTOOLS:-.venv/bin/qtools}
"$QTOOLS" calibrate --suite "${SUITE:-suites/demo.jsonl}" --jobs "${JOBS:-2}" ${TASK:+--task "$TASK"}
