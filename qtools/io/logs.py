"""Where qtools writes its logs, and what a log read back must hold.

One naming for every command, so compare finds them all; one schema per kind of
log (validate, retention, a delta-survival report), checked where a log is
loaded, so a field missing, null or of another type is one `Error:` line
naming the file and the field, never a KeyError further on.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from .. import QtoolsError


def log_path(model: str | Path, suite: str | None = None, logs_dir: str | Path = "logs",
             kind: str | None = None) -> Path:
    """<logs>/<model>-<suite>.json for a validate log, <logs>/<kind>-<model>.json for another
    kind (retention); `model` is a name or a directory (its resolved name)."""
    name = Path(model).resolve().name if isinstance(model, Path) else str(model)
    stem = f"{kind}-{name}" if kind else name
    return Path(logs_dir) / (f"{stem}-{suite}.json" if suite else f"{stem}.json")


# ---------------------------------------------------------------- schemas: (check, what it must be)

def _num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _opt(check):
    return lambda v: v is None or check(v)


def _nonneg(v) -> bool:
    return _num(v) and v >= 0


def _fraction(v) -> bool:
    return _num(v) and 0 <= v <= 1


def _count(v) -> bool:
    return _int(v) and v >= 0


def _dict_of(check, keys=lambda k: True):
    return lambda v: isinstance(v, dict) and all(keys(k) and check(x) for k, x in v.items())


def _is_str(v) -> bool:
    return isinstance(v, str) and v != ""


def _category(v) -> bool:
    return isinstance(v, dict) and _fraction(v.get("accuracy"))


def _stats(v) -> bool:
    """A delta-survival summary at one bit-width: every statistic a number (inf allowed) or null."""
    return isinstance(v, dict) and all(x is None or (isinstance(x, (int, float)) and not isinstance(x, bool)
                                                     and not math.isnan(x)) for x in v.values())


def _layer(v) -> bool:
    return isinstance(v, dict) and _dict_of(_opt(_stats), str.isdigit)(v.get("by_bits"))


def _threshold(v) -> bool:
    return isinstance(v, dict) and _is_str(v.get("statistic")) and _num(v.get("min")) \
        and v.get("aggregate", "weighted") in ("weighted", "weakest_layer")


NUMBER, FRACTION = (_nonneg, "a number >= 0"), (_fraction, "a number between 0 and 1")
VALIDATE_LOG = {
    "model": (_is_str, "a name"), "suite": (_is_str, "a name"),
    "bits": (_int, "an integer"), "quantized": (lambda v: isinstance(v, bool), "true or false"),
    "mixed": (lambda v: v is None or isinstance(v, bool), "true, false or absent"),
    "accuracy": FRACTION, "format_compliance": FRACTION,
    "correct": (_count, "a count"), "total": (_count, "a count"), "critical_errors": (_count, "a count"),
    "mean_gen_s": NUMBER, "peak_memory_gb": NUMBER, "disk_bytes": NUMBER, "bits_per_weight": NUMBER,
    "load_s": (_opt(_nonneg), "a number >= 0 or null"), "first_gen_s": (_opt(_nonneg), "a number >= 0 or null"),
    "tokens_per_s": (_opt(_nonneg), "a number >= 0 or null"),
    "per_category": (_dict_of(_category), "an object of categories, each with an accuracy between 0 and 1"),
    "created": (lambda v: v is None or isinstance(v, str), "a date string"),
    "cases": (lambda v: isinstance(v, list), "a list"),
}
RETENTION_LOG = {
    "model": (_is_str, "a name"), "suite": (lambda v: v is None or isinstance(v, str), "a name or null"),
    "logit_retention": (_opt(_num), "a number or null"),
    "kl": (lambda v: isinstance(v, dict) and _nonneg(v.get("mean")), "an object with a mean >= 0"),
    "created": (lambda v: v is None or isinstance(v, str), "a date string"),
}
SURVIVAL_REPORT = {
    "summary": (_dict_of(_stats, str.isdigit), "an object {bits: statistics}"),
    "predicted_min_bits": (_opt(_int), "a bit-width or null"),
    "verdict": (lambda v: v is None or _dict_of(lambda x: x is None or isinstance(x, bool), str.isdigit)(v),
                "an object {bits: true, false or null}"),
    "threshold": (lambda v: v is None or _threshold(v), "an object {statistic, aggregate, min}"),
    "layers": (lambda v: v is None or (isinstance(v, list) and all(_layer(x) for x in v)),
               "a list of layers with their statistics by bits"),
    "model": (lambda v: v is None or isinstance(v, str), "a name"),
    "bracket": (lambda v: v is None or (isinstance(v, dict) and _opt(_int)(v.get("survives_at"))
                                        and _opt(_int)(v.get("rounded_away_at"))
                                        and isinstance(v.get("check", []), list) and all(map(_int, v.get("check", [])))),
                "an object {survives_at, rounded_away_at: a bit-width or null, check: a list of bit-widths}"),
}
# kind -> (schema, the fields it may lack or hold null in, what it is called)
KINDS = {
    "validate": (VALIDATE_LOG, {"mixed", "load_s", "first_gen_s", "tokens_per_s", "created"}, "qtools validate log"),
    "retention": (RETENTION_LOG, {"suite", "created"}, "qtools retention log"),
    "survival": (SURVIVAL_REPORT, {"verdict", "threshold", "layers", "model", "bracket"},
                 "`qtools delta-survival --json` report"),
}


def check_log(obj: dict, path: str | Path, kind: str = "validate") -> dict:
    """`obj` if it holds every field a `kind` log must, each of its type; else one QtoolsError that
    names the file and the first bad field."""
    schema, optional, what = KINDS[kind]
    for key, (check, want) in schema.items():
        if key not in obj:
            if key in optional:
                continue
            raise QtoolsError(f"{path}: field {key!r} is missing: not a complete {what} (written by an older "
                              "qtools, or damaged)")
        value = obj[key]
        if key in optional and value is None:
            continue
        if not check(value):
            shown = json.dumps(value)
            shown = shown if len(shown) <= 40 else shown[:37] + "..."
            raise QtoolsError(f"{path}: field {key!r} is {shown}, not {want}: a damaged {what}, or one an older "
                              "qtools wrote")
    return obj
