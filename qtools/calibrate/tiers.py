"""The two prediction tiers judged as a user meets them: held out by family, against the real
quantized models' threshold, beside the constant guess and the ceiling a re-drawn suite allows.

- The weights tier (delta-survival) answers with a bracket that must never be optimistic:
  "survives at >= a" (the statistic clears `survive`, a value no training fine-tune reached at a
  bit-width it lost, then a moved up as far as the training families held out in turn show it
  must be: fit_weights_bracket), "rounded away at <= b" (the statistic at most `lost`, below every
  value a training fine-tune showed above its threshold: b may be the threshold, which the probe
  of the check set keeps); the bit-widths between are left to the probe.
- The probe tier: `qtools probe`'s own verdicts, or with a calibrated margin (a bit-width counts
  as kept only when, besides the verdict, no decision the float model gets right is nearer to
  flipping than `margin`), chosen so that training families are never predicted optimistically.

Truth is the real quantized models' threshold (`qtools quantize` + `qtools validate`) where it was
measured, else the fake-quantized one.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import replace

from ..survival.rule import AGGREGATES, Bracket, answer_with_probe, check_set, smallest_surviving
from ..survival.rule import raised as raise_end
from .fit import STATISTICS, bits_rank, constant_guess, family, folds, rule_input, score_predictions
from .grid import BITS


def truth(r: dict):
    """A fine-tune's threshold: the real models' where measured, else fake quantization's."""
    return r["real_min_bits"] if r.get("real") is not None else r["true_min_bits"]


def _steps(a, b, bits_list=BITS) -> int:
    """Supported bit-widths strictly between b (rounded away; None: none) and a (survives; None: 16)."""
    lo, hi = (0 if b is None else b), bits_rank(a)
    return sum(1 for x in bits_list if lo < x < hi)


# ----------------------------------------------------------------------------- weights tier

def predict_bracket(br: Bracket, r: dict, bits_list=BITS) -> tuple:
    """Bracket.settle on a result's (memoized) statistics."""
    lost_stat, lost_agg = br.lost_side
    return br.settle(lambda b: rule_input(r, b, br.statistic, br.aggregate), bits_list,
                     lambda b: rule_input(r, b, lost_stat, lost_agg))


def _finite(x) -> bool:
    return x is not None and math.isfinite(x)


def _bounds(train: list, stat: str, agg: str, bits_list=BITS) -> tuple | None:
    """(survive, lost) on one statistic: kept from the smallest value seen where kept, or above the
    largest seen where lost if that is higher; lost up to the largest value seen where lost, or
    below the smallest seen above a threshold if that is lower. The threshold itself may fall on
    the lost side: the probe checks the rounded-away end and keeps it (check_set), so calling it
    lost costs nothing, where calling a bit-width above it lost makes the answer pessimistic."""
    lost_vals, kept_vals, above_vals = [], [], []
    for r in train:
        t = bits_rank(truth(r))
        for b in bits_list:
            v = rule_input(r, b, stat, agg)
            if _finite(v):
                (kept_vals if b >= t else lost_vals).append(v)
                if b > t:
                    above_vals.append(v)
    if not lost_vals or not kept_vals:
        return None
    below_kept = math.nextafter(min(kept_vals), -math.inf)  # strictly below every kept value
    below_above = math.nextafter(min(above_vals), -math.inf) if above_vals else math.inf
    return max(max(lost_vals), below_kept), min(max(lost_vals), below_above)


def fit_bracket_on(train: list, stat: str, agg: str, bits_list=BITS, lost_side: tuple | None = None) -> Bracket | None:
    """The bracket on `stat` never optimistic (nor wrongly lost) on `train`, and no bolder than train
    shows (_bounds). Where kept and lost values overlap, the overlap is left to the probe; where a
    gap separates them, so is the gap (a held-out fine-tune there is one train never showed).
    lost_side: (statistic, aggregate) of the rounded-away side, when another than `stat`'s."""
    s = _bounds(train, stat, agg, bits_list)
    lost_side = None if lost_side == (stat, agg) else lost_side
    w = s if lost_side is None else _bounds(train, *lost_side, bits_list)
    if s is None or w is None:
        return None
    return Bracket(stat, agg, survive=s[0], lost=w[1], lost_statistic=lost_side[0] if lost_side else None,
                   lost_aggregate=lost_side[1] if lost_side else None)


