"""Compare validate logs side by side: the best model per metric, verdict, recommendation.

Also checks delta-survival's prediction against behaviour, per bit-width: the
prediction says the fine-tune survives at b bits when b >= predicted_min_bits;
behaviour says it survived when accuracy and critical errors meet the criteria.
`qtools retention` logs (logs/retention-<model>.json) among the inputs add a
"logit_retention" row next to accuracy; delta-survival's weight statistic
is `delta_retention`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .. import BadValue, QtoolsError
from ..format import human_bytes
from ..io.atomic import check_output, check_writable
from ..io.logs import check_log
from .scoring import DEFAULT_MAX_CRITICAL, DEFAULT_MIN_ACCURACY, pct, verdict


@dataclass
class Criteria:
    min_accuracy: float = DEFAULT_MIN_ACCURACY
    max_critical: int = DEFAULT_MAX_CRITICAL
    max_gen_s: float | None = 3.0
    max_memory_gb: float | None = 20.0
    # {category: minimum accuracy}, e.g. {"field_access": 0.8}: the field's decision matrix
    min_category: dict = field(default_factory=dict)


def _is_log(obj) -> bool:
    return isinstance(obj, dict) and "qtools_log" in obj and "cases" in obj


def _is_retention(obj) -> bool:
    return isinstance(obj, dict) and "qtools_retention" in obj and "logit_retention" in obj


def _is_survival(obj) -> bool:
    return isinstance(obj, dict) and "summary" in obj and "predicted_min_bits" in obj


def _is_probe(obj) -> bool:
    return isinstance(obj, dict) and "qtools_probe" in obj and isinstance(obj.get("by_bits"), dict)


def load_inputs(paths, survival: str | Path | None = None, retention: list | None = None,
                probes: list | None = None) -> tuple[list, dict | None]:
    """Read validate logs (and a survival JSON, given or found among them).

    `qtools retention` logs found among the paths are appended to `retention` when given, and
    `qtools probe` reports to `probes`.
    """
    logs, surv = [], None
    if survival is not None:
        surv = _read_json(survival)
        if not _is_survival(surv):
            raise QtoolsError(f"{survival} is not `qtools delta-survival --json` output")
        check_log(surv, survival, "survival")
    for p in paths:
        obj = _read_json(p)
        # each kind's fields and their types are checked on load (io.logs), not met as a KeyError later
        if _is_log(obj):
            obj = check_log(obj, p, "validate")
            obj["_path"] = str(p)
            logs.append(obj)
        elif _is_survival(obj):
            surv = surv or check_log(obj, p, "survival")  # `make compare` passes logs/*.json, survival.json included
        elif _is_retention(obj):
            if retention is not None:
                retention.append(check_log(obj, p, "retention"))
        elif _is_probe(obj):
            if probes is not None:
                probes.append(obj)
        elif isinstance(obj, dict) and "qtools_retention" in obj:
            raise QtoolsError(f"{p} has no logit_retention: it was written by an older qtools; "
                              "run `qtools retention` again")
        else:
            raise QtoolsError(f"{p} is not a qtools validate log")
    if not logs:
        raise QtoolsError("no validate logs given: run `make validate MODEL=...` or `make sweep` first")
    return logs, surv


def _read_json(path):
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise QtoolsError(f"{path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise QtoolsError(f"cannot read {path}: {exc}") from None
    except json.JSONDecodeError as exc:
        raise QtoolsError(f"{path} is not valid JSON ({exc.msg}, line {exc.lineno})") from None


def _sort_key(log):
    # Float models first, then falling bit-width, then name.
    return (-(log.get("bits") or 0), log.get("mixed", False), log["model"])


def model_verdict(log: dict, c: Criteria) -> list:
    """Reasons the model fails the criteria (empty list: it passes)."""
    reasons = verdict(log["accuracy"], log["critical_errors"], c.min_accuracy, c.max_critical)
    if c.max_gen_s is not None and log["mean_gen_s"] > c.max_gen_s:
        reasons.append(f"mean generation {log['mean_gen_s']:.2f} s > {c.max_gen_s} s")
    if c.max_memory_gb is not None and log["peak_memory_gb"] > c.max_memory_gb:
        reasons.append(f"peak memory {log['peak_memory_gb']:.2f} GB > {c.max_memory_gb} GB")
    per = log.get("per_category") or {}
    for cat, minimum in (c.min_category or {}).items():
        if cat not in per:
            reasons.append(f"{cat}: no cases in this log")
        elif per[cat]["accuracy"] < minimum:
            reasons.append(f"{cat} {pct(per[cat]['accuracy'])} < {pct(minimum)}")
    return reasons


def check_categories(logs: list, c: Criteria) -> None:
    """A --min-category no log knows is a typo, not a criterion that never applies."""
    known = list(dict.fromkeys(cat for log in logs for cat in (log.get("per_category") or {})))
    for cat in c.min_category or {}:
        if cat not in known:
            raise QtoolsError(f"--min-category {cat}: no log has this category "
                              f"(categories: {', '.join(known) or 'none'})")


def _suite_criteria(logs: list, c: Criteria) -> Criteria:
    """The criteria for one suite: category minima for categories its logs do not have are dropped."""
    cats = {cat for log in logs for cat in (log.get("per_category") or {})}
    return Criteria(c.min_accuracy, c.max_critical, c.max_gen_s, c.max_memory_gb,
                    {k: v for k, v in (c.min_category or {}).items() if k in cats})


def survival_at(surv: dict | None, bits) -> dict | None:
    if not surv or bits is None:
        return None
    return surv.get("summary", {}).get(str(bits))


def predicted_survives(surv: dict, bits: int) -> bool | None:
    """delta-survival's verdict at `bits` (None: its bracket leaves `bits` to the probe); at a
    bit-width it did not judge, whether `bits` is at or above the predicted minimum."""
    verdict = surv.get("verdict") or {}
    if str(bits) in verdict:
        v = verdict[str(bits)]
        if v is not None and not isinstance(v, bool):
            raise QtoolsError(f"the delta-survival report's verdict at {bits} bits is {v!r}, not true or false: "
                              "it was written by an older qtools; run delta-survival again")
        return v
    p = surv.get("predicted_min_bits")
    return p is not None and bits >= p


ROWS = [
    # (label, key, better, formatter)
    ("bits", "bits", None, lambda v, log: f"{v}" + (" mixed" if log.get("mixed") else "") if log.get("quantized") else f"float{v}"),
    ("bits/weight", "bits_per_weight", "min", lambda v, log: f"{v:.2f}"),
    ("disk size", "disk_bytes", "min", lambda v, log: human_bytes(v)),
    ("accuracy", "accuracy", "max", lambda v, log: f"{v:.1%} ({log['correct']}/{log['total']})"),
    ("critical errors", "critical_errors", "min", lambda v, log: f"{v}"),
    ("format compliance", "format_compliance", "max", lambda v, log: f"{v:.0%}"),
    ("load time", "load_s", "min", lambda v, log: f"{v:.2f} s"),
    ("first query", "first_gen_s", "min", lambda v, log: f"{v:.2f} s"),
    ("mean generation", "mean_gen_s", "min", lambda v, log: f"{v:.2f} s"),
    ("tokens/s", "tokens_per_s", "max", lambda v, log: f"{v:.1f}"),
    ("peak memory", "peak_memory_gb", "min", lambda v, log: human_bytes(v * 1e9)),
]


def _best(values: dict, better: str | None) -> list:
    """The models with the row's best value; none when every model ties (nothing to mark)."""
    vals = {m: v for m, v in values.items() if v is not None}
    if better is None or len(vals) < 2:
        return []
    best = max(vals.values()) if better == "max" else min(vals.values())
    winners = [m for m, v in vals.items() if abs(v - best) <= 1e-9 * max(1.0, abs(best))]
    return [] if len(winners) == len(vals) else winners


