"""quantize recipes beyond MLX affine: fixed formats, mlx_lm.quant, adapter, compensated; their bad input."""

import json

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner
from helpers import fused_trio

from qtools.cli import cli
from qtools.demo.model import make_tiny_adapter, make_tiny_model
from qtools.io.modeldir import load_model, weights_bytes
from qtools.pipeline import compensate

KEYS = ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.fixture(scope="module")
def trio(tmp_path_factory):
    """A tiny float16 base, a LoRA adapter, and the model qtools fuse made of them (with provenance)."""
    return fused_trio(tmp_path_factory.mktemp("recipes"), KEYS)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    p = tmp_path_factory.mktemp("data") / "train.jsonl"
    p.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"find the parser {i}"},
                                                  {"role": "assistant", "content": "the parser is a general idea."}]})
                         + "\n" for i in range(24)))
    return p


def stored_bits_per_weight(out, source):
    """Bits per weight from the stored tensors: every byte shipped over the source's parameter count."""
    n = sum(v.size for v in mx.load(str(source / "model.safetensors")).values())
    files = [out / "model.safetensors"] + ([out / "adapters" / "adapters.safetensors"]
                                           if (out / "adapters").is_dir() else [])
    return sum(v.nbytes for f in files for v in mx.load(str(f)).values()) * 8 / n


def logits(net, tokens=(1, 5, 9, 13, 2)):
    return np.array(net(mx.array([list(tokens)])).astype(mx.float32))


@pytest.mark.parametrize("mode,group,bits", [("mxfp4", 32, 4), ("nvfp4", 16, 4), ("mxfp8", 32, 8)])
def test_fixed_formats(trio, tmp_path, mode, group, bits):
    from mlx_lm import load

    _, _, fused = trio
    out = tmp_path / mode
    r = run("quantize", fused, "--recipe", mode, "--output", out, "--json")
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    q = json.loads((out / "config.json").read_text())["quantization"]
    assert (q["mode"], q["group_size"], q["bits"]) == (mode, group, bits)
    assert (rep["bits"], rep["group_size"]) == (bits, group)
    assert rep["bits_per_weight"] == pytest.approx(stored_bits_per_weight(out, fused), rel=1e-9)
    # The quantized weights hold bits + 8/group bits each (an 8-bit shared scale per group), norms aside.
    assert bits + 8 / group < rep["bits_per_weight"] < bits + 8 / group + 0.1
    prov = json.loads((out / "qtools_provenance.json").read_text())
    assert (prov["recipe"], prov["mode"], prov["data"]) == (mode, mode, None)
    assert prov["bits_per_weight"] == rep["bits_per_weight"]
    net, _ = load(str(out))
    assert np.isfinite(logits(net)).all()


def test_fixed_format_wrong_group_size(trio, tmp_path):
    _, _, fused = trio
    r = run("quantize", fused, "--recipe", "nvfp4", "--group-size", 64, "--output", tmp_path / "o")
    assert r.exit_code == 2
    assert r.output.strip().splitlines()[-1] == (
        "Error: Invalid value for '--group-size': nvfp4 quantizes in groups of 16 weights only (got group size 64); "
        "leave the group size unset (make: no GROUP=)")
    assert not (tmp_path / "o").exists()
    # 16 is nvfp4's, not an affine group size.
    r = run("quantize", fused, "--bits", 4, "--group-size", 16, "--output", tmp_path / "o")
    assert r.exit_code == 2 and "Error: Invalid value for '--group-size': group size 16 is not supported" in r.output


def test_unknown_recipe(trio, tmp_path):
    from qtools import QtoolsError
    from qtools.pipeline.quantize import quantize

    _, _, fused = trio
    r = run("quantize", fused, "--recipe", "bogus", "--output", tmp_path / "o")
    assert r.exit_code == 2 and "'bogus' is not one of" in r.output
    with pytest.raises(QtoolsError, match="recipe 'bogus' is not known"):
        quantize(fused, tmp_path / "o", recipe="bogus")
    assert not (tmp_path / "o").exists()


