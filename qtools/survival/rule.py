"""The rule delta-survival predicts with, and where it comes from.

A rule is (statistic, aggregate, min): a bit-width survives when the statistic,
|D|^2-weighted over the model or the weakest layer's, is at least min; the
predicted minimum bit-width is the smallest that survives with every larger one
surviving too (smallest_surviving, the one definition of a threshold, for
predictions and measured behaviour alike).

`make calibrate` fits it against behaviour on a grid of fine-tunes and writes
RULE_FILE (rule + evidence; the study is docs/calibration.md). Until that file
exists the rule is PROVISIONAL: a bit-width is predicted safe when the
fine-tuning delta carries more energy than the quantization noise that lands in
the adapter's own subspace (U^T (Dq - D) V), weighted over the model by |D|^2.
Without the adapter's factors the subspace is unknown and the per-weight cosine
is used instead (FALLBACK).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from .. import SUPPORTED_BITS

RULE_FILE = Path(__file__).with_name("calibration.json")
AGGREGATES = ("weighted", "weakest_layer")


def smallest_surviving(bits, survives):
    """Smallest bit-width b for which survives(b) holds with every larger one holding too;
    None when even the largest fails."""
    best = None
    for b in sorted(bits, reverse=True):
        if not survives(b):
            break
        best = b
    return best


@dataclass(frozen=True)
class Rule:
    statistic: str
    aggregate: str = "weighted"
    min: float = 0.0
    provisional: bool = True
    evidence: str = ""

    @classmethod
    def from_dict(cls, d: dict) -> Rule:
        """A rule as delta-survival reports write it ("threshold"), or as the rule file holds it."""
        return cls(d["statistic"], d.get("aggregate", "weighted"), d["min"], d.get("provisional", True),
                   d.get("evidence", ""))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def load(cls, available: dict | None = None, path: str | Path | None = None) -> Rule:
        """The calibrated rule from the rule file (PROVISIONAL when there is none or it is
        unreadable); FALLBACK when `available`, a report's statistics at one bit-width,
        lacks its statistic (subspace statistics need the adapter's factors)."""
        path = Path(path or RULE_FILE)
        rule = PROVISIONAL
        if path.exists():
            try:
                rule = cls.from_dict(json.loads(path.read_text()))
            except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
                pass
        if available is not None and available.get(rule.statistic) is None:
            return FALLBACK
        return rule

    def judged_value(self, model_value, layer_values):
        """The value the rule judges, from the model's pooled value and each layer's."""
        if self.aggregate == "weakest_layer":
            vals = [v for v in layer_values if v is not None]
            return min(vals) if vals else model_value
        return model_value

    def value(self, summary: dict, layers: list, bits: int):
        """The rule's statistic at `bits` for a report's summary and layers (None where absent)."""
        key = str(bits)
        return self.judged_value((summary.get(key) or {}).get(self.statistic),
                                 [(L["by_bits"].get(key) or {}).get(self.statistic) for L in layers or []])

    def clears(self, value) -> bool | None:
        """Whether a value meets the threshold (None: no value to judge)."""
        return None if value is None else value >= self.min

    def survives(self, summary: dict, layers: list, bits: int) -> bool | None:
        return self.clears(self.value(summary, layers, bits))

    def predict(self, summary: dict, layers: list, bits) -> tuple[int | None, dict]:
        """(predicted minimum bit-width, {bits: survives}) over the bit-widths `bits`."""
        verdict = {str(b): self.survives(summary, layers, b) for b in bits}
        return smallest_surviving(bits, lambda b: verdict[str(b)]), verdict


@dataclass(frozen=True)
class Bracket:
    """The weights tier's never-optimistic answer (`make calibrate` fits it: docs/study.md):
    a bit-width survives, with every larger one, where the statistic is above `survive` (no
    calibration fine-tune lost a bit-width at a value that high); it is rounded away, with every
    smaller one, where the lost side's statistic (lost_statistic, lost_aggregate: the survive
    side's unless the study chose another) is at most `lost` (below every value at which a
    bit-width above a threshold survived: the threshold itself may be called lost, the probe
    confirms it). The survive end is then moved up `raise_by` supported bit-widths: held out, a
    family lost bit-widths at values no other family lost at, and the move is what made the
    bracket never optimistic without it. The bit-widths between are left to `qtools probe`."""
    statistic: str
    aggregate: str
    survive: float
    lost: float
    lost_statistic: str | None = None
    lost_aggregate: str | None = None
    raise_by: int = 0

    @classmethod
    def load(cls, path: str | Path | None = None) -> Bracket | None:
        """The rule file's bracket; None when it has none (not calibrated by the study) or is unreadable."""
        try:
            d = json.loads(Path(path or RULE_FILE).read_text())["bracket"]
            br = cls(d["statistic"], d["aggregate"], float(d["survive"]), float(d["lost"]),
                     d.get("lost_statistic"), d.get("lost_aggregate"), d.get("raise_by", 0))
        except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError):
            return None
        ok = isinstance(br.raise_by, int) and not isinstance(br.raise_by, bool) and br.raise_by >= 0
        return br if ok else None  # a move that is not a count of bit-widths: no bracket, as unreadable

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def lost_side(self) -> tuple[str, str]:
        """(statistic, aggregate) the rounded-away side is judged on."""
        return self.lost_statistic or self.statistic, self.lost_aggregate or self.aggregate

    def settle(self, value_at, bits, lost_value_at=None) -> tuple:
        """(a, b) over `bits` from value_at(b) (the statistic, None where absent) and lost_value_at(b)
        (the lost side's; value_at when not given): a the smallest bit-width settled as kept (None:
        none), b the largest settled as rounded away (None: none)."""
        v = {x: value_at(x) for x in bits}
        w = v if lost_value_at is None else {x: lost_value_at(x) for x in bits}
        a = smallest_surviving(bits, lambda x: v[x] is not None and v[x] > self.survive)
        b = None
        for x in sorted(bits):
            if w[x] is None or w[x] > self.lost or (a is not None and x >= a):  # below the statistic's own a
                break
            b = x
        return raised(a, self.raise_by, bits), b

    def predict(self, summary: dict, layers: list, bits) -> tuple:
        """settle() on a delta-survival report's statistics."""
        rule, lost = Rule(self.statistic, self.aggregate), Rule(*self.lost_side)
        return self.settle(lambda b: rule.value(summary, layers, b), bits, lambda b: lost.value(summary, layers, b))