def judge_brackets(pairs, bits_list=BITS) -> dict:
    """Scores of (bracket prediction (a, b), truth) pairs: optimistic (a below the truth), exact
    (a is the truth), settled (exact with nothing left between: no probe needed), wrongly lost
    (b at or above the truth), lost above the truth (b above it: the probe, which checks b, keeps b
    and never sees the truth), the mean number of bit-widths left between, the mean size of the
    check set the probe runs (rule.check_set) and the mean number settled as rounded away."""
    n = len(pairs)
    opt = exact = settled = wrong_lost = above = 0
    width = checked = lost = 0
    for (a, b), t in pairs:
        ta, tt = bits_rank(a), bits_rank(t)
        opt += ta < tt
        exact += ta == tt
        steps = _steps(a, b, bits_list)
        settled += ta == tt and steps == 0
        wrong_lost += b is not None and b >= tt
        above += b is not None and b > tt
        width += steps
        checked += len(check_set(bits_list, a, b))
        lost += sum(1 for x in bits_list if b is not None and x <= b)
    return {"n": n, "optimistic": opt, "exact": exact, "settled": settled, "wrongly_lost": wrong_lost,
            "lost_above": above, "exact_rate": exact / n if n else 0.0, "mean_between": width / n if n else 0.0,
            "mean_check": checked / n if n else 0.0, "mean_lost": lost / n if n else 0.0}


def _inner_pairs(inner, fit_one, bits_list=BITS) -> list:
    """(bracket prediction, truth) of each inner fold's held-out family, from fit_one(rest)."""
    pairs = []
    for _, rest, held in inner:
        br = fit_one(rest) if len(inner) > 1 else None
        if br is not None:
            pairs += [(predict_bracket(br, r, bits_list), truth(r)) for r in held]
    return pairs


def lost_side_key(s: dict, same_as_survive: bool) -> tuple:
    """How a rounded-away side ranks (smallest first) from its held-out judge_brackets scores: fewest
    rounded away above the truth, then fewest bit-widths left between, then the survive side's own
    statistic. Calling the threshold itself lost does not count against it: the probe checks b."""
    return s["lost_above"], s["mean_between"], not same_as_survive


def choose_bracket(train: list, bits_list=BITS) -> Bracket | None:
    """Each side's statistic and aggregate chosen across train's families, each held out in turn.
    The survive side from one-statistic brackets fitted on the others: fewest optimistic, then most
    exact, then fewest bit-widths left between. Then the rounded-away side, paired with it: fewest
    rounded away above the truth (b above it: an answer the probe of the check set, which confirms
    b, cannot correct), then fewest bit-widths left between (b at the truth costs nothing: the
    probe keeps it). Then fitted on all of train."""
    inner = folds(train)
    scores = {}
    for stat in STATISTICS:
        for agg in AGGREGATES:
            if fit_bracket_on(train, stat, agg, bits_list) is None:
                continue
            scores[(stat, agg)] = judge_brackets(
                _inner_pairs(inner, lambda rest: fit_bracket_on(rest, stat, agg, bits_list), bits_list), bits_list)
    if not scores:
        return None
    survive = max(scores, key=lambda c: (-scores[c]["optimistic"], scores[c]["exact"], -scores[c]["mean_between"]))
    lost_scores = {}
    for side in scores:
        pairs = _inner_pairs(inner, lambda rest: fit_bracket_on(rest, *survive, bits_list, lost_side=side), bits_list)
        lost_scores[side] = judge_brackets(pairs, bits_list)
    lost = min(lost_scores, key=lambda c: lost_side_key(lost_scores[c], c == survive))
    return fit_bracket_on(train, *survive, bits_list, lost_side=lost)


def weights_ceiling(results: list, bits_list=BITS) -> dict | None:
    """The most a never-optimistic bracket on one statistic can be exact on the fine-tunes it was
    fitted on (no family held out; its survive bound is the lowest never optimistic on them), over
    every statistic and aggregate; the best one's scores with its statistic."""
    best = None
    for stat in STATISTICS:
        for agg in AGGREGATES:
            br = fit_bracket_on(results, stat, agg, bits_list)
            if br is None:
                continue
            s = judge_brackets([(predict_bracket(br, r, bits_list), truth(r)) for r in results], bits_list)
            if best is None or (s["exact"], -s["mean_between"]) > (best["exact"], -best["mean_between"]):
                best = {**s, "statistic": stat, "aggregate": agg}
    return best


FEATURES = [(s, a) for s in STATISTICS for a in AGGREGATES]


