"""The rule and its evidence: fit a threshold, score it, and say how far it can be trusted.

A rule is (statistic, aggregate, min): a bit-width survives when the statistic,
|D|^2-weighted over the model or the weakest layer's, is at least min. It is
judged leave-one-family-out (fitted on the other families, scored on the held-out
one, for every family in turn) beside the constant guess fitted the same way; a
bootstrap of the suite bounds what any predictor can reach. Statistic and
aggregate are chosen by cross-validation across families too, never within one.
"""

from __future__ import annotations

import math
from dataclasses import replace

from .. import QtoolsError
from ..pipeline.scoring import DEFAULT_MIN_ACCURACY
from ..survival.rule import AGGREGATES, Rule, smallest_surviving
from .grid import BITS
from .measure import MISSING, exact_delta_threshold, passes

# What the delta's own rounding does (the first six), and two that see the base's quantization
# noise where the delta acts (the calibration's finding: on the demo family that noise, not the
# delta's rounding, sets the threshold): the delta's energy against the fused weights' whole
# quantization noise, and the fused weights' own signal-to-noise there.
STATISTICS = ["subspace_snr", "delta_snr", "cosine", "delta_retention", "sign_agreement", "delta_to_step",
              "delta_to_noise", "weight_snr"]
BOOTSTRAP_DRAWS = 2000


def bits_rank(b):
    """Order bit-widths; None (no bit-width survives) is above 8."""
    return 16 if b is None else b


def rule_input(r, b, stat, agg):
    """What a rule on `stat` (`agg`) judges at b bits for a fine-tune; memoized, as fitting asks often."""
    memo = r.setdefault("_values", {})
    key = (b, stat, agg)
    if key not in memo:
        memo[key] = Rule(stat, agg).value(r["summary"], r["layers"], b)
    return memo[key]


def predict(res: dict, rule: Rule, bits_list=BITS):
    """The rule's predicted minimum bit-width for a fine-tune, as Rule.predict decides it
    (on the memoized values)."""
    return smallest_surviving(bits_list, lambda b: rule.clears(rule_input(res, b, rule.statistic, rule.aggregate)))


def score(results, rule, bits_list=BITS) -> dict:
    return score_predictions([(predict(r, rule, bits_list), r["true_min_bits"]) for r in results], bits_list)


GOAL_EXACT, GOAL_ABOVE_CONSTANT = 0.9, 0.25


def goal_met(held_out: dict, constant: dict | None = None) -> bool:
    """The goal, on held-out families: 90% exact, no optimistic miss beyond one bit-width, and
    (when the constant guess's held-out score is given) 25 points above it. Short of it the
    rule stays flagged provisional in every delta-survival report."""
    above = constant is None or held_out["exact_rate"] - constant["exact_rate"] >= GOAL_ABOVE_CONSTANT - 1e-12
    return held_out["exact_rate"] >= GOAL_EXACT and held_out["worst_optimistic_steps"] <= 1 and above


def _suffix_min(r, stat, agg, bits_list):
    """Per bit-width (ascending), the smallest value at it or any larger bit-width (-inf where a
    value is missing): a rule with threshold t predicts the smallest b whose entry is >= t."""
    import numpy as np

    vals = [rule_input(r, b, stat, agg) for b in sorted(bits_list)]
    v = np.array([x if x is not None and math.isfinite(x) else -np.inf for x in vals], dtype=float)
    return np.minimum.accumulate(v[::-1])[::-1]


def _fit_threshold(train, stat, agg, bits_list=BITS):
    """(key, rule, score) of the best threshold for one statistic and aggregate on `train`:
    most exact, then fewest optimistic misses, then the smallest worst optimistic miss, then the
    widest log-ratio margin (the closest training value's distance from the threshold: among
    thresholds that score the same, the one with the widest gap generalises best)."""
    import numpy as np

    if not train:
        return None
    bits = sorted(bits_list)
    m = np.stack([_suffix_min(r, stat, agg, bits_list) for r in train])  # fine-tunes x bits
    raw = [rule_input(r, b, stat, agg) for r in train for b in bits_list]
    values = np.unique([v for v in raw if v is not None and math.isfinite(v)])
    if values.size == 0:
        return None
    a, b_ = values[:-1], values[1:]
    # midpoints between neighbouring values (geometric for positive ones: the SNRs span decades)
    cands = np.where(a > 0, np.sqrt(np.clip(a * b_, 0, None)), (a + b_) / 2) if values.size > 1 else values
    idx = {b: i for i, b in enumerate(bits)}
    true = np.array([idx.get(r["true_min_bits"], len(bits)) for r in train])
    pred = (m[None, :, :] < cands[:, None, None]).sum(axis=2)  # candidates x fine-tunes: index in bits, or None
    exact = (pred == true).sum(axis=1)
    opt_steps = np.where(pred < true, true - pred, 0)
    optimistic = (opt_steps > 0).sum(axis=1)
    worst = opt_steps.max(axis=1)
    pos = values[values > 0]
    logs = np.log(pos)
    margin = np.array([float(np.abs(logs - math.log(t)).min()) if t > 0 and logs.size else 0.0 for t in cands])
    order = np.lexsort((-margin, worst, optimistic, -exact))  # best first; ties keep the smaller threshold
    i = int(order[0])
    t = float(cands[i])
    rule = Rule(stat, agg, t)
    sc = score(train, rule, bits_list)
    key = (int(exact[i]), -int(optimistic[i]), -int(worst[i]), float(margin[i]))
    return key, rule, sc


