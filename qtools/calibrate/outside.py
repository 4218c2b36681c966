"""One fine-tune outside the study, judged as a user meets the tiers (scripts/outside.sh): the
real sweep's threshold beside delta-survival's bracket, the bracket with the probe of its check
set (what `make demo` answers), the probe of every bit-width, the point rule and the constant
guess. `python -m qtools.calibrate.outside LOGS` prints one markdown row, `--all [ROOT]` the
table and tally of every fine-tune under ROOT (logs/outside)."""

from __future__ import annotations

import sys
from pathlib import Path

from .. import QtoolsError
from ..io.atomic import read_json_or_none
from ..survival.rule import answer_with_probe, smallest_surviving, study_record


def _read(path: Path) -> dict | None:
    d = read_json_or_none(path)
    return d if isinstance(d, dict) else None


def real_threshold(logs: list) -> tuple:
    """(the sweep's threshold: the smallest bit-width passing with every larger one passing, None
    when none does; the float model's log)."""
    quantized = {log["bits"]: log["verdict"] == "pass" for log in logs if log.get("quantized") and not log.get("mixed")}
    ref = next((log for log in logs if not log.get("quantized")), None)
    return smallest_surviving(sorted(quantized), lambda b: quantized[b]), ref


def with_probe(survival: dict, probe: dict | None, bits: list):
    """The answer of the bracket with the probe of its check set (rule.answer_with_probe: a checked
    bit-width survives where the probe passes it, an unchecked one where the bracket keeps it)."""
    by_bits = (probe or {}).get("by_bits") or {}

    def passes(b):
        p = by_bits.get(str(b))
        return isinstance(p, dict) and p.get("verdict") == "pass"

    return answer_with_probe(bits, survival.get("survives_at"), survival.get("check") or [], passes)


def judge(log_dir) -> dict:
    """The fine-tune's sweep (its validate logs in log_dir) beside what each tier answers. The weights
    tier is asked again from the statistics of log_dir/survival.json with the rule file in place (a
    refitted study judges every outside fine-tune alike), and the bracket's check set is read from
    log_dir/probe.json, the probe of every bit-width (a bit-width's verdict does not depend on the
    others probed with it: one probe serves both columns)."""
    from ..survival.analyze import bracket_answer
    from ..survival.rule import Bracket, Rule

    log_dir = Path(log_dir)
    logs = [d for p in sorted(log_dir.glob("*.json")) if (d := _read(p)) and "qtools_log" in d]
    if not logs:
        raise QtoolsError(f"{log_dir}: no qtools validate logs to judge against (scripts/outside.sh writes them)")
    survival = _read(log_dir / "survival.json") or {}
    probe_all = _read(log_dir / "probe.json") or {}
    bits = sorted(log["bits"] for log in logs if log.get("quantized") and not log.get("mixed"))
    truth, ref = real_threshold(logs)
    summary, layers = survival.get("summary") or {}, survival.get("layers") or []
    answer = bracket_answer(Bracket.load(), summary, layers, bits) or {}
    by_bits = probe_all.get("by_bits") or {}
    checked = {"by_bits": {str(b): by_bits[str(b)] for b in answer.get("check", []) if str(b) in by_bits}}
    point = Rule.load(available=summary.get(str(max(bits))) if bits else None)
    return {
        "fine_tune": log_dir.name,
        "float16": None if ref is None else f"{ref['correct']}/{ref['total']}",
        "float16_passes": ref is not None and ref.get("verdict") == "pass",
        "real": truth,
        "bracket": (answer.get("survives_at"), answer.get("rounded_away_at")),
        "check": answer.get("check", []),
        "bracket_probe": with_probe(answer, checked, bits) if answer else None,
        "probe_all": probe_all.get("predicted_min_bits"),
        "point": point.predict(summary, layers, bits)[0] if bits else None,
        "constant": study_record().get("constant_guess"),
    }


def _b(x) -> str:
    return "none" if x is None else str(x)


def row(j: dict) -> str:
    a, b = j["bracket"]
    f16 = j["float16"] if j["float16_passes"] else f"{j['float16']}, fails: not judged"
    return (f"| {j['fine_tune']} | {f16} | {_b(j['real'])} | >= {_b(a)}, <= {_b(b)} "
            f"(probe {' '.join(map(str, j['check'])) or '-'}) | {_b(j['bracket_probe'])} | {_b(j['probe_all'])} | "
            f"{_b(j['point'])} | {_b(j['constant'])} |")


HEADER = ("| fine-tune | float16 | real threshold | weights bracket | bracket + probe of its check set | "
          "probe, every bit-width | point rule | constant guess |\n|---|---|---|---|---|---|---|---|")
PREDICTORS = (("weights bracket (upper end)", lambda j: j["bracket"][0]),
              ("bracket + probe of its check set", lambda j: j["bracket_probe"]),
              ("probe, every bit-width", lambda j: j["probe_all"]),
              ("point rule", lambda j: j["point"]), ("constant guess", lambda j: j["constant"]))


def tally(judged: list) -> str:
    """Each predictor's exact / optimistic / pessimistic count over the fine-tunes whose float16 passes."""
    from .fit import bits_rank

    used = [j for j in judged if j["float16_passes"]]
    lines = [f"Of {len(judged)} fine-tunes, {len(used)} pass float16 (the others are not judged):", "",
             "| predictor | exact | optimistic | pessimistic |", "|---|---|---|---|"]
    for name, get in PREDICTORS:
        r = [(bits_rank(get(j)), bits_rank(j["real"])) for j in used]
        lines.append(f"| {name} | {sum(p == t for p, t in r)} | {sum(p < t for p, t in r)} | "
                     f"{sum(p > t for p, t in r)} |")
    return "\n".join(lines)


def judge_all(root) -> list:
    """judge() of every fine-tune scripts/outside.sh left under root (a directory with its probe.json)."""
    if not Path(root).is_dir():
        raise QtoolsError(f"{root} is not a directory of judged fine-tunes (make outside writes logs/outside)")
    return [judge(d) for d in sorted(Path(root).iterdir()) if (d / "probe.json").exists()]


def main(argv: list) -> int:
    try:
        if argv[:1] == ["--all"]:  # the table and tally of docs/outside.md
            judged = judge_all(argv[1] if len(argv) > 1 else "logs/outside")
            print("\n".join([HEADER, *map(row, judged), "", tally(judged)]))
        elif len(argv) == 1:
            print(row(judge(argv[0])))
        else:
            raise QtoolsError("usage: python -m qtools.calibrate.outside LOGS | --all [ROOT]")
    except QtoolsError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
