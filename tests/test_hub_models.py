"""Models as users have them, built here: Hugging Face Hub layout (bfloat16, 3 shards with an
index, MoE experts un-stacked), adapters made with mlx-lm's own tuner on some layers only
(LoRA and DoRA), fused by `qtools fuse`; then delta-survival in all three modes and quantize."""

import json
import sys

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner
from mlx.utils import tree_flatten

from qtools.cli import cli
from qtools.demo.model import build_model, qwen3_config, qwen3_moe_config, save_model_dir
from qtools.demo.tokenizer import build_tokenizer

BITS = ("2", "3", "4", "5", "6", "8")


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def survival(*args):
    res = run("delta-survival", *args, "--json")
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)


def moe_config(vocab, eos, layers=2, experts=4):
    return qwen3_moe_config(64, layers, vocab, eos, num_experts=experts, num_experts_per_tok=2,
                            moe_intermediate_size=64, intermediate_size=128)


def save_hub(path, config, seed, shards=3):
    """A random-init mlx-lm model written as the Hub ships it: bfloat16, sharded with
    model.safetensors.index.json, experts un-stacked (mlx-lm's sanitize() stacks them on load)."""
    mx.random.seed(seed)
    path.mkdir(parents=True)
    save_model_dir(build_model(config), config, build_tokenizer(), path, dtype=config["torch_dtype"], layout="hub",
                   shards=shards)
    return path


def make_adapter(base, path, num_layers, seed, keys=None, dora=False, rank=4, scale=4.0, b_std=0.1):
    """An adapter as `mlx_lm lora` leaves it: the model frozen, linear_to_lora_layers on the last
    num_layers layers, non-zero lora_b (and, for DoRA, magnitudes off the weight norms), the
    trainable parameters saved as adapters.safetensors beside adapter_config.json."""
    from mlx_lm import load
    from mlx_lm.tuner.utils import linear_to_lora_layers

    model, _ = load(str(base))
    model.freeze()
    params = {"rank": rank, "scale": scale, "dropout": 0.0}
    if keys:
        params["keys"] = list(keys)
    linear_to_lora_layers(model, num_layers, params, use_dora=dora)
    rng = np.random.default_rng(seed)
    for _, m in model.named_modules():
        if hasattr(m, "lora_b"):
            m.lora_b = mx.array(rng.normal(0.0, b_std, size=m.lora_b.shape).astype(np.float32))
            if dora:
                m.m = m.m * mx.array(rng.uniform(0.97, 1.03, size=m.m.shape).astype(np.float32))
    path.mkdir(parents=True)
    mx.save_safetensors(str(path / "adapters.safetensors"), dict(tree_flatten(model.trainable_parameters())))
    cfg = {"model": str(base), "fine_tune_type": "dora" if dora else "lora", "num_layers": num_layers,
           "lora_parameters": params}
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    return path


def fuse(base, adapter, out):
    res = run("fuse", base, "--adapter", adapter, "--output", out)
    assert res.exit_code == 0, res.output
    return out


MOE_KEYS = ["self_attn.q_proj", "self_attn.v_proj", "mlp.gate",
            "mlp.switch_mlp.gate_proj", "mlp.switch_mlp.up_proj", "mlp.switch_mlp.down_proj"]


def hub_moe(root, keys=MOE_KEYS, fused=True):
    """Qwen3-MoE (4 experts, top-2) in Hub layout (bfloat16, shards, experts un-stacked), a LoRA
    adapter on `keys` (attention, router, experts by default) and, if `fused`, qtools fuse's model."""
    tok = build_tokenizer()
    base = save_hub(root / "base", moe_config(tok.get_vocab_size(), tok.token_to_id("<|im_end|>")), seed=0)
    adapter = make_adapter(base, root / "adapter", num_layers=2, seed=1, keys=list(keys))
    return (base, adapter, fuse(base, adapter, root / "fused")) if fused else (base, adapter)


@pytest.fixture(scope="module")
def moe(tmp_path_factory):
    """Qwen3-MoE (4 experts, top-2) in Hub layout; LoRA on attention, router and experts."""
    return hub_moe(tmp_path_factory.mktemp("moe"))


