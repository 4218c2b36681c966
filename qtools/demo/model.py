"""Tiny Qwen3 model directories for the demo and for tests.

`make_tiny_model` and `make_tiny_adapter` are fixtures other tests use: they
write, in well under a second, a random-init mlx-lm model dir (with the demo
tokenizer) and a random LoRA/DoRA adapter dir in mlx-lm's own format.
"""

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


def build_model(config):
    from mlx_lm.models import qwen3

    return qwen3.Model(qwen3.ModelArgs.from_dict(config))


def save_model_dir(model, config, tokenizer, path, dtype="float16"):
    """Write config.json, model.safetensors (in `dtype`) and the tokenizer files."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    target = _DTYPES[dtype]
    weights = {k: v.astype(target) for k, v in tree_flatten(model.parameters())}
    if config.get("tie_word_embeddings", True):
        weights.pop("lm_head.weight", None)
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
