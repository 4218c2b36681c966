"""What the study measures beyond the fake-quantized behaviour: the threshold from real quantized
models (what the sweep users run proves), and the probe's prediction with its cost.

Both run on the fine-tune's fused float16 model while the calibration has it on disk.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from .measure import passes


def _margin(x) -> float | None:
    import math

    return round(float(x), 4) if math.isfinite(x) else None


def _case_string(records, field: str) -> str:
    return "".join("1" if r[field] else "0" for r in records)


def real_behaviour(fused, suite_path, bits: int, group_size: int, out_dir) -> dict:
    """`qtools quantize` (uniform affine) then `qtools validate --batch` of the fine-tune at `bits`:
    the verdict's inputs, every case's outcome (for the bootstrap) and the seconds the two took."""
    from ..pipeline.quantize import quantize
    from ..pipeline.validate import validate

    out = Path(out_dir) / f"real_{bits}bit"
    tic = time.perf_counter()
    try:
        q = quantize(fused, out, bits=bits, group_size=group_size, force=True)
        res = validate(out, suite_path, progress=False, batch=True, note=lambda _msg: None)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    recs = res["cases"]
    return {"accuracy": res["accuracy"], "critical_errors": res["critical_errors"],
            "format_compliance": res["format_compliance"], "bits_per_weight": q["bits_per_weight"],
            "cases": {"correct": _case_string(recs, "correct"), "critical": _case_string(recs, "critical")},
            "seconds": time.perf_counter() - tic}


def real_threshold(fused, suite_path, bits_list, group_size: int, min_accuracy: float, fake_threshold,
                   out_dir) -> tuple[dict, object]:
    """({bits: real_behaviour}, the real threshold): real models at the fake-quantized threshold
    and the bit-width below it; where one disagrees with fake quantization, further up or down
    until the real threshold is settled (the smallest passing bit-width with every one above it
    passing; None: not even the largest passes)."""
    ordered = sorted(bits_list)
    real: dict = {}

    def ok(b) -> bool:
        if str(b) not in real:
            real[str(b)] = real_behaviour(fused, suite_path, b, group_size, out_dir)
        return passes(real[str(b)], min_accuracy)

    i = len(ordered) - 1 if fake_threshold is None else ordered.index(fake_threshold)
    if not ok(ordered[i]):  # fails for real where fake quantization passed: up until one passes
        while i + 1 < len(ordered):
            i += 1
            if ok(ordered[i]):
                return real, ordered[i]
        return real, None
    while i > 0 and ok(ordered[i - 1]):  # passes: down until one fails (the bit-width below, at least)
        i -= 1
    return real, ordered[i]


def probe_prediction(fused, suite_path, bits_list, group_size: int, min_accuracy: float) -> dict:
    """`qtools probe` at every bit-width: its prediction, per bit-width its summary and per case
    (decided correct, critical, margin: what a margin rule is calibrated on), and its seconds."""
    from ..pipeline.probe import probe

    tic = time.perf_counter()
    rep = probe(fused, suite_path, bits=list(bits_list), group_size=group_size, min_accuracy=min_accuracy,
                progress=False)
    keep = ("accuracy", "critical_errors", "verdict", "margin", "flips")
    by_bits = {"float": {k: rep["reference"][k] for k in keep if k in rep["reference"]}}
    by_bits.update({b: {k: s[k] for k in keep if k in s} for b, s in rep["by_bits"].items()})
    cases = {"float": {"correct": "".join("1" if c["float"]["correct"] else "0" for c in rep["cases"]),
                       "margin": [_margin(c["float"]["margin"]) for c in rep["cases"]]}}
    for b in rep["by_bits"]:
        cases[b] = {"correct": "".join("1" if c["by_bits"][b]["correct"] else "0" for c in rep["cases"]),
                    "critical": "".join("1" if c["by_bits"][b]["critical"] else "0" for c in rep["cases"]),
                    "margin": [_margin(c["by_bits"][b]["margin"]) for c in rep["cases"]]}
    return {"predicted_min_bits": rep["predicted_min_bits"], "by_bits": by_bits, "cases": cases,
            "case_ids": [c["id"] for c in rep["cases"]], "seconds": time.perf_counter() - tic,
            "seconds_parts": rep["seconds"]}
