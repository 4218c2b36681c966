#!/usr/bin/env python
"""Write a synthetic model larger than RAM and a LoRA adapter, for the memory benchmarks.

Dense (default, ~30 GB): for `delta-survival` (docs/speed.md): a Qwen3-shaped float16 model
(hidden 4096, MLP 12288, 76 layers) in Hub-style shards with model.safetensors.index.json and a
rank-16 LoRA on every projection.

--moe: shaped like Qwen3-30B-A3B, for `make bench-scale` (scripts/bench_scale.py): qwen3_moe,
hidden 2048, 128 experts of intermediate 768, top-8, 32 query / 4 KV heads of 128, vocab 151936,
untied lm_head; Hub layout (bfloat16, shards + index, un-stacked experts
mlp.experts.E.{gate,up,down}_proj), the demo tokenizer, and an mlx-lm LoRA adapter (rank 8) on
attention, the router (mlp.gate) and the experts; by default enough layers for 1.1x this
machine's RAM (MemTotal), --layers N for a small one.

Both are written tensor by tensor in chunks from one 128 MiB pool of random values, so the
generator itself stays under ~0.5 GB whatever the model's size. Free disk is checked first. Then, e.g.:

    python scripts/bigmodel.py /path/big            # ~30 GB
    /usr/bin/time -v qtools delta-survival /path/big/model --adapter /path/big/adapter --bits 4 5 6
"""

import argparse
import json
import math
import shutil
import struct
import sys
import zlib
from pathlib import Path

import numpy as np

POOL = 64 << 20  # float16 elements (128 MiB)
CHUNK = 16 << 20  # elements generated or written at a time


def pool_filler(pool, ones):
    """write(name, f, n): n values for tensor `name` from the random pool (norms get ones), so a
    model of any size is written from one fixed pool."""

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

    return fill


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


# Qwen3-30B-A3B's shape (config.json on the Hub), the layer count aside.
MOE = {"hidden": 2048, "experts": 128, "moe_mlp": 768, "top_k": 8, "heads": 32, "kv_heads": 4, "head_dim": 128,
       "vocab": 151936, "mlp": 6144}
MOE_KEYS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate",
            "mlp.switch_mlp.gate_proj", "mlp.switch_mlp.up_proj", "mlp.switch_mlp.down_proj"]


def moe_layer_tensors(i, c=MOE):
    """One qwen3_moe layer as the Hub stores it: experts un-stacked (mlx-lm's sanitize stacks them)."""
    p = f"model.layers.{i}."
    h, q, kv = c["hidden"], c["heads"] * c["head_dim"], c["kv_heads"] * c["head_dim"]
    out = [
        (p + "input_layernorm.weight", (h,)), (p + "post_attention_layernorm.weight", (h,)),
        (p + "self_attn.q_norm.weight", (c["head_dim"],)), (p + "self_attn.k_norm.weight", (c["head_dim"],)),
        (p + "self_attn.q_proj.weight", (q, h)), (p + "self_attn.k_proj.weight", (kv, h)),
        (p + "self_attn.v_proj.weight", (kv, h)), (p + "self_attn.o_proj.weight", (h, q)),
        (p + "mlp.gate.weight", (c["experts"], h)),
    ]
    for e in range(c["experts"]):
        out += [(p + f"mlp.experts.{e}.gate_proj.weight", (c["moe_mlp"], h)),
                (p + f"mlp.experts.{e}.up_proj.weight", (c["moe_mlp"], h)),
                (p + f"mlp.experts.{e}.down_proj.weight", (h, c["moe_mlp"]))]
    return out


def moe_sizes(rank, c=MOE):
    """(bytes of the model outside the layers, bytes per layer, adapter bytes per layer), bfloat16 / float32."""
    fixed = 2 * (2 * c["vocab"] * c["hidden"] + c["hidden"])
    layer = 2 * sum(int(np.prod(shape)) for _, shape in moe_layer_tensors(0, c))
    adapter = 4 * sum(int(np.prod(shape)) for _, shape in moe_lora_factors(0, rank, c).items())
    return fixed, layer, adapter


