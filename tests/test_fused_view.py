"""The streamed fuse and FusedView against the fuse as it was (tests/old_fuse.py: the whole base
loaded by mlx-lm, saved by mlx-lm's save): the same files, tensors bit for bit, on a float16 and a
bfloat16 base, a DoRA adapter, a 4-bit base, sharded output and a Hub-layout qwen3_moe with its
experts and router adapted; delta-survival from base + adapter equals the report on the fused model."""

import functools
import json

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner
from old_fuse import old_fuse

from qtools.cli import cli
from qtools.compat import mlx_blas_is_reference as blas_is_reference
from qtools.demo.model import make_tiny_adapter, make_tiny_model
from qtools.io.weights import SafetensorsModel
from qtools.pipeline.fuse import fuse

Q = "model.layers.1.self_attn.q_proj"


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def assert_same_model_dir(old, new):
    """Same files; every file but the provenance byte for byte (index and config included); the
    provenance equal but for its timestamp; every tensor in the same shard with the same dtype,
    shape and bytes."""
    files = sorted(p.name for p in old.iterdir())
    assert files == sorted(p.name for p in new.iterdir())
    for f in files:
        if f == "qtools_provenance.json":
            a, b = (json.loads((d / f).read_text()) for d in (old, new))
            a.pop("created"), b.pop("created")
            assert a == b
        elif not f.endswith(".safetensors"):
            assert (old / f).read_bytes() == (new / f).read_bytes(), f
    a, b = SafetensorsModel(old), SafetensorsModel(new)
    assert sorted(a.tensors) == sorted(b.tensors)
    for name, ia in a.tensors.items():
        ib = b.info(name)
        assert (ia.dtype, ia.shape, ia.file.name) == (ib.dtype, ib.shape, ib.file.name), name
        assert np.array_equal(a.raw(name), b.raw(name)), name
    meta = json.loads(new.joinpath("model.safetensors.index.json").read_text())["weight_map"]
    for fname in set(meta.values()):
        # MLX's own reader reads what we wrote, with mlx-lm's metadata
        assert mx.load(str(new / fname), return_metadata=True)[1] == {"format": "mlx"}
    a.close(), b.close()


@pytest.fixture
def native(monkeypatch):
    """The tensors the native kernel fused (io.fused.fuse_native calls): on Linux's CPU backend every
    plain-LoRA weight on a float base takes it, and must still match the old fuse bit for bit."""
    import qtools.io.fused as fused

    calls = []
    real = fused.fuse_native

    def counted(w, w_dtype, sb, *rest, **kw):
        if sb.shape[-1]:  # a LoRA delta, not the astype (rank 0) of an untouched tensor
            calls.append(w.shape)
        return real(w, w_dtype, sb, *rest, **kw)

    monkeypatch.setattr(fused, "fuse_native", counted)
    return calls


def lora_layers(adapter):
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    with SafetensorsModel.from_file(adapter / "adapters.safetensors") as st:
        return len([n for n in st.names() if n.endswith("lora_a")]) if cfg.get("fine_tune_type", "lora") == "lora" else 0


def both(base, adapter, tmp_path, dtype="float16", **kw):
    old, new = tmp_path / "old", tmp_path / "new"
    old_fuse(base, adapter, old, dtype=dtype)
    fuse(base, adapter, new, dtype=dtype, **kw)
    return old, new


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_streamed_fuse_is_bit_identical_to_the_old_fuse(base, adapter, tmp_path, dtype, native):
    assert_same_model_dir(*both(base, adapter, tmp_path, dtype))
    assert lora_layers(adapter) > 0
    assert len(native) == (lora_layers(adapter) if blas_is_reference() else 0)


