"""docs/study.md for the study (`qtools calibrate --study`): the fine-tunes, how reliable
their thresholds are, both tiers held out by family against the constant guess and the ceiling,
and which goals are met."""

from __future__ import annotations

from pathlib import Path

from tabulate import tabulate

from ..io.atomic import write_text_atomic
from .fit import bits_rank, distribution, family, leave_one_family_out
from .grid import BITS
from .tiers import (
    bracket_probe_tier,
    constant_tier,
    every_statistic_held_out,
    fake_vs_real,
    monotone_ceiling,
    optimistic_covers,
    probe_tier,
    scale_inversions,
    truth,
    weights_tier,
)

GOAL_PROBE_EXACT = 0.95
GOAL_PROBE_COST = 0.05
GOAL_WEIGHTS_EXACT = 0.70
GOAL_WEIGHTS_BETWEEN = 2.0
GOAL_REPRODUCE = 0.90
GOAL_USABLE = 64


def analyse(usable: list, excluded: list, min_accuracy: float) -> dict:
    """Every number the report shows."""
    rep = [distribution(r, BITS, min_accuracy, 1).get(bits_rank(r["true_min_bits"]), 0.0) for r in usable]
    ceiling = [max(distribution(r, BITS, min_accuracy, 1).values()) for r in usable]
    thresholds: dict = {}
    for r in usable:
        thresholds[truth(r)] = thresholds.get(truth(r), 0) + 1
    weights = weights_tier(usable)
    return {
        "n": len(usable), "excluded": len(excluded), "families": list(dict.fromkeys(family(r) for r in usable)),
        "thresholds": thresholds,
        "reproduce_mean": sum(rep) / len(rep) if rep else 0.0,
        "reproduce_90": sum(p >= GOAL_REPRODUCE for p in rep),
        **unsettled(usable, min_accuracy),
        "ceiling": sum(ceiling) / len(ceiling) if ceiling else 0.0,
        "fake_vs_real": fake_vs_real(usable),
        "weights": weights,
        "probe": probe_tier(usable),
        "bracket_probe": bracket_probe_tier(usable, weights),
        "constant": constant_tier(usable),
        "inversions": scale_inversions(usable),
        "every_statistic": every_statistic_held_out(usable),
        # where the bracket unmoved was optimistic: what being right there would have cost
        "optimistic_covers": optimistic_covers(usable, weights["unmoved_predictions"], min_accuracy),
        # whatever the rule: one for all families (what delta-survival ships), one per family
        "monotone": {"one_rule": monotone_ceiling(usable), "per_family": monotone_ceiling(usable, by_family=True)},
        # the point rule delta-survival printed before the bracket (one bit-width, not a bracket)
        "point": leave_one_family_out([{**r, "true_min_bits": truth(r)} for r in usable], min_accuracy)["held_out"],
    }


def unsettled(usable: list, min_accuracy: float, sizes=(2, 4)) -> dict:
    """The fine-tunes whose threshold fewer than GOAL_REPRODUCE of re-drawn suites reproduce, each
    with its re-drawn thresholds, how often a suite `sizes` times as large would reproduce it
    (its cases drawn from these: each case failing at the rate it did) and what it turns on; and
    how many fine-tunes such larger suites would settle."""
    def reproduced(r, f):
        return distribution(r, BITS, min_accuracy, f).get(bits_rank(r["true_min_bits"]), 0.0)

    return {
        "reproduce_90_larger": {f: sum(reproduced(r, f) >= GOAL_REPRODUCE for r in usable) for f in sizes},
        "unsettled": [{"id": r["id"], "threshold": r["true_min_bits"],
                       "distribution": distribution(r, BITS, min_accuracy, 1),
                       "larger": {f: reproduced(r, f) for f in sizes}, "below": _below(r)}
                      for r in usable if reproduced(r, 1) < GOAL_REPRODUCE],
    }


def _below(r: dict) -> str:
    """What the measured threshold turns on: accuracy and critical errors at the bit-width below it
    (its fail) and at it (its pass), fake-quantized as the bootstrap re-draws them."""
    t = r["true_min_bits"]
    ranked = sorted(BITS)
    if t is None or t not in ranked:
        return "-"
    out = []
    for b in ranked[max(0, ranked.index(t) - 1):ranked.index(t) + 1]:
        s = r["behaviour"][str(b)]
        out.append(f"{b}: {s['accuracy']:.1%}, {s['critical_errors']} critical")
    return "; ".join(out)


