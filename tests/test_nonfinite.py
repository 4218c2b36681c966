"""NaN/Inf weights: quantize and fuse refuse them, naming the tensor, before anything is written;
a real float16 overflow of the fused weights is told apart from an input that was already broken."""

import shutil

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner

from qtools import QtoolsError
from qtools.cli import cli
from qtools.demo.model import make_tiny_adapter, make_tiny_model
from qtools.io.atomic import TMP_PREFIX
from qtools.io.weights import SafetensorsModel

DOWN = "model.layers.1.mlp.down_proj.weight"
Q = "model.layers.1.self_attn.q_proj"


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def poisoned_copy(src, dst, name, value, index=(3, 5), file="model.safetensors", dtype=None):
    """A copy of a model (or adapter) directory with one element of one tensor set to `value`."""
    shutil.copytree(src, dst)
    w = mx.load(str(dst / file))
    a = np.array(w[name].astype(mx.float32))
    a[index] = value
    w[name] = mx.array(a).astype(dtype or w[name].dtype)
    mx.save_safetensors(str(dst / file), w, metadata={"format": "mlx"})
    return dst


def _no_output(out):
    assert not out.exists()
    assert [p for p in out.parent.iterdir() if p.name.startswith(TMP_PREFIX)] == []


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
@pytest.mark.parametrize("value, what", [(np.nan, "NaN"), (np.inf, "Inf"), (-np.inf, "Inf")])
def test_quantize_refuses_nonfinite_weights(tmp_path, dtype, value, what):
    model = make_tiny_model(tmp_path / "m", dtype=dtype)
    bad = poisoned_copy(model, tmp_path / "bad", DOWN, value)
    out = tmp_path / "out" / "q4"
    r = run("quantize", bad, "--bits", 4, "--output", out)
    assert (r.exit_code, r.output.strip()) == (1, (
        f"Error: model {bad}: tensor '{DOWN}' (model.safetensors) has 1 NaN or Inf value(s) of 16384: "
        "quantizing would spread it over its whole group; fix the model that wrote it"))
    assert not out.exists() and not out.parent.exists()  # refused before anything was created


def test_quantize_survival_recipe_refuses_nonfinite_weights_too(base, adapter, tmp_path):
    fused = tmp_path / "fused"
    assert run("fuse", base, "--adapter", adapter, "--output", fused).exit_code == 0
    bad = poisoned_copy(fused, tmp_path / "bad", DOWN, np.nan)
    out = tmp_path / "q"
    r = run("quantize", bad, "--bits", 4, "--recipe", "survival", "--output", out)
    assert r.exit_code == 1 and r.output.startswith(f"Error: model {bad}: tensor '{DOWN}' (model.safetensors) has 1 NaN")
    assert not out.exists()


def test_fuse_base_with_nan_names_the_input_tensor_not_an_overflow(base, adapter, tmp_path):
    bad = poisoned_copy(base, tmp_path / "bad", f"{Q}.weight", np.nan)
    out = tmp_path / "out" / "fused"
    r = run("fuse", bad, "--adapter", adapter, "--output", out)
    assert (r.exit_code, r.output.strip()) == (1, (
        f"Error: base model {bad}: tensor '{Q}.weight' (model.safetensors) has 1 NaN or Inf value(s) of 4096: "
        "the input is already broken, not an overflow of the fused weights; fix the model that wrote it"))
    assert not out.exists() and not out.parent.exists()


def test_fuse_adapter_with_inf_names_the_adapter_tensor(base, adapter, tmp_path):
    bad = poisoned_copy(adapter, tmp_path / "bad_ad", f"{Q}.lora_b", np.inf, index=(0, 1),
                        file="adapters.safetensors")
    out = tmp_path / "fused"
    r = run("fuse", base, "--adapter", bad, "--output", out)
    assert r.exit_code == 1
    assert r.output.strip() == (
        f"Error: adapter {bad}: tensor '{Q}.lora_b' (adapters.safetensors) has 1 NaN or Inf value(s) of 256: "
        "the input is already broken, not an overflow of the fused weights; fix the model that wrote it")
    assert not out.exists()


def test_fuse_real_float16_overflow_still_advises_another_dtype(tmp_path):
    # 70000 is a finite bfloat16 but above float16's largest (65504): the output, not the input, overflows.
    base = make_tiny_model(tmp_path / "bf16", dtype="bfloat16")
    big = poisoned_copy(base, tmp_path / "big", f"{Q}.weight", 70000.0)
    ad = make_tiny_adapter(big, tmp_path / "ad")
    r = run("fuse", big, "--adapter", ad, "--output", tmp_path / "fused")
    assert r.exit_code == 1
    assert r.output.strip() == f"Error: fused weights overflow float16 in {Q}.weight; use --dtype float32 or bfloat16"
    assert not (tmp_path / "fused").exists()
    r = run("fuse", big, "--adapter", ad, "--output", tmp_path / "fused32", "--dtype", "float32")
    assert r.exit_code == 0, r.output


@pytest.mark.parametrize("dtype, code", [("float16", "F16"), ("bfloat16", "BF16"), ("float32", "F32")])
def test_check_finite_counts_across_chunks(tmp_path, dtype, code):
    from qtools.io.weights import check_finite

    n = 1000
    vals = np.linspace(-1, 1, n).astype(np.float32)
    vals[0] = 6e-8 if dtype == "float16" else 1e-39  # subnormals are finite
    vals[1] = 60000.0  # large but finite in all three
    good = {"w": mx.array(vals).astype(getattr(mx, dtype)), "ids": mx.arange(10, dtype=mx.uint32)}
    mx.save_safetensors(str(tmp_path / "good.safetensors"), good)
    st = SafetensorsModel.from_file(tmp_path / "good.safetensors")
    assert st.info("w").dtype == code
    check_finite(st, "model x", chunk=64)  # no error
    bad_vals = vals.copy()
    bad_vals[[63, 64, n - 1]] = [np.nan, np.inf, -np.inf]  # a chunk's last, the next one's first, the very last
    mx.save_safetensors(str(tmp_path / "bad.safetensors"), {"w": mx.array(bad_vals).astype(getattr(mx, dtype))})
    st = SafetensorsModel.from_file(tmp_path / "bad.safetensors")
    with pytest.raises(QtoolsError, match=r"^model x: tensor 'w' \(bad.safetensors\) has 3 NaN or Inf value\(s\) of 1000"):
        check_finite(st, "model x", chunk=64)