def _vector(r: dict, b) -> list:
    """r's every statistic x aggregate at b bits, NaN as missing (it compares with nothing)."""
    return [None if x is None or math.isnan(x) else x for x in (rule_input(r, b, s, a) for s, a in FEATURES)]


def _covers(w: list, v: list) -> bool:
    """Every statistic of w at least v's (a NaN or missing one compares with nothing)."""
    return all(x is not None and y is not None and x >= y for x, y in zip(w, v))


def monotone_ceiling(results: list, bits_list=BITS, by_family: bool = False) -> dict:
    """What the weights cannot see, whatever the rule: the most fine-tunes a rule could be exact for
    while never optimistic on them, if it keeps a bit-width on its statistics (every STATISTICS x
    AGGREGATES value) and keeps it wherever they, and the bit-width, are at least as high. Such a
    rule cannot keep a bit-width where another fine-tune lost one at least as large with every
    statistic at least as high (it would keep that one too: optimistic), so a fine-tune is exact
    only if none of its bit-widths from its threshold up is covered so. The rule that keeps what
    no lost bit-width covers reaches the bound: it is tight. by_family: only lost bit-widths of the
    fine-tune's own family count, the bound for one rule per family, each never optimistic on its
    family and fitted knowing its truths (the most a held-out weights tier can reach).
    Returns n, exact and, per fine-tune it cannot be exact for, the first covered bit-width and
    the lost one covering it."""
    lost = [(r, b, _vector(r, b)) for r in results for b in bits_list if b < bits_rank(truth(r))]
    blocked = []
    for r in results:
        t = bits_rank(truth(r))
        for b in sorted(x for x in bits_list if x >= t):
            v = _vector(r, b)
            by = next(((o, ob) for o, ob, w in lost
                       if ob >= b and (not by_family or family(o) == family(r)) and _covers(w, v)), None)
            if by is not None:
                blocked.append({"id": r["id"], "family": family(r), "bits": b, "by": by[0]["id"], "by_bits": by[1]})
                break
    fams: dict = {}
    for r in results:
        fams.setdefault(family(r), {"n": 0, "exact": 0})["n"] += 1
    for f in fams:
        fams[f]["exact"] = fams[f]["n"] - sum(x["family"] == f for x in blocked)
    return {"n": len(results), "exact": len(results) - len(blocked), "statistics": len(FEATURES), "blocked": blocked,
            "families": fams}


def every_statistic_held_out(results: list, bits_list=BITS) -> dict:
    """Each one-statistic bracket (STATISTICS x AGGREGATES, both sides on it) held out by family: the
    fine-tunes it is optimistic for. Whether any is never optimistic, before any choosing."""
    out = {}
    for stat in STATISTICS:
        for agg in AGGREGATES:
            opt = []
            for _, train, test in folds(results):
                br = fit_bracket_on(train, stat, agg, bits_list)
                opt += [r["id"] for r in test
                        if br is not None and bits_rank(predict_bracket(br, r, bits_list)[0]) < bits_rank(truth(r))]
            out[f"{stat} ({agg})"] = opt
    return out


def optimistic_covers(results: list, predictions: dict, min_accuracy: float, bits_list=BITS) -> list[dict]:
    """What a held-out weights tier would have had to refuse to be right where it is optimistic
    (predictions: id -> (a, b)). Being right means refusing the bit-width just below the truth,
    `lost`; a rule monotone in the statistics and the bit-width that refuses it refuses every
    bit-width no larger with every statistic at most its values there. Per optimistic fine-tune:
    the fine-tunes whose own threshold is among those (refusing it: pessimistic there), all and of
    other families (what its held-out tier was fitted on), and the smaller bit-widths at which it
    passes all the same (fake-quantized) with every statistic at most its values at `lost`: a loss
    the delta's survival does not order."""
    from .measure import passes

    out = []
    for r in results:
        a, t = predictions.get(r["id"], (None, None))[0], truth(r)
        below = [b for b in bits_list if b < bits_rank(t)]
        if bits_rank(a) >= bits_rank(t) or not below:
            continue
        lost = max(below)
        v = _vector(r, lost)
        covered = [o for o in results if o is not r and truth(o) is not None and truth(o) <= lost
                   and _covers(v, _vector(o, truth(o)))]
        beh = r["real"] if r.get("real") and str(lost) in r["real"] else r["behaviour"]
        out.append({"id": r["id"], "predicted": a, "truth": t, "lost": lost,
                    "lost_behaviour": {k: beh[str(lost)][k] for k in ("accuracy", "critical_errors")},
                    "covered": len(covered), "covered_other_families": sum(family(o) != family(r) for o in covered),
                    "passes_below": [b for b in below if b < lost and passes(r["behaviour"][str(b)], min_accuracy)
                                     and _covers(v, _vector(r, b))]})
    return out


