"""`qtools delta-survival` / `qtools quant-error` through the CLI, good and bad input."""

import json
import re
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner

from qtools.cli import cli
from qtools.demo.model import make_tiny_adapter, make_tiny_model

SUMMARY_KEYS = {"rmse", "delta_retention", "cosine", "codes_changed", "delta_to_step", "sign_agreement"}


@pytest.fixture(scope="module")
def trio(tmp_path_factory):
    """A tiny base, a LoRA adapter for it, and their float16 fusion (fused in float32)."""
    root = tmp_path_factory.mktemp("survival")
    base, adapter, fused = root / "base", root / "adapter", root / "fused"
    make_tiny_model(base, hidden_size=128, num_layers=2, seed=0)
    make_tiny_adapter(base, adapter, rank=4, scale=1.0, seed=1)
    res = CliRunner().invoke(cli, ["fuse", str(base), "--adapter", str(adapter), "--output", str(fused)])
    assert res.exit_code == 0, res.output
    return base, adapter, fused


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def survival_json(*args):
    res = run("delta-survival", *args, "--json")
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)


def test_json_report_has_the_documented_shape(trio):
    base, adapter, fused = trio
    rep = survival_json(fused, "--adapter", adapter, "--bits", 3, 4, 5)
    assert rep["model"] == str(fused) and rep["group_size"] == 64 and rep["bits"] == [3, 4, 5]
    for b in ("3", "4", "5"):
        assert SUMMARY_KEYS <= set(rep["summary"][b])
    # the point rule's verdict is the rule applied to the reported statistics, its prediction the
    # smallest bit-width from which every verdict up is "survives" (beside a bracket, under
    # point_prediction; the report's own verdict and prediction are then the bracket's)
    rule = rep["threshold"]
    point = rep.get("point_prediction", rep)
    assert ("point_prediction" in rep) == ("bracket" in rep)
    for b in ("3", "4", "5"):
        if rule["aggregate"] == "weakest_layer":
            value = min(L["by_bits"][b][rule["statistic"]] for L in rep["layers"])
        else:
            value = rep["summary"][b][rule["statistic"]]
        assert point["verdict"][b] == (value >= rule["min"])
    up = [b for b in (5, 4, 3) if point["verdict"][str(b)]]
    first_dead = next((b for b in (5, 4, 3) if not point["verdict"][str(b)]), 2)
    assert point["predicted_min_bits"] == (min([b for b in up if b > first_dead], default=None))
    if "bracket" in rep:
        assert rep["predicted_min_bits"] == rep["bracket"]["survives_at"]
    names = {t["name"] for t in rep["tensors"]}
    assert "model.layers.0.self_attn.q_proj.weight" in names
    assert "model.embed_tokens.weight" in names  # embeddings are quantized by mlx-lm too
    t = next(t for t in rep["tensors"] if t["name"] == "model.layers.1.self_attn.v_proj.weight")
    assert t["dtype"] == "float16" and len(t["shape"]) == 2
    assert SUMMARY_KEYS <= set(t["by_bits"]["4"])
    # untouched tensors carry quantization error only
    k = next(t for t in rep["tensors"] if t["name"] == "model.layers.0.self_attn.k_proj.weight")
    assert "rmse" in k["by_bits"]["4"] and "delta_retention" not in k["by_bits"]["4"]
    assert {"q", "v"} <= set(rep["by_kind"])
    assert [L["layer"] for L in rep["layers"]] == [0, 1]


def test_survival_improves_with_bits(trio):
    _, adapter, fused = trio
    rep = survival_json(fused, "--adapter", adapter)
    cos = [rep["summary"][str(b)]["cosine"] for b in rep["bits"]]
    err = [rep["summary"][str(b)]["rmse"] for b in rep["bits"]]
    assert cos == sorted(cos) and cos[-1] > 0.95
    assert err == sorted(err, reverse=True)
    assert rep["summary"]["8"]["delta_retention"] == pytest.approx(1.0, abs=0.05)