def goals(a: dict) -> list[tuple[str, str, bool]]:
    """(goal, measured, met) for each of the study's goals."""
    w, u, p = a["weights"]["held_out"], a["weights"]["unmoved"], a["probe"]["held_out"]
    m = a["monotone"]["per_family"]
    alone = a["probe"]["cost_alone"]
    cost = alone if alone["n"] else a["probe"]["cost"]
    largest = max(a["thresholds"].values()) if a["thresholds"] else 0
    out = [
        (f"at least {GOAL_USABLE} usable fine-tunes", f"{a['n']}", a["n"] >= GOAL_USABLE),
        ("true thresholds on at least 3 bit-widths, none holding more than half",
         ", ".join(f"{k}: {v}" for k, v in sorted(a["thresholds"].items(), key=lambda kv: bits_rank(kv[0]))),
         len(a["thresholds"]) >= 3 and largest <= a["n"] / 2),
        (f"the bootstrap reproduces each threshold in at least {GOAL_REPRODUCE:.0%} of re-drawn suites",
         f"{a['reproduce_90']}/{a['n']} fine-tunes (mean {a['reproduce_mean']:.0%})", a["reproduce_90"] == a["n"]),
        ("probe, held out: never optimistic", f"{p['optimistic']}/{p['n']} optimistic", p["n"] > 0 and p["optimistic"] == 0),
        (f"probe, held out: at least {GOAL_PROBE_EXACT:.0%} exact", f"{p['exact']}/{p['n']}",
         p["n"] > 0 and p["exact_rate"] >= GOAL_PROBE_EXACT),
        (f"probe at most {GOAL_PROBE_COST:.0%} of the sweep's time",
         "-" if cost["median"] is None else f"median {cost['median']:.1%}, worst {cost['max']:.1%}"
         + (f" (timed alone, {alone['n']} of {a['probe']['n']} fine-tunes; {a['probe']['cost']['median']:.1%} as measured "
            "two at a time)" if alone["n"] else ""),
         cost["median"] is not None and cost["max"] <= GOAL_PROBE_COST and cost["n"] == a["probe"]["n"]),
        ("weights tier, held out: never optimistic", f"{w['optimistic']}/{w['n']} optimistic, its survive end moved "
         f"up as far as the training families show it must be (unmoved: {u['optimistic']} optimistic"
         + "".join(f"; {c['id']} loses {c['lost']} bits with every statistic at least as high as {c['covered']} "
                   f"fine-tunes ({c['covered_other_families']} of other families) show at the threshold they keep"
                   for c in a.get("optimistic_covers", []))
         + "; below)", w["n"] > 0 and w["optimistic"] == 0),
        (f"weights tier, held out: at least {GOAL_WEIGHTS_EXACT:.0%} exact, or the measurement that shows what the "
         "weights cannot see", f"{w['exact']}/{w['n']}; no rule monotone in the {m['statistics']} statistics, one per family and "
         f"never optimistic on it, is exact for more than {m['exact']}/{m['n']} (below)",
         w["n"] > 0 and (w["exact_rate"] >= GOAL_WEIGHTS_EXACT or m["exact"] < GOAL_WEIGHTS_EXACT * m["n"])),
        (f"the bracket leaves the probe at most {GOAL_WEIGHTS_BETWEEN:g} bit-widths on average",
         f"{w['mean_between']:.2f} between (the probe runs {w['mean_check']:.2f} of {len(BITS)}: these and both "
         "ends, which it confirms)", w["n"] > 0 and w["mean_between"] <= GOAL_WEIGHTS_BETWEEN),
    ]
    return out