def fit_weights_bracket(train: list, bits_list=BITS, inner: list | None = None) -> tuple[Bracket | None, list]:
    """The bracket delta-survival ships, fitted on train: choose_bracket's, with its survive end
    moved up the fewest supported bit-widths that make train's families' own held-out answers
    (each family held out in turn, choose_bracket refitted without it) never optimistic. A family
    held out may lose bit-widths at statistic values the others never lost at; the move is how
    much of that train itself shows. inner: those answers where already computed. Returns the
    bracket and those held-out answers."""
    if inner is None:
        inner = _inner_pairs(folds(train), lambda rest: choose_bracket(rest, bits_list), bits_list)
    br = choose_bracket(train, bits_list)
    return (None if br is None else replace(br, raise_by=_least_raise(inner, bits_list))), inner


def weights_tier(results: list, bits_list=BITS) -> dict:
    """The bracket judged leave-one-family-out (statistic, aggregate, bounds and move all refitted
    without the held-out family: fit_weights_bracket), and fitted on every family. Beside it, what
    the move buys: the same brackets unmoved, and with a move for each survive end instead
    (end_margins of the same held-out answers, which widens only the ends the training families
    were optimistic at)."""
    pairs, unmoved, per_end, rows = [], [], [], []
    predictions, unmoved_predictions, margins, end_moves = {}, {}, {}, {}
    for name, train, test in folds(results):
        br, inner = fit_weights_bracket(train, bits_list)
        margins[name] = 0 if br is None else br.raise_by
        end_moves[name] = moves = end_margins(inner, bits_list)
        unmoved_br, fold = (None if br is None else replace(br, raise_by=0)), []
        for r in test:
            p0 = (None, None) if br is None else predict_bracket(unmoved_br, r, bits_list)
            p = raised(p0, margins[name], bits_list)  # as settle moves it
            predictions[r["id"]], unmoved_predictions[r["id"]] = p, p0
            fold.append((p, truth(r)))
            unmoved.append((p0, truth(r)))
            per_end.append((raised(p0, moves.get(p0[0], 0), bits_list), truth(r)))
        pairs += fold
        rows.append({"family": name, "bracket": br.to_dict() if br else None, **judge_brackets(fold, bits_list)})
    final, _ = fit_weights_bracket(results, bits_list, inner=unmoved)  # the folds' answers unmoved: its inner ones
    return {"held_out": judge_brackets(pairs, bits_list), "folds": rows, "predictions": predictions,
            "margins": margins, "unmoved": judge_brackets(unmoved, bits_list), "unmoved_predictions": unmoved_predictions,
            "per_end": {**judge_brackets(per_end, bits_list), "margins": end_moves},
            "bracket": final.to_dict() if final else None, "ceiling": weights_ceiling(results, bits_list)}


def raised(pred: tuple, m: int, bits_list=BITS) -> tuple:
    """A bracket's answer (a, b) with its survive end a moved up m supported bit-widths (past the
    largest: none settled as kept); b as it was."""
    return raise_end(pred[0], m, bits_list), pred[1]


def _least_raise(pairs, bits_list=BITS) -> int:
    """The fewest bit-widths the survive end of every (prediction, truth) pair must move up for
    none to be optimistic."""
    return next(m for m in range(len(bits_list) + 1)
                if judge_brackets([(raised(p, m, bits_list), t) for p, t in pairs], bits_list)["optimistic"] == 0)


def end_margins(pairs, bits_list=BITS) -> dict:
    """{survive end a: the fewest bit-widths it must move up for the pairs answering a to be never
    optimistic}, for each a the pairs answer. Moving one end's answers changes no other's, and the
    width left between only grows with the move: each end's least move is the narrowest bracket
    never optimistic on these pairs. An end they never answer gets none."""
    ends = {p[0] for p, _t in pairs if p[0] is not None}
    return {a: _least_raise([(p, t) for p, t in pairs if p[0] == a], bits_list) for a in sorted(ends)}


# ----------------------------------------------------------------------------- probe tier