def moe_lora_factors(i, rank, c=MOE):
    """mlx-lm's LoRA factors for one layer: Linear lora_a (in, r), lora_b (r, out); the experts'
    LoRASwitchLinear lora_a (E, r, in), lora_b (E, out, r)."""
    p = f"model.layers.{i}."
    h, q, kv, e, m = c["hidden"], c["heads"] * c["head_dim"], c["kv_heads"] * c["head_dim"], c["experts"], c["moe_mlp"]
    linear = {"self_attn.q_proj": (h, q), "self_attn.k_proj": (h, kv), "self_attn.v_proj": (h, kv),
              "self_attn.o_proj": (q, h), "mlp.gate": (h, e)}
    out = {}
    for key, (din, dout) in linear.items():
        out[p + key + ".lora_a"] = (din, rank)
        out[p + key + ".lora_b"] = (rank, dout)
    for key, (din, dout) in {"gate_proj": (h, m), "up_proj": (h, m), "down_proj": (m, h)}.items():
        out[p + f"mlp.switch_mlp.{key}.lora_a"] = (e, rank, din)
        out[p + f"mlp.switch_mlp.{key}.lora_b"] = (e, dout, rank)
    return out


def mem_total() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    raise SystemExit("Error: cannot read MemTotal from /proc/meminfo")


def check_free(root: Path, need: int) -> None:
    anc = root
    while not anc.exists():
        anc = anc.parent
    free = shutil.disk_usage(anc).free
    if free < need:
        sys.exit(f"Error: not enough free disk for the model in {root}: it needs {need / 1e9:.1f} GB, "
                 f"{anc} has {free / 1e9:.1f} GB free")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("root", type=Path)
    ap.add_argument("--moe", action="store_true", help="Qwen3-30B-A3B's shape (bfloat16, Hub layout) instead of dense")
    ap.add_argument("--layers", type=int, default=None,
                    help="layers (default: 76 dense; --moe: enough for 1.1x MemTotal)")
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--mlp", type=int, default=12288)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--rank", type=int, default=None, help="LoRA rank (default: 16 dense, 8 --moe)")
    ap.add_argument("--layers-per-shard", type=int, default=None, help="(default: 10 dense, 2 --moe)")
    args = ap.parse_args()
    if args.layers is not None and args.layers < 1:
        sys.exit("Error: --layers must be at least 1")
    model, adapter = args.root / "model", args.root / "adapter"
    for d in (model, adapter):
        if d.exists():
            sys.exit(f"Error: {d} exists: delete it first")
    if args.moe:
        return write_moe(args, model, adapter)
    args.layers = args.layers or 76
    args.rank = args.rank or 16
    args.layers_per_shard = args.layers_per_shard or 10
    heads, kv_heads, head_dim = args.hidden // 128, max(1, args.hidden // 512), 128
    per_layer = 2 * sum(int(np.prod(sh)) for _, sh in layer_tensors(0, args.hidden, args.mlp, heads, kv_heads, head_dim))
    check_free(args.root, args.layers * per_layer + 2 * args.vocab * args.hidden + (1 << 30))
    for d in (model, adapter):
        d.mkdir(parents=True)

    rng = np.random.default_rng(0)
    pool = np.empty(POOL, np.float16)
    for i in range(0, POOL, CHUNK):
        pool[i : i + CHUNK] = rng.standard_normal(min(CHUNK, POOL - i), dtype=np.float32) * 0.02
    ones = np.ones(CHUNK, np.float16)

    fill = pool_filler(pool, ones)

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