def _parts_text(cost: dict, check_median) -> str:
    return (f"Where it goes, in units of one bit-width's quantize + validate (medians): the float model's own "
            f"answers {cost['generate']:.2f}, each precision's teacher-forced pass {cost['score_per_precision']:.2f}. "
            "On these tiny models on a CPU a pass over the suite costs about what generating its answers does (no "
            f"memory-bound decoding to save), so the float answers alone are {cost['generate'] / len(BITS):.0%} of a "
            f"{len(BITS)}-bit-width sweep; read from the float model's validate log instead (`qtools probe "
            f"--reference LOG`: the float16 model is validated before anything is quantized), the probe is median "
            f"{cost['median_answers_read']:.0%}. The probe of the bracket's check set alone, estimated from the same "
            f"parts: median {check_median:.0%} of the sweep.")


def _cost_text(p: dict, bp: dict) -> list:
    """The probe's cost against the sweep: timed alone where it was, and as the study measured it."""
    alone, study = p["cost_alone"], p["cost"]
    lines = []
    if alone["n"]:
        lines += [f"The probe's time against the sweep on the same fine-tune (every bit-width quantized and validated, "
                  f"from the real models' mean time), each fine-tune timed alone with nothing else running "
                  f"(`make calibrate-timing`: {alone['n']} of the {p['n']} fine-tunes, a family at a time in turn; "
                  f"calibration/timing/): median {alone['median']:.1%}, from {alone['min']:.1%} to {alone['max']:.1%}. "
                  + ("" if alone["score_per_precision"] is None else _parts_text(alone, bp["cost_median_alone"]))
                  + f" No probe that runs the model over the suite reaches {GOAL_PROBE_COST:.0%} here.", ""]
    if study["median"] is not None:
        lines += [f"As the study measured both, two fine-tunes at a time on this 2-core machine: median "
                  f"{study['median']:.1%}, worst {study['max']:.1%} ({study['n']} fine-tunes). "
                  + ("The probe's streamed model multiplies with numpy's BLAS on every core (its float answers and its "
                     "scoring pass), so beside another job the cores were oversubscribed and its seconds say as much "
                     "about the neighbour as about the probe; the times above, taken alone, are the ones to read." if alone["n"] else
                     "" if study["score_per_precision"] is None else _parts_text(study, bp["cost_median"])), ""]
    return lines


def _bracket_text(br: dict) -> str:
    lost = ("" if not br.get("lost_statistic") else f"{br['lost_statistic']} ({br['lost_aggregate']}) ")
    up = f", then {br['raise_by']} up" if br.get("raise_by") else ""
    return f"{br['statistic']} ({br['aggregate']}) > {br['survive']:.4g}{up}; lost: {lost}<= {br['lost']:.4g}"


def _ceiling_text(c: dict | None, n: int) -> list:
    if not c:
        return []
    return [f"The most the weights can do: a bracket on one statistic, fitted on all {n} fine-tunes and judged on the "
            f"same ones (its survive bound the lowest never optimistic on them), is exact for at most "
            f"{c['exact']}/{c['n']} ({c['statistic']}, {c['aggregate']}; {c['mean_between']:.2f} left between). "
            f"{GOAL_WEIGHTS_EXACT:.0%} exact and never optimistic is beyond any such bracket on these fine-tunes: where "
            "fine-tunes keep and lose a bit-width at the same values of every statistic (the scale inversions "
            "below), only running the model tells them apart.", ""]


def _monotone_text(a: dict) -> list:
    """The bound monotone_ceiling puts on any weights rule, overall and per family, beside the tier."""
    one, per = a["monotone"]["one_rule"], a["monotone"]["per_family"]
    if not per["n"]:
        return []
    held = {f["family"]: f for f in a["weights"]["folds"]}
    rows = []
    for fam, c in per["families"].items():
        blocked = [x for x in per["blocked"] if x["family"] == fam]
        eg = "-" if not blocked else (f"{blocked[0]['id']} keeps {blocked[0]['bits']} bits where {blocked[0]['by']} "
                                      f"lost {blocked[0]['by_bits']}")
        f = held.get(fam)
        rows.append([fam, f"{f['exact']}/{f['n']}" if f else "-", f"{c['exact']}/{c['n']}", eg])
    return [f"Whatever the rule: a rule that keeps a bit-width on the {per['statistics']} statistics (each statistic x "
            "aggregate), and keeps it wherever they and the bit-width are at least as high, cannot keep a bit-width "
            "where another fine-tune lost one at least as large with every statistic at least as high: it would keep "
            "that one too, an optimistic answer. Counted on these fine-tunes, such a rule never optimistic on them is "
            f"exact for at most {one['exact']}/{one['n']} (one rule for every family, as delta-survival ships it); "
            f"one rule per family, each never optimistic on its own family and fitted knowing its truths, for at most "
            f"{per['exact']}/{per['n']} ({per['exact'] / per['n']:.0%}). A weights tier held out by family can do no "
            f"better than that, so {GOAL_WEIGHTS_EXACT:.0%} exact and never optimistic is beyond any weights rule "
            f"on these statistics: for {len(per['blocked'])} fine-tunes another of their own family lost a bit-width "
            "at least as large with every statistic at least as high.", "",
            tabulate(rows, headers=["family", "weights tier exact (held out)", "at most, any rule for the family",
                                    "e.g. (the first that bounds it)"], tablefmt="github"), ""]