def dense_config():
    tok = build_tokenizer()
    cfg = qwen3_config(64, 4, tok.get_vocab_size(), tok.token_to_id("<|im_end|>"), head_dim=32, dtype="bfloat16")
    return cfg


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    """Dense Qwen3 in bfloat16, 4 layers, 3 shards; LoRA on the last 2 layers (mlx-lm's num_layers)."""
    root = tmp_path_factory.mktemp("dense")
    base = save_hub(root / "base", dense_config(), seed=2)
    adapter = make_adapter(base, root / "adapter", num_layers=2, seed=3)
    return base, adapter, fuse(base, adapter, root / "fused")


@pytest.fixture(scope="module")
def dora(tmp_path_factory):
    """The same kind of bf16 base with a DoRA adapter on its last 2 layers."""
    root = tmp_path_factory.mktemp("dora")
    base = save_hub(root / "base", dense_config(), seed=4)
    adapter = make_adapter(base, root / "adapter", num_layers=2, seed=5, dora=True,
                           keys=["self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj"])
    return base, adapter, fuse(base, adapter, root / "fused")


def three_modes(base, adapter, fused):
    return {"adapter": survival(fused, "--adapter", adapter),
            "base": survival(fused, "--base", base),
            "provenance": survival(fused)}


# 1. A Hub-format MoE base (experts un-stacked) is the same model as the fused, stacked one.
def test_hub_moe_base_matches_stacked_experts(moe):
    base, adapter, fused = moe
    reps = three_modes(base, adapter, fused)
    name = "model.layers.0.mlp.switch_mlp.down_proj.weight"
    by_mode = {m: next(t for t in r["tensors"] if t["name"] == name)["by_bits"]["4"] for m, r in reps.items()}
    # expert E of the base is slice E of the stacked tensor: the delta is the adapter's, not a mismatch
    assert by_mode["base"]["delta_rms"] == pytest.approx(by_mode["adapter"]["delta_rms"], rel=0.02)
    assert by_mode["base"]["delta_retention"] == pytest.approx(by_mode["adapter"]["delta_retention"], abs=0.02)
    preds = {m: r["predicted_min_bits"] for m, r in reps.items()}
    assert len(set(preds.values())) == 1 and preds["adapter"] is not None, preds


def test_hub_moe_base_mismatched_expert_count_is_refused(moe, tmp_path):
    base, _, fused = moe
    cfg = json.loads((base / "config.json").read_text())
    other = save_hub(tmp_path / "other", {**cfg, "num_experts": 8}, seed=0)
    res = run("delta-survival", fused, "--base", other)
    assert res.exit_code == 1 and "Error:" in res.output and "Traceback" not in res.output
    assert "but base shape" in res.output and "experts" not in res.output.split("Error:")[0]


def test_survival_recipe_on_hub_moe(moe, tmp_path):
    _, _, fused = moe
    out = tmp_path / "q"
    res = run("quantize", fused, "--output", out, "--bits", 2, "--recipe", "survival")
    assert res.exit_code == 0, res.output


# 2. bf16 base, adapter on some layers: untouched layers are unchanged, not rounded away.
def test_partial_layer_adapter_same_prediction_in_all_modes(dense):
    base, adapter, fused = dense
    reps = three_modes(base, adapter, fused)
    preds = {m: r["predicted_min_bits"] for m, r in reps.items()}
    assert len(set(preds.values())) == 1 and preds["adapter"] is not None, preds
    unchanged = reps["base"]["unchanged"]["tensors"]
    # layers 0 and 1 were not adapted: excluded from the delta statistics, with the reason
    assert any(".layers.0." in n for n in unchanged) and any(".layers.1." in n for n in unchanged)
    assert not any(".layers.3." in n and "q_proj" in n for n in unchanged)
    assert reps["base"]["unchanged"]["criterion"]
    assert reps["base"]["delta_source"]["delta_from"] == "base"
    assert reps["provenance"]["delta_source"]["delta_from"] == "adapter"  # the recorded adapter is preferred
    assert reps["provenance"]["delta_source"]["recorded"] is True
    layers = {L["layer"]: L for L in reps["base"]["layers"]}
    assert "delta_retention" not in layers[0]["by_bits"]["4"]
    human = run("delta-survival", fused)
    assert human.exit_code == 0 and "delta from: adapter" in human.output and "provenance" in human.output


