"""The calibration study's qwen3_moe family: Qwen3-30B-A3B's architecture, tiny, saved as the Hub
ships it (bfloat16 shards with an index, experts un-stacked); the outlier gain folded into a MoE
layer without changing its function; LoRA on attention, router and experts, fused by qtools."""

import json

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner
from mlx.utils import tree_flatten

from qtools.cli import cli
from qtools.demo import train
from qtools.demo.model import build_model, layout_of, qwen3_moe_config, save_model_dir
from qtools.demo.tokenizer import build_tokenizer
from qtools.pipeline.backend import cpu_float32_experts

# Tiny: hidden 64, 2 layers, 4 experts (top 2), experts 64 wide.
MOE = dict(hidden_size=64, num_layers=2, intermediate_size=128, seed=0, batch_size=8, lr=3e-3,
           arch="qwen3_moe", num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64)
TOKENS = mx.array([[5, 17, 42, 9, 77, 3, 120, 64, 11, 30]])


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def tiny_config(**kw):
    tok = build_tokenizer()
    return qwen3_moe_config(64, 2, tok.get_vocab_size(), tok.token_to_id("<|im_end|>"), num_experts=4,
                            moe_intermediate_size=64, **kw)


def router_topk(model, tokens):
    """Each layer's top-k expert choices for `tokens` (as a set per token: argpartition's order is arbitrary)."""
    h, out = model.model.embed_tokens(tokens), []
    for layer in model.model.layers:
        h = h + layer.self_attn(layer.input_layernorm(h), "causal")
        x = layer.post_attention_layernorm(h)
        k = layer.mlp.top_k
        inds = np.array(mx.argpartition(layer.mlp.gate(x), kth=-k, axis=-1)[..., -k:])
        out.append([set(t) for t in inds.reshape(-1, k).tolist()])
        h = h + layer.mlp(x)
    return out


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A qwen3_moe base pretrained 20 iterations on the agent task, in the Hub's layout."""
    out = tmp_path_factory.mktemp("moe") / "pre"
    return train.pretrain_base(out, **MOE, iters=20, task="agent", layout="hub")


def test_config_builds_qwen3_moe():
    cfg = tiny_config()
    assert cfg["model_type"] == "qwen3_moe" and cfg["architectures"] == ["Qwen3MoeForCausalLM"]
    assert (cfg["decoder_sparse_step"], cfg["mlp_only_layers"], cfg["norm_topk_prob"]) == (1, [], True)
    assert cfg["tie_word_embeddings"] and cfg["torch_dtype"] == "bfloat16"
    model = build_model(cfg)
    assert model.model.layers[1].mlp.switch_mlp.up_proj.weight.shape == (4, 64, 64)
    assert model.model.layers[0].mlp.gate.weight.shape == (4, 64)
    assert model(TOKENS).shape == (1, TOKENS.shape[1], cfg["vocab_size"])


def test_hub_layout_is_sharded_unstacked_and_loads_to_the_same_weights(tmp_path):
    from mlx_lm import load

    from qtools.io.modeldir import load_model

    cfg = tiny_config()
    mx.random.seed(1)
    model = build_model(cfg)
    path = tmp_path / "hub"
    save_model_dir(model, cfg, build_tokenizer(), path, dtype="bfloat16", layout="hub")
    index = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    assert sorted(set(index.values())) == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert not (path / "model.safetensors").exists() and layout_of(path) == "hub"
    assert "model.layers.1.mlp.experts.3.down_proj.weight" in index
    assert not any("switch_mlp" in n for n in index) and "lm_head.weight" not in index
    shard = mx.load(str(path / index["model.layers.0.mlp.experts.0.up_proj.weight"]))
    assert shard["model.layers.0.mlp.experts.0.up_proj.weight"].dtype == mx.bfloat16
    want = {k: v.astype(mx.bfloat16) for k, v in tree_flatten(model.parameters())}
    for loaded in (load(str(path))[0], load_model(path)[0]):
        got = dict(tree_flatten(loaded.parameters()))
        assert got.keys() == want.keys()
        assert all(mx.array_equal(got[k], want[k]).item() for k in want)