def test_model_statistics_pool_over_tensors(trio):
    """Retention is the |D|^2-weighted mean over tensors; the SNRs are total delta energy
    over total noise, so one very clean tensor cannot hide a noisy one."""
    _, adapter, fused = trio
    rep = survival_json(fused, "--adapter", adapter, "--bits", 3, 4)
    for b in ("3", "4"):
        ts = [t["by_bits"][b] for t in rep["tensors"] if "delta_retention" in t["by_bits"][b]]
        n = {t["name"]: t["shape"][0] * t["shape"][1] for t in rep["tensors"]}
        ws = [(t["by_bits"][b]["delta_rms"] ** 2 * n[t["name"]], t["by_bits"][b])
              for t in rep["tensors"] if "delta_retention" in t["by_bits"][b]]
        assert len(ts) >= 2
        wsum = sum(w for w, _ in ws)
        assert rep["summary"][b]["delta_retention"] == pytest.approx(sum(w * s["delta_retention"] for w, s in ws) / wsum)
        for key in ("subspace_snr", "delta_snr"):
            pooled = wsum / sum(w / s[key] for w, s in ws)
            assert rep["summary"][b][key] == pytest.approx(pooled)
            assert rep["summary"][b][key] <= sum(w * s[key] for w, s in ws) / wsum


def test_reaggregate_rebuilds_the_summary_from_the_json_tensors(trio):
    """Calibration caches per-tensor JSON and re-pools it; that must equal the report's own pooling."""
    from qtools.survival.analyze import reaggregate

    _, adapter, fused = trio
    rep = survival_json(fused, "--adapter", adapter, "--bits", 2, 4, 8)
    summary, layers = reaggregate(rep["tensors"], rep["bits"])
    for b in ("2", "4", "8"):
        for key, v in rep["summary"][b].items():
            assert summary[b][key] == pytest.approx(v, rel=1e-6), (b, key)
    assert [L["layer"] for L in layers] == [L["layer"] for L in rep["layers"]]
    assert layers[1]["by_bits"]["4"]["subspace_snr"] == pytest.approx(rep["layers"][1]["by_bits"]["4"]["subspace_snr"])


def test_noise_statistics_see_the_fused_weights_quantization_noise(trio):
    """delta_to_noise = |D|^2 / |Q(W) - W|^2 and weight_snr = |W|^2 / |Q(W) - W|^2 per tensor,
    pooled as total over total; reaggregate derives them for cached tensors that lack them."""
    from qtools.survival.analyze import reaggregate

    _, adapter, fused = trio
    rep = survival_json(fused, "--adapter", adapter, "--bits", 2, 4, 8)
    for t in rep["tensors"]:
        s = t["by_bits"].get("4", {})
        if "delta_rms" not in s:
            continue
        assert s["delta_to_noise"] == pytest.approx((s["delta_rms"] / s["rmse"]) ** 2, rel=1e-9)
        assert s["weight_snr"] == pytest.approx(1 / s["rel_rmse"] ** 2, rel=1e-9)
        assert t["by_bits"]["2"]["weight_snr"] < s["weight_snr"] < t["by_bits"]["8"]["weight_snr"]
    stripped = [{**t, "by_bits": {b: {k: v for k, v in x.items() if k not in ("delta_to_noise", "weight_snr")}
                                  for b, x in t["by_bits"].items()}} for t in rep["tensors"]]
    summary, _ = reaggregate(stripped, rep["bits"])
    for b in ("2", "4", "8"):
        for key in ("delta_to_noise", "weight_snr"):
            assert summary[b][key] == pytest.approx(rep["summary"][b][key], rel=1e-6)
    with_d = [t for t in rep["tensors"] if "delta_rms" in t["by_bits"]["4"]]
    d2 = sum(t["by_bits"]["4"]["delta_rms"] ** 2 * np.prod(t["shape"]) for t in with_d)
    sse = sum(t["by_bits"]["4"]["rmse"] ** 2 * np.prod(t["shape"]) for t in with_d)
    assert rep["summary"]["4"]["delta_to_noise"] == pytest.approx(d2 / sse, rel=1e-6)


