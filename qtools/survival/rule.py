"""The survival threshold `delta-survival` predicts with, and where it comes from.

`make calibrate` fits it against behaviour on a grid of fine-tunes and writes
qtools/calibration.json (rule + evidence; the study is docs/calibration.md).
Until that file exists the rule is PROVISIONAL: a bit-width is predicted safe
when the fine-tuning delta carries more energy than the quantization noise
that lands in the adapter's own subspace (U^T (Dq - D) V), weighted over the
model by |D|^2. Without the adapter's factors the subspace is unknown and the
per-weight cosine is used instead.
"""

import json
from pathlib import Path

RULE_FILE = Path(__file__).with_name("calibration.json")

PROVISIONAL = {
    "statistic": "subspace_snr",
    "aggregate": "weighted",
    "min": 1.0,
    "provisional": True,
    "evidence": "not yet calibrated against behaviour (see README: Prediction threshold)",
}

FALLBACK_THRESHOLD = {
    "statistic": "cosine",
    "aggregate": "weighted",
    "min": 0.5,
    "provisional": True,
    "evidence": "no adapter factors: the subspace statistic is unavailable; cosine threshold not calibrated",
}


def calibrated_rule() -> dict:
    if RULE_FILE.exists():
        try:
            rule = json.loads(RULE_FILE.read_text())
            return {k: rule[k] for k in ("statistic", "aggregate", "min", "provisional", "evidence")}
        except (json.JSONDecodeError, KeyError):
            pass
    return PROVISIONAL


def threshold_for(summary_stats: dict) -> dict:
    """The rule that applies to a summary (subspace statistics need the adapter)."""
    rule = calibrated_rule()
    if summary_stats.get(rule["statistic"]) is not None:
        return rule
    return FALLBACK_THRESHOLD