def family(r) -> str:
    """A fine-tune's family; a result without one is its own."""
    return r.get("family") or r["id"]


def folds(results) -> list[tuple[str, list, list]]:
    """(held-out family, training fine-tunes, held-out fine-tunes), one per family in order of
    first appearance: leave-one-family-out."""
    names = list(dict.fromkeys(family(r) for r in results))
    return [(f, [r for r in results if family(r) != f], [r for r in results if family(r) == f]) for f in names]


def fit(train, bits_list=BITS) -> tuple[Rule, dict]:
    """Choose the statistic and aggregate by cross-validation across the families of `train`
    (a threshold refitted without each family predicts it; results without a family are each
    their own, so leave-one-out), then fit its threshold on all of `train`. Picking by training
    fit alone overfits: with a few dozen fine-tunes some statistic always separates the training
    set by chance; picking within a family learns that family."""
    best = None
    cv_folds = folds(train)
    for stat in STATISTICS:
        for agg in AGGREGATES:
            full = _fit_threshold(train, stat, agg, bits_list)
            if full is None:
                continue
            cv = {"exact": 0, "optimistic": 0, "worst": 0}
            for _, rest, held in cv_folds:
                fold = _fit_threshold(rest, stat, agg, bits_list) if rest else full
                if fold is None:
                    continue
                s = score(held, fold[1], bits_list)
                cv["exact"] += s["exact"]
                cv["optimistic"] += s["optimistic"]
                cv["worst"] = max(cv["worst"], s["worst_optimistic_steps"])
            key = (cv["exact"], -cv["optimistic"], -cv["worst"], full[0])
            if best is None or key > best[0]:
                best = (key, full[1], {**full[2], "cv_exact": cv["exact"], "cv_optimistic": cv["optimistic"],
                                       "cv_worst_optimistic_steps": cv["worst"], "cv_folds": len(cv_folds)})
    if best is None:
        raise QtoolsError("calibration has no usable fine-tunes to fit")
    return best[1], best[2]


def constant_guess(train):
    """The most common true threshold of `train` (ties: the higher, the cautious one)."""
    counts = {}
    for r in train:
        counts[r["true_min_bits"]] = counts.get(r["true_min_bits"], 0) + 1
    return max(counts, key=lambda b: (counts[b], bits_rank(b))) if counts else None


def score_predictions(pairs, bits_list=BITS) -> dict:
    """score() for (predicted, true) pairs of bit-widths (None: no bit-width survives)."""
    exact = optimistic = pessimistic = worst_optimistic = 0
    for p, t in pairs:
        p, t = bits_rank(p), bits_rank(t)
        if p == t:
            exact += 1
        elif p < t:
            optimistic += 1
            worst_optimistic = max(worst_optimistic, sum(1 for b in [*bits_list, 16] if p <= b < t))
        else:
            pessimistic += 1
    n = len(pairs)
    return {"n": n, "exact": exact, "optimistic": optimistic, "pessimistic": pessimistic,
            "exact_rate": exact / n if n else 0.0, "worst_optimistic_steps": worst_optimistic}


def constant_baseline(train, test) -> tuple[int | None, dict]:
    """The most common true threshold of the training split, predicted for every held-out
    fine-tune: what a rule must beat to have learnt anything from the weights."""
    guess = constant_guess(train)
    exact = sum(r["true_min_bits"] == guess for r in test)
    optimistic = sum(bits_rank(guess) < bits_rank(r["true_min_bits"]) for r in test)
    return guess, {"n": len(test), "exact": exact, "optimistic": optimistic}


def separability(results, stat, agg, bits_list=BITS) -> list[dict]:
    """Per bit-width, the statistic's range over fine-tunes that keep their behaviour there
    and over those that lose it. Overlapping ranges: no threshold on it can be exact."""
    out = []
    for b in bits_list:
        keep, lose = [], []
        for r in results:
            v = rule_input(r, b, stat, agg)
            if v is None:
                continue
            (keep if b >= bits_rank(r["true_min_bits"]) else lose).append(v)
        if keep and lose:
            out.append({"bits": b, "keep": (min(keep), max(keep)), "lose": (min(lose), max(lose)),
                        "overlap": min(keep) <= max(lose)})
    return out


