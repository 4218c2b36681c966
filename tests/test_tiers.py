"""The study's two tiers (qtools/calibrate/tiers.py) on synthetic fine-tunes whose answers are
known, and a study refitted from its results directory alone."""

import io
import json

from test_calibrate import family_result, moving_families

from qtools.calibrate import run, tiers
from qtools.calibrate.grid import BITS
from qtools.io.atomic import write_json_atomic


def with_probe(r, keeps_down_to, margins_at: dict, real=None):
    """r with a probe whose verdict passes at keeps_down_to and above, and per bit-width the
    margins of its 4 decisions (all right at float)."""
    by_bits = {str(b): {"verdict": "pass" if b >= keeps_down_to else "fail"} for b in BITS}
    cases = {"float": {"correct": "1111", "margin": [2.0] * 4}}
    for b in BITS:
        cases[str(b)] = {"correct": "1111", "critical": "0000", "margin": [margins_at.get(b, 2.0)] * 4}
    r["probe"] = {"predicted_min_bits": keeps_down_to, "by_bits": by_bits, "cases": cases, "seconds": 1.0}
    if real is not None:
        r["real"], r["real_min_bits"] = real, r["true_min_bits"] if "t" not in real else real["t"]
    return r


def test_truth_is_the_real_models_threshold_where_measured():
    r = family_result(0, "ga", 4, 12.0)
    assert tiers.truth(r) == 4
    r["real"], r["real_min_bits"] = {"4": {}}, 5
    assert tiers.truth(r) == 5
    r["real_min_bits"] = None  # measured: nothing survives
    assert tiers.truth(r) is None


def test_bracket_held_out_settles_a_statistic_that_follows_the_family():
    """delta_to_noise crosses 10 at each fine-tune's threshold, whatever its family: fitted on two
    families, the bracket on the statistic settles the third exactly, never optimistic, nothing left
    to the probe. Fitted on one family, the inner folds cannot choose the statistic and are
    optimistic, so the bracket shipped moves its survive end up: never optimistic still."""
    results = moving_families()
    w = tiers.weights_tier(results)
    assert w["unmoved"] == {"n": 9, "optimistic": 0, "exact": 9, "settled": 9, "wrongly_lost": 0, "lost_above": 0,
                            "exact_rate": 1.0, "mean_between": 0.0, "mean_check": 2.0, "mean_lost": 3.0}
    for r in results:
        a, b = w["unmoved_predictions"][r["id"]]
        assert a == r["true_min_bits"] and b == max(x for x in BITS if x < a)
    assert w["held_out"]["optimistic"] == 0 and w["held_out"]["lost_above"] == 0


def test_bracket_is_never_optimistic_on_what_it_was_fitted_on_and_calls_an_overlap_lost_for_the_probe():
    """Two fine-tunes show the same statistic at a bit-width one keeps and the other loses: no
    threshold separates them. The survive side does not claim it for either; the rounded-away side
    calls it lost for both, at most the truth (never above it): the probe checks the rounded-away
    end and keeps it where it is the threshold, so both answers come out exact."""
    from qtools.survival.rule import answer_with_probe, check_set

    results = moving_families()
    odd = family_result(20, "gd", 5, 40.0)  # loses 4 bits at a value above what one of ga's keeps it at (12)
    for d in (odd["summary"]["4"], odd["layers"][0]["by_bits"]["4"]):
        d["delta_to_noise"] = 13.0
    results.append(odd)
    br = tiers.fit_bracket_on(results, "delta_to_noise", "weighted")
    preds = [(tiers.predict_bracket(br, r), r["true_min_bits"]) for r in results]
    s = tiers.judge_brackets(preds)
    assert s["optimistic"] == 0 and s["lost_above"] == 0
    assert tiers.predict_bracket(br, odd) == (5, 4)  # 4 lost at 13
    # every fine-tune whose value at its threshold is at most 13 (each family's weakest, 12)
    at_13 = [r for r in results if r["summary"][str(r["true_min_bits"])]["delta_to_noise"] <= 13.0 and r is not odd]
    assert len(at_13) == 3 and s["wrongly_lost"] == 3
    for r in at_13 + [odd]:  # its threshold called lost, or the bit-width below: with the probe, exact
        a, b = tiers.predict_bracket(br, r)
        assert b <= r["true_min_bits"] <= a
        assert answer_with_probe(BITS, a, check_set(BITS, a, b),
                                 lambda x, r=r: x >= r["true_min_bits"]) == r["true_min_bits"]


def test_judge_brackets_counts():
    pairs = [((4, 3), 4), ((4, 2), 4), ((5, None), 6), ((None, 6), None), ((6, 5), 5)]
    s = tiers.judge_brackets(pairs)
    assert (s["optimistic"], s["exact"], s["settled"], s["wrongly_lost"]) == (1, 3, 1, 1)
    # left between: none; 3; 2 3 4; 8 (no bit-width settled as kept); none
    assert s["mean_between"] == (0 + 1 + 3 + 1 + 0) / 5
    # the probe runs these and both ends: 3 4; 2 3 4; 2 3 4 5; 6 8; 5 6
    assert s["mean_check"] == (2 + 3 + 4 + 2 + 2) / 5
    # (6, 5) calls the threshold itself lost (the probe of 5 keeps it); only b above the truth is beyond it
    assert s["lost_above"] == 0 and tiers.judge_brackets([((8, 6), 5)])["lost_above"] == 1


