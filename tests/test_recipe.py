"""Survival-aware mixed precision: the plan raises exactly the failing tensors, mlx-lm loads the result."""

import json

import pytest
from click.testing import CliRunner

import qtools.pipeline.recipe as R
from qtools import QtoolsError
from qtools.cli import cli
from qtools.demo.model import make_tiny_adapter, make_tiny_model

RULE = {"statistic": "subspace_snr", "min": 1.0}


def tensor(name, shape=(64, 64), delta_rms=1.0, layer=None, **by_bits):
    return {"name": name + ".weight", "shape": list(shape), "layer": layer,
            "by_bits": {b[1:]: ({"subspace_snr": v, "delta_rms": delta_rms} if v is not None else {})
                        for b, v in by_bits.items()}}


def report(tensors, bits=(3, 4, 5, 6, 8), rule=RULE):
    return {"bits": list(bits), "threshold": rule, "tensors": tensors, "group_size": 64}


def weighted(rep, assigned):
    """The model's subspace_snr at the assigned bits, written out: total delta energy over
    total noise (|D|^2-weighted harmonic mean)."""
    num = den = 0.0
    for t in rep["tensors"]:
        b = assigned.get(t["name"][:-len(".weight")], 3)
        st = t["by_bits"][str(b)]
        if not st:
            continue
        w = st["delta_rms"] ** 2 * t["shape"][0] * t["shape"][1]
        num, den = num + w, den + w / st["subspace_snr"]
    return num / den


def test_plan_raises_the_best_buy_first_and_stops_when_the_model_survives():
    rep = report([
        tensor("a", b3=0.2, b4=5.0, b5=6.0, b6=7.0, b8=9.0),
        tensor("b", b3=2.0, b4=2.5, b5=3.0, b6=4.0, b8=9.0),
        tensor("c", b3=None, b4=None, b5=None, b6=None, b8=None),  # no delta: stays
    ])
    plan = R.plan_from_report(rep, 3, target="rule")
    # model SNR at 3 bits: 2 / (1/0.2 + 1/2) = 0.364, a's noise dominates; raising a to 4
    # gives 2 / (1/5 + 1/2) = 2.86, raising b only 0.370 for the same cost
    assert plan["value_before"] == pytest.approx(2 / 5.5)
    assert plan["layer_bits"] == {"a": 4}
    assert plan["value"] == pytest.approx(2 / 0.7) == pytest.approx(weighted(rep, plan["layer_bits"]))
    assert plan["survives"] and plan["raised"][0]["value_at_bits"] == 0.2
    # already surviving at 5: nothing raised
    assert R.plan_from_report(rep, 5, target="rule")["layer_bits"] == {}
    assert R.plan_from_report(rep, 5)["layer_bits"] == {}


def test_plan_is_minimal_and_weighs_by_size_and_delta():
    rep = report([
        tensor("big", shape=(256, 64), delta_rms=1.0, b3=0.3, b4=0.7, b5=1.5, b6=3.0, b8=9.0),
        tensor("small", shape=(64, 64), delta_rms=1.0, b3=0.1, b4=0.5, b5=1.2, b6=2.0, b8=9.0),
        tensor("weak", shape=(64, 64), delta_rms=0.1, b3=0.01, b4=0.02, b5=0.05, b6=0.1, b8=0.2),
    ])
    plan = R.plan_from_report(rep, 3, target="rule")
    lb = plan["layer_bits"]
    assert plan["survives"] and weighted(rep, lb) >= 1.0
    # a tensor with a hundredth of the delta energy is not worth raising
    assert "weak" not in lb
    # minimal: lowering any raised tensor one step breaks survival
    widths = [3, 4, 5, 6, 8]
    for name, b in lb.items():
        lower = {**lb, name: widths[widths.index(b) - 1]}
        assert weighted(rep, lower) < 1.0, (name, lower)


def test_plan_flags_a_fine_tune_that_dies_even_at_8_bits():
    rep = report([tensor("a", b3=0.1, b4=0.2, b5=0.3, b6=0.4, b8=0.5),
                  tensor("b", b3=0.1, b4=0.2, b5=0.3, b6=0.4, b8=0.5)])
    plan = R.plan_from_report(rep, 4)
    assert plan["layer_bits"] == {"a": 8, "b": 8} and not plan["survives"]
    assert [r["survives"] for r in plan["raised"]] == [False, False]