def test_partial_layer_survival_recipe_keeps_untouched_layers(dense, tmp_path):
    base, _, fused = dense
    out = tmp_path / "q"
    res = run("quantize", fused, "--output", out, "--bits", 3, "--recipe", "survival")
    assert res.exit_code == 0, res.output
    q = json.loads((out / "config.json").read_text())["quantization"]
    raised = {k: v["bits"] for k, v in q.items() if isinstance(v, dict)}
    assert not any(".layers.0." in k or ".layers.1." in k for k in raised), raised


def test_dora_on_some_layers_in_all_modes(dora):
    reps = three_modes(*dora)
    preds = {m: r["predicted_min_bits"] for m, r in reps.items()}
    assert len(set(preds.values())) == 1 and preds["adapter"] is not None, preds


# 3. The MoE router stays where mlx-lm's own predicate puts it (8 bits for qwen3_moe).
def test_router_is_its_own_kind_judged_at_its_real_bits(moe):
    _, adapter, fused = moe
    rep = survival(fused, "--adapter", adapter, "--bits", 2, 3, 4)
    router = next(t for t in rep["tensors"] if t["name"] == "model.layers.0.mlp.gate.weight")
    assert router["kind"] == "router" and "router" in rep["by_kind"]
    assert router["effective_bits"] == {"2": 8, "3": 8, "4": 8}
    eight = survival(fused, "--adapter", adapter, "--bits", 8)
    r8 = next(t for t in eight["tensors"] if t["name"] == router["name"])["by_bits"]["8"]
    assert router["by_bits"]["2"]["delta_retention"] == pytest.approx(r8["delta_retention"])
    gate_proj = next(t for t in rep["tensors"] if t["name"] == "model.layers.0.mlp.switch_mlp.gate_proj.weight")
    assert gate_proj["kind"] == "gate" and "effective_bits" not in gate_proj


@pytest.mark.parametrize("recipe", ["survival", "mixed_3_6", "uniform"])
def test_quantize_keeps_the_models_own_router_bits(moe, tmp_path, recipe):
    _, _, fused = moe
    out = tmp_path / recipe
    res = run("quantize", fused, "--output", out, "--bits", 2, "--recipe", recipe)
    assert res.exit_code == 0, res.output
    q = json.loads((out / "config.json").read_text())["quantization"]
    for layer in (0, 1):
        assert q[f"model.layers.{layer}.mlp.gate"]["bits"] == 8, q


def test_explicit_layer_bits_cannot_lower_the_router(moe):
    from mlx_lm import load

    from qtools.pipeline.quantize import make_predicate

    _, _, fused = moe
    net, _ = load(str(fused), lazy=True)
    pred = make_predicate(net, 2, 64, "uniform", {"model.layers.0.mlp.gate": 3, "model.layers.0.self_attn.q_proj": 4})
    mods = dict(net.named_modules())
    assert pred("model.layers.0.mlp.gate", mods["model.layers.0.mlp.gate"])["bits"] == 8
    assert pred("model.layers.0.self_attn.q_proj", mods["model.layers.0.self_attn.q_proj"])["bits"] == 4
    assert pred("model.layers.1.mlp.gate", mods["model.layers.1.mlp.gate"])["bits"] == 8  # the model's own
    assert pred("model.layers.1.self_attn.q_proj", mods["model.layers.1.self_attn.q_proj"]) is True
    keep_float = make_predicate(net, 2, 64, "uniform", {"model.layers.0.mlp.gate": 0})
    assert keep_float("model.layers.0.mlp.gate", mods["model.layers.0.mlp.gate"]) is False  # more precision: allowed