def test_the_rounded_away_side_is_chosen_for_answers_the_probe_can_correct():
    """A side that calls the threshold itself lost, leaving one bit-width between, beats one never
    wrong leaving three; one that calls a bit-width above the threshold lost (the probe of b keeps
    it, the answer is pessimistic) loses to both."""
    at_truth = tiers.judge_brackets([((6, 4), 4)])  # 5 between; 4 called lost, the probe keeps it
    never_wrong = tiers.judge_brackets([((8, 2), 4)])  # 3 4 5 6 between
    above = tiers.judge_brackets([((6, 5), 4)])  # nothing between; 5 called lost: the answer 5
    assert at_truth["wrongly_lost"] == 1 and never_wrong["wrongly_lost"] == 0
    ranked = sorted([("above", above), ("never_wrong", never_wrong), ("at_truth", at_truth)],
                    key=lambda kv: tiers.lost_side_key(kv[1], False))
    assert [k for k, _ in ranked] == ["at_truth", "never_wrong", "above"]


def test_the_bracket_with_the_probe_of_its_check_set_is_not_optimistic_where_the_bracket_is():
    """Held out, the bracket settles 6 as kept where the truth is 8: the probe of its check set,
    which includes 6, fails 6, and the answer is 8 (kept by the bracket, above its check set)."""
    from qtools.survival.rule import answer_with_probe, check_set

    assert check_set(BITS, 6, 4) == [4, 5, 6] and check_set(BITS, None, 5) == [5, 6, 8]
    assert check_set(BITS, 3, None) == [2, 3]
    r = with_probe(family_result(0, "ga", 8, 12.0), 8, {})
    out = tiers.bracket_probe_tier([r], {"predictions": {r["id"]: (6, 4)}})
    assert (out["exact"], out["optimistic"], out["mean_check"]) == (1, 0, 3.0)
    # the probe overrules b too: it keeps 4, and 5 and 6, so the answer is 4; below b nothing survives
    assert answer_with_probe(BITS, 6, [4, 5, 6], lambda b: b >= 2) == 4
    assert answer_with_probe(BITS, 6, [4, 5, 6], lambda b: b >= 5) == 5


def test_probe_margin_removes_the_optimism_of_thin_verdicts():
    """The probe's verdict passes one bit-width below the threshold on every family, but there
    its decisions are within 0.1 of flipping; at the threshold they are 1.0 away. A margin
    fitted on the other families never lets the held-out one through one bit-width too low."""
    results = []
    for r in moving_families():
        t = r["true_min_bits"]
        results.append(with_probe(r, t - 1, {t - 1: 0.1, t: 1.0}))
    p = tiers.probe_tier(results)
    assert p["raw"]["optimistic"] == 9 and p["raw"]["exact"] == 0
    assert p["held_out"] == {"n": 9, "exact": 9, "optimistic": 0, "pessimistic": 0, "exact_rate": 1.0,
                             "worst_optimistic_steps": 0}
    assert all(0.1 < f["margin"] <= 1.0 for f in p["folds"])


def test_probe_needs_no_margin_when_its_verdicts_are_never_optimistic():
    results = [with_probe(r, r["true_min_bits"], {}) for r in moving_families()]
    p = tiers.probe_tier(results)
    assert p["margin"] is None and p["held_out"]["exact"] == 9 and p["raw"]["exact"] == 9


def test_a_study_refits_from_its_results_directory_alone(tmp_path):
    """No base, adapter or work directory: the per-fine-tune results (what the repository keeps)
    are the whole study; families are matched by name, runs by their recipe."""
    grid = [dict(rank=8, keys=["self_attn.q_proj"], lr=1e-3, seed=1, checkpoints=[200],
                 scale_multipliers={"200": [2.0]})]
    fams = [{"name": n, "base": {}, "task": "demo", "bar": 0.95} for n in ("ga", "gb")]
    results_dir = tmp_path / "results"
    for k, fam in enumerate(("ga", "gb")):
        for i, ft in enumerate(run._run_ids(fam, grid[0])):
            r = family_result(10 * k + i, fam, 4 + k, 12.0)
            r.update(id=ft, format=run.CACHE_FORMAT, tensors=[])
            (results_dir / fam).mkdir(parents=True, exist_ok=True)
            write_json_atomic(results_dir / f"{ft}.json.gz", r)
    from pathlib import Path

    suite = Path(__file__).resolve().parents[1] / "suites" / "demo.jsonl"
    got = run.run_grid(suite, tmp_path / "work", fams, grid, from_cache=True, log=io.StringIO(),
                       results_dir=results_dir)
    assert sorted(r["id"] for r in got) == sorted(ft for f in ("ga", "gb") for ft in run._run_ids(f, grid[0]))
    assert not (tmp_path / "work" / "bases").exists() or not any((tmp_path / "work" / "bases").iterdir())