def _covers_text(covers: list) -> list:
    """What never being optimistic where the tier was (optimistic_covers) would have cost."""
    out = []
    for c in covers:
        lb = c["lost_behaviour"]
        below = ", ".join(str(b) for b in c["passes_below"])
        out += [f"To be right for {c['id']} (truly {_bits(c['truth'])}), a weights rule must refuse its "
                f"{c['lost']} bits ({lb['accuracy']:.1%}, {lb['critical_errors']} critical). A rule that keeps a "
                "bit-width wherever the statistics and the bit-width are at least as high as where it keeps one "
                f"then refuses every bit-width up to {c['lost']} at which every statistic is at most this one's at "
                f"{c['lost']} bits. Those include the thresholds of {c['covered']} other fine-tunes "
                f"({c['covered_other_families']} in the families its held-out bracket was fitted on), at which each "
                f"of them passes: refusing them makes the bracket pessimistic for all {c['covered']}, and nothing "
                "those families show calls for it."
                + (f" It passes, fake-quantized, at {below} bits, where no statistic is higher than at "
                   f"{c['lost']}: its loss at {c['lost']} is not one the delta's survival orders." if below else ""),
                ""]
    return out


def _margin_text(w: dict, constant: dict) -> list:
    """The move that makes the bracket never optimistic held out (weights_tier), what it costs
    against the bracket unmoved, beside the constant guess."""
    if not w.get("margins"):
        return []
    ms = ", ".join(f"{f} {k}" for f, k in w["margins"].items())
    h, u = w["held_out"], w["unmoved"]
    final = (w.get("bracket") or {}).get("raise_by", 0)
    return [f"The move: the bracket's survive end goes up as many supported bit-widths as it takes to make the "
            "training families' own held-out answers never optimistic (chosen without the held-out family; per "
            f"held-out family: {ms}; fitted on every family: {final}). Held out, the bracket is then optimistic for "
            f"{h['optimistic']}/{h['n']}, exact for {h['exact']} (the constant guess: {constant['exact']} exact, "
            f"{constant['optimistic']} optimistic) and leaves {h['mean_between']:.2f} bit-widths between (the probe "
            f"runs {h['mean_check']:.2f} of {len(BITS)}). Unmoved, it is optimistic for {u['optimistic']}/{u['n']}, "
            f"exact for {u['exact']} and leaves {u['mean_between']:.2f} between: the move gives up the answers the "
            "weights settled alone for never being optimistic, and the probe, which checks the bracket, gives "
            "them back.", "",
            *_per_end_text(w.get("per_end"), constant)]


def _per_end_text(e: dict | None, constant: dict) -> list:
    """The bracket with a move for each survive end (weights_tier's per_end), beside the constant guess."""
    if not e:
        return []
    moved = ", ".join(f"{f} " + (" ".join(f"{a}:+{k}" for a, k in mv.items() if k) or "none")
                      for f, mv in e["margins"].items())
    return [f"With a move for each survive end instead (the fewest bit-widths that make the training families' own "
            f"held-out answers at that end never optimistic; per held-out family, the ends moved: {moved}), the bracket "
            f"held out leaves {e['mean_between']:.2f} bit-widths between, is exact for {e['exact']} and optimistic for "
            f"{e['optimistic']}/{e['n']} (the constant guess: {constant['exact']} exact, {constant['optimistic']} "
            "optimistic): an end at which only the held-out family loses is not moved.", ""]