def erratic(results, min_accuracy, bits_list=BITS) -> list[str]:
    """Fine-tunes that fail at some bit-width yet pass at a lower one."""
    out = []
    for r in results:
        ok = [passes(r["behaviour"][str(b)], min_accuracy) for b in sorted(bits_list)]
        first_pass = ok.index(True) if True in ok else len(ok)
        if not all(ok[first_pass:]):
            out.append(r["id"])
    return out


def _case_bits(beh: dict, key: str, field: str):
    import numpy as np

    return np.frombuffer(beh[key]["cases"][field].encode(), dtype=np.uint8) - ord("0")


def threshold_distribution(res: dict, bits_list=BITS, min_accuracy: float = DEFAULT_MIN_ACCURACY, size_factor: int = 1,
                           draws: int = BOOTSTRAP_DRAWS) -> dict:
    """{threshold: probability} when the suite is re-drawn: its cases resampled with replacement
    (size_factor times as many), one draw judging every bit-width as one suite would.

    The measured threshold is one draw of this distribution; no predictor, however good,
    agrees with a re-drawn suite more often than its largest probability.
    """
    import zlib

    import numpy as np

    beh = res["behaviour"]
    n = len(beh[str(bits_list[0])]["cases"]["correct"])
    m = n * size_factor
    rng = np.random.default_rng(zlib.crc32(f"{res['id']}/{size_factor}".encode()))
    counts = rng.multinomial(m, np.full(n, 1.0 / n), size=draws)  # draws x cases
    alive = np.ones(draws, dtype=bool)
    thr = np.full(draws, bits_rank(None))
    for b in sorted(bits_list, reverse=True):
        k = str(b)
        acc = counts @ _case_bits(beh, k, "correct") / m
        ok = (acc >= min_accuracy - 1e-12) & (counts @ _case_bits(beh, k, "critical") == 0)
        alive &= ok
        thr[alive] = b
    values, freq = np.unique(thr, return_counts=True)
    return {int(v): f / draws for v, f in zip(values, freq)}


def distribution(r, bits_list, min_accuracy, size_factor):
    """threshold_distribution, memoized on the result (deterministic: seeded by its id)."""
    memo = r.setdefault("_dists", {})
    key = (tuple(bits_list), min_accuracy, size_factor)
    if key not in memo:
        memo[key] = threshold_distribution(r, bits_list, min_accuracy, size_factor)
    return memo[key]


def reliability(results, test, rule, guess, min_accuracy, bits_list=BITS, size_factors=(1, 2, 4)) -> dict:
    """How reproducible the measured threshold is, the ceiling it puts on any predictor, and
    the rule's and the constant guess's expected scores against re-drawn suites.

    rule: a Rule, or a function of a result giving its prediction (leave-one-family-out: each
    family's from the rule fitted without it); guess likewise a bit-width or such a function."""
    out = {"size_factors": {}}
    test_ids = {r["id"] for r in test}
    pred_rule = rule if callable(rule) else (lambda r: predict(r, rule, bits_list))
    pred_const = guess if callable(guess) else (lambda r: guess)
    for f in size_factors:
        dists = {r["id"]: distribution(r, bits_list, min_accuracy, f) for r in results}
        ceiling_all = sum(max(d.values()) for d in dists.values()) / len(dists)
        ceiling_test = sum(max(dists[i].values()) for i in test_ids) / len(test_ids)
        out["size_factors"][f] = {"ceiling": float(ceiling_all), "ceiling_held_out": float(ceiling_test)}
        if f == 1:
            reproduce = [dists[r["id"]].get(bits_rank(r["true_min_bits"]), 0.0) for r in results]
            # plain floats and ints: `qtools calibrate --json` prints them
            reproduce = [float(p) for p in reproduce]
            out["reproduce"] = sum(reproduce) / len(reproduce)
            out["reproduce_under_half"] = sum(p < 0.5 for p in reproduce)
            out["reproduce_min"] = min(reproduce)
            for name, pred in (("rule", pred_rule), ("constant", pred_const)):
                exact = opt = 0.0
                for r in test:
                    d, p = dists[r["id"]], bits_rank(pred(r))
                    exact += d.get(p, 0.0)
                    opt += sum(q for t, q in d.items() if t > p)
                out[name] = {"exact": float(exact / len(test)), "optimistic": float(opt / len(test))}
    return out


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for a rate of k in n."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    mid = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, mid - half), min(1.0, mid + half)