def _fake_real(monkeypatch, passing: set):
    """truth.real_behaviour replaced by one that passes exactly at the bit-widths in `passing`."""
    from qtools.calibrate import truth

    measured = []

    def real_behaviour(fused, suite_path, bits, group_size, out_dir):
        measured.append(bits)
        ok = bits in passing
        return {"accuracy": 0.95 if ok else 0.5, "critical_errors": 0, "format_compliance": 1.0,
                "bits_per_weight": bits + 0.5, "cases": {"correct": "1", "critical": "0"}, "seconds": 1.0}

    monkeypatch.setattr(truth, "real_behaviour", real_behaviour)
    return measured


def test_real_threshold_measures_the_fake_threshold_and_the_one_below(monkeypatch):
    from qtools.calibrate.truth import real_threshold

    measured = _fake_real(monkeypatch, {5, 6, 8})
    real, t = real_threshold("m", "s", BITS, 64, 0.8, 5, "out")
    assert t == 5 and measured == [5, 4] and set(real) == {"5", "4"}


def test_real_threshold_walks_up_where_real_models_fail_above_the_fake_threshold(monkeypatch):
    from qtools.calibrate.truth import real_threshold

    measured = _fake_real(monkeypatch, {8})
    _real, t = real_threshold("m", "s", BITS, 64, 0.8, 5, "out")
    assert t == 8 and measured == [5, 6, 8]
    measured = _fake_real(monkeypatch, set())
    _real, t = real_threshold("m", "s", BITS, 64, 0.8, 5, "out")
    assert t is None and measured == [5, 6, 8]


def test_real_threshold_walks_down_where_real_models_pass_below_it(monkeypatch):
    from qtools.calibrate.truth import real_threshold

    measured = _fake_real(monkeypatch, {3, 4, 5, 6, 8})
    _real, t = real_threshold("m", "s", BITS, 64, 0.8, 5, "out")
    assert t == 3 and measured == [5, 4, 3, 2]
    measured = _fake_real(monkeypatch, set(BITS))
    _real, t = real_threshold("m", "s", BITS, 64, 0.8, None, "out")  # fake: nothing survives
    assert t == 2 and measured == [8, 6, 5, 4, 3, 2]


def test_the_study_refits_from_its_results_byte_for_byte(tmp_path):
    """`make calibrate FROM_CACHE=1`: the study's report and rule file from calibration/results
    alone, the same bytes twice; the report names its goals and stays PROVISIONAL while they fail."""
    from pathlib import Path

    from qtools.calibrate.grid import study_families, study_grid

    results_dir = tmp_path / "results"
    fams = [f["name"] for f in study_families()][:3]
    k = 0
    for fi, fam in enumerate(fams):
        for run_ in study_grid()[:2]:
            for ft in run._run_ids(fam, run_):
                t = (4, 5, 6)[fi]
                r = with_probe(family_result(k, fam, t, 12.0 + k % 5, n=288), t, {})
                r["real"] = {str(t): {"accuracy": 0.96, "critical_errors": 0, "seconds": 10.0,
                                      "cases": {"correct": "1" * 288, "critical": "0" * 288}}}
                r["real_min_bits"] = t
                r["probe"]["seconds"] = 30.0
                r.update(id=ft, format=run.CACHE_FORMAT)
                r["behaviour"]["16"]["accuracy"] = 0.97
                write_json_atomic(results_dir / f"{ft}.json.gz", r)
                k += 1
    suite = Path(__file__).resolve().parents[1] / "suites" / "demo.jsonl"
    outs = []
    for i in range(2):
        docs, rule = tmp_path / f"docs{i}", tmp_path / f"rule{i}.json"
        in_place = json.dumps({"statistic": "cosine", "aggregate": "weighted", "min": 0.5, "held_out": {"n": 35}})
        rule.write_text(in_place)  # a rule fitted on 35 fine-tunes
        res = run.calibrate(suite, rule, tmp_path / "work", docs, families=fams, study=True, from_cache=True,
                            results_dir=results_dir, log=io.StringIO())
        outs.append(((docs / "study.md").read_bytes(), (tmp_path / "rule.json").read_bytes()))
        assert rule.read_text() == in_place and not res["rule_replaced"]  # 24 usable: delta-survival's rule is kept
    assert outs[0] == outs[1]
    rule.write_text(json.dumps({"statistic": "cosine", "held_out": {"n": 20}}))  # fitted on fewer: replaced
    res = run.calibrate(suite, rule, tmp_path / "work", docs, families=fams, study=True, from_cache=True,
                        results_dir=results_dir, log=io.StringIO())
    assert res["rule_replaced"] and rule.read_bytes() == outs[0][1] and run.fitted_on(rule) == k
    text = outs[0][0].decode()
    assert "PROVISIONAL" in text and "at least 64 usable fine-tunes" in text
    assert res["study"]["n"] == k and res["fine_tunes"] == k
    rule = json.loads(outs[0][1])
    assert rule["provisional"] and rule["bracket"]["statistic"] and rule["study"]["weights_held_out"]["n"] == k
    # the rule file's bracket carries its move; the report says where its rounded-away end fell
    w = rule["study"]["weights_held_out"]
    assert isinstance(rule["bracket"]["raise_by"], int) and rule["bracket"]["raise_by"] >= 0
    assert (f"rounded-away end at the threshold for {w['wrongly_lost'] - w['lost_above']} (the probe keeps it), "
            f"above it for {w['lost_above']}") in text
    # a fine-tune timed alone (make calibrate-timing, beside the results): the cost goal reads it
    from qtools.calibrate import timing

    write_json_atomic(timing.timing_path(tmp_path / "timing", ft), {
        "id": ft, "family": fams[-1], "probe_seconds": 6.0, "probed": 7, "real_seconds": {str(t): 10.0},
        "probe_parts": {"load": 0.0, "generate": 1.0, "score": 5.0, "total": 6.0}})
    res = run.calibrate(suite, rule_file := tmp_path / "rule2.json", tmp_path / "work", docs, families=fams,
                        study=True, from_cache=True, results_dir=results_dir, log=io.StringIO())
    assert res["study"]["probe"]["cost_alone"]["n"] == 1 and rule_file.exists()
    text = (docs / "study.md").read_text()
    assert f"median 10.0%, worst 10.0% (timed alone, 1 of {k} fine-tunes; 50.0% as measured two at a time)" in text