def _every_statistic_text(per_stat: dict) -> list:
    """Which fine-tunes each one-statistic bracket, held out, is optimistic for: whether the tier's
    optimism is its choosing's or every statistic's."""
    if not per_stat:
        return []
    never = [k for k, v in per_stat.items() if not v]
    hits: dict = {}
    for ids in per_stat.values():
        for i in ids:
            hits[i] = hits.get(i, 0) + 1
    text = (f"Before any choosing: held out by family, {len(never)} of the {len(per_stat)} one-statistic brackets "
            "(each statistic x aggregate, both sides on it) are never optimistic"
            + (f" ({', '.join(never)})" if never else "") + ".")
    if hits:
        text += " Where they are optimistic: " + "; ".join(
            f"{i} ({n} bracket{'s' if n > 1 else ''})" for i, n in sorted(hits.items(), key=lambda kv: -kv[1])) + "."
    text += (" Each fits its bound at the most its training families lost at; a family that loses a bit-width at "
             "values none of them did is beyond it.")
    return [text, ""]


def _blind(fine_tune: str, inversions: list) -> str:
    """Where an optimistic fine-tune is the stronger of a scale inversion no statistic separates:
    no weights rule monotone in its statistic is right on both of the pair."""
    for x in inversions:
        if x["separating"] == 0 and fine_tune == f"{x['adapter']}-x{x['stronger']:g}":
            b = _bits(x["weaker_threshold"])
            return (f"; the stronger of a scale inversion: x{x['weaker']:g} keeps {b} bits with every statistic at {b} "
                    f"bits at most this one's, so a rule monotone in its statistic that keeps x{x['weaker']:g}'s {b} "
                    "bits keeps this one's too, and every larger bit-width")
    return ""


def _bits(b) -> str:
    return "none" if b is None else str(b)


