"""Survival-aware mixed precision: raise only what the fine-tune needs raised.

delta-survival is run on the float model for every supported bit-width >= BITS.
Its threshold rule (the calibrated one) judges the *model*: the statistic
pooled over the tensors as delta-survival pools it (|D|^2-weighted; the SNRs
as total delta energy over total noise), or the weakest layer's, must clear
`rule["min"]`. The plan aims at the value the statistic has at the uniform
bit-width the rule recommends (never below the threshold): the mixed model is
then as safe, by the rule's own measure, as the uniform one it replaces. It
starts with every tensor at BITS and, while the model is short of that target,
raises the one tensor whose next bit-width cuts the fine-tune
delta's quantization error |Dq - D|^2 (summed over tensors) the most per extra
stored bit (codes plus scales and biases): a rate-distortion allocation, where
the target only says when to stop. (Allocating by the rule's own statistic
instead chases a bounded or weakest-layer value; on the demo that left two
VETO->APPROVE errors at the same bits per weight.) A model that cannot clear
the rule even at 8 bits gets every delta tensor at 8 and is flagged (survives
False). Tensors the fine-tune does not touch stay at BITS, and tensors the model's own
quant_predicate holds higher (qwen3_moe's router at 8 bits) are never planned below it. The result is a
`layer_bits` map for qtools.quantize, written through mlx-lm's per-layer
quantization config so `mlx_lm.load` loads the model as usual.
"""

from __future__ import annotations

from .. import SUPPORTED_BITS, QtoolsError

# What each extra bit should buy: the largest cut in the delta's quantization error
# |Dq - D|^2 summed over tensors (rate-distortion allocation). The rule decides when to stop.
OBJECTIVE = "delta_snr"


def _module_path(tensor_name: str) -> str:
    return tensor_name[: -len(".weight")] if tensor_name.endswith(".weight") else tensor_name


def _n_elements(t: dict) -> int:
    n = 1
    for d in t.get("shape") or [1]:
        n *= int(d)
    return n


def _rule_value(tensors: list[dict], assigned: dict, rule) -> float:
    """The rule's statistic for the model at the assigned bit-widths, pooled over all tensors
    and over each layer's as delta-survival pools them (embeddings and lm_head belong to no layer)."""
    from ..survival.analyze import pool

    def pooled(members):
        return pool(rule.statistic, [(t["w"], t["stat"][assigned[t["name"]]]) for t in members])

    layers: dict = {}
    if rule.aggregate == "weakest_layer":
        for t in tensors:
            if t["layer"] is not None:
                layers.setdefault(t["layer"], []).append(t)
    return rule.judged_value(pooled(tensors), [pooled(m) for m in layers.values()])


def _delta_error(t: dict, b: int) -> float:
    """|Dq - D|^2 of one tensor at b bits: its delta energy over its delta_snr."""
    return t["w"] / max(t["obj"][b], 1e-30)