def _winner(values: dict, better: str | None):
    """The JSON's winner field: the best models' names, "tie", or "" (nothing to rank)."""
    vals = [v for v in values.values() if v is not None]
    if better is None or len(vals) < 2:
        return ""
    return ", ".join(_best(values, better)) or "tie"


def retention_for(model: str, suite: str, retention: list) -> dict | None:
    """The newest retention log of a model, preferring one measured on the same suite."""
    mine = [r for r in retention if r.get("model") == model]
    same = [r for r in mine if r.get("suite") == suite] or mine
    return max(same, key=lambda r: r.get("created", "")) if same else None


def _judged(surv: dict):
    """The (statistic, aggregate) delta-survival's prediction judges: its bracket's survive side
    where the report has a bracket, else its point rule's (None: neither)."""
    rule = (surv.get("bracket") or {}).get("rule") or surv.get("threshold") or {}
    return (rule["statistic"], rule.get("aggregate", "weighted")) if rule.get("statistic") else None


def held(log: dict, c: Criteria) -> bool:
    """Whether a validated model kept the behaviour: validate's criteria (accuracy, critical
    errors, each category's floor), without compare's limits on size and speed."""
    return not model_verdict(log, Criteria(c.min_accuracy, c.max_critical, None, None, c.min_category))