def write_moe(args, model: Path, adapter: Path):
    c = MOE
    rank = args.rank or 8
    fixed, per_layer, ad_layer = moe_sizes(rank)
    layers = args.layers or max(1, math.ceil((1.1 * mem_total() - fixed) / per_layer))
    per_shard = args.layers_per_shard or 2
    total_est = fixed + layers * per_layer
    check_free(args.root, total_est + layers * ad_layer + (1 << 30))
    for d in (model, adapter):
        d.mkdir(parents=True)
    rng = np.random.default_rng(0)
    # bfloat16 bits of N(0, 0.02), truncated from float32
    pool = np.empty(POOL, np.uint16)
    for i in range(0, POOL, CHUNK):
        x = rng.standard_normal(min(CHUNK, POOL - i), dtype=np.float32) * np.float32(0.02)
        pool[i : i + CHUNK] = (x.view(np.uint32) >> 16).astype(np.uint16)
    ones = np.full(CHUNK, 0x3F80, np.uint16)  # 1.0 in bfloat16

    fill = pool_filler(pool, ones)


    groups = [[("model.embed_tokens.weight", (c["vocab"], c["hidden"]))]]
    for i in range(layers):
        if i % per_shard == 0:
            groups.append([])
        groups[-1] += moe_layer_tensors(i)
    groups[-1] += [("model.norm.weight", (c["hidden"],)), ("lm_head.weight", (c["vocab"], c["hidden"]))]
    weight_map, total = {}, 0
    for s, group in enumerate(groups):
        fname = f"model-{s + 1:05d}-of-{len(groups):05d}.safetensors"
        total += write_safetensors(model / fname, [(n, sh, "BF16", 2) for n, sh in group], fill)
        weight_map.update({n: fname for n, _ in group})
        print(f"{fname}: {total / 1e9:.1f} GB so far", flush=True)
    (model / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    config = {
        "model_type": "qwen3_moe", "architectures": ["Qwen3MoeForCausalLM"], "hidden_size": c["hidden"],
        "num_hidden_layers": layers, "intermediate_size": c["mlp"], "num_attention_heads": c["heads"],
        "num_key_value_heads": c["kv_heads"], "head_dim": c["head_dim"], "num_experts": c["experts"],
        "num_experts_per_tok": c["top_k"], "moe_intermediate_size": c["moe_mlp"], "decoder_sparse_step": 1,
        "mlp_only_layers": [], "norm_topk_prob": True, "rms_norm_eps": 1e-6, "vocab_size": c["vocab"],
        "max_position_embeddings": 40960, "rope_theta": 1e6, "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
    }
    (model / "config.json").write_text(json.dumps(config, indent=2))
    from qtools.demo.tokenizer import build_tokenizer, save_tokenizer

    save_tokenizer(build_tokenizer(), model)

    factors = {}
    for i in range(layers):
        factors.update(moe_lora_factors(i, rank))

    def fill_factor(name, f, n):
        shape = factors[name]
        fan_in = shape[-1] if name.endswith("lora_a") and len(shape) == 3 else shape[0]
        std = 1.0 / np.sqrt(fan_in) if name.endswith("lora_a") else 2e-3
        while n > 0:
            k = min(n, CHUNK)
            f.write((rng.standard_normal(k, dtype=np.float32) * np.float32(std)).astype(np.float32))
            n -= k

    write_safetensors(adapter / "adapters.safetensors", [(n, sh, "F32", 4) for n, sh in factors.items()],
                      fill_factor)
    cfg = {"fine_tune_type": "lora", "num_layers": layers,
           "lora_parameters": {"rank": rank, "scale": 2.0, "dropout": 0.0, "keys": MOE_KEYS}}
    (adapter / "adapter_config.json").write_text(json.dumps(cfg, indent=2))
    print(f"model {model} (qwen3_moe, {layers} layers, {total / 1e9:.1f} GB bfloat16, "
          f"{shutil.disk_usage(model).free / 1e9:.0f} GB left on disk), adapter {adapter}")


if __name__ == "__main__":
    main()