def test_a_gap_between_kept_and_lost_values_is_left_to_the_probe():
    """Where training separates kept from lost values with a gap, a value inside the gap is one no
    training fine-tune showed: neither settled as kept nor as lost (before, the bracket claimed
    survival anywhere above the largest lost value, the boldest choice the gap allowed)."""
    results = moving_families()  # delta_to_noise: kept from 12, lost up to 5.5
    br = tiers.fit_bracket_on(results, "delta_to_noise", "weighted")
    assert br.lost == 5.5 and 11.9 < br.survive < 12.0
    new = family_result(30, "gz", 5, 8.0)  # at 5 bits (kept) a value inside the gap: 8
    a, b = tiers.predict_bracket(br, new)
    assert a == 6 and b == 4  # 5 bits left to the probe; 6 bits (32) settled as kept


def test_a_fine_tunes_config_names_the_keys_its_adapter_was_trained_on(tmp_path):
    """On qwen3_moe a run's dense keys are mapped (grid.keys_for): the result records the adapter's."""
    from qtools.calibrate.grid import ATTENTION, MOE_ATTN_ROUTER, expand_run, keys_for
    from qtools.demo.model import adapter_config

    assert keys_for(ATTENTION, {"arch": "qwen3_moe"}) == list(MOE_ATTN_ROUTER)
    run_ = dict(rank=4, keys=list(ATTENTION), lr=1e-3, seed=1, checkpoints=[10], scale_multipliers={})
    run_dir = tmp_path / "r"
    run_dir.mkdir()
    (run_dir / "adapter_config.json").write_text(json.dumps(adapter_config(2, 4, 4.0, list(MOE_ATTN_ROUTER))))
    (run_dir / "0000010_adapters.safetensors").write_bytes(b"")
    [(_id, conf, _ad)] = expand_run(run_dir, run_, "moe")
    assert conf["keys"] == list(MOE_ATTN_ROUTER)


def test_scale_inversions_name_the_stronger_scale_with_the_higher_threshold():
    """One adapter at three LoRA scales: x0.5 keeps 4 bits, x1 loses it (threshold 5), x2 keeps it.
    x1 against x0.5 is an inversion (stronger, yet higher); x2 against either is not."""
    weak = family_result(0, "ga", 4, 12.0)  # x0.5: keeps 4 bits
    strong = family_result(1, "ga", 5, 30.0)  # x1: loses 4 bits
    same = family_result(2, "ga", 4, 40.0)  # x2: keeps 4 bits like the weakest: no inversion
    for r, x in ((weak, "0.5"), (strong, "1"), (same, "2")):
        r["id"] = f"ga/r8_attn-it300-x{x}"
    inv = tiers.scale_inversions([strong, weak, same])
    assert [(x["weaker"], x["stronger"], x["weaker_threshold"], x["stronger_threshold"]) for x in inv] == [(0.5, 1.0, 4, 5)]
    # at 4 bits: subspace_snr, cosine and delta_to_step the same for both (8 finite values with the
    # aggregates), x1's delta_to_noise lower (it crosses 10 at its threshold): only those 2 could
    # separate them
    assert inv[0]["statistics"] == 8 and inv[0]["separating"] == 2
    other = family_result(3, "ga", 5, 30.0)
    other["id"] = "ga/r16_mlp-it300-x2"  # another adapter: never paired with these
    assert len(tiers.scale_inversions([weak, strong, same, other])) == 1


