"""Tiny Qwen3 (dense and MoE) model directories for the demo, the calibration study and tests.

`make_tiny_model` and `make_tiny_adapter` are fixtures other tests use: they
write, in well under a second, a random-init mlx-lm model dir (with the demo
tokenizer) and a random LoRA/DoRA adapter dir in mlx-lm's own format.
`save_model_dir(..., layout="hub")` writes a model as the Hugging Face Hub ships
it instead (shards with an index, MoE experts one tensor each).
"""

import importlib
import json
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from .. import QtoolsError
from .tokenizer import build_tokenizer, save_tokenizer

_DTYPES = {"float16": mx.float16, "bfloat16": mx.bfloat16, "float32": mx.float32}


def qwen3_config(hidden_size, num_layers, vocab_size, eos_token_id, intermediate_size=None,
                 head_dim=32, tie_word_embeddings=True, dtype="float16"):
    heads = max(1, hidden_size // head_dim)
    return {
        "model_type": "qwen3",
        "architectures": ["Qwen3ForCausalLM"],
        "hidden_size": hidden_size,
        "num_hidden_layers": num_layers,
        "intermediate_size": intermediate_size or 4 * hidden_size,
        "num_attention_heads": heads,
        "num_key_value_heads": max(1, heads // 2),
        "head_dim": head_dim,
        "rms_norm_eps": 1e-6,
        "vocab_size": vocab_size,
        "max_position_embeddings": 512,
        "rope_theta": 10000.0,
        "tie_word_embeddings": tie_word_embeddings,
        "eos_token_id": eos_token_id,
        "torch_dtype": dtype,
    }


def qwen3_moe_config(hidden_size, num_layers, vocab_size, eos_token_id, num_experts=8, num_experts_per_tok=2,
                     moe_intermediate_size=None, intermediate_size=None, head_dim=32, tie_word_embeddings=True,
                     dtype="bfloat16"):
    """Qwen3-30B-A3B's architecture at a tiny size: every layer a sparse MoE block (a router
    `mlp.gate` over `num_experts` SwiGLU experts, the top `num_experts_per_tok` mixed with
    renormalised weights). intermediate_size only sizes the dense MLP of an mlp_only layer
    (none here); the experts are moe_intermediate_size wide (hidden_size by default)."""
    return {
        **qwen3_config(hidden_size, num_layers, vocab_size, eos_token_id, intermediate_size=intermediate_size,
                       head_dim=head_dim, tie_word_embeddings=tie_word_embeddings, dtype=dtype),
        "model_type": "qwen3_moe",
        "architectures": ["Qwen3MoeForCausalLM"],
        "num_experts": num_experts,
        "num_experts_per_tok": num_experts_per_tok,
        "moe_intermediate_size": moe_intermediate_size or hidden_size,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "norm_topk_prob": True,
    }


def build_model(config):
    """The mlx-lm model class of config's model_type (qwen3, qwen3_moe), randomly initialised."""
    arch = importlib.import_module(f"mlx_lm.models.{config['model_type']}")
    return arch.Model(arch.ModelArgs.from_dict(config))


def layout_of(path) -> str:
    """The layout save_model_dir wrote a directory in: "hub" when sharded with an index, else "mlx"."""
    return "hub" if (Path(path) / "model.safetensors.index.json").is_file() else "mlx"


def hub_weights(weights: dict) -> dict:
    """mlx-lm's weights under the Hub's names: each stacked switch_mlp tensor (E, out, in) as E
    tensors experts.E.<proj>.weight, which mlx-lm's sanitize() stacks again on load."""
    out = {}
    for name, w in weights.items():
        if ".switch_mlp." in name:
            pre, leaf = name.split(".switch_mlp.")
            out.update({f"{pre}.experts.{e}.{leaf}": w[e] for e in range(w.shape[0])})
        else:
            out[name] = w
    return out


def _save_hub_shards(weights: dict, path: Path, shards: int) -> None:
    """model-0000i-of-0000n.safetensors (names sorted, split into `shards` runs) and
    model.safetensors.index.json, as the Hub's PyTorch exports are laid out."""
    names = sorted(weights)
    shards = min(shards, len(names))
    weight_map = {}
    for i, part in enumerate(np.array_split(np.array(names, dtype=object), shards)):
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        mx.save_safetensors(str(path / fname), {n: weights[n] for n in part}, metadata={"format": "pt"})
        weight_map.update({n: fname for n in part})
    total = sum(w.nbytes for w in weights.values())
    (path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


def save_model_dir(model, config, tokenizer, path, dtype="float16", layout="mlx", shards=3):
    """Write config.json, the weights (in `dtype`) and the tokenizer files.

    layout "mlx": one model.safetensors as mlx-lm saves a small model. "hub": as the Hugging
    Face Hub ships Qwen3-30B-A3B: `shards` files with model.safetensors.index.json, the MoE
    experts un-stacked (hub_weights), so readers meet the layout users download.
    """
    if layout not in ("mlx", "hub"):
        raise QtoolsError(f"layout {layout!r} is not supported: use mlx or hub")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    target = _DTYPES[dtype]
    weights = {k: v.astype(target) for k, v in tree_flatten(model.parameters())}
    if config.get("tie_word_embeddings", True):
        weights.pop("lm_head.weight", None)
    if layout == "hub":
        _save_hub_shards(hub_weights(weights), path, shards)
    else:
        mx.save_safetensors(str(path / "model.safetensors"), weights, metadata={"format": "mlx"})
    save_tokenizer(tokenizer, path)
    with open(path / "config.json", "w") as f:
        json.dump(config, f, indent=2)


def make_tiny_model(path, hidden_size=64, num_layers=2, seed=0, dtype="float16",
                    intermediate_size=None, tie_word_embeddings=True):
    """Write a random-init tiny Qwen3 mlx-lm model dir (with tokenizer) to `path`.

    Loadable with `mlx_lm.load(path)`. Returns the path.
    """
    if dtype not in _DTYPES:
        raise QtoolsError(f"dtype {dtype!r} is not supported: use one of {', '.join(_DTYPES)}")
    path = Path(path)
    tok = build_tokenizer()
    eos = tok.token_to_id("<|im_end|>")
    config = qwen3_config(hidden_size, num_layers, tok.get_vocab_size(), eos,
                          intermediate_size=intermediate_size,
                          tie_word_embeddings=tie_word_embeddings, dtype=dtype)
    mx.random.seed(seed)
    model = build_model(config)
    mx.eval(model.parameters())
    save_model_dir(model, config, tok, path, dtype=dtype)
    return path


def adapter_config(num_layers, rank, scale, keys, dropout=0.0, fine_tune_type="lora", **extra):
    """An adapter_config.json as `mlx_lm lora` writes it (the fields load_adapters reads)."""
    return {
        "fine_tune_type": fine_tune_type,
        "num_layers": num_layers,
        "lora_parameters": {"rank": rank, "scale": scale, "dropout": dropout, "keys": list(keys)},
        **extra,
    }


def make_tiny_adapter(model_path, adapter_path, rank=4, scale=2.0, seed=0,
                      keys=("self_attn.q_proj", "self_attn.v_proj"), dora=False,
                      num_layers=None, b_std=0.02):
    """Write a random LoRA (or DoRA) adapter for the model at `model_path`.

    lora_a ~ U(-1/sqrt(in), 1/sqrt(in)) as mlx-lm initialises it, and lora_b
    ~ N(0, b_std) so the delta scale * lora_b.T @ lora_a.T is NOT zero. Applies to
    the last `num_layers` layers (all by default). Returns the adapter path.
    """
    model_path, adapter_path = Path(model_path), Path(adapter_path)
    try:
        config = json.loads((model_path / "config.json").read_text())
        weights = mx.load(str(model_path / "model.safetensors"))
    except FileNotFoundError as exc:
        raise QtoolsError(f"not a model directory: {model_path} ({exc.filename} missing)") from None
    n_total = config["num_hidden_layers"]
    num_layers = n_total if num_layers is None else num_layers
    rng = np.random.default_rng(seed)
    tensors = {}
    for layer in range(n_total - num_layers, n_total):
        for key in keys:
            name = f"model.layers.{layer}.{key}"
            if f"{name}.weight" not in weights:
                raise QtoolsError(f"the model has no linear layer {name}")
            out_dims, in_dims = weights[f"{name}.weight"].shape
            bound = 1.0 / np.sqrt(in_dims)
            a = rng.uniform(-bound, bound, size=(in_dims, rank)).astype(np.float32)
            b = rng.normal(0.0, b_std, size=(rank, out_dims)).astype(np.float32)
            tensors[f"{name}.lora_a"] = mx.array(a)
            tensors[f"{name}.lora_b"] = mx.array(b)
            if dora:
                w = weights[f"{name}.weight"].astype(mx.float32)
                fused = w + scale * (mx.array(b).T @ mx.array(a).T)
                # Magnitudes slightly off the fused norms so DoRA's rescale matters.
                jitter = rng.uniform(0.95, 1.05, size=(out_dims,)).astype(np.float32)
                tensors[f"{name}.m"] = mx.linalg.norm(fused, axis=1) * mx.array(jitter)
    adapter_path.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(adapter_path / "adapters.safetensors"), tensors)
    cfg = adapter_config(num_layers, rank, scale, keys, fine_tune_type="dora" if dora else "lora",
                         model=str(model_path), seed=seed)
    (adapter_path / "adapter_config.json").write_text(json.dumps(cfg, indent=2))
    return adapter_path