def plan_from_report(report: dict, bits: int, objective: str = OBJECTIVE, target: str = "recommended") -> dict:
    """{layer_bits, raised, rule, value, value_before, target} from a delta-survival report, for base bit-width `bits`.

    target "recommended": raise until the model's statistic is as high as at the uniform
    bit-width the rule recommends (never below the rule's threshold); "rule": until it
    clears the threshold. The threshold is a boundary fitted between bit-widths, so a plan
    that stops right at it has less margin than the uniform model it replaces: on the demo
    the "rule" plan stopped at 4.88 bits/weight with two VETO->APPROVE errors.

    raised: one entry per raised tensor, {layer, bits, statistic, value_at_bits, survives}
    (survives False: the model does not clear the rule even with every delta tensor at 8 bits).
    """
    from ..survival.analyze import bits_per_weight
    from ..survival.rule import Rule, smallest_surviving

    if target not in ("recommended", "rule"):
        raise QtoolsError(f"unknown survival target {target!r}: use recommended or rule")
    if not isinstance(report, dict) or "tensors" not in report:
        raise QtoolsError("not a delta-survival report (no per-tensor statistics)")
    threshold = report.get("threshold")
    if not isinstance(threshold, dict) or "statistic" not in threshold or "min" not in threshold:
        raise QtoolsError("the delta-survival report has no threshold rule (was it run without a delta source?)")
    rule = Rule.from_dict(threshold)
    have = sorted(int(b) for b in report.get("bits", []))
    if bits not in have:
        raise QtoolsError(f"the delta-survival report has no statistics at {bits} bits (it has {have})")
    widths = [b for b in have if b >= bits]
    stat = rule.statistic
    group_size = int(report.get("group_size", 64))
    tensors = []
    for t in report["tensors"]:
        by_bits = t.get("by_bits", {})
        vals = {b: (by_bits.get(str(b)) or {}).get(stat) for b in widths}
        if any(v is None for v in vals.values()):
            continue  # no delta in this tensor: it stays at BITS
        obj = {b: (by_bits.get(str(b)) or {}).get(objective) for b in widths}
        delta_rms = (by_bits[str(bits)] or {}).get("delta_rms", 1.0)
        n = _n_elements(t)
        tensors.append({"name": t["name"], "layer": t.get("layer"), "n": n,
                        "w": (delta_rms ** 2) * n or 1e-30, "stat": vals,
                        "obj": obj if all(v is not None for v in obj.values()) else None,
                        "eff": {b: int((t.get("effective_bits") or {}).get(str(b), b)) for b in widths}})
    assigned = {t["name"]: bits for t in tensors}
    raised_ok = True
    value_before = value = _rule_value(tensors, assigned, rule) if tensors else None
    goal, goal_bits = rule.min, None
    if tensors and target == "recommended":
        uniform = {b: _rule_value(tensors, {t["name"]: b for t in tensors}, rule) for b in widths}
        goal_bits = smallest_surviving(widths, lambda b: rule.clears(uniform[b]))
        if goal_bits is not None and goal_bits > bits:
            goal = max(goal, uniform[goal_bits])
        else:
            goal_bits = None
    while tensors and value < goal:
        best = None
        for t in tensors:
            cur = assigned[t["name"]]
            nxt = next((b for b in widths if b > cur), None)
            if nxt is None:
                continue
            if t["eff"][nxt] == t["eff"][cur]:
                continue  # the model's own predicate already holds it higher (a router at 8): nothing to buy
            if t["obj"] is not None:
                gain = _delta_error(t, cur) - _delta_error(t, nxt)
            else:  # no objective statistic: what the rule gains
                gain = _rule_value(tensors, {**assigned, t["name"]: nxt}, rule) - value
            cost = t["n"] * (bits_per_weight(nxt, group_size) - bits_per_weight(cur, group_size))
            key = gain / cost
            if best is None or key > best[0]:
                best = (key, t["name"], nxt)
        if best is None:  # everything at the top and still short
            raised_ok = False
            break
        assigned[best[1]] = best[2]
        value = _rule_value(tensors, assigned, rule)
    layer_bits, raised = {}, []
    for t in tensors:
        b = assigned[t["name"]]
        if b == bits or t["eff"][b] == t["eff"][bits]:
            continue
        path = _module_path(t["name"])
        layer_bits[path] = b
        raised.append({"layer": path, "bits": b, "statistic": stat, "value_at_bits": t["stat"][bits],
                       "survives": raised_ok})
    return {"layer_bits": layer_bits, "raised": raised, "rule": threshold, "base_bits": bits,
            "value_before": value_before, "value": value, "survives": raised_ok,
            "target": {"kind": target, "value": goal, "uniform_bits": goal_bits}}


def survival_plan(model, bits: int, group_size: int = 64, adapter=None, base=None, progress: bool = False) -> dict:
    """Run delta-survival on the float MODEL (delta from its provenance unless given) and plan."""
    from ..survival.analyze import delta_survival

    widths = [b for b in SUPPORTED_BITS if b >= bits]
    report = delta_survival(model, bits=widths, group_size=group_size, adapter=adapter, base=base,
                            progress=progress)
    plan = plan_from_report(report, bits)
    plan["predicted_min_bits"] = report.get("predicted_min_bits")
    plan["delta_source"] = report.get("delta_source")
    plan["tensors"] = len(report["tensors"])
    return plan