def raised(a, m: int, bits) -> int | None:
    """A survive end a moved up m supported bit-widths (SUPPORTED_BITS, as the study counted the
    move), then to the smallest of `bits` at or above that; None (none settled as kept) past them."""
    if a is None or m == 0:
        return a
    ranked = sorted(set(SUPPORTED_BITS) | set(bits))
    i = ranked.index(a) + m
    return None if i >= len(ranked) else next((x for x in sorted(bits) if x >= ranked[i]), None)


def check_set(bits, a, b) -> list:
    """The bit-widths `qtools probe` runs after a bracket (a: the smallest settled as kept, b: the
    largest settled as rounded away; None: none): those between, and both ends. The ends are
    extrapolated from the study's fine-tunes (the rounded-away end is often the threshold itself,
    by design, and a survive end unmoved was once optimistic held out: docs/study.md), so the
    probe confirms them; the bit-widths above a and below b it does not run."""
    return [x for x in sorted(bits) if (b is None or x >= b) and (a is None or x <= a)]


def answer_with_probe(bits, a, check, passes) -> int | None:
    """The answer of a bracket with the probe of its check set: a checked bit-width survives where
    the probe passes it (passes(x)), whichever side of the bracket it was on; an unchecked one
    where the bracket settles it as kept (at a or above); none below b survives."""
    checked = set(check)
    return smallest_surviving(bits, lambda x: passes(x) if x in checked else a is not None and x >= a)


def study_record(path: str | Path | None = None) -> dict:
    """The rule file's "study": what the calibration study judged held out by family ({} when the
    rule file has none, or is unreadable)."""
    try:
        st = json.loads(Path(path or RULE_FILE).read_text())["study"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError):
        return {}
    return st if isinstance(st, dict) else {}


def held_out(study: dict, key: str) -> dict | None:
    """One tier's held-out scores in a study record ("weights_held_out", "probe_held_out",
    "constant_held_out", "point_held_out"): n, exact, optimistic; None when not recorded."""
    d = study.get(key)
    return d if isinstance(d, dict) and all(isinstance(d.get(k), int) for k in ("n", "exact", "optimistic")) else None


def tier_evidence(path: str | Path | None = None) -> str:
    """What each prediction tier has earned, held out by family in the calibration study (the rule
    file's "study"), in one line for compare and the reports."""
    st = study_record(path)
    w, p, c = (held_out(st, k) for k in ("weights_held_out", "probe_held_out", "constant_held_out"))
    bp = held_out(st, "bracket_probe_held_out")
    if w is None or p is None or c is None:
        return ("What the tiers have earned: delta-survival's rule is not the calibration study's yet (the study, "
                "docs/study.md, replaces it once it has as many usable fine-tunes as the rule in place was fitted "
                "on); confirm every prediction with make sweep.")
    flag = "" if st.get("goals_met") else " PROVISIONAL (docs/study.md: goals not met);"
    return (f"What the tiers have earned, held out by family (docs/study.md):{flag} weights bracket "
            f"{w['exact']}/{w['n']} exact, {w['optimistic']} optimistic, {w.get('mean_between', 0):.1f} bit-widths "
            f"left to the probe"
            + ("" if bp is None else f" (bracket + probe of its check set {bp['exact']}/{bp['n']} exact, "
               f"{bp['optimistic']} optimistic)")
            + f"; probe {p['exact']}/{p['n']} exact, {p['optimistic']} optimistic; constant guess "
            f"{c['exact']}/{c['n']} exact, {c['optimistic']} optimistic.")


def probe_evidence(path: str | Path | None = None) -> str:
    """How far the probe's verdicts are calibrated: held out by family in the study (the rule file's
    "study"), or not yet."""
    base = "validate's own criteria applied to the decision tokens"
    p = held_out(study_record(path), "probe_held_out")
    if p is None:
        return f"{base}; not yet calibrated against measured sweeps across model families"
    return (f"{base}; held out by family in the calibration study (docs/study.md) the threshold it gives is "
            f"exact for {p['exact']}/{p['n']} fine-tunes, optimistic for {p['optimistic']}")


PROVISIONAL = Rule("subspace_snr", "weighted", 1.0, True,
                   "not yet calibrated against behaviour (see README: Prediction threshold)")
FALLBACK = Rule("cosine", "weighted", 0.5, True,
                "no adapter factors: the subspace statistic is unavailable; cosine threshold not calibrated")