def compare_suite(logs: list, surv: dict | None, c: Criteria, retention: list | None = None) -> dict:
    logs = sorted(logs, key=_sort_key)
    c = _suite_criteria(logs, c)
    names = [log["model"] for log in logs]
    rows = []
    for label, key, better, fmt in ROWS:
        values = {log["model"]: log.get(key) for log in logs}
        rows.append({
            "metric": label, "key": key, "better": better,
            "values": values,
            "display": {log["model"]: fmt(log[key], log) if log.get(key) is not None else "-" for log in logs},
            "winner": _winner(values, better), "best": _best(values, better),
        })
    categories = []
    for log in logs:
        for cat in log.get("per_category", {}):
            if cat not in categories:
                categories.append(cat)
    for cat in categories:
        values = {log["model"]: log.get("per_category", {}).get(cat, {}).get("accuracy") for log in logs}
        rows.insert(4 + categories.index(cat), {
            "metric": f"  {cat}", "key": f"per_category.{cat}", "better": "max", "values": values,
            "display": {m: f"{v:.0%}" if v is not None else "-" for m, v in values.items()},
            "winner": _winner(values, "max"), "best": _best(values, "max"),
        })
    if retention:
        found = {log["model"]: retention_for(log["model"], log["suite"], retention) for log in logs}
        if any(found.values()):
            values = {m: (r or {}).get("logit_retention") for m, r in found.items()}
            rows.insert(4 + len(categories), {
                "metric": "logit_retention", "key": "logit_retention", "better": "max", "values": values,
                "display": {m: (f"{v:.3f} (KL {found[m]['kl']['mean']:.2g})" if v is not None else "-")
                            for m, v in values.items()},
                "winner": _winner(values, "max"), "best": _best(values, "max"),
            })
    if surv:
        values = {}
        for log in logs:
            s = survival_at(surv, log.get("bits")) if log.get("quantized") else None
            values[log["model"]] = s.get("delta_retention") if s else None
        rows.append({
            "metric": "predicted delta_retention", "key": "survival.delta_retention", "better": "max", "values": values,
            "display": {m: f"{v:.2f}" if v is not None else "-" for m, v in values.items()},
            "winner": _winner(values, "max"), "best": _best(values, "max"),
        })

    verdicts = {log["model"]: model_verdict(log, c) for log in logs}
    passing = [log for log in logs if not verdicts[log["model"]]]
    recommended = min(passing, key=lambda log: (log["disk_bytes"], log["bits_per_weight"]))["model"] if passing else None
    # A passing model smaller than a failing one means behaviour is not monotone in bits
    # (a thin margin tipped by noise): name the smallest model above every failure too.
    rec_log = next((log for log in logs if log["model"] == recommended), None)
    failing_bigger = [log for log in logs if verdicts[log["model"]] and rec_log is not None
                      and log["bits_per_weight"] > rec_log["bits_per_weight"]]
    monotone = None
    if failing_bigger:
        floor = max(log["bits_per_weight"] for log in failing_bigger)
        above = [log for log in passing if log["bits_per_weight"] > floor]
        monotone = min(above, key=lambda log: log["bits_per_weight"])["model"] if above else None

    agreement = []
    if surv:
        from ..survival.rule import Rule

        # the value the prediction judges (weakest layer or |D|^2-weighted), not always the summary's
        judged = _judged(surv)
        rule = Rule(*judged) if judged else None
        label = None if rule is None else rule.statistic if rule.aggregate == "weighted" else \
            f"{rule.statistic} ({rule.aggregate.replace('_', ' ')})"
        # If the float model itself fails, a failing quantized model proves nothing.
        ref_fails = _float_fails(logs, c)
        for log in _uniform(logs):
            pred = predicted_survives(surv, log["bits"])
            kept = held(log, c)
            s = survival_at(surv, log["bits"]) or {}
            agreement.append({
                "model": log["model"], "bits": log["bits"],
                "delta_retention": s.get("delta_retention"), "cosine": s.get("cosine"),
                "statistic": label,
                "statistic_value": None if rule is None else
                rule.value(surv.get("summary") or {}, surv.get("layers") or [], log["bits"]),
                "predicted": "survives" if pred else "left to the probe" if pred is None else "rounded away",
                "observed": "survives" if kept else ("fails (float fails too)" if ref_fails else "fails"),
                "agree": None if (ref_fails and not kept) or pred is None else pred == kept,
            })
    return {
        "suite": logs[0]["suite"],
        "models": names,
        "rows": rows,
        "verdicts": {m: ("pass" if not r else "fail") for m, r in verdicts.items()},
        "verdict_reasons": verdicts,
        "recommendation": recommended,
        "not_monotone": [log["model"] for log in failing_bigger],
        "recommendation_above_failures": monotone,
        "predicted_min_bits": surv.get("predicted_min_bits") if surv else None,
        "bracket": surv.get("bracket") if surv else None,
        "survival_agreement": agreement,
        "min_category": c.min_category,
    }