def test_plan_weakest_layer_rule_raises_only_the_weak_layer():
    rule = {"statistic": "subspace_snr", "aggregate": "weakest_layer", "min": 1.0}
    rep = report([
        tensor("model.layers.0.q", layer=0, b3=2.0, b4=3.0, b5=4.0, b6=5.0, b8=9.0),
        tensor("model.layers.1.q", layer=1, b3=0.5, b4=1.1, b5=2.0, b6=3.0, b8=9.0),
        tensor("model.embed_tokens", layer=None, b3=0.1, b4=0.2, b5=0.3, b6=0.4, b8=0.5),
    ], rule=rule)
    plan = R.plan_from_report(rep, 3, target="rule")
    assert plan["layer_bits"] == {"model.layers.1.q": 4} and plan["survives"]
    # uniform 4 bits is what the rule recommends; its weakest layer (1) has 1.1 there, so
    # "recommended" wants 1.1 from every layer: layer 0 already has 2.0 at 3 bits
    plan = R.plan_from_report(rep, 3)
    assert plan["layer_bits"] == {"model.layers.1.q": 4} and plan["value"] == pytest.approx(1.1)


def test_plan_allocates_bits_where_they_cut_the_delta_error_most():
    """With delta_snr in the report, the next bit goes where it removes the most |Dq - D|^2
    per stored bit; the rule (here delta_retention) only decides when to stop."""
    def t(name, n_rows, snr, ret):
        return {"name": name + ".weight", "shape": [n_rows, 64], "layer": None,
                "by_bits": {str(b): {"delta_rms": 1.0, "delta_snr": snr[b], "delta_retention": ret[b]}
                            for b in (4, 5, 6, 8)}}
    rule = {"statistic": "delta_retention", "aggregate": "weighted", "min": 0.95}
    # "noisy" has 4x the delta error per element of "clean" at 4 bits; "tiny" is clean too
    rep = report([
        t("clean", 64, {4: 2.0, 5: 8.0, 6: 32.0, 8: 512.0}, {4: 0.93, 5: 0.97, 6: 0.99, 8: 1.0}),
        t("noisy", 64, {4: 0.5, 5: 2.0, 6: 8.0, 8: 128.0}, {4: 0.90, 5: 0.96, 6: 0.99, 8: 1.0}),
    ], bits=(4, 5, 6, 8), rule=rule)
    plan = R.plan_from_report(rep, 4, target="rule")
    # raising "noisy" to 5 cuts 4096*(2 - 0.5) of error, "clean" only 4096*(0.5 - 0.125);
    # then delta_retention = (0.93 + 0.96) / 2 = 0.945 < 0.95, and noisy 5->6 (cut 4096*0.375)
    # ties clean 4->5 (4096*0.375): either way the model clears 0.95 after the second step
    assert plan["layer_bits"]["noisy"] >= 5
    assert plan["value"] >= 0.95 and plan["survives"]
    assert sum(b - 4 for b in plan["layer_bits"].values()) == 2
    first = R.plan_from_report({**rep, "threshold": {**rule, "min": 0.94}}, 4, target="rule")
    assert first["layer_bits"] == {"noisy": 5}


def test_plan_aims_at_the_recommended_uniform_bit_width_not_the_bare_threshold():
    """The threshold (1.0) is cleared at uniform 4 bits with SNR 2.0; "rule" stops as soon as
    the model clears 1.0, "recommended" goes on to 2.0 -- as safe as the uniform 4-bit model
    by the rule's measure -- and still leaves the tensor that is clean at 3 bits alone."""
    rep = report([
        tensor("clean", b3=4.0, b4=16.0, b5=64.0, b6=256.0, b8=4096.0),
        tensor("noisy", b3=0.3, b4=1.25, b5=5.0, b6=20.0, b8=320.0),
    ])
    uniform4 = weighted(rep, {"clean": 4, "noisy": 4})
    assert weighted(rep, {}) < 1.0 <= uniform4  # the rule recommends 4 bits
    low = R.plan_from_report(rep, 3, target="rule")
    assert low["layer_bits"] == {"noisy": 4} and 1.0 <= low["value"] < uniform4
    assert low["target"] == {"kind": "rule", "value": 1.0, "uniform_bits": None}
    plan = R.plan_from_report(rep, 3)
    assert plan["target"] == {"kind": "recommended", "value": pytest.approx(uniform4), "uniform_bits": 4}
    assert plan["value"] >= uniform4 and plan["survives"]
    assert plan["layer_bits"] == {"noisy": 5}  # 2/(1/4 + 1/5) = 4.44: clean stays at 3
    assert plan["value"] == pytest.approx(weighted(rep, plan["layer_bits"]))


def test_plan_target_must_be_known():
    with pytest.raises(QtoolsError, match="unknown survival target"):
        R.plan_from_report(report([tensor("a", b3=0.4, b4=0.6, b5=0.9, b6=1, b8=1)]), 3, target="max")