def test_adapter_recipe_ships_the_adapter_unfused(trio, tmp_path):
    from mlx_lm import load

    base, adapter, fused = trio
    out = tmp_path / "qlora"
    r = run("quantize", fused, "--recipe", "adapter", "--bits", 4, "--output", out, "--json")
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    shipped = mx.load(str(out / "adapters" / "adapters.safetensors"))
    original = mx.load(str(adapter / "adapters.safetensors"))
    assert set(shipped) == set(original) and all(v.dtype == mx.float16 for v in shipped.values())
    # The base, not the fused model, is what was quantized.
    u4 = tmp_path / "base4"
    assert run("quantize", base, "--bits", 4, "--output", u4).exit_code == 0
    w, w4 = mx.load(str(out / "model.safetensors")), mx.load(str(u4 / "model.safetensors"))
    assert all(mx.array_equal(w[k], w4[k]).item() for k in w4)
    # mlx-lm serves it with adapter_path, and qtools loads the same model from the directory alone.
    net, _ = load(str(out), adapter_path=str(out / "adapters"))
    mine, _, _, _ = load_model(out)
    np.testing.assert_array_equal(logits(net), logits(mine))
    assert not np.array_equal(logits(mine), logits(load(str(u4))[0]))
    # Bits per weight count the adapter's parameters: shipped bytes over the model's weights.
    assert rep["bits_per_weight"] == pytest.approx(stored_bits_per_weight(out, fused), rel=1e-9)
    extra = sum(v.nbytes for v in shipped.values()) * 8 / sum(v.size for v in mx.load(str(fused / "model.safetensors")).values())
    assert rep["bits_per_weight"] == pytest.approx(4.5 + extra, abs=0.1)
    assert weights_bytes(out) == (out / "model.safetensors").stat().st_size + (out / "adapters" / "adapters.safetensors").stat().st_size


def test_adapter_not_matching_the_model(trio, tmp_path):
    _, adapter, fused = trio
    other = make_tiny_model(tmp_path / "other", hidden_size=32)
    wrong = make_tiny_adapter(other, tmp_path / "wrong", keys=KEYS)
    for recipe, extra in (("adapter", ["--base", other, "--adapter", adapter]),
                          ("compensated", ["--adapter", wrong])):
        r = run("quantize", fused, "--recipe", recipe, "--bits", 4, *extra, "--output", tmp_path / "o")
        assert r.exit_code == 1, r.output
        assert r.output.startswith("Error: adapter ") and " does not match model " in r.output
        assert len(r.output.strip().splitlines()) == 1 and not (tmp_path / "o").exists()


def test_adapter_recipe_needs_base_and_adapter(tmp_path):
    bare = make_tiny_model(tmp_path / "bare")
    r = run("quantize", bare, "--recipe", "adapter", "--bits", 4, "--output", tmp_path / "o")
    assert r.exit_code == 1 and r.output.startswith(f"Error: {bare} does not say which base and adapter")


def test_svd_and_subspace_factors():
    rng = np.random.default_rng(0)
    err = rng.normal(size=(48, 64)).astype(np.float32)
    a, b = compensate.svd_factors(err, 5)
    assert a.shape == (64, 5) and b.shape == (5, 48)
    us, s, vt = np.linalg.svd(err, full_matrices=False)
    np.testing.assert_allclose(compensate.correction(a, b), (us[:, :5] * s[:5]) @ vt[:5], atol=1e-4)
    u = np.linalg.qr(rng.normal(size=(48, 4)))[0].astype(np.float32)
    v = np.linalg.qr(rng.normal(size=(64, 4)))[0].astype(np.float32)
    a, b = compensate.subspace_factors(err, u, v, 4)
    np.testing.assert_allclose(compensate.correction(a, b), u @ u.T @ err @ v @ v.T, atol=1e-4)
    kept = compensate.energy_kept(err, a, b, u, v)
    assert kept["subspace_error_removed"] == pytest.approx(1.0, abs=1e-5) and 0 < kept["error_removed"] < 0.2
    # Budget: rank r on (48, 64) costs 16 r (48 + 64) bits over 1000 weights.
    assert compensate.rank_for_budget([(48, 64)], 16 * 3 * 112 / 1000 + 1e-6, 1000, 10) == 3


