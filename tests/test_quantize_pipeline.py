"""The one quantize pipeline: every recipe behind the same checks, numerical failures as one
`Error:` line, and the streamed recipes writing exactly what mlx-lm's whole-model path writes
(load + quantize_model + save, run here as the reference) without loading the model."""

import json
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner
from helpers import fused_trio

from qtools import QtoolsError
from qtools.cli import cli
from qtools.demo.model import make_tiny_model
from qtools.io.atomic import TMP_PREFIX
from qtools.io.weights import MappedTensors, TensorInfo
from qtools.pipeline.quantize import RECIPES, make_predicate, quantize

KEYS = ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")
DOWN = "model.layers.1.mlp.down_proj.weight"
ALL_RECIPES = ("uniform", "mixed_3_6", "mixed_4_6", "survival", "mxfp4", "nvfp4", "mxfp8", "awq", "gptq", "dwq",
               "dynamic", "adapter", "compensated")
FIXED = {"mxfp4": (32, 4), "nvfp4": (16, 4), "mxfp8": (32, 8)}


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def _no_output(out):
    assert not out.exists()
    if out.parent.exists():
        assert [p for p in out.parent.iterdir() if p.name.startswith(TMP_PREFIX)] == []


def _one_error(r, start):
    assert r.exit_code == 1, r.output
    assert "Traceback" not in r.output and len(r.output.strip().splitlines()) == 1, r.output
    assert r.output.startswith(start), r.output


@pytest.fixture(scope="module")
def trio(tmp_path_factory):
    """A tiny float16 base, a LoRA adapter, and the model qtools fuse made of them (with provenance)."""
    return fused_trio(tmp_path_factory.mktemp("trio"), KEYS)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    p = tmp_path_factory.mktemp("data") / "train.jsonl"
    p.write_text("".join(json.dumps({"text": f"find the parser number {i} in the build"}) + "\n" for i in range(24)))
    return p


@pytest.fixture(scope="module")
def moe(tmp_path_factory):
    """A qwen3_moe in Hub layout (bfloat16, 3 shards, experts un-stacked) and its fused model."""
    from test_hub_models import hub_moe

    return hub_moe(tmp_path_factory.mktemp("moe"), keys=["self_attn.q_proj", "mlp.gate", "mlp.switch_mlp.up_proj"])


# ---------------------------------------------------------------- the same checks for every recipe

def test_the_table_has_every_recipe():
    assert RECIPES == ALL_RECIPES


@pytest.mark.parametrize("recipe", ALL_RECIPES)
def test_every_recipe_refuses_a_nan_weight(trio, data, tmp_path, recipe):
    """mxfp4/nvfp4/mxfp8 wrote a NaN model and exited 0, compensated ended in a LinAlgError
    traceback, the calibrated ones and adapter never looked."""
    _, _, fused = trio
    bad = tmp_path / "bad"
    shutil.copytree(fused, bad)  # the provenance (base, adapter) comes along
    w = mx.load(str(bad / "model.safetensors"))
    a = np.array(w[DOWN].astype(mx.float32))
    a[3, 5] = np.nan
    w[DOWN] = mx.array(a).astype(mx.float16)
    mx.save_safetensors(str(bad / "model.safetensors"), w, metadata={"format": "mlx"})
    out = tmp_path / "out" / "q"
    extra = ["--data", data] if recipe in ("awq", "gptq", "dwq", "dynamic") else []
    r = run("quantize", bad, "--recipe", recipe, "--bits", 4, *extra, "--output", out)
    _one_error(r, f"Error: model {bad}: tensor '{DOWN}' (model.safetensors) has 1 NaN or Inf value(s) of 16384: "
                  "quantizing would spread it over its whole group")
    assert not out.parent.exists()  # refused before anything was created


