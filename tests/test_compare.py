"""compare on synthetic validate logs and a synthetic delta-survival JSON (no model needed)."""

import json

import pytest
from click.testing import CliRunner
from helpers import write_logs

from qtools.cli import cli


def log(model, bits, acc, critical=0, gen=0.5, mem=1.0, disk=None, quantized=True, created="2026-01-01T00:00:00"):
    total = 20
    return {
        "qtools_log": 1, "model": model, "suite": "demo", "quantized": quantized, "bits": bits,
        "group_size": 64 if quantized else None, "mixed": False,
        "bits_per_weight": bits + 0.5 if quantized else 16.0,
        "disk_bytes": disk or int(bits * 1e8), "load_s": 1.0, "first_gen_s": gen * 2, "mean_gen_s": gen,
        "tokens_per_s": 10.0 / gen, "peak_memory_gb": mem, "accuracy": acc, "correct": round(acc * total),
        "total": total, "per_category": {"tool": {"correct": 1, "total": 1, "accuracy": acc}},
        "critical_errors": critical, "format_compliance": 1.0, "verdict": "pass", "cases": [], "created": created,
    }


SURVIVAL = {"model": "models/fused_f16", "group_size": 64, "bits": [3, 4, 5, 6, 8],
            "summary": {str(b): {"delta_retention": r, "cosine": r, "codes_changed": 0.1, "delta_to_step": 0.1,
                                 "sign_agreement": 0.9, "rmse": 0.01}
                        for b, r in [(3, 0.2), (4, 0.5), (5, 0.8), (6, 0.9), (8, 0.99)]},
            "tensors": [], "predicted_min_bits": 5}


@pytest.fixture
def logs(tmp_path):
    specs = [
        log("fused_f16", 16, 1.0, quantized=False, mem=3.0),
        log("fused_8bit", 8, 1.0, mem=1.6),
        log("fused_6bit", 6, 0.95, gen=3.5, mem=1.2),   # too slow
        log("fused_5bit", 5, 0.9, mem=1.0),
        log("fused_4bit", 4, 0.6, mem=0.8),              # fine-tune rounded away
        log("fused_3bit", 3, 0.85, critical=2, mem=0.6),  # accuracy ok, safety broken
    ]
    return write_logs(tmp_path, specs, "demo")


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def test_compare_table_verdicts_recommendation(logs, tmp_path):
    r = run("compare", *logs)
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    header = next(l for l in lines if l.startswith("| metric"))
    assert [c.strip() for c in header.strip("|").split("|")] == [
        "metric", "fused_f16", "fused_8bit", "fused_6bit", "fused_5bit", "fused_4bit", "fused_3bit"]
    disk = [c.strip() for c in next(l for l in lines if l.startswith("| disk size")).strip("|").split("|")]
    assert [c.endswith(" *") for c in disk[1:]] == [False] * 5 + [True]  # the smallest is marked best
    assert "* best in its row (no mark: all equal)" in lines
    assert max(len(l) for l in lines if l.startswith("|")) < 130
    verdict = next(l for l in lines if l.startswith("| verdict"))
    assert [c.strip() for c in verdict.strip("|").split("|")][1:7] == ["PASS", "PASS", "FAIL", "PASS", "FAIL", "FAIL"]
    assert "recommendation: fused_5bit (smallest model meeting all criteria)" in lines
    assert "  fused_3bit: FAIL (2 critical error(s) > 0)" in lines
    assert "  fused_6bit: FAIL (mean generation 3.50 s > 3.0 s)" in lines


def test_compare_criteria_options(logs):
    r = run("compare", *logs, "--min-accuracy", 0.5, "--max-critical", 2, "--json")
    comp = json.loads(r.stdout)["comparisons"][0]
    assert comp["recommendation"] == "fused_3bit"
    r = run("compare", *logs, "--max-memory-gb", 0.5, "--json")
    comp = json.loads(r.stdout)["comparisons"][0]
    assert comp["recommendation"] is None
    assert "recommendation: none (no model meets all criteria)" in run("compare", *logs, "--max-memory-gb", 0.5).output


