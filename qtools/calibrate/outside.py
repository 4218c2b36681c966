"""One fine-tune outside the study, judged as a user meets the tiers (scripts/outside.sh): the
real sweep's threshold beside delta-survival's bracket, the bracket with the probe of its check
set (what `make demo` answers), the probe of every bit-width, the point rule and the constant
guess. `python -m qtools.calibrate.outside LOGS` prints one markdown row, `--all [ROOT]` the
table and tally of every fine-tune under ROOT (logs/outside)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

from .. import QtoolsError, script_exit
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
    answer = (bracket_answer(Bracket.load(), summary, layers, bits) if bits else None) or {}  # no sweep yet: none
    by_bits = probe_all.get("by_bits") or {}
    checked = {"by_bits": {str(b): by_bits[str(b)] for b in answer.get("check", []) if str(b) in by_bits}}
    point = Rule.load(available=summary.get(str(max(bits))) if bits else None)
    bar = (_read(log_dir / BUILD_FILE) or {}).get("bar")  # a study family's: as the study uses its fine-tunes
    validated = ref is not None and ref.get("verdict") == "pass"
    below_bar = validated and bar is not None and not (ref.get("accuracy", 0.0) >= bar
                                                       and ref.get("critical_errors", 1) == 0)
    return {
        "fine_tune": log_dir.name,
        "float16": None if ref is None else f"{ref['correct']}/{ref['total']}",
        "float16_passes": validated and not below_bar,
        "below_bar": below_bar,
        "real": truth,
        "bracket": (answer.get("survives_at"), answer.get("rounded_away_at")),
        "check": answer.get("check", []),
        "bracket_probe": with_probe(answer, checked, bits) if answer else None,
        "probe_all": probe_all.get("predicted_min_bits"),
        "point": point.predict(summary, layers, bits)[0] if bits else None,
        "constant": study_record().get("constant_guess"),
    }


# A recipe no run of the study's grid used (its ranks are 4, 8, 16, its rates 1e-3 and 1.5e-3), on
# attention (on qwen3_moe attention and the router) or, with keys "all", every linear layer (on
# qwen3_moe the experts too): a fine-tune of a study family the study never saw, judged on the
# family's task.
OUTSIDE_RECIPE = {"rank": 12, "lr": 1.2e-3, "iters": 300}
OUTSIDE_KEYS = ("attention", "all")
RECIPE_FILE = "qtools_outside_recipe.json"
# what --build printed, kept in the fine-tune's logs (not *.json: compare reads every *.json there)
BUILD_FILE = "outside.build"


def study_family(name: str) -> dict | None:
    """The study family of that name (grid.study_families), None for any other name."""
    from .grid import study_families

    return next((f for f in study_families() if f["name"] == name), None)


def build(name: str, seed: int, out_dir, work="models/calibration", log=sys.stderr, keys="attention",
          lr: float | None = None) -> dict:
    """A fine-tune of study family `name` the study never saw: the family's base (run.build_base,
    cached in `work` as the study caches it), and OUTSIDE_RECIPE (at learning rate `lr` when given)
    trained with `seed` on the family's task into out_dir/NAME_adapter (reused when built with the
    same recipe and seed). Returns the base, the adapter, the family's suite and its bar (a float16
    model below it is not judged)."""
    import json
    import time

    from ..demo.train import ADAPTER, ALL_LINEAR, ATTENTION, train_adapter
    from ..io.atomic import atomic_output_dir, check_writable
    from ..io.modeldir import read_config
    from .grid import family_suite, family_task, keys_for
    from .run import build_base

    family = study_family(name)
    if family is None:
        raise QtoolsError(f"{name} is not a study family (qtools.calibrate.grid.study_families)")
    if seed < 0:
        raise QtoolsError(f"seed {seed} is negative: use 0 or more")
    if keys not in OUTSIDE_KEYS:
        raise QtoolsError(f"keys {keys!r}: use {' or '.join(OUTSIDE_KEYS)}")
    adapter = Path(out_dir) / f"{name}_adapter"
    check_writable(adapter)
    base = build_base(Path(work), family, log=log)
    cfg = read_config(base)
    recipe = {**OUTSIDE_RECIPE, **({} if lr is None else {"lr": lr}), "seed": seed, "scale": ADAPTER["scale"],
              "batch_size": ADAPTER["batch_size"],
              "keys": keys_for(list(ATTENTION if keys == "attention" else ALL_LINEAR), {"arch": cfg.get("model_type")}),
              "num_layers": cfg["num_hidden_layers"], "task": family_task(family)}
    if read_json_or_none(adapter / RECIPE_FILE) != recipe or not (adapter / "adapters.safetensors").exists():
        print(f"[outside] training {name} seed {seed}: {recipe}", file=log, flush=True)
        tic = time.perf_counter()
        with atomic_output_dir(adapter, force=True) as tmp:
            train_adapter(base, tmp, **recipe)
            (Path(tmp) / RECIPE_FILE).write_text(json.dumps(recipe, indent=1))
        print(f"[outside] trained in {time.perf_counter() - tic:.0f} s", file=log, flush=True)
    return {"family": name, "seed": seed, "base": str(base), "adapter": str(adapter),
            "suite": str(family_suite(family, work)), "bar": family["bar"]}


def _b(x) -> str:
    return "none" if x is None else str(x)


def row(j: dict) -> str:
    a, b = j["bracket"]
    below = "below the study's bar" if j.get("below_bar") else "fails"
    f16 = j["float16"] if j["float16_passes"] else f"{j['float16']}, {below}: not judged"
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


def _seed(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise QtoolsError(f"seed {text!r} is not a whole number") from None


def _lr(text: str) -> float | None:
    """A pair's learning rate: none when empty, else a positive number."""
    if not text:
        return None
    try:
        lr = float(text)
    except ValueError:
        lr = math.nan
    if not (math.isfinite(lr) and lr > 0):
        raise QtoolsError(f"learning rate {text!r} is not a positive number")
    return lr