def test_outlier_gain_preserves_a_moe_layer_exactly():
    """Router, experts and attention get the gain; logits and router choices do not move."""
    cfg = tiny_config()
    mx.random.seed(2)
    model = build_model(cfg)
    model.set_dtype(mx.float32)
    mlp = model.model.layers[0].mlp
    before, topk = model(TOKENS), router_topk(model, TOKENS)
    router, down = np.array(mlp.gate.weight), np.array(mlp.switch_mlp.down_proj.weight)
    train.add_outlier_channels(model, cfg, gain=24.0, seed=0)
    after = model(TOKENS)
    scale = float(mx.abs(before).max())
    assert float(mx.abs(after - before).max()) < 1e-3 * scale
    assert router_topk(model, TOKENS) == topk
    # one router column per 64-group carries the gain, and one down_proj column per expert and group
    ratio = np.abs(np.array(mlp.gate.weight)).max(axis=0) / np.abs(router).max(axis=0)
    assert np.sum(np.isclose(ratio, 24.0, rtol=1e-5)) == 1 and np.sum(np.isclose(ratio, 1.0)) == 63
    ratio = np.abs(np.array(mlp.switch_mlp.down_proj.weight)).max(axis=1) / np.abs(down).max(axis=1)
    assert [np.sum(np.isclose(r, 24.0, rtol=1e-5)) for r in ratio] == [1, 1, 1, 1]


def test_a_gain_variant_of_a_hub_moe_pretraining_is_the_base_train_base_makes(pretrained, tmp_path):
    from qtools.io.weights import fingerprint

    variant = train.with_outlier_gain(pretrained, tmp_path / "variant", 24.0, MOE["seed"], task="agent")
    assert layout_of(variant) == "hub" and json.loads((variant / "config.json").read_text())["torch_dtype"] == "bfloat16"
    direct = train.train_base(tmp_path / "direct", **MOE, iters=20, outlier_gain=24.0, task="agent", layout="hub")
    assert fingerprint(variant) == fingerprint(direct) != fingerprint(pretrained)


def test_lora_on_attention_and_router_fuses_and_runs(pretrained, tmp_path):
    """pretrain -> gain 24 -> LoRA on attention + router -> qtools fuse on the Hub-layout base ->
    the fused model loads with mlx-lm and generates; delta-survival measures it."""
    from mlx_lm import generate, load

    base = train.with_outlier_gain(pretrained, tmp_path / "base", 24.0, MOE["seed"], task="agent")
    adapter = train.train_adapter(base, tmp_path / "ad", rank=4, scale=4.0, keys=train.MOE_ATTN_ROUTER,
                                  num_layers=2, iters=10, batch_size=8, lr=1e-3, seed=0, task="agent")
    lora = mx.load(str(adapter / "adapters.safetensors"))
    assert "model.layers.1.mlp.gate.lora_b" in lora and not any("switch_mlp" in k for k in lora)
    fused = tmp_path / "fused"
    res = run("fuse", base, "--adapter", adapter, "--output", fused)
    assert res.exit_code == 0, res.output
    model, tok = load(str(fused))
    tuned, _ = load(str(base), adapter_path=str(adapter))
    for net in (model, tuned):  # MLX's CPU GatherMM runs float32 only
        cpu_float32_experts(net)
    assert isinstance(generate(model, tok, "hello", max_tokens=3), str)
    fused_logits, tuned_logits = model(TOKENS).astype(mx.float32), tuned(TOKENS).astype(mx.float32)
    assert float(mx.abs(fused_logits - tuned_logits).max()) < 0.05 * float(mx.abs(tuned_logits).max())
    res = run("delta-survival", fused, "--adapter", adapter, "--bits", 4, 8, "--json")
    assert res.exit_code == 0, res.output
    names = {t["name"] for t in json.loads(res.stdout)["tensors"]}
    assert "model.layers.0.mlp.gate.weight" in names


def test_lora_on_the_experts_trains_and_fuses(pretrained, tmp_path):
    adapter = train.train_adapter(pretrained, tmp_path / "ad", rank=2, scale=4.0, keys=train.MOE_ALL,
                                  num_layers=1, iters=2, batch_size=8, lr=1e-3, seed=0, task="agent")
    lora = mx.load(str(adapter / "adapters.safetensors"))
    # LoRASwitchLinear: one factor pair per expert
    assert lora["model.layers.1.mlp.switch_mlp.down_proj.lora_b"].shape == (4, 64, 2)
    assert "model.layers.0.mlp.gate.lora_a" not in lora  # num_layers=1: the last layer only
    res = run("fuse", pretrained, "--adapter", adapter, "--output", tmp_path / "fused")
    assert res.exit_code == 0, res.output
    res = run("delta-survival", tmp_path / "fused", "--adapter", adapter, "--bits", 4, 8, "--json")
    assert res.exit_code == 0, res.output
