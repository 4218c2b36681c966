"""Survival-aware mixed precision: raise only the layers whose delta dies at BITS.

delta-survival is run on the float model for every supported bit-width >= BITS.
A tensor stays at BITS when its own statistic clears the report's threshold rule
(`by_bits[b][rule["statistic"]] >= rule["min"]`, the rule delta-survival predicts
with); otherwise it gets the next bit-width where it does clear it, 8 at most.
Tensors the fine-tune does not touch (no delta) stay at BITS. The result is a
`layer_bits` map for qtools.quantize, written through mlx-lm's per-layer
quantization config so `mlx_lm.load` loads the model as usual.
"""

from __future__ import annotations

from . import SUPPORTED_BITS, QtoolsError

MAX_BITS = max(SUPPORTED_BITS)


def _module_path(tensor_name: str) -> str:
    return tensor_name[: -len(".weight")] if tensor_name.endswith(".weight") else tensor_name


def _survives(stats: dict | None, rule: dict) -> bool | None:
    if not stats:
        return None
    v = stats.get(rule["statistic"])
    return None if v is None else v >= rule["min"]


def plan_from_report(report: dict, bits: int) -> dict:
    """{layer_bits, raised, rule} from a delta-survival report, for base bit-width `bits`.

    raised: one entry per raised tensor, {layer, bits, statistic, value_at_bits, survives}
    (survives False: it dies even at 8 bits, and is kept at 8).
    """
    if bits not in SUPPORTED_BITS:
        raise QtoolsError(f"bits={bits} is not supported: use one of {' '.join(map(str, SUPPORTED_BITS))}")
    if not isinstance(report, dict) or "tensors" not in report:
        raise QtoolsError("not a delta-survival report (no per-tensor statistics)")
    rule = report.get("threshold")
    if not isinstance(rule, dict) or "statistic" not in rule or "min" not in rule:
        raise QtoolsError("the delta-survival report has no threshold rule (was it run without a delta source?)")
    have = sorted(int(b) for b in report.get("bits", []))
    if bits not in have:
        raise QtoolsError(f"the delta-survival report has no statistics at {bits} bits (it has {have})")
    higher = [b for b in have if b > bits]
    stat = rule["statistic"]
    layer_bits, raised = {}, []
    for t in report["tensors"]:
        by_bits = t.get("by_bits", {})
        if _survives(by_bits.get(str(bits)), rule) is not False:
            continue  # survives, or no delta in this tensor
        new, ok = MAX_BITS, False
        for b in higher:
            if _survives(by_bits.get(str(b)), rule):
                new, ok = b, True
                break
        path = _module_path(t["name"])
        layer_bits[path] = new
        raised.append({"layer": path, "bits": new, "statistic": stat,
                       "value_at_bits": by_bits[str(bits)].get(stat), "survives": ok})
    return {"layer_bits": layer_bits, "raised": raised, "rule": rule, "base_bits": bits}


def survival_plan(model, bits: int, group_size: int = 64, adapter=None, base=None, progress: bool = False) -> dict:
    """Run delta-survival on the float MODEL (delta from its provenance unless given) and plan."""
    from .survival import delta_survival

    if bits not in SUPPORTED_BITS:
        raise QtoolsError(f"bits={bits} is not supported: use one of {' '.join(map(str, SUPPORTED_BITS))}")
    widths = [b for b in SUPPORTED_BITS if b >= bits]
    report = delta_survival(model, bits=widths, group_size=group_size, adapter=adapter, base=base,
                            progress=progress)
    plan = plan_from_report(report, bits)
    plan["predicted_min_bits"] = report.get("predicted_min_bits")
    plan["delta_source"] = report.get("delta_source")
    plan["tensors"] = len(report["tensors"])
    return plan