def test_adapter_and_base_sources_agree(trio):
    """The delta rebuilt from the adapter's factors matches fused - base."""
    base, adapter, fused = trio
    a = survival_json(fused, "--adapter", adapter, "--bits", 4)["summary"]["4"]
    b = survival_json(fused, "--base", base, "--bits", 4)["summary"]["4"]
    for key in ("delta_retention", "cosine", "codes_changed", "delta_to_step"):
        assert a[key] == pytest.approx(b[key], rel=0.05, abs=0.01), key


def test_provenance_is_used_when_no_source_is_given(trio):
    _, adapter, fused = trio
    rep = survival_json(fused, "--bits", 4)
    assert rep["delta_source"]["adapter"] == str(adapter.resolve())
    assert "subspace_snr" in rep["summary"]["4"]


def test_human_output_names_the_prediction_and_provisional_threshold(trio, tmp_path, monkeypatch):
    """A rule file without a bracket: the point rule's prediction and the two evaluations to confirm it."""
    import qtools.survival.rule as R

    _, adapter, fused = trio
    rule = {"statistic": "delta_retention", "aggregate": "weighted", "min": 0.9901, "provisional": True,
            "evidence": "the one-task calibration's rule"}
    monkeypatch.setattr(R, "RULE_FILE", tmp_path / "rule.json")
    R.RULE_FILE.write_text(json.dumps(rule))
    res = run("delta-survival", fused, "--adapter", adapter, "--bits", 4, 5, 6)
    assert res.exit_code == 0, res.output
    assert "Predicted minimum bit-width" in res.output
    assert "PROVISIONAL" in res.output
    assert "Weakest layers" in res.output
    # a provisional prediction comes with the two evaluations that settle it
    b = int(re.search(r"Predicted minimum bit-width: (\d+)", res.output).group(1))
    assert b in (4, 5)  # --bits 4 5 6: the one above is requested too
    assert f'Confirm: make sweep BITS="{b} {b + 1}"' in res.output


def test_quant_error_json_has_no_delta_keys(trio):
    _, _, fused = trio
    res = run("quant-error", fused, "--bits", 4, 8, "--json")
    assert res.exit_code == 0, res.output
    rep = json.loads(res.stdout)
    assert set(rep["summary"]) == {"4", "8"}
    assert "delta_retention" not in rep["summary"]["4"] and "predicted_min_bits" not in rep
    assert rep["summary"]["8"]["rmse"] < rep["summary"]["4"]["rmse"]


def test_dora_adapter_uses_the_base(tmp_path):
    base, adapter = tmp_path / "base", tmp_path / "dora"
    make_tiny_model(base, hidden_size=64, num_layers=1)
    make_tiny_adapter(base, adapter, rank=2, scale=1.0, dora=True)
    fused = tmp_path / "fused"
    assert run("fuse", base, "--adapter", adapter, "--output", fused).exit_code == 0
    rep = survival_json(fused, "--adapter", adapter, "--base", base, "--bits", 4, 8)
    assert rep["summary"]["8"]["cosine"] > 0.9


# ---------------------------------------------------------------- bad input

def error_line(res):
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert lines and lines[-1].startswith("Error: "), res.output
    assert "Traceback" not in res.output
    return lines[-1]


def test_missing_directory(tmp_path):
    res = run("delta-survival", tmp_path / "nope", "--base", tmp_path)
    assert res.exit_code == 1
    assert "nope: no such directory" in error_line(res)


def test_directory_without_safetensors(tmp_path):
    res = run("quant-error", tmp_path)
    assert res.exit_code == 1
    assert "no .safetensors weights found" in error_line(res)