def test_bf16_base_with_lora_on_every_projection(tmp_path, native):
    b = make_tiny_model(tmp_path / "bf16", dtype="bfloat16", num_layers=3)
    ad = make_tiny_adapter(b, tmp_path / "ad", keys=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                                     "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj",
                                                     "mlp.down_proj"), num_layers=2)
    assert_same_model_dir(*both(b, ad, tmp_path / "out"))
    assert len(native) == (14 if blas_is_reference() else 0)


def test_dora(base, tmp_path, native):
    ad = make_tiny_adapter(base, tmp_path / "dora", dora=True, scale=2.0)
    assert_same_model_dir(*both(base, ad, tmp_path / "out"))
    assert native == []  # DoRA keeps MLX's graph


def test_quantized_base_is_dequantized_as_before(base, adapter, tmp_path, native):
    q4 = tmp_path / "q4"
    assert run("quantize", base, "--bits", 4, "--output", q4).exit_code == 0
    old, new = both(q4, adapter, tmp_path / "out")
    assert_same_model_dir(old, new)
    assert native == []  # a quantized base keeps MLX's graph
    assert "quantization" not in json.loads((new / "config.json").read_text())


def test_shards_are_mlx_lms(base, adapter, tmp_path, monkeypatch, native):
    """With mlx-lm's make_shards at 0 GB (a shard per tensor), both write the same shards and index."""
    import mlx_lm.utils

    monkeypatch.setattr(mlx_lm.utils, "make_shards", functools.partial(mlx_lm.utils.make_shards, max_file_size_gb=0))
    old, new = both(base, adapter, tmp_path, max_shard_bytes=0)
    assert len(list(new.glob("model-*-of-*.safetensors"))) > 10
    assert_same_model_dir(old, new)
    assert len(native) == (lora_layers(adapter) if blas_is_reference() else 0)


@pytest.fixture(scope="module")
def moe(tmp_path_factory):
    from test_hub_models import hub_moe

    return hub_moe(tmp_path_factory.mktemp("moe"), fused=False)


def test_hub_moe_with_experts_and_router_adapted(moe, tmp_path, native):
    """Hub layout in, mlx-lm's out: experts stacked by mlx-lm's sanitize, the tied lm_head absent."""
    old, new = both(*moe, tmp_path)
    assert_same_model_dir(old, new)
    # natively: attention, router, and the experts one by one from the Hub files' maps
    assert (len(native) > lora_layers(moe[1])) == blas_is_reference()
    with SafetensorsModel(new) as st:
        assert "model.layers.0.mlp.switch_mlp.gate_proj.weight" in st and "lm_head.weight" not in st


def test_fuse_never_holds_the_whole_model(tmp_path):
    """MLX's peak memory during the fuse stays well under the base's size (the old fuse loaded it all)."""
    b = make_tiny_model(tmp_path / "b", num_layers=12, hidden_size=128)
    ad = make_tiny_adapter(b, tmp_path / "ad", keys=("self_attn.q_proj", "mlp.down_proj"))
    size = sum(p.stat().st_size for p in b.glob("*.safetensors"))
    mx.reset_peak_memory()
    fuse(b, ad, tmp_path / "fused")
    assert mx.get_peak_memory() < 0.25 * size


@pytest.mark.parametrize("exc, message", [
    (KeyboardInterrupt(), "Error: interrupted"),
    (RuntimeError("[load] Failed to read 4096 bytes"), "cannot read or fuse tensor"),
])
def test_fuse_interrupted_or_failing_mid_stream_leaves_nothing(base, adapter, tmp_path, monkeypatch, exc, message):
    """Ctrl-C (or a base file going bad) after some tensors were written: no output, no temporary
    directory, not even the parent directory the fuse made."""
    import mlx.core as mx

    evaluated = []
    real_eval = mx.eval

    def eval_then_fail(*args):
        if args[0].dtype != mx.uint16:  # a fused tensor, not as_numpy's zero-copy view of one
            evaluated.append(1)
            if len(evaluated) > 3:
                raise exc
        return real_eval(*args)

    monkeypatch.setattr(mx, "eval", eval_then_fail)
    out = tmp_path / "models" / "fused"
    r = run("fuse", base, "--adapter", adapter, "--output", out)
    assert r.exit_code == 1 and message in r.output and "Traceback" not in r.output, r.output
    assert len(r.output.strip().splitlines()) == 1
    assert not out.exists() and not out.parent.exists()