def _float_fails(logs: list, c: Criteria) -> bool:
    """Whether the float model's log (every one, if several) fails the suite: then a failing quantized
    model proves nothing about a prediction."""
    refs = [log for log in logs if not log.get("quantized")]
    return bool(refs) and not any(held(r, c) for r in refs)


def _uniform(logs: list) -> list:
    """The uniformly quantized models among the logs: the ones a prediction per bit-width is about."""
    return [log for log in logs if log.get("quantized") and not log.get("mixed")]


def probe_agreement(logs: list, probes: list, c: Criteria) -> list:
    """Per bit-width a `qtools probe` report predicted (the latest report on this suite), its verdict
    beside the validated quantized model's."""
    if not probes:
        return []
    probe = max(probes, key=lambda p: p.get("created", ""))
    out = []
    fails_float = _float_fails(logs, c)
    for log in _uniform(logs):
        pred = (probe.get("by_bits") or {}).get(str(log.get("bits")))
        if not isinstance(pred, dict):
            continue
        kept, predicted = held(log, c), pred.get("verdict") == "pass"
        out.append({"bits": log["bits"], "model": log["model"], "predicted": "survives" if predicted else "fails",
                    "observed": "survives" if kept else ("fails (float fails too)" if fails_float else "fails"),
                    "agree": None if fails_float and not kept else predicted == kept,
                    "predicted_min_bits": probe.get("predicted_min_bits")})
    return out