@pytest.mark.parametrize("recipe", ["uniform", "mxfp4", "compensated"])
def test_output_equal_to_the_model_is_refused(trio, tmp_path, recipe):
    """`quantize M --output M --force` replaced M by its own quantized copy (and deleted it first)."""
    _, _, fused = trio
    m = tmp_path / "m"
    shutil.copytree(fused, m)
    before = {p.name: p.read_bytes() for p in m.iterdir()}
    r = run("quantize", m, "--recipe", recipe, "--bits", 4, "--output", m, "--force")
    _one_error(r, f"Error: the output {m} is the input {m}: writing it would destroy the input")
    r = run("quantize", m, "--recipe", recipe, "--bits", 4, "--output", m / "q4", "--force")
    _one_error(r, f"Error: the output {m / 'q4'} lies inside the input {m}: writing it would destroy")
    r = run("quantize", m, "--recipe", recipe, "--bits", 4, "--output", tmp_path, "--force")
    _one_error(r, f"Error: the output {tmp_path} contains the input {m}: writing it would destroy")
    assert {p.name: p.read_bytes() for p in m.iterdir()} == before
    # through a symlink too
    link = tmp_path / "link"
    link.symlink_to(m)
    r = run("quantize", m, "--recipe", recipe, "--bits", 4, "--output", link, "--force")
    _one_error(r, f"Error: the output {link} is the input {m}")
    assert {p.name: p.read_bytes() for p in m.iterdir()} == before


def test_output_equal_to_the_base_or_adapter_is_refused(trio, tmp_path):
    base, adapter, fused = trio
    for what, path in (("base model", base), ("adapter", adapter)):
        r = run("quantize", fused, "--recipe", "adapter", "--bits", 4, "--output", path, "--force")
        _one_error(r, f"Error: the output {path} is the input {path}")
    assert (base / "model.safetensors").is_file() and (adapter / "adapters.safetensors").is_file()


def test_scales_in_the_weights_mean_already_quantized(trio, tmp_path):
    _, _, fused = trio
    q = tmp_path / "q4"
    assert run("quantize", fused, "--bits", 4, "--output", q).exit_code == 0
    cfg = json.loads((q / "config.json").read_text())
    cfg.pop("quantization"), cfg.pop("quantization_config")
    (q / "config.json").write_text(json.dumps(cfg))
    r = run("quantize", q, "--recipe", "mxfp4", "--output", tmp_path / "again")
    _one_error(r, f"Error: {q} is already quantized; quantize the float16 fused model instead")


# ---------------------------------------------------------------- numerical failures inside a recipe

def test_svd_failure_is_one_error_line(trio, tmp_path, monkeypatch):
    from qtools.pipeline import compensate

    def fails(err, rank):
        raise np.linalg.LinAlgError("SVD did not converge")

    monkeypatch.setattr(compensate, "svd_factors", fails)
    out = tmp_path / "c"
    r = run("quantize", trio[2], "--recipe", "compensated", "--bits", 4, "--rank", 1, "--output", out)
    _one_error(r, "Error: compensated: the correction of model.layers.0.mlp.down_proj failed (SVD did not converge)")
    _no_output(out)


def test_nan_correction_is_one_error_line(trio, tmp_path, monkeypatch):
    from qtools.pipeline import compensate

    real = compensate.svd_factors
    monkeypatch.setattr(compensate, "svd_factors", lambda err, rank: [np.full_like(f, np.nan) for f in real(err, rank)])
    out = tmp_path / "c"
    r = run("quantize", trio[2], "--recipe", "compensated", "--bits", 4, "--rank", 1, "--output", out)
    _one_error(r, "Error: compensated: the correction of model.layers.0.mlp.down_proj has NaN or Inf values")
    _no_output(out)


def test_mlx_runtime_error_while_quantizing_is_one_error_line(trio, tmp_path, monkeypatch):
    def fails(*a, **k):
        raise RuntimeError("[quantize] the device is gone")

    monkeypatch.setattr(mx, "quantize", fails)
    out = tmp_path / "q"
    r = run("quantize", trio[2], "--recipe", "mxfp4", "--output", out)
    _one_error(r, "Error: recipe mxfp4 failed: RuntimeError: [quantize] the device is gone")
    _no_output(out)


def test_nan_from_a_calibrated_recipe_is_one_error_line(trio, data, tmp_path, monkeypatch):
    from qtools.pipeline import recipes_mlx

    real = recipes_mlx.quantize_gptq

    def poisoned(net, *args):
        net, qconf = real(net, *args)
        layer = net.model.layers[0].mlp.up_proj
        layer.scales = mx.full(layer.scales.shape, np.nan, dtype=layer.scales.dtype)
        return net, qconf

    monkeypatch.setattr(recipes_mlx, "quantize_gptq", poisoned)
    out = tmp_path / "g"
    r = run("quantize", trio[2], "--recipe", "gptq", "--bits", 4, "--data", data, "--output", out)
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert r.output.strip().splitlines()[-1] == ("Error: the quantized model's tensor "
                                                 "model.layers.0.mlp.up_proj.scales has NaN or Inf values")
    _no_output(out)