@pytest.mark.parametrize("correction", ["svd", "subspace"])
def test_compensated_recipe(trio, tmp_path, correction):
    from mlx_lm import load

    _, adapter, fused = trio
    out = tmp_path / correction
    r = run("quantize", fused, "--recipe", "compensated", "--bits", 3, "--rank", 2,
            "--correction", correction, "--output", out, "--json")
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    cfg = json.loads((out / "adapters" / "adapter_config.json").read_text())
    assert cfg["fine_tune_type"] == "lora" and cfg["lora_parameters"]["scale"] == 1.0
    assert cfg["lora_parameters"]["rank"] == 2 and cfg["lora_parameters"]["keys"] == list(KEYS)
    ad = mx.load(str(out / "adapters" / "adapters.safetensors"))
    assert len(ad) == 2 * 2 * len(KEYS) and all(v.dtype == mx.float16 for v in ad.values())
    # Served by mlx-lm with no qtools code: the corrected model is closer to the float fused one.
    net, _ = load(str(out), adapter_path=str(out / "adapters"))
    plain = tmp_path / "u3"
    assert run("quantize", fused, "--bits", 3, "--output", plain).exit_code == 0
    w = mx.load(str(fused / "model.safetensors"))
    q = mx.load(str(plain / "model.safetensors"))
    name = "model.layers.1.mlp.down_proj"
    deq = np.array(mx.dequantize(q[f"{name}.weight"], q[f"{name}.scales"], q[f"{name}.biases"], bits=3).astype(mx.float32))
    err = np.array(w[f"{name}.weight"].astype(mx.float32)) - deq
    c = compensate.correction(np.array(ad[f"{name}.lora_a"].astype(mx.float32)),
                              np.array(ad[f"{name}.lora_b"].astype(mx.float32)))
    assert np.linalg.norm(err - c) < np.linalg.norm(err)
    # The layer mlx-lm built computes x (deq + C)^T: the correction's orientation and scale as shipped.
    layer = net.model.layers[1].mlp.down_proj
    x = mx.random.normal((3, deq.shape[1]), key=mx.random.key(0))
    np.testing.assert_allclose(np.array(layer(x.astype(mx.float16)).astype(mx.float32)),
                               np.array(x) @ (deq + c).T, rtol=2e-2, atol=2e-2)
    assert rep["bits_per_weight"] == pytest.approx(stored_bits_per_weight(out, fused), rel=1e-9)
    assert rep["compensation"]["rank"] == 2


def test_compensated_rank_from_budget(trio, tmp_path):
    _, _, fused = trio
    out = tmp_path / "c"
    r = run("quantize", fused, "--recipe", "compensated", "--bits", 4, "--target-bpw", 4.8,
            "--output", out, "--json")
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    assert rep["bits_per_weight"] <= 4.8 and rep["compensation"]["rank"] >= 1
    r = run("quantize", fused, "--recipe", "compensated", "--bits", 4, "--target-bpw", 4.5,
            "--output", tmp_path / "d")
    assert r.exit_code == 2 and "Error: Invalid value for '--target-bpw': target 4.500 bits/weight leaves no room" in r.output


@pytest.mark.parametrize("recipe", ["gptq", "dynamic"])
def test_data_recipes(trio, data, tmp_path, recipe):
    from mlx_lm import load

    _, _, fused = trio
    out = tmp_path / recipe
    r = run("quantize", fused, "--recipe", recipe, "--bits", 4, "--data", data, "--output", out, "--json")
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    prov = json.loads((out / "qtools_provenance.json").read_text())
    assert prov["data"] == str(data.resolve()) == rep["data"] and prov["recipe"] == recipe
    assert rep["calibration"]["records"] == 24
    assert prov["bits_per_weight"] == pytest.approx(stored_bits_per_weight(out, fused), rel=1e-9)
    assert np.isfinite(logits(load(str(out))[0])).all()
    if recipe == "dynamic":  # default target: BITS + 0.8, met from below
        assert 4.5 < rep["bits_per_weight"] <= 4.8