def test_fused_view_api(base, adapter, tmp_path):
    from qtools.io.fused import FusedView

    out = tmp_path / "fused"
    fuse(base, adapter, out)
    with SafetensorsModel(out) as st, FusedView(base, adapter) as view:
        assert sorted(view.names()) == sorted(st.names())
        assert view.info(f"{Q}.weight").dtype == "F16" and view.quantization is None
        assert np.array_equal(view.raw(f"{Q}.weight"), st.raw(f"{Q}.weight"))
        assert mx.array_equal(view.array(f"{Q}.weight"), mx.load(str(out / "model.safetensors"))[f"{Q}.weight"]).item()
        view.release(f"{Q}.weight")
        r = run_error(lambda: view.array(f"{Q}.weight"))
        assert "was already read and released" in r
        rest = dict(view.items())
        assert set(rest) == set(st.names()) - {f"{Q}.weight"}


@pytest.mark.skipif(not blas_is_reference(), reason="the native fuse is MLX's bits only beside a reference BLAS")
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_native_fuse_equals_mlx_graph_tensor_by_tensor(base, adapter, dtype, monkeypatch):
    """FusedView with and without the native kernel: the same tensors, through raw(), array() and items()
    (a converted tensor in parts of a few rows)."""
    import qtools.io.fused
    from qtools.io.fused import FusedView

    monkeypatch.setattr(qtools.io.fused, "NATIVE_PART_BYTES", 1000)
    with FusedView(base, adapter, dtype, native=False) as graph, FusedView(base, adapter, dtype, native=True) as fast:
        assert fast.native_tensors == 0
        # the float16 base's other tensors are their memory maps in float16, else converted natively
        assert bool(fast._stored) == (dtype == "float16") != bool(fast._convert)
        assert not graph._stored and not graph._convert
        names = graph.names()
        assert mx.array_equal(fast.array(f"{Q}.weight"), graph.array(f"{Q}.weight")).item()
        assert fast.array(f"{Q}.weight").dtype == getattr(mx, dtype)
        for name, arr in fast.items():
            assert np.array_equal(np.array(arr.view(mx.uint16) if arr.dtype != mx.float32 else arr), graph.raw(name)), name
        assert fast.native_tensors == lora_layers(adapter) and graph.native_tensors == 0
        assert names == fast.names()


@pytest.mark.skipif(not blas_is_reference(), reason="the native fuse is MLX's bits only beside a reference BLAS")
def test_native_fuse_reads_no_tensor_that_sanitize_changed_from_the_file(base, adapter, monkeypatch):
    """A tensor mlx-lm's sanitize rewrites under its own name is not the file's: the native fuse takes
    MLX's value of it (a LoRA weight and an untouched norm here), never the memory map."""
    import mlx_lm.models.qwen3 as qwen3

    from qtools.io.fused import FusedView

    changed = (f"{Q}.weight", "model.layers.1.input_layernorm.weight")
    own = qwen3.Model.sanitize

    def sanitize(self, weights):
        weights = own(self, weights)
        for k in changed:
            weights[k] = weights[k] * 2
        return weights

    monkeypatch.setattr(qwen3.Model, "sanitize", sanitize)
    with FusedView(base, adapter, native=False) as graph, FusedView(base, adapter, native=True) as fast:
        assert changed[1] not in fast._stored and changed[1] not in fast._convert
        for name in changed:
            assert np.array_equal(fast.raw(name), graph.raw(name)), name
        assert fast.native_tensors == 1  # the LoRA weight, from MLX's value of the base