def test_linalg_error_inside_mlx_lm_quant_is_one_error_line(trio, data, tmp_path, monkeypatch):
    from qtools.pipeline import recipes_mlx

    def fails(*a, **k):
        raise np.linalg.LinAlgError("Singular matrix")

    monkeypatch.setattr(recipes_mlx, "quantize_gptq", fails)
    out = tmp_path / "g"
    r = run("quantize", trio[2], "--recipe", "gptq", "--bits", 4, "--data", data, "--output", out)
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert r.output.strip().splitlines()[-1] == "Error: recipe gptq failed: LinAlgError: Singular matrix"
    _no_output(out)


# ---------------------------------------------------------------- memory of the recipes that load the model

def test_calibrated_recipe_refuses_a_model_larger_than_the_machine(trio, data, tmp_path, monkeypatch):
    import mlx_lm.utils

    import qtools.pipeline.memory as M

    def refuse(*a, **k):
        raise AssertionError("the model was loaded before its memory was checked")

    monkeypatch.setattr(mlx_lm.utils, "load", refuse)
    monkeypatch.setattr(M, "device_total", lambda: (100_000, "test limit"))
    for recipe in ("awq", "gptq", "dwq", "dynamic"):
        out = tmp_path / recipe
        r = run("quantize", trio[2], "--recipe", recipe, "--bits", 4, "--data", data, "--output", out)
        _one_error(r, f"Error: recipe {recipe} holds the whole model: it needs about ")
        assert "more than the 0.0 GB this machine has (test limit)" in r.output and "use a streamed recipe" in r.output
        _no_output(out)
    # the streamed recipes do not hold the model: the same limit does not stop them
    assert run("quantize", trio[2], "--recipe", "mxfp4", "--output", tmp_path / "m").exit_code == 0


def test_calibration_memory_counts_the_copies_each_recipe_makes(trio):
    from qtools.io.weights import SafetensorsModel
    from qtools.pipeline.recipes_mlx import calibration_memory

    _, _, fused = trio
    cfg = json.loads((fused / "config.json").read_text())
    with SafetensorsModel(fused) as st:
        stored = sum(i.nbytes for i in st.tensors.values())
        need = {r: calibration_memory(r, st, cfg, cal_tokens=4096, batch_tokens=2048, float32_experts=False)
                for r in ("awq", "gptq", "dwq", "dynamic")}
    assert all(n["model"] == stored for n in need.values())
    assert need["gptq"]["copies"] > 2 * stored  # the whole model again in float32
    assert need["dwq"]["copies"] > stored and need["dynamic"]["copies"] > 3 * stored
    assert all(n["total"] >= n["model"] + n["copies"] + n["activations"] for n in need.values())


# ---------------------------------------------------------------- streamed = mlx-lm's whole-model path

def tensors(d):
    out = {}
    for f in sorted(Path(d).glob("*.safetensors")):
        out.update({k: (f.name, v) for k, v in mx.load(str(f)).items()})
    return out


def assert_same_model(ours, ref):
    """Same files, same tensors (names, shard, dtype, shape, bytes), same config, index, tokenizer."""
    assert sorted(p.name for p in ours.iterdir() if p.name != "qtools_provenance.json") == \
        sorted(p.name for p in ref.iterdir())
    a, b = tensors(ours), tensors(ref)
    assert sorted(a) == sorted(b)
    for k in a:
        (fa, va), (fb, vb) = a[k], b[k]
        assert (fa, va.dtype, va.shape) == (fb, vb.dtype, vb.shape), k
        assert bytes(memoryview(va.view(mx.uint8) if va.dtype != mx.bool_ else va)) == \
            bytes(memoryview(vb.view(mx.uint8) if vb.dtype != mx.bool_ else vb)), k
    for name in ("config.json", "model.safetensors.index.json"):
        assert json.loads((ours / name).read_text()) == json.loads((ref / name).read_text()), name
    for p in ref.iterdir():
        if p.is_file() and not p.name.endswith(".safetensors") and not p.name.endswith(".json"):
            assert (ours / p.name).read_bytes() == p.read_bytes(), p.name
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (ref / name).exists():
            assert (ours / name).read_bytes() == (ref / name).read_bytes(), name