def check_pairs(pairs: list) -> None:
    """Every FAMILY:SEED[:KEYS[:LR]] of make outside's PAIRS sound before anything is built: a
    demo-task family (qtools demo-models --family) or a study family, a seed of 0 or more, KEYS (a
    study family's only) one of OUTSIDE_KEYS or empty, LR (a study family's only) a positive
    learning rate in place of OUTSIDE_RECIPE's."""
    from .grid import default_families, study_families

    demo, study = [f["name"] for f in default_families()], [f["name"] for f in study_families()]
    if not pairs:
        raise QtoolsError("PAIRS is empty: give FAMILY:SEED pairs, e.g. PAIRS=\"g12:1 agent-moe-g24:8\"")
    for pair in pairs:
        fam, _, rest = pair.partition(":")
        seed, _, rest = rest.partition(":")
        keys, _, lr = rest.partition(":")
        if fam not in demo and fam not in study:
            raise QtoolsError(f"{pair}: unknown family {fam!r}; the demo task's families are {', '.join(demo)}, the "
                              f"study's {', '.join(study)}")
        if not seed:
            raise QtoolsError(f"{pair}: no seed: write FAMILY:SEED, e.g. {fam}:1")
        if _seed(seed) < 0:
            raise QtoolsError(f"{pair}: seed {seed} is negative: use 0 or more")
        if keys and (fam not in study or keys not in OUTSIDE_KEYS):
            raise QtoolsError(f"{pair}: {keys!r} after the seed: only a study family takes one, "
                              f"{' or '.join(OUTSIDE_KEYS)}")
        if lr and fam not in study:
            raise QtoolsError(f"{pair}: a learning rate: only a study family takes one")
        try:
            _lr(lr)
        except QtoolsError as e:
            raise QtoolsError(f"{pair}: {e}") from None


def _main(argv: list) -> int | None:
    if argv[:1] == ["--all"]:  # the table and tally of docs/outside.md
        judged = judge_all(argv[1] if len(argv) > 1 else "logs/outside")
        print("\n".join([HEADER, *map(row, judged), "", tally(judged)]))
    elif argv[:1] == ["--build"] and len(argv) in (4, 5, 6, 7):  # FAMILY SEED OUT [KEYS [LR [WORK]]]: a study family's
        import json

        keys = argv[4] if len(argv) > 4 and argv[4] else "attention"
        lr = _lr(argv[5]) if len(argv) > 5 else None
        print(json.dumps(build(argv[1], _seed(argv[2]), argv[3], *argv[6:], keys=keys, lr=lr)))
    elif argv[:1] == ["--check-pairs"]:  # PAIR...: make outside's PAIRS, before any work
        check_pairs(argv[1:])
    elif argv[:1] == ["--is-study"] and len(argv) == 2:
        return 0 if study_family(argv[1]) else 1
    elif len(argv) == 1:
        print(row(judge(argv[0])))
    else:
        raise QtoolsError("usage: python -m qtools.calibrate.outside LOGS | --all [ROOT] | "
                          "--build FAMILY SEED OUT [KEYS [LR [WORK]]] | --is-study FAMILY | --check-pairs PAIR...")


def main(argv: list) -> int:
    return script_exit(lambda: _main(argv))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