@pytest.mark.skipif(not blas_is_reference(), reason="the native fuse is MLX's bits only beside a reference BLAS")
def test_native_fuse_of_hub_experts_reads_them_stacked_from_their_maps(moe):
    """A Hub checkpoint's experts, stacked by mlx-lm's sanitize, are fused one by one from the base's
    memory maps (SafetensorsModel's stack_experts order), not read and stacked through MLX."""
    from qtools.io.fused import FusedView

    name = "model.layers.0.mlp.switch_mlp.gate_proj.weight"
    with FusedView(*moe, native=False) as graph, FusedView(*moe, native=True) as fast:
        assert np.array_equal(fast.raw(name), graph.raw(name))
        assert fast.native_tensors == 1 and fast._hub and fast._hub.is_stack(name)


def run_error(fn):
    from qtools import QtoolsError

    with pytest.raises(QtoolsError) as e:
        fn()
    return str(e.value)


def test_fused_view_refuses_a_mismatched_adapter(adapter, tmp_path):
    from qtools.io.fused import FusedView

    other = make_tiny_model(tmp_path / "other", hidden_size=32)
    msg = run_error(lambda: FusedView(other, adapter))
    assert msg.startswith(f"adapter {adapter} does not match base model {other}: ")


# ------------------------------------------------------------------ delta-survival from base + adapter

def report(*args):
    # one thread: the kernel's threaded subspace sums vary in their last bits from run to run
    r = run("delta-survival", *args, "--bits", 4, 5, 6, "--json", "--threads", 1)
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    rep.pop("elapsed_s")
    return rep.pop("model"), rep


def assert_same_report(base, adapter, fused_args):
    where, unfused = report("--base", base, "--adapter", adapter)
    _, on_disk = report(*fused_args)
    assert unfused == on_disk
    assert str(base) in where and str(adapter) in where


def test_delta_survival_without_a_fused_model(base, adapter, tmp_path):
    fused = tmp_path / "fused"
    fuse(base, adapter, fused)
    assert_same_report(base, adapter, [fused, "--adapter", adapter])


def test_delta_survival_without_a_fused_model_dora(base, tmp_path):
    ad = make_tiny_adapter(base, tmp_path / "dora", dora=True, scale=2.0)
    fused = tmp_path / "fused"
    fuse(base, ad, fused)
    assert_same_report(base, ad, [fused, "--adapter", ad, "--base", base])


def test_delta_survival_without_a_fused_model_hub_moe(moe, tmp_path):
    base, ad = moe
    fused = tmp_path / "fused"
    fuse(base, ad, fused)
    assert_same_report(base, ad, [fused, "--adapter", ad])


@pytest.mark.parametrize("given", [[], ["--adapter"], ["--base"]])
def test_delta_survival_without_model_needs_base_and_adapter(base, adapter, given):
    args = [a for g in given for a in (g, base if g == "--base" else adapter)]
    r = run("delta-survival", *args)
    assert r.exit_code == 2
    assert r.output.strip().splitlines()[-1] == (
        "Error: give MODEL (a fused model directory), or both --base and --adapter (fused on the fly, nothing written)")


def test_delta_survival_without_model_bad_input_is_one_line(base, adapter, tmp_path):
    other = make_tiny_model(tmp_path / "other", hidden_size=32)
    for args, start in [
        (["--base", other, "--adapter", adapter], f"Error: adapter {adapter} does not match base model {other}: "),
        (["--base", tmp_path / "nope", "--adapter", adapter], f"Error: base model {tmp_path / 'nope'} does not exist"),
        (["--base", base, "--adapter", tmp_path], f"Error: adapter {tmp_path} has no adapter_config.json"),
    ]:
        r = run("delta-survival", *args)
        assert r.exit_code == 1 and r.output.startswith(start), r.output
        assert len(r.output.strip().splitlines()) == 1 and "Traceback" not in r.output