def test_the_probe_says_how_far_the_study_calibrated_it(tmp_path):
    from qtools.survival.rule import probe_evidence

    assert "not yet calibrated" in probe_evidence(tmp_path / "none.json")
    path = tmp_path / "rule.json"
    path.write_text(json.dumps({"study": {"probe_held_out": {"n": 35, "exact": 34, "optimistic": 0}}}))
    assert "exact for 34/35 fine-tunes, optimistic for 0" in probe_evidence(path)


def test_a_bracket_may_judge_its_rounded_away_side_on_another_statistic(tmp_path):
    """The survive side on one statistic, the lost side on another: each settles its own end, and
    the rule file keeps both (a rule file without lost_statistic judges both sides on one)."""
    from qtools.survival.rule import Bracket

    kept_stat = {2: 0.1, 3: 0.2, 4: 0.5, 5: 0.9, 6: 0.95, 8: 0.99}
    lost_stat = {2: 1.0, 3: 2.0, 4: 9.0, 5: 20.0, 6: 30.0, 8: 40.0}
    br = Bracket("cosine", "weighted", survive=0.8, lost=2.5, lost_statistic="delta_to_noise",
                 lost_aggregate="weighted")
    assert br.settle(kept_stat.get, BITS, lost_stat.get) == (5, 3)
    assert br.settle(kept_stat.get, BITS) == (5, 4)  # one statistic: 0.5 <= 2.5 at 4 bits
    path = tmp_path / "rule.json"
    path.write_text(json.dumps({"bracket": br.to_dict()}))
    assert Bracket.load(path) == br and br.lost_side == ("delta_to_noise", "weighted")
    path.write_text(json.dumps({"bracket": {"statistic": "cosine", "aggregate": "weighted", "survive": 0.8,
                                            "lost": 0.3}}))
    assert Bracket.load(path).lost_side == ("cosine", "weighted")
    r = family_result(0, "ga", 4, 12.0)
    one = tiers.fit_bracket_on([r, family_result(1, "gb", 5, 12.0)], "delta_to_noise", "weighted",
                               lost_side=("delta_to_noise", "weighted"))
    assert one.lost_statistic is None  # the same statistic on both sides is recorded once


def test_an_incomplete_study_record_reads_as_not_yet_judged(tmp_path):
    """A rule file whose "study" lacks a tier's scores: every reader says the tier is not judged
    yet (one reader, rule.study_record + rule.held_out), none raises."""
    from qtools.survival.rule import held_out, probe_evidence, study_record, tier_evidence

    path = tmp_path / "rule.json"
    path.write_text(json.dumps({"study": {"weights_held_out": {"n": 35}, "probe_held_out": {"n": "x"},
                                          "constant_held_out": {"n": 35, "exact": 8, "optimistic": 16}}}))
    st = study_record(path)
    assert held_out(st, "weights_held_out") is None and held_out(st, "probe_held_out") is None
    assert held_out(st, "constant_held_out") == {"n": 35, "exact": 8, "optimistic": 16}
    assert "not the calibration study's yet" in tier_evidence(path)
    assert "not yet calibrated" in probe_evidence(path)
    path.write_text("[1, 2]")
    assert study_record(path) == {}


def test_an_optimistic_answer_on_the_stronger_of_an_unseparated_inversion_is_named_as_such():
    from qtools.calibrate.study_report import _blind

    inv = [{"adapter": "ga/r8_all-it200", "weaker": 0.75, "stronger": 1.0, "weaker_threshold": 4,
            "stronger_threshold": 8, "separating": 0, "statistics": 16}]
    assert "x0.75 keeps 4 bits" in _blind("ga/r8_all-it200-x1", inv)
    assert _blind("ga/r8_all-it200-x0.75", inv) == ""  # the weaker one is not
    assert _blind("ga/r8_all-it200-x1", [{**inv[0], "separating": 2}]) == ""  # a statistic could tell them apart


def test_the_probes_cost_is_split_into_its_float_answers_and_one_pass_per_precision():
    """A probe of float + 6 bit-widths: 2 s loading, 6 s of float answers, 14 s scoring (2 s per
    precision), against real bit-widths of 4 s each (24 s for a 6-bit-width sweep): 22/24 of the
    sweep; its float answers 1.5 bit-widths' worth, each pass 0.5; the probe of a check set of 3
    (bracket (6, 4)): 2 + 6 + 2 x 4 = 16 s, 16/24."""
    r = with_probe(family_result(0, "ga", 5, 12.0), 5, {}, real={"5": {"seconds": 3.0}, "4": {"seconds": 5.0}})
    r["probe"]["by_bits"]["float"] = {"verdict": "pass"}
    r["probe"]["seconds"] = 22.0
    r["probe"]["seconds_parts"] = {"load": 2.0, "generate": 6.0, "score": 14.0, "total": 22.0}
    cost = tiers.probe_tier([r])["cost"]
    assert cost["median"] == 22.0 / 24.0 and cost["generate"] == 1.5 and cost["score_per_precision"] == 0.5
    assert tiers.bracket_probe_tier([r], {"predictions": {r["id"]: (6, 4)}})["cost_median"] == 16.0 / 24.0