def bracket_with_probe(logs: list, surv: dict | None, probes: list, c: Criteria) -> dict | None:
    """The answer a user acts on: delta-survival's bracket with the probe's verdicts on its check
    set (rule.answer_with_probe), beside the sweep's threshold (the smallest uniformly quantized
    model kept with every larger one). None without a bracket or a probe report; where the probe
    left part of the check set out, those bit-widths are named and there is no answer."""
    from ..survival.rule import answer_with_probe, smallest_surviving

    br = (surv or {}).get("bracket")
    if not br or not probes or not isinstance(br.get("check"), list):
        return None
    probe = max(probes, key=lambda p: p.get("created", ""))
    by_bits = probe.get("by_bits") or {}
    missing = [b for b in br["check"] if not isinstance(by_bits.get(str(b)), dict)]
    bits = sorted(int(b) for b in (surv.get("verdict") or {}))
    answer = None if missing else answer_with_probe(
        bits, br.get("survives_at"), br["check"], lambda b: by_bits[str(b)].get("verdict") == "pass")
    uniform = {log["bits"]: held(log, c) for log in _uniform(logs)}
    swept = set(bits) <= set(uniform)
    return {"check": br["check"], "unprobed": missing, "answer": answer,
            "sweep": smallest_surviving(sorted(uniform), lambda b: uniform[b]) if swept else None,
            "swept": swept, "float_fails": _float_fails(logs, c)}


def compare(paths, survival=None, criteria: Criteria | None = None) -> dict:
    """Compare validate logs (grouped by suite); returns the full result."""
    criteria = criteria or Criteria()
    retention: list = []
    probes: list = []
    logs, surv = load_inputs(paths, survival, retention, probes)
    check_categories(logs, criteria)
    by_suite: dict = {}
    for log in logs:
        # A rerun replaces the older log of the same model and suite.
        key = (log["suite"], log["model"])
        if key not in by_suite or log.get("created", "") >= by_suite[key].get("created", ""):
            by_suite[key] = log
    suites = []
    for name in dict.fromkeys(s for s, _ in by_suite):
        suite_logs = [v for (s, _), v in by_suite.items() if s == name]
        comp = compare_suite(suite_logs, surv, criteria, retention)
        suite_probes = [p for p in probes if p.get("suite") == name]
        comp["probe_agreement"] = probe_agreement(suite_logs, suite_probes, criteria)
        comp["bracket_probe"] = bracket_with_probe(suite_logs, surv, suite_probes, criteria)
        suites.append(comp)
    return {
        "criteria": asdict(criteria),
        "survival_model": surv.get("model") if surv else None,
        "comparisons": suites,
        "_logs": logs,
        "_survival": surv,
    }


