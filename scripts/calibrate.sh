#!/usr/bin/env bash
# The calibration study (docs/study.md): build the families' bases (one shared pretraining per
# recipe), train a grid of fine-tunes on each, measure each usable one's threshold with fake and
# real quantized models and the probe, judge both tiers leave-one-family-out; writes
# docs/study.md and calibration/rule.json (rule and bracket; qtools/survival/calibration.json, the rule
# delta-survival uses, once the study has its 64 usable fine-tunes).
# Resumable: each fine-tune's result is kept in calibration/results/ (committed: a session cut
# short loses nothing measured), models and adapters in models/calibration. FROM_CACHE=1 refits
# from calibration/results alone (under a minute). TASK=demo|agent|access: the earlier
# calibration (five recipes on one task, fake quantization only) instead of the study.
set -euo pipefail
QTOOLS=${QTOOLS:-.venv/bin/qtools}
if [ -n "${TASK:-}" ]; then
  exec "$QTOOLS" calibrate --suite "${SUITE:-suites/demo.jsonl}" --jobs "${JOBS:-2}" --task "$TASK" \
    ${FROM_CACHE:+--from-cache}
fi
exec "$QTOOLS" calibrate --study --jobs "${JOBS:-2}" ${FAMILY:+--family $FAMILY} ${FROM_CACHE:+--from-cache}