def probe_keeps(r: dict, b, margin: float | None) -> bool:
    """Whether the probe calls bit-width b kept: its verdict passes and, with a margin, no decision
    the float model gets right is within `margin` of flipping at b."""
    p = r["probe"]
    s = p["by_bits"].get(str(b))
    if s is None or s.get("verdict") != "pass":
        return False
    if margin is None:
        return True
    cases = p["cases"]
    right = cases["float"]["correct"]
    m = [x for x, ok in zip(cases[str(b)]["margin"], right) if ok == "1" and x is not None]
    return not m or min(m) >= margin


def probe_predict(r: dict, margin: float | None, bits_list=BITS):
    return smallest_surviving(bits_list, lambda b: probe_keeps(r, b, margin))


def _probed(results):
    return [r for r in results if r.get("probe") and "error" not in r["probe"]]


def fit_margin(train: list, bits_list=BITS) -> float | None:
    """The smallest margin under which no training fine-tune is predicted optimistically (None:
    the probe's verdicts alone never are); most exact among those."""
    train = _probed(train)
    if all(bits_rank(probe_predict(r, None, bits_list)) >= bits_rank(truth(r)) for r in train):
        return None
    cands = sorted({x for r in train for b in bits_list if str(b) in r["probe"]["cases"]
                    for x in r["probe"]["cases"][str(b)]["margin"] if x is not None} | {0.0})
    best = None
    for m in cands:
        preds = [(probe_predict(r, m, bits_list), truth(r)) for r in train]
        s = score_predictions(preds, bits_list)
        if s["optimistic"]:
            continue
        if best is None or s["exact"] > best[1]:
            best = (m, s["exact"])
    return None if best is None else best[0]


def probe_tier(results: list, bits_list=BITS) -> dict:
    """The probe's verdicts as they are, and with a margin fitted leave-one-family-out; its cost
    against the sweep's on the same fine-tune (every bit-width quantized and validated, estimated
    from the real models measured)."""
    res = _probed(results)
    raw = score_predictions([(probe_predict(r, None, bits_list), truth(r)) for r in res], bits_list)
    pairs, rows, preds = [], [], {}
    for name, train, test in folds(res):
        m = fit_margin(train, bits_list)
        fold = [(probe_predict(r, m, bits_list), truth(r)) for r in test]
        for r, (p, _t) in zip(test, fold):
            preds[r["id"]] = p
        pairs += fold
        rows.append({"family": name, "margin": m, **score_predictions(fold, bits_list)})
    return {"n": len(res), "errors": len(results) - len(res) - sum(1 for r in results if not r.get("probe")),
            "raw": raw, "held_out": score_predictions(pairs, bits_list), "folds": rows, "predictions": preds,
            "margin": fit_margin(res, bits_list),
            "cost": _probe_cost(res, bits_list, alone=False), "cost_alone": _probe_cost(res, bits_list, alone=True)}


def _probe_cost(res: list, bits_list, alone: bool) -> dict:
    """The probe of every bit-width against the sweep (every bit-width quantized and validated, from
    the real models' mean seconds) on the same fine-tune: as the study measured both (two fine-tunes
    at a time), or timed alone (r["timed_alone"], qtools.calibrate.timing) where it was."""
    ratios, per_precision, generate, read = [], [], [], []
    for r in res:
        sec = _seconds(r, alone)
        if sec is None:
            continue
        total, parts, probed, one = sec
        ratios.append(total / (one * len(bits_list)))
        if "score" in parts and "generate" in parts:  # the float model and each bit-width: one copy each
            per_precision.append(parts["score"] / probed / one)
            generate.append(parts["generate"] / one)
            # the float answers read from the float model's validate log (probe --reference LOG)
            read.append((total - parts["generate"]) / (one * len(bits_list)))
    return {"median": _median(ratios), "min": min(ratios) if ratios else None,
            "max": max(ratios) if ratios else None, "n": len(ratios), "median_answers_read": _median(read),
            # in units of one bit-width's quantize + validate: what one precision's
            # teacher-forced pass costs, and the float model's own answers
            "score_per_precision": _median(per_precision), "generate": _median(generate)}


def _seconds(r: dict, alone: bool):
    """(the probe's seconds, their parts, how many precisions it ran, one real bit-width's mean
    seconds) as the study measured them, or as timed alone; None where not measured so."""
    if alone:
        t = r.get("timed_alone")
        if not t:
            return None
        real = list(t["real_seconds"].values())
        return t["probe_seconds"], t.get("probe_parts") or {}, t["probed"], sum(real) / len(real)
    one = _one_bit_width_seconds(r)
    if not one:
        return None
    return r["probe"]["seconds"], r["probe"].get("seconds_parts") or {}, len(r["probe"]["by_bits"]), one