def format_comparison(result: dict) -> str:
    from tabulate import tabulate

    c = result["criteria"]
    crit = [f"accuracy >= {c['min_accuracy']:.0%}", f"critical errors <= {c['max_critical']}"]
    if c["max_gen_s"] is not None:
        crit.append(f"mean generation <= {c['max_gen_s']} s")
    if c["max_memory_gb"] is not None:
        crit.append(f"peak memory <= {c['max_memory_gb']} GB")
    out = []
    for comp in result["comparisons"]:
        models = comp["models"]
        cats = comp.get("min_category", {})
        absent = [k for k in c.get("min_category") or {} if k not in cats]
        suite_crit = crit + [f"{k} >= {pct(v)}" for k, v in cats.items()]
        # The best cell of each row is marked, not named: a column of names repeated up to six
        # times per row made the table ~250 characters wide.
        table = [[row["metric"], *[row["display"][m] + (" *" if m in row.get("best", ()) else "") for m in models]]
                 for row in comp["rows"]]
        table.append(["verdict", *[comp["verdicts"][m].upper() for m in models]])
        out.append(f"suite: {comp['suite']}")
        out.append(tabulate(table, headers=["metric", *models], tablefmt="github"))
        out.append("* best in its row (no mark: all equal)")
        out.append("")
        out.append("criteria: " + ", ".join(suite_crit))
        if absent:
            out.append(f"  (no {', '.join(absent)} cases in this suite: those minima do not apply)")
        for m in models:
            if comp["verdict_reasons"][m]:
                out.append(f"  {m}: FAIL ({'; '.join(comp['verdict_reasons'][m])})")
        if comp["recommendation"]:
            out.append(f"recommendation: {comp['recommendation']} (smallest model meeting all criteria)")
            if comp.get("not_monotone"):
                safer = comp.get("recommendation_above_failures") or "none"
                out.append(f"  warning: {', '.join(comp['not_monotone'])} fail(s) with more bits than "
                           f"{comp['recommendation']}: behaviour is not monotone in bits (a thin margin tipped "
                           f"by rounding noise). Smallest model above every failure: {safer}")
        else:
            out.append("recommendation: none (no model meets all criteria)")
        if comp["survival_agreement"]:
            out.append("")
            out.append(_down_to("delta-survival", comp["predicted_min_bits"], "it judged") + ":")
            stat = comp["survival_agreement"][0]["statistic"]
            extra = [stat] if stat and stat != "delta_retention" else []
            rows = []
            for a in comp["survival_agreement"]:
                vals = [a["delta_retention"]] + ([a["statistic_value"]] if extra else [])
                agree = "n/a" if a["agree"] is None else ("yes" if a["agree"] else "NO")
                rows.append([a["bits"], a["model"], *[f"{v:.3g}" if v is not None else "-" for v in vals],
                             a["predicted"], a["observed"], agree])
            out.append(tabulate(rows, headers=["bits", "model", "delta_retention", *extra, "predicted", "observed", "agree"],
                                tablefmt="github"))
            if comp.get("bracket"):
                a, b = comp["bracket"]["survives_at"], comp["bracket"]["rounded_away_at"]
                out.append(f"delta-survival's bracket: survives at >= {a if a is not None else '(none settled)'}, "
                           f"rounded away at <= {b if b is not None else '(none settled)'}")
            from ..survival.rule import tier_evidence

            out.append(tier_evidence())
        if comp.get("probe_agreement"):
            out.append("")
            pmb = comp["probe_agreement"][0]["predicted_min_bits"]
            out.append(_down_to("the probe", pmb, "it probed") + ("" if pmb is None else " (of the bit-widths it probed)")
                       + ":")
            out.append(tabulate([[a["bits"], a["model"], a["predicted"], a["observed"],
                                  "n/a" if a["agree"] is None else "yes" if a["agree"] else "NO"]
                                 for a in comp["probe_agreement"]],
                                headers=["bits", "model", "predicted", "observed", "agree"], tablefmt="github"))
        bp = comp.get("bracket_probe")
        if bp:
            out.append("")
            out.append(_bracket_probe_line(bp))
        out.append("")
    return "\n".join(out).rstrip()


def _bracket_probe_line(bp: dict) -> str:
    """The answer of the bracket with the probe of its check set, and whether the sweep bears it out."""
    check = " ".join(str(b) for b in bp["check"])
    head = f"delta-survival's bracket with the probe of its check set ({check}), the answer to act on: "
    if bp["unprobed"]:
        return head + (f"not given: the probe did not check {' '.join(str(b) for b in bp['unprobed'])} "
                       f"(qtools probe MODEL --bits {check})")
    said = "none of the bit-widths keeps the fine-tune" if bp["answer"] is None else f"{bp['answer']} bits"
    if not bp["swept"]:
        return head + said + " (not every bit-width swept: not judged)"
    if bp["float_fails"]:
        return head + said + " (the float model fails the suite: not judged)"
    truth = "none" if bp["sweep"] is None else f"{bp['sweep']} bits"
    held_up = bp["answer"] == bp["sweep"]
    return head + said + f"; the sweep: {truth} ({'held' if held_up else 'did NOT hold'})"