def reference(src, out, bits, group_size=64, recipe="uniform", layer_bits=None):
    """What qtools quantize did before it streamed: mlx-lm loads the model, quantize_model, save."""
    from mlx_lm.utils import compute_bits_per_weight, load, quantize_model, save

    net, tok, config = load(str(src), return_config=True, lazy=True)
    if recipe in FIXED:
        g, b = FIXED[recipe]
        net, qconfig = quantize_model(net, config, g, b, mode=recipe)
    else:
        predicate = make_predicate(net, bits, group_size, "uniform" if recipe == "survival" else recipe, layer_bits)
        net, qconfig = quantize_model(net, config, group_size, bits, quant_predicate=predicate)
    bpw = float(compute_bits_per_weight(net))
    save(out, str(src), net, tok, qconfig, donate_model=True)
    return bpw


@pytest.fixture(scope="module")
def dense_bf16(tmp_path_factory):
    """bfloat16, embeddings not tied (an lm_head of its own)."""
    return make_tiny_model(tmp_path_factory.mktemp("bf16") / "m", dtype="bfloat16", tie_word_embeddings=False)


STREAMED = ["uniform", "mixed_3_6", "mixed_4_6", "survival", "mxfp4", "nvfp4", "mxfp8"]


@pytest.mark.parametrize("recipe", STREAMED)
@pytest.mark.parametrize("which", ["dense", "moe_fused", "moe_hub_base", "dense_bf16"])
def test_streamed_output_is_mlx_lm_s(trio, moe, dense_bf16, tmp_path, recipe, which):
    src = {"dense": trio[2], "moe_fused": moe[2], "moe_hub_base": moe[0], "dense_bf16": dense_bf16}[which]
    if recipe == "survival" and which in ("moe_hub_base", "dense_bf16"):
        pytest.skip("survival needs the fine-tune's delta (a fused model with provenance)")
    bits = {"mixed_3_6": 3, "mixed_4_6": 4}.get(recipe, 3)
    layer_bits = None
    if recipe == "survival":
        from qtools.pipeline.recipe import survival_plan

        layer_bits = survival_plan(src, bits, 64)["layer_bits"]
    ref = tmp_path / "ref"
    ref_bpw = reference(src, ref, bits, recipe=recipe, layer_bits=layer_bits)
    out = tmp_path / "ours"
    rep = quantize(src, out, bits=bits, group_size=None if recipe in FIXED else 64, recipe=recipe)
    assert_same_model(out, ref)
    assert rep["bits_per_weight"] == ref_bpw
    assert json.loads((out / "qtools_provenance.json").read_text())["bits_per_weight"] == ref_bpw


def test_streamed_shards_are_mlx_lm_s(moe, tmp_path, monkeypatch):
    """A model over the shard limit: the same shards, file names and weight map as mlx-lm's save."""
    import mlx_lm.utils

    import qtools.io.shards

    limit = 20_000

    def make_shards(weights, max_file_size_gb=5):  # mlx_lm.utils.make_shards with a limit in bytes
        shards, size = [], 0
        for k, v in weights.items():
            if not shards or size + v.nbytes > limit:
                shards.append({})
                size = 0
            shards[-1][k] = v
            size += v.nbytes
        return shards

    monkeypatch.setattr(mlx_lm.utils, "make_shards", make_shards)
    monkeypatch.setattr(qtools.io.shards, "max_shard_bytes", lambda: limit)
    _, _, fused = moe
    ref = tmp_path / "ref"
    reference(fused, ref, 4)
    out = tmp_path / "ours"
    quantize(fused, out, bits=4)
    assert len(list(ref.glob("model-*-of-*.safetensors"))) > 3, list(ref.iterdir())
    assert_same_model(out, ref)


