"""The rule and its evidence: fit a threshold, score it, and say how far it can be trusted.

A rule is (statistic, aggregate, min): a bit-width survives when the statistic,
|D|^2-weighted over the model or the weakest layer's, is at least min. It is
fitted on half the usable fine-tunes and judged on the other half, beside the
constant guess; a bootstrap of the suite bounds what any predictor can reach.
"""

from __future__ import annotations

import math
from dataclasses import replace

from .. import QtoolsError
from ..survival.rule import AGGREGATES, Rule, smallest_surviving
from .grid import BITS
from .measure import MISSING, exact_delta_threshold, passes

STATISTICS = ["subspace_snr", "delta_snr", "cosine", "delta_retention", "sign_agreement", "delta_to_step"]
BOOTSTRAP_DRAWS = 2000


def _rank(b):
    """Order bit-widths; None (no bit-width survives) is above 8."""
    return 16 if b is None else b


def _value(r, b, stat, agg):
    """What a rule on `stat` (`agg`) judges at b bits for a fine-tune; memoized, as fitting asks often."""
    memo = r.setdefault("_values", {})
    key = (b, stat, agg)
    if key not in memo:
        memo[key] = Rule(stat, agg).value(r["summary"], r["layers"], b)
    return memo[key]


def predict(res: dict, rule: Rule, bits_list=BITS):
    """The rule's predicted minimum bit-width for a fine-tune, as Rule.predict decides it
    (on the memoized values)."""
    return smallest_surviving(bits_list, lambda b: rule.clears(_value(res, b, rule.statistic, rule.aggregate)))


def split(results):
    """Deterministic split: every other usable fine-tune trains, the rest are held out."""
    return results[0::2], results[1::2]


def score(results, rule, bits_list=BITS) -> dict:
    exact = optimistic = pessimistic = worst_optimistic = 0
    for r in results:
        p, t = _rank(predict(r, rule, bits_list)), _rank(r["true_min_bits"])
        if p == t:
            exact += 1
        elif p < t:
            optimistic += 1
            steps = sum(1 for b in [*bits_list, 16] if p <= b < t)
            worst_optimistic = max(worst_optimistic, steps)
        else:
            pessimistic += 1
    n = len(results)
    return {"n": n, "exact": exact, "optimistic": optimistic, "pessimistic": pessimistic,
            "exact_rate": exact / n if n else 0.0, "worst_optimistic_steps": worst_optimistic}


def goal_met(held_out: dict) -> bool:
    """The goal: 90% exact held out, no optimistic miss beyond one bit-width. Short of it the
    rule stays flagged provisional in every delta-survival report."""
    return held_out["exact_rate"] >= 0.9 and held_out["worst_optimistic_steps"] <= 1


def _log_margin(train, rule, bits_list) -> float:
    """How far, in log ratio, the closest training value sits from the threshold: among
    rules that score the same, the one with the widest gap generalises best."""
    t = rule.min
    if t <= 0:
        return 0.0
    gaps = [abs(math.log(v / t)) for r in train for b in bits_list
            for v in [_value(r, b, rule.statistic, rule.aggregate)]
            if v is not None and v > 0 and math.isfinite(v)]
    return min(gaps) if gaps else 0.0


def _fit_threshold(train, stat, agg, bits_list=BITS):
    """(key, rule, score) of the best threshold for one statistic and aggregate on `train`:
    most exact, then fewest optimistic misses, then the widest log-ratio margin."""
    values = sorted({
        v for r in train for b in bits_list
        for v in [_value(r, b, stat, agg)] if v is not None and math.isfinite(v)
    })
    # midpoints between neighbouring values (geometric for positive ones: the SNRs span decades)
    cands = [math.sqrt(a * b) if a > 0 else (a + b) / 2 for a, b in zip(values, values[1:])] or values
    best = None
    for t in cands:
        rule = Rule(stat, agg, t)
        s = score(train, rule, bits_list)
        key = (s["exact"], -s["optimistic"], -s["worst_optimistic_steps"])
        if best is not None and key < best[0][:3]:
            continue
        key = (*key, _log_margin(train, rule, bits_list))
        if best is None or key > best[0]:
            best = (key, rule, s)
    return best


def fit(train, bits_list=BITS) -> tuple[Rule, dict]:
    """Choose the statistic and aggregate by leave-one-out cross-validation on `train`
    (a threshold refitted without each fine-tune predicts it), then fit its threshold on
    all of `train`. Picking by training fit alone overfits: with a few dozen fine-tunes
    some statistic always separates the training split by chance."""
    best = None
    for stat in STATISTICS:
        for agg in AGGREGATES:
            full = _fit_threshold(train, stat, agg, bits_list)
            if full is None:
                continue
            cv = {"exact": 0, "optimistic": 0}
            for i in range(len(train)):
                rest = train[:i] + train[i + 1:]
                fold = _fit_threshold(rest, stat, agg, bits_list) if rest else full
                if fold is None:
                    continue
                s = score([train[i]], fold[1], bits_list)
                cv["exact"] += s["exact"]
                cv["optimistic"] += s["optimistic"]
            key = (cv["exact"], -cv["optimistic"], full[0])
            if best is None or key > best[0]:
                best = (key, full[1], {**full[2], "cv_exact": cv["exact"], "cv_optimistic": cv["optimistic"]})
    if best is None:
        raise QtoolsError("calibration has no usable fine-tunes to fit")
    return best[1], best[2]


