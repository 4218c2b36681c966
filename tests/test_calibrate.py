"""Calibration: thresholds from behaviour, rule fitting and scoring, fake quantization, rule file."""

import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

import qtools.survival.rule as calibration
from qtools.calibrate import fit, measure, run
from qtools.calibrate.grid import BITS
from qtools.survival.rule import Rule


def beh(acc16, crit16=0, **by_bits):
    out = {"16": {"accuracy": acc16, "critical_errors": crit16}}
    for b, (acc, crit) in by_bits.items():
        out[b.lstrip("b")] = {"accuracy": acc, "critical_errors": crit}
    return out


def test_true_threshold_needs_every_larger_bit_width_to_pass():
    b = beh(0.9, b8=(0.9, 0), b6=(0.88, 0), b5=(0.7, 0), b4=(0.9, 0), b3=(0.5, 0), b2=(0.3, 0))
    assert measure.true_threshold(b, BITS, 0.8) == 6  # 4 bits passes again, but 5 already failed


def test_a_critical_error_fails_whatever_the_accuracy():
    b = beh(0.9, b8=(0.9, 0), b6=(0.9, 0), b5=(0.95, 1), b4=(0.9, 0), b3=(0.9, 0), b2=(0.9, 0))
    assert measure.true_threshold(b, BITS, 0.8) == 6


def test_nothing_passes():
    b = beh(0.9, b8=(0.5, 0), b6=(0.9, 0), b5=(0.9, 0), b4=(0.9, 0), b3=(0.9, 0), b2=(0.9, 0))
    assert measure.true_threshold(b, BITS, 0.8) is None


def synthetic(i, true_bits, snr_at):
    """A result whose subspace_snr grows 4x per bit and crosses 10 at the true threshold."""
    summary = {str(b): {"subspace_snr": snr_at * 4.0 ** (b - true_bits), "cosine": 0.5} for b in BITS}
    layers = [{"layer": 0, "by_bits": {str(b): dict(summary[str(b)]) for b in BITS}}]
    return {"id": f"ft{i:02d}", "true_min_bits": true_bits, "summary": summary, "layers": layers}


def test_fit_finds_the_separating_threshold_and_scores_held_out():
    rng = np.random.default_rng(0)
    results = [synthetic(i, b, float(rng.uniform(12, 30))) for i, b in enumerate([2, 3, 4, 5, 6, 3, 4, 5])]
    rule, s = fit.fit(results)
    assert rule.statistic in fit.STATISTICS and s["exact"] == len(results)
    snr_rule = Rule("subspace_snr", "weighted", 10.0)
    assert fit.score(results, snr_rule)["exact"] == len(results)
    optimistic = Rule("subspace_snr", "weighted", 1.0)
    sc = fit.score(results, optimistic)
    assert sc["optimistic"] > 0 and sc["exact"] < len(results) and sc["worst_optimistic_steps"] >= 1


def test_fit_prefers_the_statistic_with_the_wider_margin():
    """Both statistics separate every fine-tune; delta_snr (4x per bit) leaves a far wider
    gap around its threshold than subspace_snr (1.1x per bit), so it wins the tie."""
    rng = np.random.default_rng(1)
    results = []
    for i, t in enumerate([3, 4, 5, 4, 5, 3]):
        r = synthetic(i, t, float(rng.uniform(12, 14)))
        for b in BITS:
            r["summary"][str(b)]["delta_snr"] = r["summary"][str(b)]["subspace_snr"]
            r["summary"][str(b)]["subspace_snr"] = 10.5 * 1.1 ** (b - t)
            r["layers"][0]["by_bits"][str(b)] = dict(r["summary"][str(b)])
        results.append(r)
    assert fit.score(results, Rule("subspace_snr", "weighted", 10.2))["exact"] == 6
    rule, s = fit.fit(results)
    assert s["exact"] == 6 and rule.statistic == "delta_snr"
    # between the largest value below a threshold (<= 14/4) and the smallest at one (>= 12)
    assert 14.0 / 4 < rule.min < 12.0


def test_weakest_layer_aggregate_uses_the_minimum_layer():
    r = synthetic(0, 4, 20.0)
    r["layers"].append({"layer": 1, "by_bits": {str(b): {"subspace_snr": 0.5} for b in BITS}})
    rule = Rule("subspace_snr", "weakest_layer", 1.0)
    assert rule.value(r["summary"], r["layers"], 4) == 0.5
    assert fit.predict(r, rule) is None