def test_data_bad_input(trio, tmp_path):
    _, _, fused = trio
    bare = make_tiny_model(tmp_path / "bare")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    binary = tmp_path / "b.txt"
    binary.write_bytes(b"\xff\xfe\x00\x01binary")
    notjson = tmp_path / "n.jsonl"
    notjson.write_text('{"text": "a"}\nnot json\n')
    wrong = tmp_path / "w.jsonl"
    wrong.write_text('{"input": "a"}\n')
    cases = [
        (bare, None, "Error: recipe awq calibrates on data: give DATA=<file> (--data)"),
        (fused, tmp_path / "nope.jsonl", f"Error: DATA {tmp_path / 'nope.jsonl'} does not exist"),
        (fused, empty, f"Error: DATA {empty} is empty"),
        (fused, binary, f"Error: DATA {binary} is not text (not UTF-8)"),
        (fused, notjson, f"Error: DATA {notjson} line 2 is not JSON"),
        (fused, wrong, f"Error: DATA {wrong} line 1 is not an mlx-lm record"),
    ]
    for model, d, message in cases:
        extra = ["--data", d] if d is not None else []
        r = run("quantize", model, "--recipe", "awq", "--bits", 4, *extra, "--output", tmp_path / "o")
        assert r.exit_code == 1, r.output
        assert r.output.startswith(message) and len(r.output.strip().splitlines()) == 1, r.output
        assert not (tmp_path / "o").exists()
    r = run("quantize", fused, "--recipe", "gptq", "--bits", 4, "--data", empty, "--num-samples", 0,
            "--output", tmp_path / "o")
    assert r.exit_code == 2 and "Error: Invalid value for '--num-samples': 0 is not a count" in r.output
    r = run("quantize", fused, "--recipe", "gptq", "--bits", 3, "--data", empty, "--output", tmp_path / "o")
    assert r.exit_code == 2 and "Error: Invalid value for '--bits': gptq (mlx_lm.quant.gptq) packs 2, 4, 8 bits only" in r.output
    r = run("quantize", fused, "--recipe", "mxfp4", "--data", empty, "--output", tmp_path / "o")
    assert r.exit_code == 2 and "Error: Invalid value for '--data': recipe mxfp4 takes no calibration data" in r.output


def test_validate_takes_a_model_that_ships_an_adapter(trio, tmp_path):
    _, _, fused = trio
    out = tmp_path / "qlora"
    assert run("quantize", fused, "--recipe", "adapter", "--bits", 4, "--output", out).exit_code == 0
    suite = tmp_path / "s.jsonl"
    suite.write_text(json.dumps({"id": "r1", "category": "misc", "prompt": "say hi",
                                 "expect": {"type": "regex", "pattern": "^hi"}}) + "\n")
    r = run("validate", out, "--suite", suite, "--output", tmp_path / "log.json", "--max-tokens", 2, "--min-accuracy", 0)
    log = json.loads((tmp_path / "log.json").read_text())
    assert r.exit_code == 0, r.output
    prov = json.loads((out / "qtools_provenance.json").read_text())
    assert log["bits_per_weight"] == pytest.approx(prov["bits_per_weight"], rel=1e-9)


def test_fingerprint_sees_a_shipped_adapter(trio, tmp_path):
    from qtools.io.weights import fingerprint

    _, _, fused = trio
    out = tmp_path / "c"
    assert run("quantize", fused, "--recipe", "compensated", "--bits", 4, "--rank", 1,
               "--output", out).exit_code == 0
    before = fingerprint(out)
    ad = out / "adapters" / "adapters.safetensors"
    w = mx.load(str(ad))
    mx.save_safetensors(str(ad), {k: v * 2 for k, v in w.items()})
    assert fingerprint(out) != before


def test_gptq_hessians_do_not_overflow_in_float16(data, tmp_path):
    from qtools.pipeline.quantize import quantize

    # Large MLP activations: X^T X of down_proj's inputs exceeds float16's range.
    model = make_tiny_model(tmp_path / "loud")
    w = mx.load(str(model / "model.safetensors"))
    for k in list(w):
        if k.endswith(("mlp.up_proj.weight", "mlp.gate_proj.weight")):
            w[k] = (w[k].astype(mx.float32) * 40).astype(mx.float16)
    mx.save_safetensors(str(model / "model.safetensors"), w, metadata={"format": "mlx"})
    out = tmp_path / "g"
    quantize(model, out, bits=4, recipe="gptq", data=data)
    q = mx.load(str(out / "model.safetensors"))
    scales = [v for k, v in q.items() if k.endswith(".scales")]
    assert all(v.dtype == mx.float16 for v in scales)
    assert all(mx.isfinite(v).all().item() for v in scales)
