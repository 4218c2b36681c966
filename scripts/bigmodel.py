#!/usr/bin/env python
"""Write a synthetic float16 model larger than RAM (default ~30 GB) and a rank-16 LoRA adapter.

For the memory benchmark of `delta-survival` (docs/speed.md): a Qwen3-shaped model
(hidden 4096, MLP 12288, 76 layers) in Hub-style shards with model.safetensors.index.json,
written tensor by tensor in chunks from one 128 MiB pool of random float16 values, so the
generator itself stays under ~0.5 GB whatever the model's size. Then, e.g.:

    python scripts/bigmodel.py /path/big            # ~30 GB; check `df -h` first
    /usr/bin/time -v qtools delta-survival /path/big/model --adapter /path/big/adapter --bits 4 5 6
"""

import argparse
import json
import shutil
import struct
import sys
import zlib
from pathlib import Path

import numpy as np

POOL = 64 << 20  # float16 elements (128 MiB)
CHUNK = 16 << 20  # elements generated or written at a time


def layer_tensors(i, hidden, mlp, heads, kv_heads, head_dim):
    p = f"model.layers.{i}."
    q, kv = heads * head_dim, kv_heads * head_dim
    return [
        (p + "input_layernorm.weight", (hidden,)), (p + "post_attention_layernorm.weight", (hidden,)),
        (p + "self_attn.q_norm.weight", (head_dim,)), (p + "self_attn.k_norm.weight", (head_dim,)),
        (p + "self_attn.q_proj.weight", (q, hidden)), (p + "self_attn.k_proj.weight", (kv, hidden)),
        (p + "self_attn.v_proj.weight", (kv, hidden)), (p + "self_attn.o_proj.weight", (hidden, q)),
        (p + "mlp.gate_proj.weight", (mlp, hidden)), (p + "mlp.up_proj.weight", (mlp, hidden)),
        (p + "mlp.down_proj.weight", (hidden, mlp)),
    ]


def write_safetensors(path: Path, tensors, fill):
    """tensors: [(name, shape, dtype code, itemsize)]; fill(name, f, n) writes n elements of name."""
    header, off = {}, 0
    for name, shape, code, size in tensors:
        n = int(np.prod(shape))
        header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [off, off + n * size]}
        off += n * size
    header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name, shape, _, _ in tensors:
            fill(name, f, int(np.prod(shape)))
    return off


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("root", type=Path)
    ap.add_argument("--layers", type=int, default=76)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--mlp", type=int, default=12288)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--layers-per-shard", type=int, default=10)
    args = ap.parse_args()
    heads, kv_heads, head_dim = args.hidden // 128, max(1, args.hidden // 512), 128
    model, adapter = args.root / "model", args.root / "adapter"
    for d in (model, adapter):
        if d.exists():
            sys.exit(f"{d} exists: delete it first")
        d.mkdir(parents=True)

    rng = np.random.default_rng(0)
    pool = np.empty(POOL, np.float16)
    for i in range(0, POOL, CHUNK):
        pool[i : i + CHUNK] = rng.standard_normal(min(CHUNK, POOL - i), dtype=np.float32) * 0.02
    ones = np.ones(CHUNK, np.float16)

    def fill(name, f, n):
        if "norm" in name:
            while n > 0:
                k = min(n, CHUNK)
                f.write(ones[:k])
                n -= k
            return
        start = zlib.crc32(name.encode()) % POOL
        while n > 0:  # wrap around the pool: values repeat across tensors, which the analysis ignores
            k = min(n, CHUNK, POOL - start)
            f.write(pool[start : start + k])
            n -= k
            start = (start + k) % POOL

    groups = [[("model.embed_tokens.weight", (args.vocab, args.hidden)), ("model.norm.weight", (args.hidden,))]]
    for i in range(args.layers):
        if i % args.layers_per_shard == 0:
            groups.append([])
        groups[-1] += layer_tensors(i, args.hidden, args.mlp, heads, kv_heads, head_dim)
    weight_map, total = {}, 0
    for s, group in enumerate(groups):
        fname = f"model-{s + 1:05d}-of-{len(groups):05d}.safetensors"
        total += write_safetensors(model / fname, [(n, sh, "F16", 2) for n, sh in group], fill)
        weight_map.update({n: fname for n, _ in group})
        print(f"{fname}: {total / 1e9:.1f} GB so far", flush=True)
    (model / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    config = {
        "model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"], "hidden_size": args.hidden,
        "num_hidden_layers": args.layers, "intermediate_size": args.mlp, "num_attention_heads": heads,
        "num_key_value_heads": kv_heads, "head_dim": head_dim, "rms_norm_eps": 1e-6, "vocab_size": args.vocab,
        "max_position_embeddings": 4096, "rope_theta": 1e6, "tie_word_embeddings": True, "torch_dtype": "float16",
    }
    (model / "config.json").write_text(json.dumps(config, indent=2))

    # rank-r LoRA on every projection, as mlx-lm stores it: lora_a (in, r), lora_b (r, out), float32
    keys = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
            "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    factors = {}
    for i in range(args.layers):
        for name, shape in layer_tensors(i, args.hidden, args.mlp, heads, kv_heads, head_dim):
            if len(shape) == 2:
                stem = name[: -len(".weight")]
                factors[stem + ".lora_a"] = (shape[1], args.rank)
                factors[stem + ".lora_b"] = (args.rank, shape[0])

    def fill_factor(name, f, n):
        shape = factors[name]
        std = 1.0 / np.sqrt(shape[0]) if name.endswith("lora_a") else 2e-3
        f.write((rng.standard_normal(n, dtype=np.float32) * np.float32(std)).astype(np.float32))

    write_safetensors(adapter / "adapters.safetensors", [(n, sh, "F32", 4) for n, sh in factors.items()],
                      fill_factor)
    cfg = {"fine_tune_type": "lora", "num_layers": args.layers,
           "lora_parameters": {"rank": args.rank, "scale": 2.0, "dropout": 0.0, "keys": keys}}
    (adapter / "adapter_config.json").write_text(json.dumps(cfg, indent=2))
    print(f"model {model} ({total / 1e9:.1f} GB, {shutil.disk_usage(model).free / 1e9:.0f} GB left on disk), "
          f"adapter {adapter}")


if __name__ == "__main__":
    main()