def test_compare_survival_agreement_and_plot(logs, tmp_path):
    surv = tmp_path / "survival.json"
    surv.write_text(json.dumps(SURVIVAL))
    png = tmp_path / "out" / "compare.png"
    r = run("compare", *logs, "--survival", surv, "--plot", png, "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    agree = {a["bits"]: (a["predicted"], a["observed"], a["agree"]) for a in out["comparisons"][0]["survival_agreement"]}
    assert agree == {
        8: ("survives", "survives", True), 6: ("survives", "survives", True), 5: ("survives", "survives", True),
        4: ("rounded away", "fails", True), 3: ("rounded away", "fails", True),
    }
    rows = {row["metric"]: row for row in out["comparisons"][0]["rows"]}
    assert rows["predicted delta_retention"]["values"]["fused_5bit"] == 0.8
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out["plot"] == str(png)


def test_survival_json_found_among_logs(logs, tmp_path):
    surv = tmp_path / "survival.json"
    surv.write_text(json.dumps(dict(SURVIVAL, predicted_min_bits=4)))
    r = run("compare", *logs, surv)
    assert r.exit_code == 0, r.output
    assert "delta-survival predicted the fine-tune survives down to 4 bits:" in r.output
    line = next(l for l in r.output.splitlines() if "| fused_4bit " in l and "survives" in l)
    assert [c.strip() for c in line.strip("|").split("|")] == ["4", "fused_4bit", "0.5", "survives", "fails", "NO"]


def test_per_bit_verdict_and_float_reference_failing(logs, tmp_path):
    surv = tmp_path / "survival.json"
    surv.write_text(json.dumps(dict(SURVIVAL, verdict={"3": False, "4": True, "5": True, "6": True, "8": True},
                                    threshold={"statistic": "subspace_snr", "min": 1.0})))
    comp = json.loads(run("compare", *logs, surv, "--json").stdout)["comparisons"][0]
    agree = {a["bits"]: (a["predicted"], a["agree"]) for a in comp["survival_agreement"]}
    assert agree[4] == ("survives", False) and agree[3] == ("rounded away", True)
    ref = json.loads(logs[0].read_text())
    logs[0].write_text(json.dumps(dict(ref, accuracy=0.5)))
    comp = json.loads(run("compare", *logs, surv, "--json").stdout)["comparisons"][0]
    a4 = next(a for a in comp["survival_agreement"] if a["bits"] == 4)
    assert (a4["observed"], a4["agree"]) == ("fails (float fails too)", None)


def test_rerun_replaces_older_log(logs, tmp_path):
    newer = tmp_path / "rerun.json"
    newer.write_text(json.dumps(log("fused_4bit", 4, 0.95, created="2026-02-01T00:00:00")))
    out = json.loads(run("compare", *logs, newer, "--json").stdout)["comparisons"][0]
    assert out["models"].count("fused_4bit") == 1
    assert out["recommendation"] == "fused_4bit"


def test_compare_bad_input(tmp_path):
    r = run("compare")
    assert (r.exit_code, r.output.strip()) == (
        1, "Error: no validate logs given: run `make validate MODEL=...` or `make sweep` first")
    bad = tmp_path / "bad.json"
    bad.write_text("{oops")
    r = run("compare", bad)
    assert (r.exit_code, r.output.strip()) == (1, f"Error: {bad} is not valid JSON (Expecting property name enclosed in double quotes, line 1)")
    other = tmp_path / "other.json"
    other.write_text("{}")
    assert run("compare", other).output.strip() == f"Error: {other} is not a qtools validate log"
    assert run("compare", tmp_path / "missing.json").output.strip() == f"Error: {tmp_path / 'missing.json'} does not exist"


def test_a_pass_below_a_failure_is_flagged_with_the_smallest_model_above_every_failure(tmp_path):
    specs = [log("fused_f16", 16, 1.0, quantized=False), log("fused_5bit", 5, 1.0),
             log("fused_4bit", 4, 0.9, critical=3), log("fused_3bit", 3, 1.0)]
    paths = []
    for spec in specs:
        p = tmp_path / f"{spec['model']}-demo.json"
        p.write_text(json.dumps(spec))
        paths.append(p)
    out = json.loads(run("compare", *paths, "--json").stdout)["comparisons"][0]
    assert out["recommendation"] == "fused_3bit"
    assert out["not_monotone"] == ["fused_4bit"] and out["recommendation_above_failures"] == "fused_5bit"
    human = run("compare", *paths).output
    assert "not monotone in bits" in human and "Smallest model above every failure: fused_5bit" in human


def test_agreement_shows_the_value_the_rule_judges():
    """With a weakest-layer rule the table shows the weakest layer's value, not the model's; the
    statistic is the bracket's survive side where the report has a bracket, else the point rule's."""
    from qtools.pipeline.compare import _judged
    from qtools.survival.rule import Rule

    surv = {"summary": {"4": {"delta_retention": 0.96}},
            "layers": [{"layer": 0, "by_bits": {"4": {"delta_retention": 0.99}}},
                       {"layer": 1, "by_bits": {"4": {"delta_retention": 0.93}}}]}
    assert Rule("delta_retention", "weakest_layer").value(surv["summary"], surv["layers"], 4) == 0.93
    assert Rule("delta_retention", "weighted").value(surv["summary"], surv["layers"], 4) == 0.96
    assert Rule("delta_retention").value(surv["summary"], surv["layers"], 3) is None
    point = {**surv, "threshold": {"statistic": "delta_retention", "aggregate": "weakest_layer", "min": 0.97}}
    assert _judged(point) == ("delta_retention", "weakest_layer")
    bracket = {"rule": {"statistic": "sign_agreement", "aggregate": "weighted", "survive": 0.8, "lost": 0.5,
                        "lost_statistic": "delta_snr", "lost_aggregate": "weakest_layer"}}
    assert _judged({**point, "bracket": bracket}) == ("sign_agreement", "weighted")
    assert _judged(surv) is None


def test_a_survival_report_with_string_verdicts_is_refused(logs, tmp_path):
    """Verdicts are true/false since delta-survival's rule moved to one place; an older
    report's strings are not guessed at."""
    surv = tmp_path / "survival.json"
    surv.write_text(json.dumps(dict(SURVIVAL, verdict={"4": "rounded away", "5": "survives"})))
    r = run("compare", *logs, surv)
    assert r.exit_code == 1
    assert r.output.strip() == (f"Error: {surv}: field 'verdict' is {{\"4\": \"rounded away\", \"5\": \"survives\"}}, "
                                "not an object {bits: true, false or null}: a damaged `qtools delta-survival --json` "
                                "report, or one an older qtools wrote")


# ------------------------------------------------------------------ bad input: the plot, a log's fields

def one_error(r, code=1):
    assert r.exit_code == code, r.output
    lines = r.output.strip().splitlines()
    assert lines[-1].startswith("Error: ") and sum(ln.startswith("Error:") for ln in lines) == 1, r.output
    assert "Traceback" not in r.output and (r.exception is None or isinstance(r.exception, SystemExit))
    return lines[-1]


def test_plot_with_two_logs_of_one_bit_width(tmp_path):
    # uniform and awq at 4 bits, both valid: both are plotted at 4, the written path printed
    paths = write_logs(tmp_path, [log("fused_4bit", 4, 0.9), log("fused_awq_4bit", 4, 0.95)], "demo")
    plot = tmp_path / "out" / "bits.svg"
    r = run("compare", *paths, "--plot", plot)
    assert r.exit_code == 0, r.output
    assert plot.is_file() and plot.read_bytes().lstrip().startswith(b"<?xml")
    assert r.output.strip().splitlines()[-1] == f"plot: {plot}"


@pytest.mark.parametrize("name", ["p.xyz", "p", "p.json"])
def test_plot_in_a_format_matplotlib_does_not_write_is_a_usage_error(logs, tmp_path, name):
    line = one_error(run("compare", *logs, "--plot", tmp_path / name), code=2)
    assert line.startswith(f"Error: Invalid value for '--plot': {tmp_path / name}: give a file name ending in one of "
                           "the formats matplotlib writes: ") and ".png" in line and ".svg" in line
    assert not list(tmp_path.glob("p*"))


def test_plot_into_a_directory_is_a_usage_error(logs, tmp_path):
    d = tmp_path / "plots"
    d.mkdir()
    line = one_error(run("compare", *logs, "--plot", d), code=2)
    assert line == f"Error: Invalid value for '--plot': {d} is a directory: give a file name, e.g. {d / 'compare.png'}"
    assert list(d.iterdir()) == [] and not (tmp_path / "plots.png").exists()


REQUIRED = ["model", "suite", "bits", "quantized", "accuracy", "format_compliance", "correct", "total",
            "critical_errors", "mean_gen_s", "peak_memory_gb", "disk_bytes", "bits_per_weight", "per_category"]


@pytest.mark.parametrize("field", REQUIRED)
@pytest.mark.parametrize("how", ["missing", "null", "wrong type"])
def test_a_log_with_a_field_missing_null_or_of_another_type_is_one_error(tmp_path, field, how):
    good = log("fused_5bit", 5, 0.9)
    bad = dict(log("fused_4bit", 4, 0.6))
    if how == "missing":
        del bad[field]
    else:
        bad[field] = None if how == "null" else {"per_category": ["tool"], "model": 5, "suite": 5}.get(field, "x")
    paths = write_logs(tmp_path, [good], "demo") + [tmp_path / "bad.json"]
    paths[1].write_text(json.dumps(bad))
    line = one_error(run("compare", *paths, "--plot", tmp_path / "p.png"))
    assert line.startswith(f"Error: {paths[1]}: field {field!r} is ")
    assert not (tmp_path / "p.png").exists()


@pytest.mark.parametrize("change", [
    {"summary": [1, 2]},
    {"summary": {"4": {"delta_retention": "high"}}},
    {"summary": {"four": {"delta_retention": 0.5}}},
    {"predicted_min_bits": "5"},
    {"threshold": {"statistic": "delta_retention", "min": "0.9"}},
    {"threshold": ["delta_retention"]},
    {"layers": {"0": {}}},
    {"layers": [{"layer": 0, "by_bits": {"4": {"delta_retention": "x"}}}]},
    {"verdict": ["4"]},
])
def test_a_survival_report_with_wrongly_typed_fields_is_one_error(logs, tmp_path, change):
    surv = tmp_path / "survival.json"
    surv.write_text(json.dumps({**SURVIVAL, "threshold": {"statistic": "delta_retention", "min": 0.9},
                                "layers": [], **change}))
    for args in (["--survival", surv], [surv]):
        line = one_error(run("compare", *logs, *args))
        assert line.startswith(f"Error: {surv}: field {next(iter(change))!r} is ")


@pytest.mark.parametrize("change", [{"logit_retention": "high"}, {"kl": None}, {"kl": {"mean": "x"}}, {"model": None}])
def test_a_retention_log_with_wrongly_typed_fields_is_one_error(logs, tmp_path, change):
    ret = tmp_path / "retention-fused_4bit.json"
    ret.write_text(json.dumps({"qtools_retention": 1, "model": "fused_4bit", "suite": "demo", "logit_retention": 0.5,
                               "kl": {"mean": 0.1}, "created": "2026-01-01T00:00:00", **change}))
    line = one_error(run("compare", *logs, ret))
    assert line.startswith(f"Error: {ret}: field {next(iter(change))!r} is ")


def test_compare_says_what_each_tier_has_earned_and_the_bracket(logs, tmp_path, monkeypatch):
    """Beside the prediction's agreement with behaviour: delta-survival's bracket, and what each
    tier earned held out by family in the study (the rule file's "study"), or that it was not judged."""
    import qtools.survival.rule as R

    surv = tmp_path / "survival.json"
    surv.write_text(json.dumps(dict(SURVIVAL, bracket={"survives_at": 6, "rounded_away_at": 3, "probe": [4, 5]})))
    monkeypatch.setattr(R, "RULE_FILE", tmp_path / "none.json")
    r = run("compare", *logs, "--survival", surv)
    assert r.exit_code == 0, r.output
    assert "bracket: survives at >= 6, rounded away at <= 3" in r.output
    assert "delta-survival's rule is not the calibration study's yet" in r.output
    study = {"weights_held_out": {"n": 70, "exact": 50, "optimistic": 0, "mean_between": 1.4},
             "probe_held_out": {"n": 70, "exact": 67, "optimistic": 0}, "constant_held_out": {"n": 70, "exact": 20,
                                                                                           "optimistic": 30},
             "goals_met": False}
    (tmp_path / "rule.json").write_text(json.dumps({"statistic": "cosine", "min": 0.5, "study": study}))
    monkeypatch.setattr(R, "RULE_FILE", tmp_path / "rule.json")
    r = run("compare", *logs, "--survival", surv)
    assert "PROVISIONAL" in r.output and "weights bracket 50/70 exact, 0 optimistic, 1.4 bit-widths" in r.output
    assert "probe 67/70 exact, 0 optimistic; constant guess 20/70 exact, 30 optimistic" in r.output


def test_bit_widths_the_bracket_leaves_to_the_probe_are_neither_agreement_nor_disagreement(logs, tmp_path):
    """A delta-survival report whose verdict is its bracket's: kept at >= 6, lost at <= 3, 4 and 5
    left to the probe (None): compare shows them as such, not as a prediction that failed."""
    from qtools.pipeline.compare import compare

    surv = tmp_path / "survival.json"
    surv.write_text(json.dumps(dict(SURVIVAL, predicted_min_bits=6,
                                    verdict={"3": False, "4": None, "5": None, "6": True, "8": True},
                                    bracket={"survives_at": 6, "rounded_away_at": 3, "probe": [4, 5],
                                             "rule": {"statistic": "cosine", "aggregate": "weighted",
                                                      "survive": 0.85, "lost": 0.4}})))
    rows = {a["bits"]: a for a in compare(logs, surv)["comparisons"][0]["survival_agreement"]}
    assert rows[4]["statistic"] == "cosine" and rows[4]["statistic_value"] == 0.5  # the bracket's statistic
    assert rows[4]["predicted"] == rows[5]["predicted"] == "left to the probe"
    assert rows[4]["agree"] is None and rows[5]["agree"] is None
    assert rows[6]["predicted"] == "survives" and rows[3]["predicted"] == "rounded away"
    assert rows[8]["agree"] is True and rows[3]["agree"] is True  # 3 bits fails (2 critical errors)
    r = run("compare", *logs, "--survival", surv)
    assert r.exit_code == 0, r.output
    assert "left to the probe" in r.output


def test_a_probe_report_among_the_logs_is_judged_against_the_sweep(logs, tmp_path):
    """`make demo` writes the probe's report beside the validate logs: compare shows the probe's
    verdict per bit-width it probed beside the validated model's (before: "not a qtools validate log")."""
    from qtools.pipeline.compare import compare

    probe = tmp_path / "probe.json"
    probe.write_text(json.dumps({"qtools_probe": 1, "suite": "demo", "predicted_min_bits": 4,
                                 "created": "2026-01-01T00:00:00",
                                 "by_bits": {"4": {"verdict": "pass"}, "5": {"verdict": "pass"},
                                             "3": {"verdict": "fail"}}}))
    rows = {a["bits"]: a for a in compare([*logs, probe])["comparisons"][0]["probe_agreement"]}
    assert set(rows) == {3, 4, 5}  # the bit-widths it probed, each with its validated model
    assert rows[5]["agree"] and rows[3]["agree"]  # 3 bits fails validate (2 critical errors)
    assert rows[4]["predicted"] == "survives" and rows[4]["observed"] == "fails" and not rows[4]["agree"]
    r = run("compare", *logs, probe)
    assert r.exit_code == 0, r.output
    assert "the probe predicted the fine-tune survives down to 4 bits" in r.output


def test_where_the_float_model_fails_the_probe_is_not_judged_by_the_failures(tmp_path):
    """A fine-tune whose float16 model fails its suite (one critical error, logs/outside/g36-s1):
    a quantized model failing proves nothing against the probe (as against delta-survival), and a
    probe that keeps no bit-width says so instead of "down to None bits"."""
    from qtools.pipeline.compare import compare

    paths = write_logs(tmp_path, [log("fused_f16", 16, 0.98, quantized=False, critical=1),
                                  log("fused_8bit", 8, 0.98, critical=1), log("fused_6bit", 6, 1.0)], "demo")
    probe = tmp_path / "probe.json"
    probe.write_text(json.dumps({"qtools_probe": 1, "suite": "demo", "predicted_min_bits": None,
                                 "created": "2026-01-01T00:00:00",
                                 "by_bits": {"8": {"verdict": "fail"}, "6": {"verdict": "pass"}}}))
    rows = {a["bits"]: a for a in compare([*paths, probe])["comparisons"][0]["probe_agreement"]}
    assert rows[8]["observed"] == "fails (float fails too)" and rows[8]["agree"] is None
    assert rows[6]["observed"] == "survives" and rows[6]["agree"] is True
    out = run("compare", *paths, probe).output
    assert "the probe keeps none of the bit-widths it probed" in out
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in out.splitlines() if line.startswith("|")]
    assert ["8", "fused_8bit", "fails", "fails (float fails too)", "n/a"] in cells