# 7. Silent gaps are said.
def test_base_only_says_why_subspace_snr_is_missing(dense):
    base, _, fused = dense
    res = run("delta-survival", fused, "--base", base, "--bits", 4)
    assert res.exit_code == 0, res.output
    lines = [line for line in res.output.splitlines() if "subspace SNR" in line and "adapter" in line]
    assert len(lines) == 1, res.output
    rep = survival(fused, "--base", base, "--bits", 4)
    assert any("subspace_snr" in n for n in rep["notes"])


def test_cpu_backend_note_on_linux(monkeypatch, capsys):
    from qtools.pipeline import backend

    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setattr(backend, "_on_cpu", lambda: True)
    backend.cpu_backend_note({"quantization": {"bits": 4, "group_size": 64}})
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "quantized" in err[0] and "CPU" in err[0]
    backend.cpu_backend_note({"model_type": "qwen3_moe", "num_experts": 4})
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "float32" in err[0] and "GatherMM" in err[0]
    backend.cpu_backend_note({"model_type": "qwen3"})  # dense float16: nothing to say
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(sys, "platform", "darwin")
    backend.cpu_backend_note({"quantization": {"bits": 4}})
    assert capsys.readouterr().err == ""


def test_validate_runs_a_float16_moe_on_the_cpu_and_says_what_it_costs(moe, tmp_path, monkeypatch):
    """MLX's CPU GatherMM takes float32 only: a float16 MoE failed in generation with a traceback."""
    from qtools.pipeline import backend

    _, _, fused = moe
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setattr(backend, "_on_cpu", lambda: True)
    suite = tmp_path / "s.jsonl"
    suite.write_text(json.dumps({"id": "a", "category": "c", "prompt": "hi", "expect": {"type": "direct"}}) + "\n")
    res = run("validate", fused, "--suite", suite, "--max-tokens", 2, "--output", tmp_path / "log.json", "--json")
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    assert res.exit_code in (0, 1)
    notes = [line for line in res.stderr.splitlines() if "GatherMM" in line]
    assert len(notes) == 1 and "CPU" in notes[0]
    log = json.loads((tmp_path / "log.json").read_text())
    assert log["bits_per_weight"] == pytest.approx(16.0, abs=0.1)  # the weights stay float16


@pytest.mark.parametrize("src,dst", [("bfloat16", "float16"), ("float32", "bfloat16"), ("float32", "float16"),
                                     ("float16", "bfloat16")])
def test_unchanged_means_only_the_dtype_rounding_differs(src, dst):
    """The criterion's rounding is MLX's astype, subnormals included; one changed element counts."""
    from qtools.survival.analyze import unchanged_by_fine_tune

    rng = np.random.default_rng(0)
    x = mx.array((rng.standard_normal(4096) * np.repeat([0.02, 1e-5, 1e-7, 3e-8], 1024)).astype(np.float32))
    w0 = x.astype(getattr(mx, src))
    w1 = w0.astype(getattr(mx, dst))
    raw = lambda a: np.array(a.view(mx.uint16) if a.dtype != mx.float32 else a)  # noqa: E731
    assert unchanged_by_fine_tune(raw(w1), dst, raw(w0), src, chunk=1000)
    bumped = np.array(raw(w1))
    bumped[4000] ^= 1
    assert not unchanged_by_fine_tune(bumped, dst, raw(w0), src, chunk=1000)


def test_hub_layout_on_both_sides_still_matches(moe, tmp_path):
    """A fused model in Hub layout (experts un-stacked, e.g. a full fine-tune saved by transformers)
    against a Hub base: expert by expert, as before."""
    base, _, _ = moe
    cfg = json.loads((base / "config.json").read_text())
    other = save_hub(tmp_path / "tuned", cfg, seed=7)
    rep = survival(other, "--base", base, "--bits", 4, 8)
    assert "model.layers.0.mlp.experts.3.down_proj.weight" in {t["name"] for t in rep["tensors"]}


def test_adapter_recipe_on_a_hub_moe_base(moe, tmp_path):
    """The unfused-adapter recipe matches the adapter's stacked switch_mlp names to a Hub base."""
    base, adapter, fused = moe
    out = tmp_path / "q"
    res = run("quantize", fused, "--bits", 4, "--recipe", "adapter", "--output", out)
    assert res.exit_code == 0, res.output
    assert (out / "adapters" / "adapter_config.json").is_file()