def write_study_report(usable: list, excluded: list, fams: list, path, min_accuracy: float, suites: dict) -> dict:
    """Write the report; returns analyse()'s numbers with the goals."""
    a = analyse(usable, excluded, min_accuracy)
    g = goals(a)
    met = all(ok for _, _, ok in g)
    lines = ["# The calibration study", ""]
    lines += [("All goals are met." if met else "**PROVISIONAL**: the goals marked no below are not met; "
               "until they are, confirm every prediction with `make sweep`."), ""]
    lines += ["Written by `qtools calibrate --study` (`make calibrate`) from the per-fine-tune results in "
              "`calibration/results/` (`--from-cache` refits from them alone). Truth is the threshold of real "
              "quantized models (`qtools quantize` + `qtools validate`); every verdict is validate's: accuracy "
              f">= {min_accuracy:.0%} and no critical error.", ""]
    lines += ["## Goals", "", tabulate([[n, m, "yes" if ok else "no"] for n, m, ok in g],
                                      headers=["goal", "measured", "met"], tablefmt="github"), ""]
    rows = []
    by_fam: dict = {}
    for r in usable + excluded:
        by_fam.setdefault(family(r), []).append(r)
    for f in fams:
        rs = by_fam.get(f["name"], [])
        use = [r for r in rs if r in usable]
        acc = [r["behaviour"]["16"]["accuracy"] for r in use]
        th: dict = {}
        for r in use:
            th[_bits(truth(r))] = th.get(_bits(truth(r)), 0) + 1
        rows.append([f["name"], f.get("task", "demo"), suites.get(f.get("task", "demo"), "-"), len(rs), len(use),
                     f"{min(acc):.1%}-{max(acc):.1%}" if acc else "-",
                     ", ".join(f"{k}: {v}" for k, v in sorted(th.items(), key=lambda kv: bits_rank(
                         None if kv[0] == "none" else int(kv[0]))))])
    lines += ["## Fine-tunes", "",
              f"{a['n']} usable of {a['n'] + a['excluded']} measured: a fine-tune is used when its float16 model "
              "passes its suite at the family's bar (95%) with no critical error; the others are listed, not used.",
              "", tabulate(rows, headers=["family", "task", "suite", "measured", "usable", "float16 accuracy (usable)",
                                          "true thresholds"], tablefmt="github"), ""]
    spent = sum(r.get("seconds") or 0.0 for r in usable + excluded)
    lines += [f"Measuring took {spent / 3600:.1f} h summed over the {len(usable) + len(excluded)} fine-tunes (each "
              "result's seconds: float16 and fake-quantized behaviour, delta-survival, the probe and the real "
              "models; two at a time on this 2-core machine). Training the adapters and pretraining the bases come "
              "on top and are not in the results (README: about 10 h from nothing here with `JOBS=2`). From its "
              "results (`FROM_CACHE=1`) the study refits byte for byte.", ""]
    fr = a["fake_vs_real"]
    lines += ["## Fake against real quantization", "",
              f"Of {fr['n']} fine-tunes, fake quantization (the values `mx.quantize` stores, run in float16) gives the "
              f"real quantized models' threshold for {fr['same']}; the real threshold is higher for {fr['real_higher']} "
              f"and lower for {fr['real_lower']}.", ""]
    lines += ["## How reproducible the thresholds are", "",
              f"The suite's cases resampled ({2000} draws per fine-tune): the measured threshold comes back in "
              f"{a['reproduce_mean']:.0%} of re-drawn suites on average; {a['reproduce_90']} of {a['n']} fine-tunes "
              f"reach {GOAL_REPRODUCE:.0%}. The ceiling for any predictor against a re-drawn suite: {a['ceiling']:.0%}.", ""]
    if a["unsettled"]:
        big = a["reproduce_90_larger"]
        lines += [f"Were the suite twice as large, its cases failing at the rates these did (2x as many drawn from "
                  f"the same cases), {big[2]} of {a['n']} would reach {GOAL_REPRODUCE:.0%}; four times as large, "
                  f"{big[4]}. The thresholds this suite does not settle: one critical error "
                  "or an accuracy near the line at the bit-width below decides them, and a re-drawn suite misses "
                  "it. Read each as the range its re-drawn thresholds span.", "",
                  tabulate([[u["id"], _bits(u["threshold"]),
                             ", ".join(f"{_bits(None if k == bits_rank(None) else k)}: {v:.0%}"
                                       for k, v in sorted(u["distribution"].items(), reverse=True)),
                             f"{u['larger'][2]:.0%}", f"{u['larger'][4]:.0%}", u["below"]] for u in a["unsettled"]],
                           headers=["fine-tune", "measured threshold", "re-drawn suites' thresholds",
                                    "reproduced at 2x", "at 4x", "fake-quantized at the bit-width below, and at it"],
                           tablefmt="github"), ""]
    w, p, c, bp = a["weights"], a["probe"], a["constant"], a["bracket_probe"]
    lines += ["## Held out by family", "",
              tabulate([
                  ["constant guess", f"{c['exact']}/{c['n']}", c["optimistic"], "-"],
                  ["weights tier (upper end of its bracket)", f"{w['held_out']['exact']}/{w['held_out']['n']}",
                   w["held_out"]["optimistic"], f"{w['held_out']['mean_between']:.2f} bit-widths left to the probe; "
                                                f"{w['held_out']['settled']} settled alone; "
                                                f"rounded-away end at the threshold for "
                                                f"{w['held_out']['wrongly_lost'] - w['held_out']['lost_above']} (the "
                                                f"probe keeps it), above it for {w['held_out']['lost_above']}"],
                  ["bracket + probe of its check set", f"{bp['exact']}/{bp['n']}", bp["optimistic"],
                   f"what a user runs: the probe on {bp['mean_check']:.2f} of {bp['bits']} bit-widths"],
                  ["weights tier's point rule (its single guess)", f"{a['point']['exact']}/{a['point']['n']}",
                   a["point"]["optimistic"], "what delta-survival predicted before the bracket"],
                  ["probe, its verdicts", f"{p['raw']['exact']}/{p['raw']['n']}", p["raw"]["optimistic"], "not refitted"],
                  ["probe, margin fitted without the family", f"{p['held_out']['exact']}/{p['held_out']['n']}",
                   p["held_out"]["optimistic"], f"final margin: {p['margin']}"],
              ], headers=["predictor", "exact", "optimistic", "note"], tablefmt="github"), ""]
    lines += ["Per family (weights tier's bracket fitted without it):", "",
              tabulate([[f["family"], f"{f['exact']}/{f['n']}", f["optimistic"], f"{f['mean_between']:.2f}",
                         "-" if not f["bracket"] else _bracket_text(f["bracket"])]
                        for f in w["folds"]],
                       headers=["held-out family", "exact", "optimistic", "between", "bracket"], tablefmt="github"), ""]
    lines += _cost_text(p, bp)
    opt = [(rid, pred[0], truth(r)) for r in usable for rid, pred in [(r["id"], w["unmoved_predictions"].get(r["id"]))]
           if pred is not None and bits_rank(pred[0]) < bits_rank(truth(r))]
    inv = a["inversions"]
    lines += ["## What the weights cannot see", "",
              f"Held out, the bracket on its statistic alone (unmoved) is optimistic for {len(opt)} fine-tune(s)"
              + (": " + "; ".join(f"{i} (survives at >= {_bits(p)}, truly {_bits(t)}{_blind(i, inv)})"
                                  for i, p, t in opt) if opt else "")
              + ". The bracket delta-survival ships moves its survive end up (below); the probe of the bracket's "
              "check set, which includes its survive end, would overrule it too.", "",
              *_covers_text(a.get("optimistic_covers", [])),
              *_margin_text(w, a["constant"]),
              *_every_statistic_text(a["every_statistic"]),
              *_ceiling_text(w.get("ceiling"), a["n"]),
              *_monotone_text(a),
              f"Scale inversions: {len(inv)} pair(s) of one adapter at two LoRA scales where the stronger delta has the "
              "higher real threshold. A weights rule that keeps a bit-width where its statistic is high enough "
              "is wrong on one of the pair unless the statistic is lower for the stronger delta at the weaker's "
              "threshold; the last column counts the statistics (x aggregates) that are. Where it is 0, no rule the "
              "study can fit sees the difference: only running the model (the probe) does.", ""]
    if inv:
        lines += [tabulate([[x["adapter"], f"x{x['weaker']:g}: {_bits(x['weaker_threshold'])}",
                             f"x{x['stronger']:g}: {_bits(x['stronger_threshold'])}",
                             f"{x['separating']}/{x['statistics']}"] for x in inv],
                           headers=["adapter", "weaker scale: threshold", "stronger scale: threshold",
                                    "statistics lower for the stronger"], tablefmt="github"), ""]
    br = w["bracket"]
    if br:
        lost_stat, lost_agg = br.get("lost_statistic") or br["statistic"], br.get("lost_aggregate") or br["aggregate"]
        lines += ["## The bracket delta-survival reports", "",
                  f"Fitted on every family: survives at >= a where {br['statistic']} ({br['aggregate']}) > "
                  f"{br['survive']:.4g} at a and every larger bit-width, then a moved up {br.get('raise_by', 0)} "
                  f"supported bit-width(s); rounded away at <= b where {lost_stat} "
                  f"({lost_agg}) is at most {br['lost']:.4g} (below the statistic's own a); `qtools probe` checks "
                  "the bit-widths between, and both ends (a and b). Each side's statistic is chosen across the "
                  "families, each held out in turn: the survive side's for the fewest optimistic answers, the "
                  "rounded-away side's for the fewest rounded away above the truth (an answer the probe of b cannot "
                  "correct), then the fewest left between. The lost bound lies below every value seen above a "
                  "threshold, not below the threshold's own: calling the threshold lost costs nothing, the probe "
                  "checks b and keeps it. The move is the fewest bit-widths that make the families' own held-out "
                  "answers never optimistic.", ""]
    if excluded:
        lines += ["## Not used (float16 below the bar)", "",
                  tabulate([[r["id"], f"{r['behaviour']['16']['accuracy']:.1%}", r["behaviour"]["16"]["critical_errors"]]
                            for r in excluded], headers=["fine-tune", "float16 accuracy", "critical errors"],
                           tablefmt="github"), ""]
    write_text_atomic(Path(path), "\n".join(lines) + "\n")
    return {**{k: v for k, v in a.items() if k not in ("weights", "probe")},
            "weights": {k: v for k, v in a["weights"].items() if k not in ("predictions", "unmoved_predictions")},
            "probe": {k: v for k, v in a["probe"].items() if k != "predictions"},
            "goals": [{"goal": n, "measured": m, "met": ok} for n, m, ok in g], "goals_met": met}