@pytest.mark.parametrize("damage", ["truncate", "header"])
def test_corrupt_safetensors(trio, tmp_path, damage):
    _, _, fused = trio
    bad = tmp_path / "bad"
    shutil.copytree(fused, bad)
    f = next(bad.glob("*.safetensors"))
    data = f.read_bytes()
    if damage == "truncate":
        f.write_bytes(data[: len(data) // 2])
    else:
        f.write_bytes(data[:8] + b"{not json" + data[17:])
    res = run("quant-error", bad)
    assert res.exit_code == 1
    line = error_line(res)
    assert str(f) in line and ("corrupt" in line or "truncated" in line)


def test_base_with_different_tensors(trio, tmp_path):
    _, _, fused = trio
    other = tmp_path / "other"
    make_tiny_model(other, hidden_size=64, num_layers=2)
    res = run("delta-survival", fused, "--base", other)
    assert res.exit_code == 1
    assert "fused shape" in error_line(res) and "base shape" in error_line(res)
    fewer = tmp_path / "fewer"
    make_tiny_model(fewer, hidden_size=128, num_layers=1)
    res = run("delta-survival", fused, "--base", fewer)
    assert res.exit_code == 1
    assert "no tensor 'model.layers.1." in error_line(res)


def test_adapter_for_another_model(trio, tmp_path):
    _, _, fused = trio
    small = tmp_path / "small"
    make_tiny_model(small, hidden_size=64, num_layers=2)
    make_tiny_adapter(small, tmp_path / "ad", rank=4)
    res = run("delta-survival", fused, "--adapter", tmp_path / "ad")
    assert res.exit_code == 1
    assert "does not match" in error_line(res)


def test_adapter_module_not_in_model(trio, tmp_path):
    _, adapter, fused = trio
    bad = tmp_path / "ad"
    shutil.copytree(adapter, bad)
    w = mx.load(str(bad / "adapters.safetensors"))
    w = {k.replace("layers.0.", "layers.9."): v for k, v in w.items()}
    mx.save_safetensors(str(bad / "adapters.safetensors"), w)
    res = run("delta-survival", fused, "--adapter", bad)
    assert res.exit_code == 1
    assert "model.layers.9.self_attn" in error_line(res) and "not in the model" in error_line(res)


def test_adapter_rank_mismatch(trio, tmp_path):
    _, adapter, fused = trio
    bad = tmp_path / "ad"
    shutil.copytree(adapter, bad)
    cfg = json.loads((bad / "adapter_config.json").read_text())
    cfg["lora_parameters"]["rank"] = 8
    (bad / "adapter_config.json").write_text(json.dumps(cfg))
    res = run("delta-survival", fused, "--adapter", bad)
    assert res.exit_code == 1
    assert "has rank 4 but adapter_config.json says rank 8" in error_line(res)


@pytest.mark.parametrize("bits", [1, 7, 9])
def test_unsupported_bits(trio, bits):
    _, adapter, fused = trio
    res = run("delta-survival", fused, "--adapter", adapter, "--bits", 4, bits)
    assert res.exit_code == 2
    assert f"unsupported bits {bits}" in error_line(res)


@pytest.mark.parametrize("args", [
    ["--bits", 5, 3, 4],                          # as the README types it, after MODEL
    ["--bits", 4, "--bits", 5, "--bits", 3],      # click's repeated form
    ["--bits", 5, "--bits", 3, 4, "--json"],      # both, then another option
])
def test_bits_take_a_list_or_repeats_before_or_after_the_model(trio, args):
    _, adapter, fused = trio
    for argv in ([fused, "--adapter", adapter, *args], [*args, fused, "--adapter", adapter]):
        res = run("delta-survival", *argv, *([] if "--json" in args else ["--json"]))
        assert res.exit_code == 0, res.output
        assert json.loads(res.stdout)["bits"] == [3, 4, 5]


def test_bits_that_are_not_numbers_are_refused(trio):
    _, adapter, fused = trio
    res = run("delta-survival", fused, "--adapter", adapter, "--bits", "four")
    assert res.exit_code == 2
    assert error_line(res) == ("Error: Invalid value for '--bits': unsupported bits four: "
                               "MLX affine quantization supports 2, 3, 4, 5, 6, 8")


def test_unsupported_group_size(trio):
    _, _, fused = trio
    res = run("quant-error", fused, "--group-size", 48)
    assert res.exit_code == 2
    assert "unsupported group size 48" in error_line(res)


def write_model(path, tensors):
    path.mkdir()
    (path / "config.json").write_text("{}")
    mx.save_safetensors(str(path / "model.safetensors"), tensors)


def test_group_size_that_does_not_divide_is_skipped_and_said(tmp_path):
    rng = np.random.default_rng(0)
    write_model(tmp_path / "m", {
        "a.weight": mx.array(rng.standard_normal((8, 128)).astype(np.float32)).astype(mx.float16),
        "b.weight": mx.array(rng.standard_normal((8, 96)).astype(np.float32)).astype(mx.float16),
    })
    res = run("quant-error", tmp_path / "m", "--group-size", 64, "--json")
    assert res.exit_code == 0, res.output
    rep = json.loads(res.stdout)
    assert [t["name"] for t in rep["tensors"]] == ["a.weight"]
    assert rep["skipped"][0]["name"] == "b.weight" and "not divisible by group size 64" in rep["skipped"][0]["reason"]
    human = run("quant-error", tmp_path / "m")
    assert "b.weight [8, 96]: last dimension 96 not divisible by group size 64" in human.output


def test_nan_weights_are_an_error_naming_the_tensor(tmp_path):
    x = np.ones((4, 64), np.float32)
    x[2, 3] = np.nan
    write_model(tmp_path / "m", {"layer.weight": mx.array(x).astype(mx.bfloat16)})
    res = run("quant-error", tmp_path / "m")
    assert res.exit_code == 1
    assert "tensor 'layer.weight'" in error_line(res) and "NaN or Inf" in error_line(res)


def test_no_delta_source(tmp_path):
    write_model(tmp_path / "m", {"w.weight": mx.zeros((4, 64), dtype=mx.float16)})
    res = run("delta-survival", tmp_path / "m")
    assert res.exit_code == 1
    assert "no delta source" in error_line(res)


def test_sharded_model_is_read_through_its_index(tmp_path):
    rng = np.random.default_rng(1)
    d = tmp_path / "sharded"
    d.mkdir()
    (d / "config.json").write_text("{}")
    t1 = {"x.weight": mx.array(rng.standard_normal((4, 64)).astype(np.float32))}
    t2 = {"y.weight": mx.array(rng.standard_normal((4, 64)).astype(np.float32))}
    mx.save_safetensors(str(d / "model-00001-of-00002.safetensors"), t1)
    mx.save_safetensors(str(d / "model-00002-of-00002.safetensors"), t2)
    index = {"weight_map": {"x.weight": "model-00001-of-00002.safetensors",
                            "y.weight": "model-00002-of-00002.safetensors"}}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    rep = json.loads(run("quant-error", d, "--bits", 4, "--json").stdout)
    assert sorted(t["name"] for t in rep["tensors"]) == ["x.weight", "y.weight"]
    (d / "model-00002-of-00002.safetensors").unlink()
    res = run("quant-error", d)
    assert res.exit_code == 1 and "is missing" in error_line(res)


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs /proc/self/maps")
def test_closing_a_delta_source_unmaps_the_base_and_adapter(trio):
    """delta-survival closes its delta source when done, not whenever it is collected."""
    from qtools.io.weights import SafetensorsModel
    from qtools.survival.analyze import resolve_delta_source

    base, adapter, fused = trio
    m = SafetensorsModel(fused)
    src = resolve_delta_source(m, adapter=adapter, base=base)
    src.base.raw(src.base.names()[0])  # maps the base file
    src.adapter._st.raw(src.adapter._st.names()[0])  # and the adapter file (its deltas are read lazily)
    mapped = Path("/proc/self/maps").read_text()
    assert str(base) in mapped and str(adapter) in mapped
    src.close()
    m.close()
    mapped = Path("/proc/self/maps").read_text()
    assert str(base) not in mapped and str(adapter) not in mapped


def test_tensors_are_memory_mapped_views_not_copies(trio):
    from qtools.io.weights import SafetensorsModel

    _, _, fused = trio
    st = SafetensorsModel(fused)
    a = st.raw("model.layers.0.self_attn.q_proj.weight")
    assert not a.flags.owndata and not a.flags.writeable
    assert a.dtype == np.uint16 and a.shape == (128, 128)
    st.release("model.layers.0.self_attn.q_proj.weight")  # drops the pages; the view stays valid
    assert a.sum() > 0
    st.close()


def test_moe_expert_adapter_matches_the_base_delta(tmp_path):
    """3-D stacked experts (E x out x in) with a LoRASwitchLinear-shaped adapter."""
    rng = np.random.default_rng(2)
    E, out, inp, r, scale = 4, 64, 128, 2, 2.0
    base = (rng.standard_normal((E, out, inp)) * 0.02).astype(np.float32)
    a = (rng.standard_normal((E, r, inp)) / np.sqrt(inp)).astype(np.float32)
    b = (rng.standard_normal((E, out, r)) * 0.01).astype(np.float32)
    fused = base + scale * np.einsum("eor,eri->eoi", b, a)
    name = "model.layers.0.mlp.switch_mlp.up_proj"
    write_model(tmp_path / "base", {name + ".weight": mx.array(base).astype(mx.float16)})
    write_model(tmp_path / "fused", {name + ".weight": mx.array(fused).astype(mx.float16)})
    ad = tmp_path / "ad"
    ad.mkdir()
    mx.save_safetensors(str(ad / "adapters.safetensors"), {name + ".lora_a": mx.array(a), name + ".lora_b": mx.array(b)})
    (ad / "adapter_config.json").write_text(json.dumps(
        {"fine_tune_type": "lora", "num_layers": 1, "lora_parameters": {"rank": r, "scale": scale}}))
    x = survival_json(tmp_path / "fused", "--adapter", ad, "--bits", 4, 8)
    y = survival_json(tmp_path / "fused", "--base", tmp_path / "base", "--bits", 4, 8)
    assert x["tensors"][0]["shape"] == [E, out, inp]
    for key in ("delta_retention", "cosine", "codes_changed"):
        assert x["summary"]["4"][key] == pytest.approx(y["summary"]["4"][key], rel=0.05, abs=0.01), key
    assert "subspace_snr" in x["summary"]["4"]


def test_quantized_base_is_dequantized_like_mlx_lm_fuse(tmp_path):
    """QLoRA: the base is 4-bit; delta = fused - dequantize(base), as mlx-lm fuses."""
    base, qbase, adapter, fused = (tmp_path / n for n in ("base", "qbase", "ad", "fused"))
    make_tiny_model(base, hidden_size=128, num_layers=1)
    assert run("quantize", base, "--bits", 4, "--output", qbase).exit_code == 0
    make_tiny_adapter(base, adapter, rank=4, scale=1.0)  # same logical shapes as the 4-bit base
    res = run("fuse", qbase, "--adapter", adapter, "--output", fused)
    assert res.exit_code == 0, res.output
    via_base = survival_json(fused, "--base", qbase, "--bits", 4, 8)
    via_adapter = survival_json(fused, "--adapter", adapter, "--bits", 4, 8)
    assert via_base["summary"]["8"]["cosine"] > 0.9
    for key in ("delta_retention", "cosine"):
        assert via_base["summary"]["4"][key] == pytest.approx(via_adapter["summary"]["4"][key], rel=0.05, abs=0.02)


def test_the_calibrated_bracket_is_reported_and_leaves_the_rest_to_the_probe(trio, tmp_path, monkeypatch):
    """With a study's bracket in the rule file, delta-survival says what the weights settle
    (survives at >= a, rounded away at <= b) and which bit-widths it hands the probe."""
    import qtools.survival.rule as R

    _, adapter, fused = trio
    rule = json.loads(R.RULE_FILE.read_text())
    rule.pop("bracket", None)
    rule.pop("study", None)
    path = tmp_path / "rule.json"
    path.write_text(json.dumps(rule))
    monkeypatch.setattr(R, "RULE_FILE", path)
    before = survival_json(fused, "--adapter", adapter, "--bits", 2, 3, 4, 5, 6, 8)
    assert "bracket" not in before and "point_prediction" not in before  # a rule file without a bracket
    cos = {b: before["summary"][str(b)]["cosine"] for b in (2, 3, 4, 5, 6, 8)}
    assert cos[2] < cos[3] < cos[4] < cos[5] < cos[6] < cos[8]
    rule["bracket"] = {"statistic": "cosine", "aggregate": "weighted", "survive": (cos[5] + cos[6]) / 2,
                       "lost": (cos[3] + cos[4]) / 2}
    rule["study"] = {"weights_held_out": {"n": 35, "exact": 9, "optimistic": 1},
                     "point_held_out": {"n": 35, "exact": 15, "optimistic": 7}}
    path.write_text(json.dumps(rule))
    rep = survival_json(fused, "--adapter", adapter, "--bits", 2, 3, 4, 5, 6, 8)
    assert rep["bracket"]["survives_at"] == 6 and rep["bracket"]["rounded_away_at"] == 3
    assert rep["bracket"]["probe"] == [4, 5] and rep["bracket"]["check"] == [3, 4, 5, 6]
    # the prediction is the bracket's: kept from 6, lost up to 3, 4 and 5 neither (the probe's)
    assert rep["predicted_min_bits"] == 6
    assert rep["verdict"] == {"2": False, "3": False, "4": None, "5": None, "6": True, "8": True}
    assert rep["point_prediction"] == {"predicted_min_bits": before["predicted_min_bits"],
                                       "verdict": before["verdict"]}
    res = run("delta-survival", fused, "--adapter", adapter, "--bits", 2, 3, 4, 5, 6, 8)
    assert "survives at >= 6, rounded away at <= 3, probe between: 4 5\n" in res.output
    assert "held out by family in the study: optimistic for 1/35" in res.output
    assert "Predicted minimum bit-width: 6" in res.output and "optimistic for 7/35; use the bracket" in res.output
    assert "Confirm: qtools probe MODEL --bits 3 4 5 6 (" in res.output  # both ends of the bracket too
    # the study's move: the survive end 6 goes up one supported bit-width, to 8; 6 is left to the probe
    rule["bracket"]["raise_by"] = 1
    path.write_text(json.dumps(rule))
    moved = survival_json(fused, "--adapter", adapter, "--bits", 2, 3, 4, 5, 6, 8)
    assert (moved["bracket"]["survives_at"], moved["bracket"]["rounded_away_at"]) == (8, 3)
    assert moved["bracket"]["check"] == [3, 4, 5, 6, 8] and moved["predicted_min_bits"] == 8
    assert "survives at >= 8, rounded away at <= 3, probe between: 4 5 6\n" in \
        run("delta-survival", fused, "--adapter", adapter, "--bits", 2, 3, 4, 5, 6, 8).output
    # asked only up to 6: nothing the weights settle as kept, the probe checks from 3 up
    assert survival_json(fused, "--adapter", adapter, "--bits", 3, 4, 5, 6)["bracket"]["survives_at"] is None