def test_the_probes_cost_timed_alone_is_read_beside_the_studys_own(tmp_path):
    """A fine-tune timed alone (qtools.calibrate.timing's record): its probe 11 s (1 s loading, 3 s
    float answers, 7 s scoring: 1 s per precision) against real bit-widths of 3 s and 5 s, 4 s
    each (24 s a sweep): 11/24; the study's own seconds stay as they were. Records are read back by
    fine-tune id; a half-written one is not."""
    from qtools.calibrate import timing
    from qtools.io.atomic import write_json_atomic

    r = with_probe(family_result(0, "ga", 5, 12.0), 5, {}, real={"5": {"seconds": 3.0}, "4": {"seconds": 5.0}})
    r["probe"]["by_bits"]["float"] = {"verdict": "pass"}
    r["probe"]["seconds"] = 44.0
    rec = {"id": r["id"], "family": "ga", "probe_seconds": 11.0, "probed": 7, "real_seconds": {"4": 3.0, "5": 5.0},
           "probe_parts": {"load": 1.0, "generate": 3.0, "score": 7.0, "total": 11.0}}
    write_json_atomic(timing.timing_path(tmp_path, r["id"]), rec)
    (tmp_path / "ga" / "broken.json").write_text('{"id": "ga/x", "probe_sec')
    assert timing.read_timings(tmp_path) == {r["id"]: rec}
    r["timed_alone"] = rec
    p = tiers.probe_tier([r])
    assert p["cost"]["median"] == 44.0 / 24.0
    alone = p["cost_alone"]
    assert (alone["median"], alone["n"], alone["generate"], alone["score_per_precision"]) == (11.0 / 24.0, 1, 0.75, 0.25)
    assert alone["median_answers_read"] == 8.0 / 24.0  # the float answers read from a validate log
    # the check set of bracket (6, 4) is 3 bit-widths: 1 + 3 + 1 x 4 = 8 s
    assert tiers.bracket_probe_tier([r], {"predictions": {r["id"]: (6, 4)}})["cost_median_alone"] == 8.0 / 24.0


def test_timing_takes_the_families_in_turn_and_finds_each_adapter():
    from pathlib import Path

    from qtools.calibrate import timing

    rs = [{"id": f"{f}/run-it300-x{x}", "family": f} for f in ("b", "a") for x in ("1", "0.75")]
    assert [r["id"] for r in timing._in_turn(rs)] == ["a/run-it300-x0.75", "b/run-it300-x0.75",
                                                      "a/run-it300-x1", "b/run-it300-x1"]
    assert timing._adapter_dir(Path("w"), "agent-g24/r8_attn_lr0.0015_s5_it300-it300-x1.25") == Path(
        "w/agent-g24/r8_attn_lr0.0015_s5_it300/it0300_x1.25")


