"""The survival threshold `delta-survival` predicts with, and where it comes from.

PROVISIONAL until `make calibrate` fits it against behaviour: a bit-width is
predicted safe when the fine-tuning delta carries more energy than the
quantization noise that lands in the adapter's own subspace (U^T (Dq - D) V),
weighted over the model by |D|^2. Without the adapter's factors the subspace
is unknown and the per-weight cosine is used instead.
"""

THRESHOLD = {
    "statistic": "subspace_snr",
    "min": 1.0,
    "provisional": True,
    "evidence": "not yet calibrated against behaviour (see README: Prediction)",
}

FALLBACK_THRESHOLD = {
    "statistic": "cosine",
    "min": 0.5,
    "provisional": True,
    "evidence": "not yet calibrated against behaviour (see README: Prediction)",
}


def threshold_for(summary_stats: dict) -> dict:
    """The rule that applies to a summary (subspace statistics need the adapter)."""
    if summary_stats.get(THRESHOLD["statistic"]) is not None:
        return THRESHOLD
    return FALLBACK_THRESHOLD