def test_adapter_and_compensated_weights_are_mlx_lm_s(trio, moe, tmp_path):
    """adapter: the base as mlx-lm quantizes it; compensated: the fused model as mlx-lm quantizes it,
    and its correction the SVD of exactly that model's error."""
    from qtools.pipeline import compensate

    base, adapter, fused = trio
    ref = tmp_path / "ref_base"
    ref_bpw = reference(base, ref, 4)
    out = tmp_path / "adapter"
    rep = quantize(fused, out, bits=4, recipe="adapter")
    shutil.rmtree(out / "adapters")
    assert_same_model(out, ref)
    assert rep["bits_per_weight"] > ref_bpw  # the adapter's float16 bytes count

    ref = tmp_path / "ref_fused"
    reference(fused, ref, 3)
    out = tmp_path / "compensated"
    quantize(fused, out, bits=3, recipe="compensated", rank=2)
    ad = mx.load(str(out / "adapters" / "adapters.safetensors"))
    shutil.rmtree(out / "adapters")
    assert_same_model(out, ref)
    w, q = mx.load(str(fused / "model.safetensors")), tensors(ref)
    for name in (f"model.layers.{i}.{k}" for i in range(2) for k in KEYS):
        deq = mx.dequantize(q[f"{name}.weight"][1], q[f"{name}.scales"][1], q[f"{name}.biases"][1], bits=3)
        err = np.array(w[f"{name}.weight"].astype(mx.float32)) - np.array(deq.astype(mx.float32))
        a, b = compensate.svd_factors(err, 2)
        assert np.array_equal(np.array(ad[f"{name}.lora_a"]), a.astype(np.float16))
        assert np.array_equal(np.array(ad[f"{name}.lora_b"]), b.astype(np.float16))


def test_compensated_on_a_moe_lists_only_the_keys_it_corrects(moe, tmp_path):
    """The fine-tune's adapter names switch_mlp too, which the correction skips: listed, mlx-lm gave
    those layers random lora_a (loaded with nothing) and counted them in bits per weight."""
    from mlx_lm import load
    from mlx_lm.utils import compute_bits_per_weight

    _, _, fused = moe
    out = tmp_path / "c"
    rep = quantize(fused, out, bits=3, recipe="compensated", rank=1)
    cfg = json.loads((out / "adapters" / "adapter_config.json").read_text())
    assert cfg["lora_parameters"]["keys"] == ["self_attn.q_proj", "mlp.gate"]
    net, _ = load(str(out), adapter_path=str(out / "adapters"), lazy=True)
    assert rep["bits_per_weight"] == float(compute_bits_per_weight(net))


def test_streamed_recipes_never_load_the_model(trio, tmp_path, monkeypatch):
    import mlx_lm.utils

    _, _, fused = trio
    real = mlx_lm.utils.load_model

    def guarded(path, *a, **k):
        if Path(path).resolve() in (fused.resolve(), trio[0].resolve()):
            raise AssertionError("the model was loaded")
        return real(path, *a, **k)

    monkeypatch.setattr(mlx_lm.utils, "load_model", guarded)
    monkeypatch.setattr(mx, "load", lambda *a, **k: (_ for _ in ()).throw(AssertionError("mx.load")))
    for recipe in ("uniform", "survival", "mxfp4", "mixed_3_6"):
        r = run("quantize", fused, "--recipe", recipe, "--bits", 3, "--output", tmp_path / recipe)
        assert r.exit_code == 0, r.output


def test_peak_memory_is_one_module_not_the_model(tmp_path):
    """MLX's peak over a streamed quantize: a few times the largest tensor, far below the model."""
    from qtools.io.weights import SafetensorsModel

    m = make_tiny_model(tmp_path / "m", hidden_size=128, num_layers=8, dtype="float32")
    with SafetensorsModel(m) as st:
        model = sum(i.nbytes for i in st.tensors.values())
        largest = max(i.nbytes for i in st.tensors.values())
    assert model > 15 * largest
    mx.clear_cache()
    mx.reset_peak_memory()
    quantize(m, tmp_path / "q", bits=4)
    assert mx.get_peak_memory() < 4 * largest


class DictSource:
    """A tensor source that is not a model directory (as a view fusing base + adapter will be):
    numpy arrays by name."""

    def __init__(self, arrays):
        self.arrays = arrays

    def names(self):
        return list(self.arrays)

    def info(self, name):
        v = self.arrays[name]
        code = {np.dtype("float16"): "F16", np.dtype("float32"): "F32"}[v.dtype]
        return TensorInfo(name, code, tuple(v.shape), Path(name), 0, v.nbytes)

    def get(self, name):
        return mx.array(self.arrays[name])