def test_the_bracket_with_the_probe_of_its_check_set_is_the_answer_and_the_sweep_judges_it(logs, tmp_path):
    """Kept at >= 6, lost at <= 3 by the weights, the check set 3 4 5 6: with the probe's verdicts
    on it the answer is 5, what the sweep keeps (5 bits at 90%, 4 at 60%). A probe that fails 6,
    the bracket's own survive end, overrules it (the answer 8: did not hold); a probe that left 3
    out gives no answer."""
    from qtools.pipeline.compare import compare

    surv = tmp_path / "survival.json"
    surv.write_text(json.dumps(dict(SURVIVAL, predicted_min_bits=6,
                                    verdict={"3": False, "4": None, "5": None, "6": True, "8": True},
                                    bracket={"survives_at": 6, "rounded_away_at": 3, "probe": [4, 5],
                                             "check": [3, 4, 5, 6],
                                             "rule": {"statistic": "cosine", "aggregate": "weighted",
                                                      "survive": 0.85, "lost": 0.4}})))

    def probe_file(name, verdicts):
        p = tmp_path / name
        p.write_text(json.dumps({"qtools_probe": 1, "suite": "demo", "created": "2026-01-01T00:00:00",
                                 "by_bits": {str(b): {"verdict": v} for b, v in verdicts.items()}}))
        return p

    right = probe_file("probe.json", {3: "fail", 4: "fail", 5: "pass", 6: "pass"})
    bp = compare([*logs, right], surv)["comparisons"][0]["bracket_probe"]
    assert (bp["answer"], bp["sweep"], bp["unprobed"]) == (5, 5, [])
    out = run("compare", *logs, right, "--survival", surv).output
    assert "the probe of its check set (3 4 5 6), the answer to act on: 5 bits; the sweep: 5 bits (held)" in out
    wrong = probe_file("probe.json", {3: "fail", 4: "fail", 5: "pass", 6: "fail"})
    assert compare([*logs, wrong], surv)["comparisons"][0]["bracket_probe"]["answer"] == 8
    assert "8 bits; the sweep: 5 bits (did NOT hold)" in run("compare", *logs, wrong, "--survival", surv).output
    partial = probe_file("probe.json", {4: "fail", 5: "pass", 6: "pass"})
    out = run("compare", *logs, partial, "--survival", surv).output
    assert "not given: the probe did not check 3 (qtools probe MODEL --bits 3 4 5 6)" in out


def test_a_survival_report_with_a_corrupt_bracket_is_one_error_line(logs, tmp_path):
    """The bracket's ends and check set are bit-widths: a report holding anything else is refused
    on load (before: compare met it as a TypeError, a traceback)."""
    surv = tmp_path / "survival.json"
    surv.write_text(json.dumps(dict(SURVIVAL, bracket={"survives_at": "6", "rounded_away_at": 3,
                                                       "check": [3, 4, 5, 6]})))
    probe = tmp_path / "probe.json"
    probe.write_text(json.dumps({"qtools_probe": 1, "suite": "demo", "created": "2026-01-01T00:00:00",
                                 "by_bits": {str(b): {"verdict": "pass"} for b in (3, 4, 5, 6)}}))
    r = run("compare", *logs, probe, "--survival", surv)
    assert r.exit_code != 0 and r.output.startswith("Error: ") and "bracket" in r.output
    assert "Traceback" not in r.output