def _median(xs: list):
    """The upper median (the study's medians all are), None for none."""
    return statistics.median_high(xs) if xs else None


def _one_bit_width_seconds(r: dict):
    """The mean seconds of one real bit-width (qtools quantize + qtools validate) measured on r."""
    real = [v["seconds"] for v in r["real"].values()] if r.get("real") else []
    return sum(real) / len(real) if real else None


def bracket_probe_tier(results: list, weights: dict, bits_list=BITS) -> dict:
    """What a user gets from both tiers together, held out by family: the weights bracket (its
    held-out predictions, weights_tier's) with the probe's verdicts on its check set alone
    (rule.answer_with_probe), scored against the truth; and the mean size of the check set beside
    the probe of every bit-width."""
    pairs, checked, cost = [], 0, {False: [], True: []}
    for r in _probed(results):
        a, b = weights["predictions"][r["id"]]
        check = check_set(bits_list, a, b)
        checked += len(check)
        pairs.append((answer_with_probe(bits_list, a, check, lambda x, r=r: probe_keeps(r, x, None)), truth(r)))
        for alone in cost:
            sec = _seconds(r, alone)
            if sec is not None and "score" in sec[1]:  # its scoring pass is one copy of the batch per precision
                _total, parts, probed, one = sec
                cost[alone].append((parts["total"] - parts["score"] + parts["score"] * (1 + len(check)) / probed)
                                   / (one * len(bits_list)))
    out = score_predictions(pairs, bits_list)
    return {**out, "mean_check": checked / len(pairs) if pairs else 0.0, "bits": len(bits_list),
            "cost_median": _median(cost[False]), "cost_median_alone": _median(cost[True])}


# ----------------------------------------------------------------------------- the study

def constant_tier(results: list, bits_list=BITS) -> dict:
    """The constant guess (the training families' most common true threshold), held out by family."""
    pairs = []
    for _name, train, test in folds(results):
        guess = constant_guess([{**r, "true_min_bits": truth(r)} for r in train])
        pairs += [(guess, truth(r)) for r in test]
    return score_predictions(pairs, bits_list)


def fake_vs_real(results: list) -> dict:
    """How often fake quantization's threshold is the real models' (and which way they differ)."""
    both = [r for r in results if r.get("real") is not None]
    same = sum(bits_rank(r["true_min_bits"]) == bits_rank(r["real_min_bits"]) for r in both)
    real_higher = sum(bits_rank(r["real_min_bits"]) > bits_rank(r["true_min_bits"]) for r in both)
    return {"n": len(both), "same": same, "real_higher": real_higher, "real_lower": len(both) - same - real_higher}


def scale_inversions(results: list) -> list[dict]:
    """What no weight statistic can see: pairs of one trained adapter at two LoRA scales where the
    stronger one (a larger delta, further above every quantization step: each statistic of the
    delta's survival at least as good) has the higher threshold. A weights rule monotone in its
    statistic is wrong on one of the two. Truth here is the real threshold."""
    by_adapter: dict = {}
    for r in results:
        adapter, _, scale = r["id"].rpartition("-x")
        try:
            by_adapter.setdefault(adapter, []).append((float(scale), r))
        except ValueError:
            continue
    out = []
    for adapter, rs in sorted(by_adapter.items()):
        rs.sort(key=lambda sr: sr[0])
        for i, (s1, weak) in enumerate(rs):
            for s2, strong in rs[i + 1:]:
                if bits_rank(truth(strong)) > bits_rank(truth(weak)):
                    # at the weaker's threshold (kept by it, lost by the stronger): the statistics
                    # whose value is lower for the stronger, the only ones that could tell them apart
                    b = truth(weak)
                    vals = [(rule_input(weak, b, st, ag), rule_input(strong, b, st, ag))
                            for st in STATISTICS for ag in AGGREGATES]
                    vals = [(w, x) for w, x in vals if _finite(w) and _finite(x)]
                    out.append({"adapter": adapter, "weaker": s1, "stronger": s2,
                                "weaker_threshold": b, "stronger_threshold": truth(strong),
                                "separating": sum(x < w for w, x in vals), "statistics": len(vals)})
    return out


def summary_by_family(results: list) -> dict:
    out = {}
    for r in results:
        f = out.setdefault(family(r), {"n": 0, "thresholds": {}})
        f["n"] += 1
        t = str(truth(r))
        f["thresholds"][t] = f["thresholds"].get(t, 0) + 1
    return out