def test_any_tensor_source_can_stand_in(trio, tmp_path):
    from mlx_lm.utils import load_config

    from qtools.io import mlxsave
    from qtools.pipeline.streamed import Skeleton, StreamedPlan

    _, _, fused = trio
    config = load_config(fused)
    arrays = {k: np.array(v) for k, v in mx.load(str(fused / "model.safetensors")).items()}
    outs = {}
    for name, source in (("mapped", MappedTensors(fused)), ("dict", DictSource(arrays))):
        plan = StreamedPlan(Skeleton(config, source), 64, 4)
        outs[name] = tmp_path / name
        outs[name].mkdir()
        mlxsave.write_weights(outs[name], plan.specs, plan.produce, plan.total_parameters())
    a, b = tensors(outs["mapped"]), tensors(outs["dict"])
    assert sorted(a) == sorted(b) and all(mx.array_equal(a[k][1], b[k][1]).item() for k in a)


def test_a_sanitize_that_computes_falls_back_to_loading(trio, tmp_path, monkeypatch, capsys):
    """A model class whose sanitize() computes a tensor the streamed path cannot reproduce: mlx-lm
    loads it (lazily) and the output is still mlx-lm's; compensated, which needs the stream, refuses."""
    from mlx_lm.models import qwen3

    _, _, fused = trio

    def sanitize(self, weights):
        weights["model.norm.weight"] = weights["model.norm.weight"] * 2
        return weights

    monkeypatch.setattr(qwen3.Model, "sanitize", sanitize, raising=False)
    ref = tmp_path / "ref"
    reference(fused, ref, 4)
    out = tmp_path / "ours"
    quantize(fused, out, bits=4)
    assert "sanitize() computes model.norm.weight" in capsys.readouterr().err
    assert_same_model(out, ref)
    with pytest.raises(QtoolsError, match="compensated cannot run on this model"):
        quantize(fused, tmp_path / "c", bits=4, recipe="compensated", rank=1)
    _no_output(tmp_path / "c")


def _same_weights(a, b):
    wa = {k: v for f in sorted(a.glob("*.safetensors")) for k, v in mx.load(str(f)).items()}
    wb = {k: v for f in sorted(b.glob("*.safetensors")) for k, v in mx.load(str(f)).items()}
    assert sorted(wa) == sorted(wb)
    for k in wa:
        assert wa[k].dtype == wb[k].dtype and mx.array_equal(wa[k], wb[k]).item(), k


@pytest.mark.parametrize("which", ["trio", "moe"])
@pytest.mark.parametrize("recipe", ["uniform", "survival", "mxfp4"])
def test_quantize_from_base_and_adapter_equals_quantizing_the_fused_model(which, recipe, trio, moe, tmp_path):
    """`qtools quantize --base B --adapter A` fuses each tensor on the fly: the same model as
    quantizing what `qtools fuse` writes, with no fused model on disk."""
    base, adapter, fused = trio if which == "trio" else moe
    ref, new = tmp_path / "ref", tmp_path / "new"
    assert run("quantize", fused, "--bits", 4, "--recipe", recipe, "-o", ref).exit_code == 0
    r = run("quantize", "--base", base, "--adapter", adapter, "--bits", 4, "--recipe", recipe, "-o", new)
    assert r.exit_code == 0, r.output
    assert "(fused on the fly)" in r.output
    _same_weights(ref, new)
    cfg_ref, cfg_new = (json.loads((d / "config.json").read_text()) for d in (ref, new))
    assert cfg_ref["quantization"] == cfg_new["quantization"]
    prov = json.loads((new / "qtools_provenance.json").read_text())
    assert prov["adapter"] == str(Path(adapter).resolve()) and prov["base"] == str(Path(base).resolve())
    assert prov["quantized_from"] == "base + adapter, fused on the fly"


def test_quantize_without_model_needs_base_and_adapter_and_a_streamed_recipe(trio, tmp_path):
    base, adapter, _ = trio
    r = run("quantize", "--base", base, "--bits", 4, "-o", tmp_path / "q")
    assert r.exit_code == 2 and "give MODEL, or --base and --adapter" in r.output
    r = run("quantize", "--base", base, "--adapter", adapter, "--recipe", "gptq", "--bits", 4, "-o", tmp_path / "q")
    assert r.exit_code == 1 and r.output.startswith("Error: recipe gptq needs the fused model on disk")
    assert not (tmp_path / "q").exists()
    r = run("quantize", "--base", base, "--adapter", adapter, "--bits", 4, "-o", base / "q", "--force")
    assert r.exit_code == 1 and "Error:" in r.output and not (base / "q").exists()