def test_timing_with_nothing_to_time_or_a_bad_limit_is_one_error_line(tmp_path, capsys, monkeypatch):
    from qtools.calibrate import timing

    assert timing.main(["--limit", "x"]) == 1
    assert capsys.readouterr().err.startswith("Error: usage: python -m qtools.calibrate.timing")
    monkeypatch.setattr(run, "STUDY_RESULTS", tmp_path / "nothing")  # the default: the study's results
    assert timing.main(["--limit", "1"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"Error: {tmp_path / 'nothing'}: no measured study fine-tunes to time (make calibrate writes them)"]
    try:
        timing.retime(results_dir=tmp_path / "results", work=tmp_path, timing_dir=tmp_path / "timing")
    except timing.QtoolsError as exc:
        assert "no measured study fine-tunes to time" in str(exc)
    else:
        raise AssertionError("an empty results directory timed nothing and said nothing")


def test_the_weights_ceiling_is_the_best_bracket_fitted_and_judged_on_the_same_fine_tunes():
    """delta_to_noise follows every family's threshold: fitted on all, it is exact for all; the
    ceiling names it (subspace_snr, the same on every family, cannot be)."""
    results = moving_families()
    c = tiers.weights_ceiling(results)
    assert c["statistic"] == "delta_to_noise" and c["exact"] == len(results) and c["optimistic"] == 0
    sub = tiers.fit_bracket_on(results, "subspace_snr", "weighted")
    assert tiers.judge_brackets([(tiers.predict_bracket(sub, r), r["true_min_bits"]) for r in results])["exact"] < c["exact"]


def _every_statistic(i, fam, threshold, scale):
    """A fine-tune of family `fam` whose every statistic (both aggregates) is scale * bits."""
    from qtools.calibrate.fit import STATISTICS

    r = family_result(i, fam, threshold, 20.0)
    for b in BITS:
        for d in (r["summary"][str(b)], r["layers"][0]["by_bits"][str(b)]):
            d.update({s: scale * b for s in STATISTICS})
    return r


def test_no_monotone_weights_rule_keeps_a_bit_width_another_lost_with_every_statistic_higher():
    """weak keeps 4 bits with every statistic at 4 bits below strong's, which loses 4 and 5: any rule
    keeping more where every statistic (and the bit-width) is higher keeps strong's 4 bits if it
    keeps weak's, so never optimistic it cannot be exact for weak. In another family, strong bounds
    only one rule for both families, not one per family."""
    weak, strong = _every_statistic(0, "ga", 4, 1.0), _every_statistic(1, "gb", 6, 2.0)
    one = tiers.monotone_ceiling([weak, strong])
    assert (one["exact"], one["n"], one["statistics"]) == (1, 2, 16)
    assert [(x["id"], x["bits"], x["by"]) for x in one["blocked"]] == [(weak["id"], 4, strong["id"])]
    per = tiers.monotone_ceiling([weak, strong], by_family=True)
    assert per["exact"] == 2 and per["families"] == {"ga": {"n": 1, "exact": 1}, "gb": {"n": 1, "exact": 1}}
    # a lost bit-width below the one it would cover bounds nothing: at threshold 4, strong loses
    # 3 bits with every statistic (6) above weak's at 4 bits (4), yet a rule may keep 4 and not 3
    strong["true_min_bits"] = 4
    assert tiers.monotone_ceiling([weak, strong])["exact"] == 2


def test_the_best_one_statistic_bracket_never_beats_the_monotone_ceiling():
    """A one-statistic bracket is a monotone rule: fitted never optimistic on the same fine-tunes,
    it is exact for at most what monotone_ceiling allows."""
    results = moving_families() + [_every_statistic(20, "gd", 5, 1.0), _every_statistic(21, "gd", 4, 0.5)]
    assert tiers.weights_ceiling(results)["exact"] <= tiers.monotone_ceiling(results)["exact"] <= len(results)


def test_every_one_statistic_bracket_is_judged_held_out_before_any_choosing():
    """subspace_snr is the same on every family: fitted on thresholds 4 and 5 it keeps 5 bits, optimistic
    for the family whose threshold is 6; delta_to_noise follows the family and is never optimistic."""
    results = moving_families()
    per = tiers.every_statistic_held_out(results)
    assert len(per) == 16
    assert per["subspace_snr (weighted)"] == [r["id"] for r in results if r["family"] == "gc"]
    assert per["delta_to_noise (weighted)"] == []


def test_where_the_weights_tier_is_optimistic_it_says_what_being_right_would_have_refused():
    """hard (threshold 8) loses 6 bits with every statistic at 12; a monotone rule refusing that
    refuses low's threshold 4 (statistics 4, another family) and mate's 5 (5, its own family), not
    high's 5 (15). hard passes at 5 bits, where its statistics (10) are lower than at 6."""
    hard = _every_statistic(0, "gx", 8, 2.0)
    low, high, mate = _every_statistic(1, "ga", 4, 1.0), _every_statistic(2, "gb", 5, 3.0), _every_statistic(3, "gx", 5, 1.0)
    hard["behaviour"]["5"].update(accuracy=1.0, critical_errors=0)
    hard["behaviour"]["6"].update(accuracy=1.0, critical_errors=1)
    results = [hard, low, high, mate]
    preds = {r["id"]: (r["true_min_bits"], None) for r in results}
    assert tiers.optimistic_covers(results, preds, 0.8) == []
    preds[hard["id"]] = (6, None)
    (c,) = tiers.optimistic_covers(results, preds, 0.8)
    assert (c["id"], c["truth"], c["lost"], c["covered"], c["covered_other_families"]) == (hard["id"], 8, 6, 2, 1)
    assert c["lost_behaviour"] == {"accuracy": 1.0, "critical_errors": 1} and c["passes_below"] == [5]


def test_the_survive_end_moved_up_is_never_optimistic_at_a_price():
    """raised moves a up the supported bit-widths (past the largest: none settled) and leaves b.
    Held out on three families whose thresholds move with them, the inner folds (fitted on one
    family, judged on the other) are optimistic, so every fold moves its survive end up: never
    optimistic, at the price of the exactness and the width the tier alone has there."""
    assert tiers.raised((5, 3), 1) == (6, 3) and tiers.raised((6, 3), 1) == (8, 3)
    assert tiers.raised((8, 3), 1) == (None, 3) and tiers.raised((None, 4), 2) == (None, 4)
    assert tiers.raised((5, 3), 0) == (5, 3)
    results = moving_families()
    wt = tiers.weights_tier(results)
    m, w = wt["held_out"], wt["unmoved"]
    assert m["n"] == len(results) and m["optimistic"] == 0 and min(wt["margins"].values()) >= 1
    assert m["exact"] < w["exact"] and m["mean_between"] > w["mean_between"]
    # the move is the bracket's own: its held-out answers are the unmoved ones moved up the fold's
    # margin, and what the fold's bracket (as the rule file keeps it) settles through Bracket.settle
    from qtools.survival.rule import Bracket

    brackets = {f["family"]: Bracket(**f["bracket"]) for f in wt["folds"]}
    for name, _train, test in tiers.folds(results):
        assert brackets[name].raise_by == wt["margins"][name]
        for r in test:
            assert wt["predictions"][r["id"]] == tiers.raised(wt["unmoved_predictions"][r["id"]], wt["margins"][name])
            assert wt["predictions"][r["id"]] == tiers.predict_bracket(brackets[name], r)


def test_a_margin_for_each_survive_end_widens_only_the_ends_the_training_answers_were_optimistic_at():
    """end_margins: answers of 5 where the truth is 6 move 5 up one bit-width; 6 and 8, never
    optimistic, stay; an end no pair answers gets no move. Held out, the per-end margins are never
    larger than the fold's single margin, so they leave no more between."""
    pairs = [((5, 3), 6), ((5, 3), 5), ((6, 4), 6), ((8, 3), 8), ((None, 4), 8), ((4, 2), 6)]
    assert tiers.end_margins(pairs) == {4: 2, 5: 1, 6: 0, 8: 0}
    assert tiers.end_margins([((6, 3), 8)]) == {6: 1}  # 6 up one supported bit-width is 8
    results = moving_families()
    wt = tiers.weights_tier(results)
    m, e = wt["held_out"], wt["per_end"]
    assert e["n"] == m["n"] == len(results) and set(e["margins"]) == set(wt["margins"])
    for fam, moves in e["margins"].items():
        assert moves and all(0 <= k <= wt["margins"][fam] for k in moves.values())
    assert e["mean_between"] <= m["mean_between"]


def test_the_study_report_says_what_each_never_optimistic_bracket_costs():
    from qtools.calibrate.study_report import _margin_text

    results = moving_families()
    wt = tiers.weights_tier(results)
    m, u = wt["held_out"], wt["unmoved"]
    text = " ".join(_margin_text(wt, {"exact": 3, "optimistic": 6}))
    e = wt["per_end"]
    assert f"optimistic for {m['optimistic']}/{m['n']}, exact for {m['exact']} (the constant guess: 3 exact, " \
           "6 optimistic)" in text
    assert f"Unmoved, it is optimistic for {u['optimistic']}/{u['n']}, exact for {u['exact']} and leaves " \
           f"{u['mean_between']:.2f} between" in text
    assert "per held-out family: " + ", ".join(f"{f} {k}" for f, k in wt["margins"].items()) in text
    assert "With a move for each survive end instead" in text
    assert f"leaves {e['mean_between']:.2f} bit-widths between, is exact for {e['exact']} and optimistic for " \
           f"{e['optimistic']}/{e['n']} (the constant guess: 3 exact, 6 optimistic)" in text
    for fam, moves in e["margins"].items():
        assert fam + " " + (" ".join(f"{a}:+{k}" for a, k in moves.items() if k) or "none") in text
    assert _margin_text({}, {}) == []


def test_the_bracket_file_carries_its_move_and_settle_applies_it(tmp_path):
    """raise_by round-trips through the rule file (a file without it: no move; a negative one: no
    bracket); settle moves the survive end up the supported bit-widths, then to the smallest asked
    at or above; the rounded-away end stays below the statistic's own survive end."""
    from qtools.survival.rule import Bracket, raised

    assert raised(5, 1, (2, 3, 4, 5, 6, 8)) == 6 and raised(6, 1, (2, 3, 4, 5, 6, 8)) == 8
    assert raised(6, 1, (4, 5, 6)) is None and raised(4, 1, (4, 6)) == 6 and raised(4, 2, (4, 8)) == 8
    assert raised(None, 2, (4, 5)) is None and raised(5, 0, (5,)) == 5
    br = Bracket("cosine", "weighted", survive=0.8, lost=0.5, raise_by=1)
    path = tmp_path / "rule.json"
    path.write_text(json.dumps({"bracket": br.to_dict()}))
    assert Bracket.load(path) == br
    for bad in (-1, 1.5, "1", True, None):
        path.write_text(json.dumps({"bracket": {**br.to_dict(), "raise_by": bad}}))
        assert Bracket.load(path) is None
    d = br.to_dict()
    d.pop("raise_by")
    path.write_text(json.dumps({"bracket": d}))
    assert Bracket.load(path).raise_by == 0
    vals = {2: 0.1, 3: 0.4, 4: 0.6, 5: 0.9, 6: 0.95, 8: 0.99}
    assert Bracket.load(path).settle(vals.get, BITS) == (5, 3)
    assert br.settle(vals.get, BITS) == (6, 3)  # 5 moved up to 6; 3 still the last at most 0.5
    # the lost side (another statistic, at most 0.5 up to 4) stops below the statistic's own end, 5
    lost = {2: 0.1, 3: 0.2, 4: 0.3, 5: 0.4, 6: 0.45, 8: 0.6}
    assert br.settle(vals.get, BITS, lost.get) == (6, 4)