def constant_baseline(train, test) -> tuple[int | None, dict]:
    """The most common true threshold of the training split, predicted for every held-out
    fine-tune: what a rule must beat to have learnt anything from the weights."""
    counts = {}
    for r in train:
        counts[r["true_min_bits"]] = counts.get(r["true_min_bits"], 0) + 1
    guess = max(counts, key=lambda b: (counts[b], -_rank(b))) if counts else None
    exact = sum(r["true_min_bits"] == guess for r in test)
    optimistic = sum(_rank(guess) < _rank(r["true_min_bits"]) for r in test)
    return guess, {"n": len(test), "exact": exact, "optimistic": optimistic}


def separability(results, stat, agg, bits_list=BITS) -> list[dict]:
    """Per bit-width, the statistic's range over fine-tunes that keep their behaviour there
    and over those that lose it. Overlapping ranges: no threshold on it can be exact."""
    out = []
    for b in bits_list:
        keep, lose = [], []
        for r in results:
            v = _value(r, b, stat, agg)
            if v is None:
                continue
            (keep if b >= _rank(r["true_min_bits"]) else lose).append(v)
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


def threshold_distribution(res: dict, bits_list=BITS, min_accuracy: float = 0.8, size_factor: int = 1,
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
    thr = np.full(draws, _rank(None))
    for b in sorted(bits_list, reverse=True):
        k = str(b)
        acc = counts @ _case_bits(beh, k, "correct") / m
        ok = (acc >= min_accuracy - 1e-12) & (counts @ _case_bits(beh, k, "critical") == 0)
        alive &= ok
        thr[alive] = b
    values, freq = np.unique(thr, return_counts=True)
    return {int(v): f / draws for v, f in zip(values, freq)}


def reliability(results, test, rule, guess, min_accuracy, bits_list=BITS, size_factors=(1, 2, 4)) -> dict:
    """How reproducible the measured threshold is, the ceiling it puts on any predictor, and
    the rule's and the constant guess's expected scores against re-drawn suites."""
    out = {"size_factors": {}}
    test_ids = {r["id"] for r in test}
    for f in size_factors:
        dists = {r["id"]: threshold_distribution(r, bits_list, min_accuracy, f) for r in results}
        ceiling_all = sum(max(d.values()) for d in dists.values()) / len(dists)
        ceiling_test = sum(max(dists[i].values()) for i in test_ids) / len(test_ids)
        out["size_factors"][f] = {"ceiling": ceiling_all, "ceiling_held_out": ceiling_test}
        if f == 1:
            reproduce = [dists[r["id"]].get(_rank(r["true_min_bits"]), 0.0) for r in results]
            # plain floats and ints: `qtools calibrate --json` prints them
            reproduce = [float(p) for p in reproduce]
            out["reproduce"] = sum(reproduce) / len(reproduce)
            out["reproduce_under_half"] = sum(p < 0.5 for p in reproduce)
            out["reproduce_min"] = min(reproduce)
            for name, pred in (("rule", lambda r: predict(r, rule, bits_list)), ("constant", lambda r: guess)):
                exact = opt = 0.0
                for r in test:
                    d, p = dists[r["id"]], _rank(pred(r))
                    exact += d.get(p, 0.0)
                    opt += sum(q for t, q in d.items() if t > p)
                out[name] = {"exact": exact / len(test), "optimistic": opt / len(test)}
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
        t = _rank(r["true_min_bits"])
        out["same" if t == _rank(e) else "delta_costs" if t > _rank(e) else "lucky"] += 1
    at4 = [(r["behaviour"]["4"], r["behaviour_exact_delta"]["4"]) for r, _ in pairs
           if "4" in r["behaviour"] and "4" in r["behaviour_exact_delta"]]
    if at4:
        out["at4"] = {"accuracy": sum(a["accuracy"] for a, _ in at4) / len(at4),
                      "accuracy_exact": sum(b["accuracy"] for _, b in at4) / len(at4),
                      "critical": sum(a["critical_errors"] for a, _ in at4),
                      "critical_exact": sum(b["critical_errors"] for _, b in at4)}
    return out


def study(results, min_accuracy) -> dict:
    """Everything the report shows about the usable fine-tunes, computed: the rule fitted on
    the training split and its scores, the constant guess, the reliability of the measured
    thresholds, separability, erratic fine-tunes and what sets the threshold."""
    train, test = split(results)
    rule, train_score = fit(train)
    test_score = score(test, rule)
    guess, baseline = constant_baseline(train, test)
    rel = reliability(results, test, rule, guess, min_accuracy)
    ceiling = rel["size_factors"][1]["ceiling_held_out"]
    evidence = (f"docs/calibration.md: {test_score['exact']}/{test_score['n']} held-out demo fine-tunes exact, "
                f"{test_score['optimistic']} optimistic; ceiling for any predictor against a re-drawn suite: "
                f"{ceiling:.0%}")
    rule = replace(rule, provisional=not goal_met(test_score), evidence=evidence)
    thresholds = {}
    for r in results:
        thresholds[r["true_min_bits"]] = thresholds.get(r["true_min_bits"], 0) + 1
    return {
        "rule": rule, "train": train_score, "held_out": test_score, "goal_met": goal_met(test_score),
        "train_ids": {r["id"] for r in train},
        "wilson": wilson(test_score["exact"], test_score["n"]),
        "guess": guess, "baseline": baseline,
        "reliability": rel, "ceiling": ceiling,
        "thresholds": thresholds,
        "separability": separability(results, rule.statistic, rule.aggregate),
        "erratic": erratic(results, min_accuracy),
        "attribution": attribution(results, min_accuracy),
    }