def test_fake_quantize_holds_the_values_mx_quantize_stores():
    model = nn.Sequential(nn.Linear(128, 64), nn.Embedding(10, 64))
    model.set_dtype(mx.float16)
    w = mx.array(model.layers[0].weight)
    measure.fake_quantize(model, 4, 64)
    q, s, b = mx.quantize(w, group_size=64, bits=4)
    expect = mx.dequantize(q, s, b, group_size=64, bits=4)
    assert mx.array_equal(model.layers[0].weight, expect).item()
    assert model.layers[0].weight.dtype == mx.float16


def test_fake_quantize_can_keep_the_delta_exact():
    """Q(W0) + (W - W0): the base's rounding only. A delta far below the step survives
    exactly, where quantizing W0 + D rounds it away."""
    mx.random.seed(0)
    model = nn.Sequential(nn.Linear(128, 64))
    w0 = mx.array(model.layers[0].weight)
    delta = 1e-4 * mx.random.normal(w0.shape)
    model.layers[0].weight = w0 + delta
    measure.fake_quantize(model, 4, 64, exact_delta_from={"layers.0.weight": w0})
    q, s, b = mx.quantize(w0, group_size=64, bits=4)
    base_q = mx.dequantize(q, s, b, group_size=64, bits=4)
    assert mx.allclose(model.layers[0].weight - base_q, delta, atol=1e-6).item()
    shipped = nn.Sequential(nn.Linear(128, 64))
    shipped.layers[0].weight = w0 + delta
    measure.fake_quantize(shipped, 4, 64)
    assert float(mx.abs(shipped.layers[0].weight - base_q - delta).max()) > 1e-3


def test_attribution_counts_where_the_delta_moves_the_threshold():
    def res(true_bits, exact_bits, acc4=0.7, acc4_exact=0.7, crit4=0, crit4_exact=0):
        def beh(t, acc, crit):
            return {str(b): {"accuracy": 1.0 if b >= t else 0.5, "critical_errors": 0} for b in BITS} | {
                "4": {"accuracy": acc, "critical_errors": crit}}
        r = {"true_min_bits": true_bits, "behaviour": beh(true_bits, acc4, crit4),
             "behaviour_exact_delta": beh(exact_bits, acc4_exact, crit4_exact)}
        return r
    results = [res(5, 5), res(5, 5), res(6, 5, crit4=2), res(5, 6, acc4_exact=0.6), {"true_min_bits": 5,
               "behaviour": {"4": {"accuracy": 0.7, "critical_errors": 0}}, "behaviour_exact_delta": None}]
    a = fit.attribution(results, 0.8)
    assert a["n"] == 4 and a["exact_thresholds"] == {5: 3, 6: 1}
    assert (a["same"], a["delta_costs"], a["lucky"]) == (2, 1, 1)
    assert a["at4"]["critical"] == 2 and a["at4"]["critical_exact"] == 0
    assert a["at4"]["accuracy_exact"] == pytest.approx((0.7 * 3 + 0.6) / 4)
    assert measure.exact_delta_threshold(results[-1], 0.8) == measure.MISSING


def test_calibrated_rule_file_is_read(tmp_path, monkeypatch):
    f = tmp_path / "calibration.json"
    monkeypatch.setattr(calibration, "RULE_FILE", f)
    assert Rule.load({"subspace_snr": 3.0}).provisional is True
    f.write_text(json.dumps({"statistic": "cosine", "aggregate": "weighted", "min": 0.3,
                             "provisional": False, "evidence": "docs/calibration.md"}))
    rule = Rule.load({"cosine": 0.9})
    assert rule.statistic == "cosine" and rule.min == 0.3 and rule.provisional is False


def test_fallback_rule_when_the_statistic_is_missing(tmp_path, monkeypatch):
    monkeypatch.setattr(calibration, "RULE_FILE", tmp_path / "none.json")
    assert Rule.load({"cosine": 0.9}) is calibration.FALLBACK


def test_fake_quantized_model_computes_what_the_quantized_model_computes(tmp_path):
    """Calibration measures behaviour on fake-quantized weights: same logits as nn.quantize."""
    from mlx_lm import load

    from qtools.demo.model import make_tiny_model

    path = make_tiny_model(tmp_path / "m", hidden_size=64, num_layers=2)
    x = mx.array([[5, 9, 30, 2, 7]])
    real, _ = load(str(path))
    nn.quantize(real, group_size=64, bits=4)
    fake, _ = load(str(path))
    measure.fake_quantize(fake, 4, 64)
    assert float(mx.abs(real(x) - fake(x)).max()) < 0.05