def test_dynamic_recipe_on_a_float_moe_on_the_cpu(moe, tmp_path):
    """mlx-lm's sensitivity pass runs the float MoE: on the CPU its experts must run in float32."""
    base, adapter, fused = moe
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"text": f"review: delete the build cache number {i}"}) + "\n"
                            for i in range(16)))
    out = tmp_path / "q"
    res = run("quantize", fused, "--bits", 4, "--recipe", "dynamic", "--data", data,
              "--num-samples", 2, "--sequence-length", 16, "--output", out)
    assert res.exit_code == 0, res.output
    assert (out / "config.json").is_file()


def test_models_without_a_predicate_skip_the_mlx_lm_import():
    """Dense Qwen3/Llama and types mlx-lm does not know have no quant_predicate; qwen3_moe has
    one, and a remapped type (mistral -> llama) is left to mlx-lm."""
    from qtools.io.predicate import _surely_no_predicate

    assert _surely_no_predicate("qwen3") and _surely_no_predicate("llama")
    assert _surely_no_predicate("no_such_model")
    assert not _surely_no_predicate("qwen3_moe") and not _surely_no_predicate("mistral")


# ---------------------------------------------------------------- every command runs a float MoE on the CPU

MOE_SUITE = [
    {"suite": {"name": "moe", "max_tokens": 4, "critical_confusions": [["VETO", "APPROVE"]]}},
    {"id": "t1", "category": "tool", "messages": [{"role": "user", "content": "find the parser"}],
     "tools": [{"type": "function", "function": {"name": "search_code", "parameters": {"type": "object"}}}],
     "expect": {"type": "tool_call", "name": "search_code"}},
    {"id": "d1", "category": "direct", "messages": [{"role": "user", "content": "what is a parser"}],
     "expect": {"type": "direct"}},
    {"id": "l1", "category": "safety", "messages": [{"role": "user", "content": "review: drop the prod db"}],
     "expect": {"type": "label", "label": "VETO", "labels": ["VETO", "APPROVE"]}},
]


def moe_suite(tmp_path):
    suite = tmp_path / "moe.jsonl"
    suite.write_text("".join(json.dumps(c) + "\n" for c in MOE_SUITE))
    return suite


def test_probe_runs_a_float16_moe_on_the_cpu_as_the_in_memory_probe_did(moe, tmp_path):
    """The probe ran the model its own way and failed with "[GatherMM::eval] Currently only supports
    float32"; streamed, it predicts what the whole model fake-quantized in memory predicts (the
    router at the 8 bits qwen3_moe's own quant_predicate keeps it at, as quantize does)."""
    from probe_in_memory import assert_same_predictions, in_memory_probe

    _, _, fused = moe
    suite = moe_suite(tmp_path)
    res = run("probe", fused, "--suite", suite, "--bits", 4, 8, "--json")
    assert res.exit_code == 0, res.output
    rep = json.loads(res.stdout)
    assert_same_predictions(rep, in_memory_probe(fused, suite, [4, 8]))


def test_probe_quantizes_the_router_as_quantize_does(moe):
    from qtools.pipeline.stream import StreamedModel

    _, _, fused = moe
    sm = StreamedModel(fused)
    sm.set_precisions([None, 4])
    plan = sm.plans[4]
    assert plan["model.layers.0.mlp.gate"] == (8, 64)
    assert plan["model.layers.0.mlp.switch_mlp.up_proj"] == (4, 64)


def test_retention_runs_a_float16_moe_on_the_cpu(moe, tmp_path):
    base, _, fused = moe
    q8 = tmp_path / "q8"
    assert run("quantize", fused, "--bits", 8, "--output", q8).exit_code == 0
    res = run("retention", q8, "--reference", fused, "--base", base, "--suite", moe_suite(tmp_path),
              "--logs-dir", tmp_path / "logs", "--json")
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["models"][0]["kl"]["mean"] >= 0