def _down_to(who: str, bits, which: str) -> str:
    if bits is None:
        return f"{who} keeps none of the bit-widths {which}"
    return f"{who} predicted the fine-tune survives down to {bits} bits"


def plot_formats() -> list:
    """The file formats the plot can be written in (matplotlib's Agg canvas: png, svg, pdf, ...)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    return sorted(FigureCanvasAgg.get_supported_filetypes())


def check_plot(path: str | Path, inputs=()) -> Path:
    """--plot before the comparison: a file name whose suffix is a format matplotlib writes (a usage
    error otherwise: it would not write that name), writable, and none of the inputs."""
    path = Path(path)
    formats = plot_formats()
    if path.is_dir():
        raise BadValue(f"{path} is a directory: give a file name, e.g. {path / 'compare.png'}", "--plot")
    if path.suffix[1:].lower() not in formats:
        raise BadValue(f"{path}: give a file name ending in one of the formats matplotlib writes: "
                       + ", ".join(f".{f}" for f in formats), "--plot")
    return check_writable(check_output(path, inputs), file=True)


def plot_comparison(result: dict, path: str | Path) -> Path:
    """bits vs accuracy, disk size and predicted delta_retention, one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    surv = result["_survival"]
    logs = result["_logs"]
    crit = result["criteria"]
    panels = 3 if surv else 2
    fig, axes = plt.subplots(1, panels, figsize=(4.2 * panels, 3.6))
    for name in dict.fromkeys(log["suite"] for log in logs):
        # by bits alone: two logs of one bit-width (uniform and awq 4-bit) are both plotted, in input order
        pts = sorted(((log["bits"], log) for log in logs if log["suite"] == name and not log.get("mixed")),
                     key=lambda p: p[0])
        xs = [b for b, _ in pts]
        axes[0].plot(xs, [log["accuracy"] for _, log in pts], "o-", label=name)
        crit_pts = [(b, log["accuracy"]) for b, log in pts if log["critical_errors"] > 0]
        if crit_pts:
            axes[0].scatter(*zip(*crit_pts), marker="x", s=90, color="red", zorder=3,
                            label="critical errors" if name == logs[0]["suite"] else None)
        axes[1].plot(xs, [log["disk_bytes"] / 1e6 for _, log in pts], "o-", label=name)
    axes[0].axhline(crit["min_accuracy"], ls="--", color="gray", lw=1)
    axes[0].set(xlabel="bits", ylabel="accuracy", title="behaviour", ylim=(-0.05, 1.05))
    axes[1].set(xlabel="bits", ylabel="disk size (MB)", title="size")
    if surv:
        bits = sorted(int(b) for b in surv.get("summary", {}))
        axes[2].plot(bits, [surv["summary"][str(b)].get("delta_retention") for b in bits], "o-", label="delta_retention")
        if any("cosine" in surv["summary"][str(b)] for b in bits):
            axes[2].plot(bits, [surv["summary"][str(b)].get("cosine") for b in bits], "s--", label="cosine")
        if surv.get("predicted_min_bits") is not None:
            axes[2].axvline(surv["predicted_min_bits"], ls=":", color="green", label="predicted min bits")
        axes[2].set(xlabel="bits", ylabel="delta survival", title="predicted (delta-survival)")
        axes[2].legend(fontsize=7)
    ticks = sorted({log["bits"] for log in logs} | {int(b) for b in (surv or {}).get("summary", {})})
    for ax in axes:
        ax.set_xticks(ticks)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110, format=path.suffix[1:].lower())
    except OSError as exc:
        raise QtoolsError(f"could not write {path}: {exc.strerror or exc}") from None
    finally:
        plt.close(fig)
    return path


def public(result: dict) -> dict:
    """The result without the raw inputs (for --json)."""
    return {k: v for k, v in result.items() if not k.startswith("_")}