def test_calibrate_refuses_a_missing_suite_or_an_unknown_family_before_any_work(tmp_path):
    from click.testing import CliRunner

    from qtools.cli import cli

    res = CliRunner().invoke(cli, ["calibrate", "--suite", str(tmp_path / "nope.jsonl"),
                                   "--work-dir", str(tmp_path / "work")])
    assert res.exit_code == 1 and res.output.startswith("Error:") and "nope.jsonl" in res.output
    assert not (tmp_path / "work").exists()
    res = CliRunner().invoke(cli, ["calibrate", "--family", "g4", "--family", "g99",
                                   "--work-dir", str(tmp_path / "work")])
    assert res.exit_code == 2 and "Error: Invalid value for '--family': unknown family g99" in res.output
    assert not (tmp_path / "work").exists()


def test_cached_fine_tunes_of_another_base_are_refused(tmp_path):
    """Results cached for one base must not be reused for a retrained one."""
    from qtools import QtoolsError
    from qtools.demo.model import make_tiny_model

    a = make_tiny_model(tmp_path / "a", hidden_size=64, num_layers=1, seed=0)
    b = make_tiny_model(tmp_path / "b", hidden_size=64, num_layers=1, seed=1)
    work = tmp_path / "work"
    work.mkdir()
    run._check_same_base(work, a)
    run._check_same_base(work, a)  # same base: fine
    with pytest.raises(QtoolsError, match="different base"):
        run._check_same_base(work, b)
    other = tmp_path / "other"
    other.mkdir()
    (other / "run00").mkdir()
    with pytest.raises(QtoolsError, match="unknown base"):
        run._check_same_base(other, a)


def test_rule_predicts_the_smallest_bit_width_above_which_everything_survives():
    """Rule.predict (delta-survival) and fit.predict (calibration, on memoized values) are one
    definition: a bit-width that survives below one that does not is no threshold."""
    summary = {str(b): {"subspace_snr": v} for b, v in zip(BITS, [0.5, 3.0, 0.8, 2.0, 4.0, 9.0])}
    layers = [{"layer": 0, "by_bits": {str(b): {"subspace_snr": v} for b, v in zip(BITS, [9, 9, 9, 1.5, 9, 9])}}]
    weighted = Rule("subspace_snr", "weighted", 1.0)
    assert weighted.predict(summary, layers, BITS) == (
        5, {"2": False, "3": True, "4": False, "5": True, "6": True, "8": True})
    weakest = Rule("subspace_snr", "weakest_layer", 1.6)
    assert weakest.value(summary, layers, 5) == 1.5 and weakest.predict(summary, layers, BITS)[0] == 6
    assert Rule("subspace_snr", "weighted", 10.0).predict(summary, layers, BITS)[0] is None
    assert Rule("cosine").predict(summary, layers, BITS) == (None, {str(b): None for b in BITS})
    r = {"summary": summary, "layers": layers}
    assert fit.predict(r, weighted) == 5 and fit.predict(r, weakest) == 6


def test_constant_baseline_and_separability():
    train = [synthetic(i, 5, 20.0) for i in range(3)] + [synthetic(3, 4, 20.0)]
    test = [synthetic(4, 5, 20.0), synthetic(5, 6, 20.0), synthetic(6, 4, 20.0)]
    guess, base = fit.constant_baseline(train, test)
    assert guess == 5 and base == {"n": 3, "exact": 1, "optimistic": 1}
    sep = {x["bits"]: x for x in fit.separability(train + test, "subspace_snr", "weighted")}
    # subspace_snr crosses 10 exactly at each true threshold: separable everywhere
    assert not any(x["overlap"] for x in sep.values())
    assert sep[5]["keep"][0] >= 20.0 > sep[5]["lose"][1]
    # the fine-tune that keeps 4 bits has a lower value there (2) than the one that loses it (5)
    mixed = [synthetic(0, 5, 20.0), synthetic(1, 4, 2.0)]
    at4 = {x["bits"]: x for x in fit.separability(mixed, "subspace_snr", "weighted")}[4]
    assert at4["overlap"] and at4["keep"] == (2.0, 2.0) and at4["lose"] == (5.0, 5.0)


def test_model_fingerprint_follows_content_not_mtime(tmp_path):
    import os

    from qtools.demo.model import make_tiny_model
    from qtools.io.weights import fingerprint

    m = make_tiny_model(tmp_path / "m", hidden_size=64, num_layers=1)
    fp = fingerprint(m)
    st = m / "model.safetensors"
    os.utime(st, (1, 1))  # a copy or touch: same model
    assert fingerprint(m) == fp
    data = bytearray(st.read_bytes())
    data[-1] ^= 1  # a changed weight at the end of the file
    st.write_bytes(bytes(data))
    assert fingerprint(m) != fp