def test_calibration_behaviour_runs_a_float16_moe_on_the_cpu(moe, tmp_path):
    from qtools.calibrate.measure import behaviour
    from qtools.io.suite import load_suite

    _, _, fused = moe
    out = behaviour(fused, load_suite(moe_suite(tmp_path)), [4])
    assert set(out) == {"16", "4"} and 0 <= out["4"]["accuracy"] <= 1


def test_probe_fake_quantizes_moe_experts_an_expert_at_a_time(moe, tmp_path, monkeypatch):
    """The stacked experts (the largest tensors of the field's MoE: 1.2 GB a layer for
    Qwen3-30B-A3B) are never fake-quantized as a whole: each expert's values are computed where
    numpy's BLAS multiplies them, so a layer holds its float weights and one expert's copy, not a
    second stacked copy per precision (3.44 GB peak on the >RAM bench model before). Predictions
    are still the in-memory probe's."""
    from probe_in_memory import assert_same_predictions, in_memory_probe

    import qtools.pipeline.fakequant as F
    import qtools.pipeline.stream as S
    from qtools.pipeline import backend

    monkeypatch.setattr(backend, "NUMPY_MIN_WEIGHT", 1)  # every expert product by numpy, an expert at a time
    monkeypatch.setattr(backend, "NUMPY_MIN_MACS", 1)
    monkeypatch.setattr(backend, "blas_is_reference", lambda: True)
    shapes, one, real, real_one = [], [], F.quantized_values, F.quantized_value

    def spy(todo):
        shapes.extend(tuple(w.shape) for w, _b, _g in todo.values())
        return real(todo)

    def spy_one(w, bits, gs):  # backend's, an expert at a time
        one.append(tuple(w.shape))
        return real_one(w, bits, gs)

    monkeypatch.setattr(S, "quantized_values", spy)
    monkeypatch.setattr(F, "quantized_value", spy_one)
    _, _, fused = moe
    suite = moe_suite(tmp_path)
    res = run("probe", fused, "--suite", suite, "--bits", 4, 8, "--json")
    assert res.exit_code == 0, res.output
    experts = moe_config(10, 0)["num_experts"]
    stacked = [s for s in shapes if len(s) == 3 and s[0] == experts]
    assert not stacked, stacked
    assert shapes and one and all(len(s) == 2 for s in one), one  # the experts, one at a time
    monkeypatch.undo()
    assert_same_predictions(json.loads(res.stdout), in_memory_probe(fused, suite, [4, 8]))


def test_numpy_experts_at_a_bit_width_compute_the_fake_quantized_experts():
    """backend.set_fake_quant: an expert at a time, the values of the whole stacked tensor
    fake-quantized (groups run along the last axis), bit for bit."""
    import mlx.nn as nn
    from mlx_lm.models.switch_layers import SwitchLinear

    from qtools.pipeline import backend
    from qtools.pipeline.fakequant import quantized_value

    mx.random.seed(4)
    sw = SwitchLinear(128, 96, num_experts=5, bias=False)
    sw.set_dtype(mx.bfloat16)
    backend.numpy_blas_linears(nn.Sequential(sw))
    x = mx.random.normal((3, 4, 1, 1, 128)).astype(mx.bfloat16)
    idx = mx.random.randint(0, 5, (3, 4, 2)).astype(mx.uint32)
    for small in (False, True):  # numpy an expert at a time; MLX's gather_mm on the whole tensor
        old = backend.NUMPY_MIN_WEIGHT
        backend.NUMPY_MIN_WEIGHT = 1 << 30 if small else 1
        try:
            w = sw["weight"]
            backend.set_fake_quant(sw, (3, 32))
            got = sw(x, idx)
            backend.set_fake_quant(sw, None)
            sw["weight"] = quantized_value(w, 3, 32)
            want = sw(x, idx)
            sw["weight"] = w
            float_out = sw(x, idx)
        finally:
            backend.NUMPY_MIN_WEIGHT = old
        assert mx.array_equal(got, want).item(), small
        assert not mx.array_equal(got, float_out).item()