def attribution(results, min_accuracy) -> dict:
    """What sets the threshold: compare it with the threshold when only the base's
    quantization noise counts (the delta kept exactly)."""
    pairs = [(r, exact_delta_threshold(r, min_accuracy)) for r in results]
    pairs = [(r, e) for r, e in pairs if e != MISSING]
    out = {"n": len(pairs), "exact_thresholds": {}, "same": 0, "delta_costs": 0, "lucky": 0}
    for r, e in pairs:
        out["exact_thresholds"][e] = out["exact_thresholds"].get(e, 0) + 1
        t = bits_rank(r["true_min_bits"])
        out["same" if t == bits_rank(e) else "delta_costs" if t > bits_rank(e) else "lucky"] += 1
    at4 = [(r["behaviour"]["4"], r["behaviour_exact_delta"]["4"]) for r, _ in pairs
           if "4" in r["behaviour"] and "4" in r["behaviour_exact_delta"]]
    if at4:
        out["at4"] = {"accuracy": sum(a["accuracy"] for a, _ in at4) / len(at4),
                      "accuracy_exact": sum(b["accuracy"] for _, b in at4) / len(at4),
                      "critical": sum(a["critical_errors"] for a, _ in at4),
                      "critical_exact": sum(b["critical_errors"] for _, b in at4)}
    return out


def _counts(results) -> dict:
    out = {}
    for r in results:
        out[r["true_min_bits"]] = out.get(r["true_min_bits"], 0) + 1
    return out


def leave_one_family_out(results, min_accuracy, bits_list=BITS) -> dict:
    """Fit on the other families, judge the held-out one, for every family in turn: the rule
    (statistic, aggregate and threshold all refitted) and the constant guess (the training
    families' most common threshold), pooled over every held-out fine-tune."""
    rows, pred_rule, pred_const = [], {}, {}
    for name, train, test in folds(results):
        rule, train_score = fit(train, bits_list)
        guess = constant_guess(train)
        for r in test:
            pred_rule[r["id"]], pred_const[r["id"]] = predict(r, rule, bits_list), guess
        ceiling = sum(max(distribution(r, bits_list, min_accuracy, 1).values()) for r in test) / len(test)
        rows.append({"family": name, "rule": rule, "train": train_score, "held_out": score(test, rule, bits_list),
                     "guess": guess, "constant": score_predictions([(guess, r["true_min_bits"]) for r in test],
                                                                   bits_list),
                     "ceiling": float(ceiling)})
    held = score_predictions([(pred_rule[r["id"]], r["true_min_bits"]) for r in results], bits_list)
    const = score_predictions([(pred_const[r["id"]], r["true_min_bits"]) for r in results], bits_list)
    return {"folds": rows, "held_out": held, "constant": const, "predictions": pred_rule,
            "constant_predictions": pred_const}


def study(results, min_accuracy) -> dict:
    """Everything the report shows about the usable fine-tunes, computed: the rule and the
    constant guess judged leave-one-family-out, the final rule fitted on every family, the
    reliability of the measured thresholds (the ceiling), separability, erratic fine-tunes and
    what sets the threshold."""
    lofo = leave_one_family_out(results, min_accuracy)
    held, const = lofo["held_out"], lofo["constant"]
    rel = reliability(results, results, lambda r: lofo["predictions"][r["id"]],
                      lambda r: lofo["constant_predictions"][r["id"]], min_accuracy)
    ceiling = rel["size_factors"][1]["ceiling_held_out"]
    rule, train_score = fit(results)
    met = goal_met(held, const)
    names = [f["family"] for f in lofo["folds"]]
    evidence = (f"docs/calibration.md: leave-one-family-out over {len(names)} families ({', '.join(names)}): "
                f"{held['exact']}/{held['n']} held-out fine-tunes exact, {held['optimistic']} optimistic "
                f"(worst {held['worst_optimistic_steps']} step(s)); constant guess {const['exact']}/{const['n']}; "
                f"ceiling for any predictor against a re-drawn suite: {ceiling:.0%}")
    rule = replace(rule, provisional=not met, evidence=evidence)
    per_family = {}
    for name, _, test in folds(results):
        per_family[name] = {"n": len(test), "thresholds": _counts(test),
                            "ceiling": next(f["ceiling"] for f in lofo["folds"] if f["family"] == name)}
    return {
        "rule": rule, "train": train_score, "held_out": held, "goal_met": met,
        "families": names, "folds": lofo["folds"], "per_family": per_family,
        "predictions": lofo["predictions"],
        "wilson": wilson(held["exact"], held["n"]),
        "wilson_optimistic": wilson(held["optimistic"], held["n"]),
        "guess": constant_guess(results), "baseline": const,
        "wilson_constant": wilson(const["exact"], const["n"]),
        "reliability": rel, "ceiling": ceiling,
        "thresholds": _counts(results),
        "separability": separability(results, rule.statistic, rule.aggregate),
        "erratic": erratic(results, min_accuracy),
        "attribution": attribution(results, min_accuracy),
    }