def with_cases(i, true_bits, snr_at, n=64, critical_at=None):
    """synthetic() plus per-case records: every case right down to true_bits, half wrong
    below; `critical_at`: one case answered critically wrong at that bit-width only."""
    r = synthetic(i, true_bits, snr_at)
    r["behaviour"] = {}
    for b in [16, *BITS]:
        good = b >= true_bits
        correct = "1" * n if good else "10" * (n // 2)
        critical = ["0"] * n
        if b == critical_at:
            critical[7] = "1"
            correct = correct[:7] + "0" + correct[8:]
        r["behaviour"][str(b)] = {"cases": {"correct": correct, "critical": "".join(critical)}}
    return r


def test_a_clean_fine_tune_reproduces_its_threshold_on_every_re_drawn_suite():
    r = with_cases(0, 4, 20.0)
    assert measure.true_threshold({k: {"accuracy": v["cases"]["correct"].count("1") / 64,
                                   "critical_errors": v["cases"]["critical"].count("1")}
                               for k, v in r["behaviour"].items()}, BITS, 0.8) == 4
    assert fit.threshold_distribution(r, BITS, 0.8) == {4: 1.0}


def test_one_critical_case_makes_the_threshold_a_coin_toss():
    """One critical error among 64 cases at 5 bits: a re-drawn suite of 64 contains that case
    with probability 1 - (63/64)^64 = 63.4%, so the threshold is 6 that often and 5 otherwise;
    four times as many cases contain it 98.2% of the time."""
    r = with_cases(0, 5, 20.0, critical_at=5)
    d = fit.threshold_distribution(r, BITS, 0.8)
    assert set(d) == {5, 6} and abs(d[6] - (1 - (63 / 64) ** 64)) < 0.04
    d4 = fit.threshold_distribution(r, BITS, 0.8, size_factor=4)
    assert abs(d4[6] - (1 - (63 / 64) ** 256)) < 0.02


def test_reliability_scores_the_rule_against_re_drawn_suites():
    # the measured threshold is 6 (the critical case is in the suite); snr crosses 10 at 5 bits
    coin = with_cases(0, 5, 20.0, critical_at=5)
    coin["true_min_bits"] = 6
    clean = with_cases(1, 4, 20.0)
    rule = Rule("subspace_snr", "weighted", 10.0)
    assert fit.predict(coin, rule) == 5 and fit.predict(clean, rule) == 4
    rel = fit.reliability([coin, clean], [coin, clean], rule, 5, 0.8)
    p6 = fit.threshold_distribution(coin, BITS, 0.8)[6]
    assert rel["reproduce"] == pytest.approx((p6 + 1.0) / 2)
    assert rel["reproduce_under_half"] == 0
    assert rel["size_factors"][1]["ceiling_held_out"] == pytest.approx((p6 + 1.0) / 2)
    # the rule predicts 5 and 4: exact when the draw misses the critical case, never optimistic for clean
    assert rel["rule"]["exact"] == pytest.approx((1 - p6 + 1.0) / 2)
    assert rel["rule"]["optimistic"] == pytest.approx(p6 / 2)
    # guessing 5 for both: pessimistic for clean, same as the rule for coin
    assert rel["constant"]["exact"] == pytest.approx((1 - p6) / 2)
    assert rel["size_factors"][4]["ceiling"] > rel["size_factors"][1]["ceiling"]


def test_a_run_trained_on_other_data_is_not_reused(tmp_path):
    """Runs cached before every seed trained on the suite's split saw suite cases in training."""
    from qtools.demo.train import finetune_data

    run_dir = tmp_path / "run03"
    assert not run.trained_on_other_data(run_dir, 3)  # nothing cached: nothing to discard
    run_dir.mkdir()
    (run_dir / "adapter_config.json").write_text(json.dumps({"data": "qtools.demo.data.finetune_examples"}))
    assert run.trained_on_other_data(run_dir, 3)
    (run_dir / "adapter_config.json").write_text(json.dumps({"data": finetune_data(3)}))
    assert not run.trained_on_other_data(run_dir, 3)
    assert run.trained_on_other_data(run_dir, 4)


def test_wilson_interval():
    lo, hi = fit.wilson(12, 16)
    assert lo == pytest.approx(0.505, abs=0.002) and hi == pytest.approx(0.898, abs=0.002)
    assert fit.wilson(16, 16)[1] == pytest.approx(1.0) and fit.wilson(16, 16)[0] == pytest.approx(0.806, abs=0.002)
    assert fit.wilson(0, 0) == (0.0, 1.0)


def test_a_cache_entry_of_another_format_is_measured_again(tmp_path):
    import io

    path = tmp_path / "result.json"
    log = io.StringIO()
    assert run._cached(path, "ft", log) is None and log.getvalue() == ""  # nothing cached
    path.write_text(json.dumps({"id": "ft", "behaviour": {}}))  # written before the format was recorded
    assert run._cached(path, "ft", log) is None
    assert "format unrecorded" in log.getvalue() and "re-measuring it" in log.getvalue()
    path.write_text(json.dumps({"format": run.CACHE_FORMAT, "id": "ft"}))
    assert run._cached(path, "ft", log)["id"] == "ft"


def test_the_committed_rule_judges_a_statistic_delta_survival_computes():
    """A renamed statistic with a stale rule file would silently fall back to the cosine rule."""
    from qtools.survival.analyze import DELTA_STATS

    committed = json.loads(calibration.RULE_FILE.read_text())
    assert committed["statistic"] in DELTA_STATS and committed["statistic"] in fit.STATISTICS
    assert Rule.load({committed["statistic"]: 1.0}) == Rule.from_dict(committed)


def test_reliability_is_plain_json_for_calibrate_json():
    """`qtools calibrate --json` prints the reliability: no numpy scalars in it."""
    coin = with_cases(0, 5, 20.0, critical_at=5)
    coin["true_min_bits"] = 6
    rel = fit.reliability([coin, with_cases(1, 4, 20.0)], [coin], Rule("subspace_snr", "weighted", 10.0), 5, 0.8)
    assert json.loads(json.dumps(rel))["reproduce_under_half"] == rel["reproduce_under_half"]


def family_result(i, fam, true_bits, snr_at, n=64):
    """with_cases() in family `fam`, with the config and accuracies the report prints; its
    delta_to_noise crosses 10 at its true threshold, its subspace_snr does not see the family."""
    r = with_cases(i, true_bits, snr_at, n=n)
    r["id"], r["family"] = f"{fam}/ft{i:02d}", fam
    r["config"] = {"rank": 8, "scale": 4.0, "keys": ["self_attn.q_proj"], "lr": 1e-4, "iters": 60, "seed": i,
                   "family": fam}
    for b in BITS:
        for d in (r["summary"][str(b)], r["layers"][0]["by_bits"][str(b)]):
            d["delta_to_noise"] = d["subspace_snr"]
            d["subspace_snr"] = 10.0 * 4.0 ** (b - 5)  # the same on every family: threshold 5 everywhere
            d["delta_to_step"] = 0.1
    for b, v in r["behaviour"].items():
        v["accuracy"] = v["cases"]["correct"].count("1") / n
        v["critical_errors"] = v["cases"]["critical"].count("1")
    r["behaviour_exact_delta"] = None
    return r


def moving_families():
    """Three families whose thresholds are 4, 5 and 6: the threshold moves with the family."""
    out = []
    for k, (fam, t) in enumerate([("ga", 4), ("gb", 5), ("gc", 6)]):
        out += [family_result(3 * k + j, fam, t, 12.0 + 5 * j) for j in range(3)]
    return out


def test_folds_leave_out_one_whole_family_each():
    results = moving_families()
    fs = fit.folds(results)
    assert [f for f, _, _ in fs] == ["ga", "gb", "gc"]
    for name, train, test in fs:
        assert {r["family"] for r in test} == {name} and name not in {r["family"] for r in train}
        assert len(train) + len(test) == len(results)
    # results without a family are each their own fold: leave-one-out
    assert len(fit.folds([synthetic(i, 5, 20.0) for i in range(4)])) == 4


def test_leave_one_family_out_predicts_a_moving_threshold_the_constant_guess_cannot():
    """Each held-out family's threshold is one the other families never had: the constant guess
    (their most common threshold) misses every one; a statistic that follows the family does not."""
    results = moving_families()
    lofo = fit.leave_one_family_out(results, 0.8)
    for f in lofo["folds"]:
        assert f["rule"].statistic == "delta_to_noise"
        assert f["held_out"]["exact"] == 3 and f["constant"]["exact"] == 0
        assert f["guess"] != {"ga": 4, "gb": 5, "gc": 6}[f["family"]]
    assert lofo["held_out"] == {"n": 9, "exact": 9, "optimistic": 0, "pessimistic": 0, "exact_rate": 1.0,
                                "worst_optimistic_steps": 0}
    assert lofo["constant"]["exact"] == 0
    assert fit.goal_met(lofo["held_out"], lofo["constant"])


def test_each_fold_is_fitted_without_its_family():
    """The rule judged on a family is exactly the rule fitted on the others: nothing of the
    held-out family leaks into the fit (its threshold, statistic or aggregate)."""
    results = moving_families()
    results[4]["true_min_bits"] = 6  # gb's middle fine-tune: its own fit would differ
    for f, (name, train, test) in zip(fit.leave_one_family_out(results, 0.8)["folds"], fit.folds(results)):
        rule, _ = fit.fit(train)
        assert f["rule"] == rule and f["held_out"] == fit.score(test, rule)
        assert f["guess"] == fit.constant_guess(train)


def test_statistic_and_aggregate_are_chosen_across_families_not_within():
    """subspace_snr separates every fine-tune of gb (threshold 5 there) and none of the others;
    fit on ga + gb + gc must pick the statistic that holds across families, and say so in cv."""
    rule, s = fit.fit(moving_families())
    assert rule.statistic == "delta_to_noise" and s["cv_folds"] == 3 and s["cv_exact"] == 9


def test_goal_needs_25_points_above_the_constant_guess():
    held = {"exact_rate": 0.95, "worst_optimistic_steps": 1}
    assert fit.goal_met(held, {"exact_rate": 0.70})
    assert not fit.goal_met(held, {"exact_rate": 0.71})
    assert not fit.goal_met({"exact_rate": 0.89, "worst_optimistic_steps": 0}, {"exact_rate": 0.0})
    assert not fit.goal_met({"exact_rate": 1.0, "worst_optimistic_steps": 2}, {"exact_rate": 0.0})


def test_fast_threshold_fit_scores_as_the_rule_does():
    """_fit_threshold scores every candidate at once; its chosen rule's score must be score()'s."""
    rng = np.random.default_rng(3)
    results = [synthetic(i, int(rng.choice([3, 4, 5, 6])), float(rng.uniform(2, 40))) for i in range(20)]
    results[3]["summary"]["5"]["subspace_snr"] = None  # a missing value fails that bit-width
    key, rule, sc = fit._fit_threshold(results, "subspace_snr", "weighted")
    assert sc == fit.score(results, rule) and key[:3] == (sc["exact"], -sc["optimistic"],
                                                         -sc["worst_optimistic_steps"])
    best = max(fit.score(results, Rule("subspace_snr", "weighted", t))["exact"]
               for t in np.geomspace(0.01, 1e4, 400))
    assert sc["exact"] >= best


def test_report_is_reproducible_byte_for_byte(tmp_path):
    from qtools.calibrate.grid import TASK
    from qtools.calibrate.report import write_report
    from qtools.demo.train import BASE

    fams = [{"name": f, "base": {**BASE, "outlier_gain": g}, "task": TASK} for f, g in (("ga", 4), ("gb", 12), ("gc", 24))]
    outs = []
    for k in range(2):
        results = moving_families()
        s = fit.study(results, 0.8)
        md, png = tmp_path / f"c{k}.md", tmp_path / f"c{k}.png"
        write_report(results, s, md, png, 0.8, [], fams)
        outs.append((md.read_bytes(), png.read_bytes()))
    assert outs[0] == outs[1]
    text = outs[0][0].decode()
    assert "| ga | 4 | 128 | 4 | demo | 3 / 3 | 3 at 4 |" in text and "Leave-one-family-out" in text and "9/9 (100%)" in text
    assert "| constant guess | 0/9 (0%)" in text


def test_a_gain_variant_of_a_shared_pretraining_is_the_base_train_base_makes(tmp_path):
    """Families that differ only in outlier gain share one pretraining: the variant must be
    bit-identical to training that base directly."""
    from qtools.demo import train
    from qtools.io.weights import fingerprint

    recipe = dict(hidden_size=64, num_layers=1, intermediate_size=128, seed=0, iters=2, batch_size=4, lr=1e-3)
    train.train_base(tmp_path / "direct", **recipe, outlier_gain=12.0)
    train.pretrain_base(tmp_path / "pre", **recipe)
    train.with_outlier_gain(tmp_path / "pre", tmp_path / "variant", 12.0, recipe["seed"])
    assert fingerprint(tmp_path / "variant") == fingerprint(tmp_path / "direct")
    train.with_outlier_gain(tmp_path / "pre", tmp_path / "g4", 4.0, recipe["seed"])
    assert fingerprint(tmp_path / "g4") != fingerprint(tmp_path / "direct")


def test_a_fine_tune_whose_float16_fails_has_no_threshold_and_is_not_measured_further():
    """behaviour(min_accuracy=...) stops after float16 when it fails; such a cached entry has
    no bit-width entries, and its threshold is None, never a KeyError."""
    failed = {"16": {"accuracy": 0.5, "critical_errors": 0}}
    assert run._threshold(failed, BITS, 0.8) is None
    passed = beh(0.9, b8=(0.9, 0), b6=(0.9, 0), b5=(0.9, 0), b4=(0.7, 0), b3=(0.5, 0), b2=(0.3, 0))
    assert run._threshold(passed, BITS, 0.8) == 5


def test_from_cache_trains_and_measures_nothing(tmp_path):
    """--from-cache on a work dir with nothing cached builds no base and trains nothing: it
    refuses with one error instead of starting a two-hour calibration."""
    from pathlib import Path

    from qtools import QtoolsError

    suite = Path(__file__).resolve().parents[1] / "suites" / "demo.jsonl"
    work = tmp_path / "work"
    assert run.run_grid(suite, work, from_cache=True) == []
    assert not (work / "pretrained").exists() and not (work / "bases").exists()
    with pytest.raises(QtoolsError, match="leave-one-family-out needs at least 2 families"):
        run.calibrate(suite, tmp_path / "rule.json", work, tmp_path / "docs", from_cache=True)
    assert not (tmp_path / "rule.json").exists() and not (tmp_path / "docs").exists()


def test_a_damaged_cache_entry_is_measured_again_not_a_traceback(tmp_path):
    """The calibration's cache (result.json, adapter_config.json) is read guarded: a file cut short
    by a killed run, or not a JSON object, is re-measured or retrained."""
    import io

    from qtools.calibrate import run as R

    bad = tmp_path / "result.json"
    for text in ('{"format": 3, "summ', "[1, 2]", "\xff"):
        bad.write_text(text, errors="surrogateescape") if text != "\xff" else bad.write_bytes(b"\xff\xfe")
        log = io.StringIO()
        assert R._cached(bad, "ft", log) is None
        assert "damaged" in log.getvalue()
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    assert R.trained_on_other_data(run_dir, 1) is False  # nothing trained yet
    (run_dir / "adapter_config.json").write_text('{"data": ')
    assert R.trained_on_other_data(run_dir, 1) is True
    (run_dir / "adapter_config.json").write_text('["data"]')
    assert R.trained_on_other_data(run_dir, 1) is True


def test_the_demo_families_and_their_cache_keys_are_unchanged():
    """An existing calibration cache (work/pretrained/KEY, work/bases/NAME) is still found; another
    task's pretraining gets its own key and its families their own names."""
    from qtools.calibrate import grid
    from qtools.demo.train import BASE

    fams = grid.default_families()
    assert [f["name"] for f in fams] == ["g4", "g12", "g24", "g36", "l8g24"]
    assert all(f["task"] == "demo" for f in fams) and fams == run.select_families()
    assert fams[0] == {"name": "g4", "base": {**BASE, "outlier_gain": 4.0}, "task": "demo"}
    assert grid.pretraining_key(BASE) == grid.pretraining_key(BASE, "demo") == "h128_l4_i256_s0_it250_b16_lr0.003"
    assert grid.pretraining_key(BASE, "agent") == "h128_l4_i256_s0_it250_b16_lr0.003_tagent"
    agent = run.select_families(task="agent")
    assert [f["name"] for f in agent] == ["agent-g4", "agent-g12", "agent-g24", "agent-g36", "agent-l8g24"]
    assert all(f["task"] == "agent" for f in agent)
    assert [f["base"] for f in agent] == [f["base"] for f in fams]
    with pytest.raises(Exception, match="unknown task"):
        grid.default_families("nope")


def test_a_familys_suite_is_its_tasks(tmp_path, monkeypatch):
    from pathlib import Path

    from qtools.calibrate.grid import family_suite
    from qtools.demo.data import suite_text

    repo = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(repo)
    assert family_suite({"name": "a", "task": "agent"}, tmp_path / "w") == Path("suites/agent.jsonl")
    assert family_suite({"name": "d", "task": "demo"}, tmp_path / "w", "x.jsonl") == Path("x.jsonl")
    assert family_suite({"name": "d", "task": "agent", "suite": "y.jsonl"}, tmp_path / "w") == Path("y.jsonl")
    monkeypatch.chdir(tmp_path)  # no suites/: generated from the Task
    gen = family_suite({"name": "x", "task": "access"}, tmp_path / "w")
    assert gen == tmp_path / "w" / "suites" / "access.jsonl" and gen.read_text() == suite_text("access")
    assert gen.read_text() == (repo / "suites" / "access.jsonl").read_text()


def test_an_agent_family_trains_on_agent_data_and_is_measured_on_the_agent_suite(tmp_path):
    """A family's task reaches its pretraining (data, tokenizer, cache key), its fine-tunes' data
    and the suite its base and fine-tunes are measured on."""
    import io
    from pathlib import Path

    from qtools.calibrate.grid import pretraining_key
    from qtools.demo.tasks import get_task
    from qtools.demo.tokenizer import build_tokenizer
    from qtools.demo.train import ATTENTION, finetune_data
    from qtools.io.suite import load_suite

    repo = Path(__file__).resolve().parents[1]
    base = dict(hidden_size=64, num_layers=1, intermediate_size=128, seed=0, iters=2, batch_size=4, lr=1e-3,
                outlier_gain=4.0)
    fam = {"name": "tiny-agent", "base": base, "task": "agent"}
    grid = [dict(rank=2, keys=list(ATTENTION), lr=1e-3, seed=1, checkpoints=[2], scale_multipliers={})]
    work = tmp_path / "work"
    results = run.run_grid(repo / "suites" / "demo.jsonl", work, [fam], grid, bits_list=[8], log=io.StringIO())
    assert (work / "pretrained" / pretraining_key(base, "agent")).is_dir()
    assert pretraining_key(base, "agent").endswith("_tagent")
    cfg = json.loads((work / "bases" / "tiny-agent" / "config.json").read_text())
    assert cfg["vocab_size"] == build_tokenizer(task="agent").get_vocab_size() != build_tokenizer().get_vocab_size()
    run_dir = work / "tiny-agent" / run.run_name(grid[0])
    assert json.loads((run_dir / "adapter_config.json").read_text())["data"] == finetune_data(1, "agent")
    assert not run.trained_on_other_data(run_dir, 1, "agent") and run.trained_on_other_data(run_dir, 1)
    n_agent = len(load_suite(repo / "suites" / "agent.jsonl").cases)
    assert n_agent == get_task("agent").n_ask_test + get_task("agent").n_check_test == 288
    base_beh = json.loads((work / "tiny-agent" / "base_behaviour.json").read_text())
    assert len(base_beh["cases"]["correct"]) == n_agent
    assert results and all(r["family"] == "tiny-agent" for r in results)
    assert all(len(r["behaviour"]["16"]["cases"]["correct"]) == n_agent for r in results)


def test_the_report_names_each_tasks_suite_and_critical_confusion(tmp_path):
    from click.testing import CliRunner

    from qtools.calibrate.report import write_report
    from qtools.cli import cli
    from qtools.demo.train import BASE

    fams = [{"name": f, "base": {**BASE, "outlier_gain": g}, "task": "access"} for f, g in (("ga", 4), ("gb", 12), ("gc", 24))]
    results = moving_families()
    write_report(results, fit.study(results, 0.8), tmp_path / "c.md", tmp_path / "c.png", 0.8, [], fams,
                 suites={"access": "work/suites/access.jsonl"})
    text = (tmp_path / "c.md").read_text()
    assert "validation on `work/suites/access.jsonl` (task: access) passes" in text
    assert "no critical (DENY->ALLOW) error" in text and "suites/demo.jsonl" not in text
    res = CliRunner().invoke(cli, ["calibrate", "--task", "agent", "--family", "g4", "--work-dir", str(tmp_path / "w")])
    assert res.exit_code == 2 and "unknown family g4" in res.output and "agent-g4" in res.output
    assert not (tmp_path / "w").exists()


def test_a_threshold_one_critical_case_decides_is_listed_as_unsettled_with_its_range():
    """docs/study.md lists the thresholds the suite does not settle: the re-drawn thresholds, how
    often a 2x and 4x suite would reproduce them, and what the threshold turns on."""
    from qtools.calibrate.study_report import unsettled

    coin = with_cases(0, 5, 20.0, critical_at=5)
    clean = with_cases(1, 4, 20.0)
    for r, name, t in ((coin, "fam/coin", 6), (clean, "fam/clean", 4)):
        r["id"], r["true_min_bits"] = name, t
        for v in r["behaviour"].values():
            v["accuracy"] = v["cases"]["correct"].count("1") / 64
            v["critical_errors"] = v["cases"]["critical"].count("1")
    u = unsettled([coin, clean], 0.8)
    assert [x["id"] for x in u["unsettled"]] == ["fam/coin"]
    x = u["unsettled"][0]
    # in a 64-case re-draw the critical case is missed 36.6% of the time: 6 for 63%, else 5
    assert set(x["distribution"]) == {5, 6} and x["distribution"][6] < 0.9
    assert x["larger"][2] < 0.9 < x["larger"][4]  # 1 - (63/64)^128 = 0.867, ^256 = 0.982
    assert x["below"] == "5: 98.4%, 1 critical; 6: 100.0%, 0 critical"
    assert u["reproduce_90_larger"] == {2: 1, 4: 2}
