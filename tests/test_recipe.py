"""Survival-aware mixed precision: the plan raises exactly the failing tensors, mlx-lm loads the result."""

import json

import pytest
from click.testing import CliRunner

import qtools.recipe as R
from qtools import QtoolsError
from qtools.cli import cli
from qtools.demo.model import make_tiny_adapter, make_tiny_model

RULE = {"statistic": "subspace_snr", "min": 1.0}


def tensor(name, **by_bits):
    return {"name": name + ".weight", "by_bits": {b[1:]: ({"subspace_snr": v} if v is not None else {})
                                                  for b, v in by_bits.items()}}


def report(tensors, bits=(3, 4, 5, 6, 8), rule=RULE):
    return {"bits": list(bits), "threshold": rule, "tensors": tensors}


def test_plan_raises_exactly_the_failing_tensors():
    rep = report([
        tensor("a", b3=2.0, b4=5.0, b5=9.0, b6=20.0, b8=90.0),   # survives at 3
        tensor("b", b3=0.5, b4=0.9, b5=1.0, b6=4.0, b8=50.0),    # first survives at 5 (>= min)
        tensor("c", b3=0.1, b4=0.2, b5=0.3, b6=0.4, b8=0.5),     # dies everywhere: 8, flagged
        tensor("d", b3=None, b4=None, b5=None, b6=None, b8=None),  # no delta: stays
        tensor("e", b3=0.99, b4=3.0, b5=5.0, b6=9.0, b8=9.0),    # just below: 4
    ])
    plan = R.plan_from_report(rep, 3)
    assert plan["layer_bits"] == {"b": 5, "c": 8, "e": 4}
    assert [(r["layer"], r["survives"]) for r in plan["raised"]] == [("b", True), ("c", False), ("e", True)]
    assert plan["raised"][0]["value_at_bits"] == 0.5
    # At 4 bits only b (0.9) and c fail; e survives there.
    assert R.plan_from_report(rep, 4)["layer_bits"] == {"b": 5, "c": 8}
    assert R.plan_from_report(rep, 8)["layer_bits"] == {"c": 8}


def test_plan_uses_the_reports_rule():
    rep = report([tensor("a", b3=0.4, b4=0.6, b5=0.9, b6=1, b8=1)], rule={"statistic": "subspace_snr", "min": 0.5})
    assert R.plan_from_report(rep, 3)["layer_bits"] == {"a": 4}


@pytest.mark.parametrize("rep,bits,msg", [
    ({"bits": [4]}, 4, "not a delta-survival report"),
    ({"bits": [4], "tensors": []}, 4, "no threshold rule"),
    (report([], bits=(4, 8)), 3, "no statistics at 3 bits"),
    (report([]), 7, "bits=7 is not supported"),
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
    r = CliRunner().invoke(cli, ["fuse", "--base", str(base), "--adapter", str(adapter), "--out", str(out)])
    assert r.exit_code == 0, r.output
    return out


def quantize(*args):
    return CliRunner().invoke(cli, ["quantize", *map(str, args)])


def test_survival_recipe_matches_delta_survival_and_loads(fused, tmp_path):
    from mlx_lm import load

    from qtools.survival import delta_survival

    rep = delta_survival(fused, bits=[2, 3, 4, 5, 6, 8], progress=False)
    want = R.plan_from_report(rep, 2)["layer_bits"]
    assert want, "the tiny fine-tune should die somewhere at 2 bits"
    out = tmp_path / "surv2"
    r = quantize("--model", fused, "--bits", 2, "--recipe", "survival", "--out", out, "--json")
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
    import qtools.survival as S

    monkeypatch.setattr(S, "delta_survival", lambda *a, **k: report(
        [tensor(layer, b4=0.1, b5=0.2, b6=2.0, b8=3.0), tensor("model.layers.1.self_attn.q_proj", b4=3, b5=3, b6=3, b8=3)],
        bits=(4, 5, 6, 8)))
    out = tmp_path / "surv4"
    r = quantize("--model", fused, "--bits", 4, "--recipe", "survival", "--out", out)
    assert r.exit_code == 0, r.output
    assert "1 of 2 tensors raised above 4 bits" in r.output and f"{layer}: 4 -> 6 bits" in r.output
    model, _ = load(str(out))
    mods = dict(model.named_modules())
    assert mods[layer].bits == 6 and mods["model.layers.1.self_attn.q_proj"].bits == 4


def test_survival_recipe_bad_input(tmp_path):
    base = make_tiny_model(tmp_path / "base")
    r = quantize("--model", base, "--bits", 4, "--recipe", "survival", "--out", tmp_path / "o")
    assert r.exit_code == 1 and "no delta source" in r.output
    assert not (tmp_path / "o").exists()
    r = quantize("--model", tmp_path / "nope", "--bits", 4, "--recipe", "survival", "--out", tmp_path / "o")
    assert r.exit_code == 1 and "does not exist" in r.output