def test_plan_uses_the_reports_rule():
    rep = report([tensor("a", b3=0.4, b4=0.6, b5=0.9, b6=1, b8=1)], rule={"statistic": "subspace_snr", "min": 0.5})
    assert R.plan_from_report(rep, 3)["layer_bits"] == {"a": 4}


@pytest.mark.parametrize("rep,bits,msg", [
    ({"bits": [4]}, 4, "not a delta-survival report"),
    ({"bits": [4], "tensors": []}, 4, "no threshold rule"),
    (report([], bits=(4, 8)), 3, "no statistics at 3 bits"),
])
def test_plan_bad_input(rep, bits, msg):
    with pytest.raises(QtoolsError, match=msg):
        R.plan_from_report(rep, bits)


@pytest.fixture(scope="module")
def fused(tmp_path_factory):
    d = tmp_path_factory.mktemp("r")
    base = make_tiny_model(d / "base")
    adapter = make_tiny_adapter(base, d / "ad", scale=2.0, b_std=0.002)
    out = d / "fused_f16"
    r = CliRunner().invoke(cli, ["fuse", str(base), "--adapter", str(adapter), "--output", str(out)])
    assert r.exit_code == 0, r.output
    return out


def quantize(*args):
    return CliRunner().invoke(cli, ["quantize", *map(str, args)])


def test_survival_recipe_matches_delta_survival_and_loads(fused, tmp_path):
    from mlx_lm import load

    from qtools.survival.analyze import delta_survival

    rep = delta_survival(fused, bits=[2, 3, 4, 5, 6, 8], progress=False)
    plan = R.plan_from_report(rep, 2)
    want = plan["layer_bits"]
    assert want, "the tiny fine-tune should die somewhere at 2 bits"
    # the planner's model value at uniform bits is what delta-survival's rule judges
    from qtools.survival.rule import Rule

    for agg in ("weighted", "weakest_layer"):
        rep["threshold"] = {**rep["threshold"], "aggregate": agg}
        p = R.plan_from_report(rep, 2)
        assert p["value_before"] == pytest.approx(Rule.from_dict(rep["threshold"]).value(rep["summary"], rep["layers"], 2),
                                                  rel=1e-9)
    out = tmp_path / "surv2"
    r = quantize(fused, "--bits", 2, "--recipe", "survival", "--output", out, "--json")
    assert r.exit_code == 0, r.output
    got = json.loads(r.stdout)
    assert {x["layer"]: x["bits"] for x in got["raised_layers"]} == want
    q = json.loads((out / "config.json").read_text())["quantization"]
    assert q["bits"] == 2
    assert {k: v["bits"] for k, v in q.items() if isinstance(v, dict) and v["bits"] != 2} == want
    model, _ = load(str(out))
    for path, bits in want.items():
        assert dict(model.named_modules())[path].bits == bits
    assert got["bits_per_weight"] > 2.5
    prov = json.loads((out / "qtools_provenance.json").read_text())
    assert prov["recipe"] == "survival" and prov["survival_recipe"]["raised"]


def test_survival_recipe_with_synthetic_plan_loads(fused, tmp_path, monkeypatch):
    from mlx_lm import load

    layer = "model.layers.0.mlp.down_proj"
    import qtools.survival.analyze as S

    monkeypatch.setattr(S, "delta_survival", lambda *a, **k: report(
        [tensor(layer, b4=0.1, b5=0.2, b6=2.0, b8=3.0), tensor("model.layers.1.self_attn.q_proj", b4=1.5, b5=1.5, b6=1.5, b8=1.6)],
        bits=(4, 5, 6, 8)))
    out = tmp_path / "surv4"
    r = quantize(fused, "--bits", 4, "--recipe", "survival", "--output", out)
    assert r.exit_code == 0, r.output
    assert "1 of 2 tensors raised above 4 bits" in r.output and f"{layer}: 4 -> 6 bits" in r.output
    # the rule recommends uniform 6 bits; raising down_proj alone matches its value
    assert "target: subspace_snr >= 1.714, its value at uniform 6 bits" in r.output
    assert "(reaches the target)" in r.output
    model, _ = load(str(out))
    mods = dict(model.named_modules())
    assert mods[layer].bits == 6 and mods["model.layers.1.self_attn.q_proj"].bits == 4


def test_survival_recipe_bad_input(tmp_path):
    base = make_tiny_model(tmp_path / "base")
    r = quantize(base, "--bits", 4, "--recipe", "survival", "--output", tmp_path / "o")
    assert r.exit_code == 1 and "no delta source" in r.output
    assert not (tmp_path / "o").exists()
    r = quantize(tmp_path / "nope", "--bits", 4, "--recipe", "survival", "--output", tmp_path / "o")
    assert r.exit_code == 1 and "does not exist" in r.output
