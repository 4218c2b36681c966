"""The other quantizers MLX has, and what ships a float16 adapter beside the weights.

- `mxfp4`, `nvfp4`, `mxfp8`: MLX's fixed-format modes, with the group size
  and bits mx.quantize requires of each (FIXED_MODES);
- `awq`, `gptq`, `dwq`, `dynamic`: mlx_lm.quant's functions called as a
  library, calibrated on a local DATA file (never a download): by default the
  fine-tune's own training data when its adapter_config.json names data qtools
  can rebuild (the demo's);
- `adapter`: the base quantized at BITS and the fine-tune's adapter kept
  unfused (float16), in OUT/adapters/;
- `compensated`: the fused model at BITS plus a float16 low-rank correction
  of the quantization error (compensate.py) as an mlx-lm LoRA adapter in OUT/adapters/.

An OUT/adapters/ directory is loaded by qtools (io.modeldir.load_model) and by
`mlx_lm.load(OUT, adapter_path=OUT/adapters)`; bits per weight count it.
"""

from __future__ import annotations

import contextlib
import copy
import json
import sys
import time
from pathlib import Path

from mlx.utils import tree_flatten

from .. import SUPPORTED_BITS, SUPPORTED_GROUP_SIZES, BadValue, QtoolsError
from ..io.atomic import atomic_output_dir, check_output, check_writable
from ..io.modeldir import (
    PROVENANCE,
    SHIPPED_ADAPTER,
    check_model_dir,
    dir_size,
    quantized_provenance,
    read_config,
    read_provenance,
)

# mode -> (group size, bits), as mx.quantize requires them.
FIXED_MODES = {"mxfp4": (32, 4), "nvfp4": (16, 4), "mxfp8": (32, 8)}
DATA_RECIPES = ("awq", "gptq", "dwq", "dynamic")
ADAPTER_RECIPES = ("adapter", "compensated")
RECIPES = (*FIXED_MODES, *DATA_RECIPES, *ADAPTER_RECIPES)
GPTQ_BITS = (2, 4, 8)  # mlx_lm.quant.gptq packs only these
DEFAULT_EXTRA_BPW = 0.8  # dynamic / compensated target: BITS + 0.8 (4.8 at 4 bits: group overhead 0.5 + 0.3)
# Calibration blocks for awq/gptq/dynamic: 8 x 512 tokens (mlx-lm's awq takes 128 x 512, sized for a GPU;
# on the CPU backend awq on all 12k tokens of the demo's data ran over 8 min per layer on a shared core).
DEFAULT_SEQUENCE_LENGTH = 512
DEFAULT_NUM_SAMPLES = 8


def _log(msg: str) -> None:
    print(f"[quantize] {msg}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def _stdout_to_stderr_on_success():
    """mlx-lm prints progress on stdout: pass it to stderr, but drop it when the step fails,
    so a failure is one `Error:` line."""
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        yield
    sys.stderr.write(buf.getvalue())


def check_recipe_args(recipe: str, bits: int, group_size: int | None) -> tuple[int, int]:
    """(bits, group size) a recipe will use, or a clear error."""
    if recipe in FIXED_MODES:
        g, b = FIXED_MODES[recipe]
        if group_size is not None and group_size != g:
            raise BadValue(f"{recipe} quantizes in groups of {g} weights only (got group size {group_size}); "
                           f"leave the group size unset (make: no GROUP=)", "--group-size")
        return b, g
    group_size = 64 if group_size is None else group_size
    if bits not in SUPPORTED_BITS:
        raise BadValue(f"bits={bits} is not supported by MLX affine quantization: use one of "
                       + " ".join(map(str, SUPPORTED_BITS)), "--bits")
    if group_size not in SUPPORTED_GROUP_SIZES:
        raise BadValue(f"group size {group_size} is not supported: use one of "
                       + " ".join(map(str, SUPPORTED_GROUP_SIZES)), "--group-size")
    if recipe == "gptq" and bits not in GPTQ_BITS:
        raise BadValue(f"gptq (mlx_lm.quant.gptq) packs {', '.join(map(str, GPTQ_BITS))} bits only, not {bits}",
                       "--bits")
    return bits, group_size


# ---------------------------------------------------------------- data

def resolve_data(recipe: str, src: Path, data) -> tuple[list, str]:
    """(records, description): DATA if given as a file, or (records, description) the caller found
    (the command finds the demo fine-tune's own training data, qtools.demo.data.training_data_of)."""
    from ..io.calib_data import read_records

    if isinstance(data, tuple):
        return data
    if data is not None:
        return read_records(data), str(Path(data).resolve())
    raise QtoolsError(f"recipe {recipe} calibrates on data: give DATA=<file> (--data), a JSONL file of "
                      "{\"text\"}, {\"messages\"} or {\"prompt\", \"completion\"} records or a .txt file, "
                      "ideally the fine-tune's own training data")


# ---------------------------------------------------------------- fine-tune sources

def resolve_base_adapter(src: Path, base, adapter) -> tuple[Path, Path]:
    """Base model and adapter of a fused model: --base/--adapter, else its provenance."""
    prov = read_provenance(src) or {}
    base = base or prov.get("base")
    adapter = adapter or prov.get("adapter")
    if not base or not adapter:
        raise QtoolsError(f"{src} does not say which base and adapter it was fused from "
                          f"(no {PROVENANCE} with base/adapter): give --base and --adapter")
    base = check_model_dir(base, "base model")
    from ..io.adapters import check_adapter_dir

    adapter, _ = check_adapter_dir(adapter)
    return base, adapter


def check_adapter_matches(adapter: Path, model: Path):
    """The adapter's low-rank deltas (weight name -> LowRankDelta), every shape checked against MODEL."""
    from ..io.adapters import Adapter
    from ..io.weights import SafetensorsModel

    ad = Adapter(adapter)
    if ad.fine_tune_type not in ("lora", "dora"):
        raise QtoolsError(f"adapter {adapter}: fine_tune_type {ad.fine_tune_type!r} cannot ship unfused")
    # mlx-lm stacks a Hub checkpoint's experts on load; the adapter names the stacked switch_mlp
    with SafetensorsModel(model, stack_experts=True) as st:
        try:
            deltas = ad.deltas(st)
        except QtoolsError as exc:
            raise QtoolsError(f"adapter {adapter} does not match model {model}: {exc}") from None
    ad.close()
    return ad, deltas


# ---------------------------------------------------------------- recipes

def _quantize_fixed(net, config, recipe):
    from mlx_lm.utils import quantize_model

    g, b = FIXED_MODES[recipe]
    return quantize_model(net, config, g, b, mode=recipe)


def _quantize_affine(net, config, bits, group_size):
    from mlx_lm.utils import quantize_model

    return quantize_model(net, config, group_size, bits)


def _set_top_level(qconfig: dict, bits: int, group_size: int) -> dict:
    # awq's update_config writes a placeholder 4-bit/64 top level; record what was used.
    q = qconfig["quantization"]
    q.update({"bits": bits, "group_size": group_size})
    qconfig["quantization_config"] = q
    return qconfig


def _quantize_awq(net, config, bits, group_size, blocks):
    from mlx_lm.quant.awq import AWQ_MODEL_CONFIGS, awq_quantize, update_config

    awq_config = AWQ_MODEL_CONFIGS.get(config.get("model_type"))
    if awq_config is None:
        raise QtoolsError(f"mlx-lm's AWQ does not support {config.get('model_type')!r} models "
                          f"(it does: {', '.join(sorted(AWQ_MODEL_CONFIGS))})")
    # Embeddings at BITS too, so awq compares with uniform BITS on the same layers.
    awq_quantize(net, blocks, awq_config, group_size=group_size, bits=bits,
                 embed_group_size=group_size, embed_bits=bits, n_grid=20)
    return net, _set_top_level(update_config(net, copy.deepcopy(config)), bits, group_size)


def _quantize_gptq(net, config, bits, group_size, blocks):
    import mlx.core as mx
    from mlx_lm.quant.gptq import gptq_quantize

    # mlx-lm accumulates each Hessian X^T X in the activations' dtype: in float16 it overflows
    # to inf (NaN scales on the demo's down_proj). Calibrate in float32, store in the model's dtype.
    dtype = next(v.dtype for _, v in tree_flatten(net.parameters()) if mx.issubdtype(v.dtype, mx.floating))
    net.set_dtype(mx.float32)
    net, qconf = gptq_quantize(net, blocks, bits, group_size, fallback_bits=bits, fallback_group_size=group_size)
    net.set_dtype(dtype)
    config = copy.deepcopy(config)
    config["quantization"] = qconf
    config["quantization_config"] = qconf
    return net, config


def _quantize_dynamic(net, config, bits, group_size, blocks, target_bpw):
    from mlx_lm.quant.dynamic_quant import estimate_sensitivities, estimate_threshold
    from mlx_lm.utils import quantize_model

    high = next((b for b in SUPPORTED_BITS if b > bits), bits)
    sens = dict(estimate_sensitivities(net, blocks, bits, group_size, high, group_size, batch_size=4))
    threshold = estimate_threshold(net, sens, target_bpw, bits, group_size, high, group_size)

    def predicate(path, module):
        if path in sens and sens[path] > threshold:
            return {"bits": high, "group_size": group_size, "mode": "affine"}
        return True

    def planned_bpw():
        import mlx.nn as nn
        from mlx_lm.utils import compute_bits_per_weight

        trial = copy.deepcopy(net)
        nn.quantize(trial, group_size=group_size, bits=bits,
                    class_predicate=lambda p, m: hasattr(m, "to_quantized") and predicate(p, m))
        return float(compute_bits_per_weight(trial))

    # mlx-lm's bisection returns the midpoint of its last interval, which can raise one layer
    # too many: drop the least sensitive raised layer until the plan fits the target.
    while planned_bpw() > target_bpw and any(v > threshold for v in sens.values()):
        threshold = min(v for v in sens.values() if v > threshold)

    net, qconfig = quantize_model(net, config, group_size, bits, quant_predicate=predicate)
    raised = sorted(p for p, s in sens.items() if s > threshold)
    return net, qconfig, {"high_bits": high, "target_bpw": target_bpw, "raised": raised}


def _quantize_dwq(net, config, bits, group_size, seqs, seed, learning_rate, batch_size=4):
    import mlx.core as mx
    import mlx.optimizers as optimizers
    import numpy as np
    from mlx_lm.quant.dwq import dwq_quantize
    from mlx_lm.utils import quantize_model

    if len(seqs) < 2 * batch_size:
        raise QtoolsError(f"dwq needs at least {2 * batch_size} calibration records, the data has {len(seqs)}")
    order = np.random.default_rng(seed).permutation(len(seqs))
    n_valid = min(32, max(batch_size, len(seqs) // 10))
    valid = [seqs[i] for i in order[:n_valid]]
    train = [seqs[i] for i in order[n_valid:]]
    teacher = net
    student = copy.deepcopy(teacher)
    student, qconfig = quantize_model(student, config, group_size, bits)
    dtype = {"float32": mx.float32, "bfloat16": mx.bfloat16}.get(
        str(config.get("torch_dtype") or config.get("dtype")), mx.float16)
    opt = optimizers.Adam(learning_rate=learning_rate, bias_correction=True)
    longest = max(len(t) for t, _ in seqs)
    dwq_quantize(student, lambda batch, idx, split: teacher(batch), opt, train, valid,
                 batch_size=batch_size, max_seq_length=longest, seed=seed, dtype=dtype)
    student.eval()
    return student, qconfig, {"learning_rate": learning_rate, "train_records": len(train),
                              "valid_records": len(valid)}


def _adapter_files(tmp: Path, weights: dict, config: dict) -> None:
    import mlx.core as mx

    d = tmp / SHIPPED_ADAPTER
    d.mkdir()
    mx.save_safetensors(str(d / "adapters.safetensors"), weights)
    (d / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")


def _compensation(src, net, bits, group_size, rank, correction, target_bpw, adapter):
    """The correction factors for every quantized linear of the adapter's keys (or all)."""
    import mlx.core as mx
    import mlx.nn as nn
    import numpy as np
    from mlx_lm.utils import get_total_parameters

    from ..io.weights import SafetensorsModel
    from . import compensate

    deltas, ad_cfg = {}, {}
    if adapter is not None:
        ad, deltas = check_adapter_matches(adapter, src)
        ad_cfg = ad.config
    if correction == "subspace" and not deltas:
        raise QtoolsError("the subspace correction needs the fine-tune's adapter: give --adapter "
                          f"or fuse with qtools (its {PROVENANCE} names the adapter)")
    layers = net.model.layers
    keys = list((ad_cfg.get("lora_parameters") or {}).get("keys") or [])
    if not keys:
        keys = [k for k, m in layers[0].named_modules() if isinstance(m, nn.QuantizedLinear)]
    num_layers = len(layers)
    targets = []  # (module path, module, weight name)
    for i, layer in enumerate(layers):
        mods = dict(layer.named_modules())
        for k in keys:
            m = mods.get(k)
            if isinstance(m, nn.QuantizedLinear):
                targets.append((f"model.layers.{i}.{k}", m))
    if not targets:
        raise QtoolsError("no quantized linear layer to correct")
    shapes = [(m.weight.shape[0], m.weight.shape[1] * 32 // m.bits) for _, m in targets]
    total = get_total_parameters(net)
    max_rank = min(min(s) for s in shapes)
    if correction == "subspace":
        max_rank = min(max_rank, min(d.rank for d in deltas.values()))
    if rank is None:
        from mlx_lm.utils import compute_bits_per_weight

        budget = target_bpw - float(compute_bits_per_weight(net))
        rank = compensate.rank_for_budget(shapes, budget, total, max_rank)
        if rank < 1:
            raise BadValue(f"target {target_bpw:.3f} bits/weight leaves no room for a rank-1 correction "
                           f"({compensate.extra_bits_per_weight(shapes, 1, total):.3f} bits/weight) at {bits} bits",
                           "--target-bpw")
    elif rank < 1 or rank > max_rank:
        raise BadValue(f"rank {rank} is out of range for these tensors (1 to {max_rank})", "--rank")
    weights, stats = {}, []
    with SafetensorsModel(src) as st:
        for path, m in targets:
            w1 = st.to_float32(f"{path}.weight")
            deq = np.array(mx.dequantize(m.weight, m.scales, m.biases, group_size=m.group_size,
                                         bits=m.bits).astype(mx.float32))
            err = w1 - deq
            u = v = None
            if f"{path}.weight" in deltas:
                u, v = deltas[f"{path}.weight"].subspace()
            if correction == "svd":
                a, b = compensate.svd_factors(err, rank)
            else:
                a, b = compensate.subspace_factors(err, u, v, rank)
            # Float16 as shipped: measure what the stored factors remove.
            a16, b16 = a.astype(np.float16), b.astype(np.float16)
            stats.append({"tensor": path, **compensate.energy_kept(err, a16.astype(np.float32),
                                                                   b16.astype(np.float32), u, v)})
            weights[f"{path}.lora_a"] = mx.array(a16)
            weights[f"{path}.lora_b"] = mx.array(b16)
            st.release(f"{path}.weight")
    config = {
        "fine_tune_type": "lora",
        "num_layers": num_layers,
        "lora_parameters": {"rank": rank, "scale": 1.0, "dropout": 0.0, "keys": keys},
        "qtools_correction": {"kind": correction, "of": f"{bits}-bit group-{group_size} quantization error",
                              "model": str(src.resolve())},
    }

    def mean(key):
        vals = [s[key] for s in stats if key in s]
        return float(np.mean(vals)) if vals else None

    summary = {"correction": correction, "rank": rank, "keys": keys, "tensors": len(stats),
               "error_removed_mean": mean("error_removed"),
               "subspace_error_removed_mean": mean("subspace_error_removed"), "per_tensor": stats}
    return weights, config, summary


def quantize_recipe(model, out, bits: int = 4, group_size: int | None = None, recipe: str = "mxfp4",
                    force: bool = False, data=None, base=None, adapter=None, rank: int | None = None,
                    correction: str = "svd", target_bpw: float | None = None, seed: int = 0,
                    learning_rate: float = 1e-5, sequence_length: int = DEFAULT_SEQUENCE_LENGTH,
                    num_samples: int = DEFAULT_NUM_SAMPLES) -> dict:
    """Quantize MODEL (a float fused model dir) with one of RECIPES into OUT atomically."""
    import mlx.core as mx
    from mlx_lm.utils import compute_bits_per_weight, load, save

    if recipe not in RECIPES:
        raise BadValue(f"recipe {recipe!r} is not one of {', '.join(RECIPES)}", "--recipe")
    bits, group_size = check_recipe_args(recipe, bits, group_size)
    src = check_model_dir(model)
    check_writable(check_output(out, [src, base, adapter, data if isinstance(data, (str, Path)) else None], force))
    config_src = read_config(src)
    if config_src.get("quantization"):
        raise QtoolsError(f"{src} is already quantized ({config_src['quantization'].get('bits')}-bit); "
                          "quantize the float16 fused model instead")
    if target_bpw is None:
        target_bpw = bits + DEFAULT_EXTRA_BPW
    if sequence_length < 8 or num_samples == 0 or num_samples < -1:
        raise BadValue("--sequence-length must be at least 8 and --num-samples at least 1 (or -1: all)",
                       "--sequence-length" if sequence_length < 8 else "--num-samples")
    from .compensate import CORRECTIONS

    if correction not in CORRECTIONS:
        raise BadValue(f"correction {correction!r} is not one of {', '.join(CORRECTIONS)}", "--correction")
    # Everything the recipe reads is checked before any work starts.
    records = data_desc = None
    if recipe in DATA_RECIPES:
        records, data_desc = resolve_data(recipe, src, data)
    elif data is not None:
        raise BadValue(f"recipe {recipe} takes no calibration data (DATA is for {', '.join(DATA_RECIPES)})", "--data")
    weights_src, base_dir, adapter_dir = src, None, None
    if recipe == "adapter":
        base_dir, adapter_dir = resolve_base_adapter(src, base, adapter)
        weights_src = base_dir
        base_cfg = read_config(base_dir)
        if base_cfg.get("quantization"):
            raise QtoolsError(f"base {base_dir} is already quantized: give the float base")
        check_adapter_matches(adapter_dir, base_dir)
    elif recipe == "compensated":
        # The fine-tune's adapter (for its keys and subspace): --adapter, else the provenance's if present.
        from ..io.adapters import check_adapter_dir

        prov_adapter = (read_provenance(src) or {}).get("adapter")
        if adapter is not None or (prov_adapter and Path(prov_adapter).is_dir()):
            adapter_dir, _ = check_adapter_dir(adapter or prov_adapter)
            check_adapter_matches(adapter_dir, src)
    check_output(out, [base_dir, adapter_dir])  # the base and adapter the provenance names are inputs too

    tic = time.perf_counter()
    try:
        net, tokenizer, config = load(str(weights_src), return_config=True, lazy=recipe in FIXED_MODES)
    except Exception as exc:
        raise QtoolsError(f"cannot load model {weights_src}: {exc}") from None
    extra, shipped = {}, None
    with _stdout_to_stderr_on_success():
        mx.random.seed(seed)
        if recipe in FIXED_MODES:
            net, qconfig = _quantize_fixed(net, config, recipe)
        elif recipe in DATA_RECIPES:
            from .backend import cpu_float32_experts

            cpu_float32_experts(net)  # MLX's CPU GatherMM runs float32 only (a float MoE's experts)
            from ..io.calib_data import token_blocks, tokenize

            seqs = tokenize(records, tokenizer)
            if not seqs:
                raise QtoolsError("the calibration data holds no text")
            n_tokens = sum(len(t) for t, _ in seqs)
            _log(f"{recipe}: calibrating on {len(seqs)} records, {n_tokens} tokens ({data_desc})")
            extra["calibration"] = {"records": len(seqs), "tokens": n_tokens}
            if recipe == "dwq":
                net, qconfig, info = _quantize_dwq(net, config, bits, group_size, seqs, seed, learning_rate)
                extra.update(info)
            else:
                blocks = token_blocks(seqs, sequence_length, num_samples=num_samples, seed=seed)
                extra["calibration"].update({"blocks": int(blocks.shape[0]), "block_tokens": int(blocks.shape[1])})
                if recipe == "awq":
                    net, qconfig = _quantize_awq(net, config, bits, group_size, blocks)
                elif recipe == "gptq":
                    net, qconfig = _quantize_gptq(net, config, bits, group_size, blocks)
                else:
                    net, qconfig, info = _quantize_dynamic(net, config, bits, group_size, blocks, target_bpw)
                    extra.update(info)
        elif recipe == "adapter":
            from ..io.adapters import check_adapter_dir

            net, qconfig = _quantize_affine(net, config, bits, group_size)
            _, ad_cfg = check_adapter_dir(adapter_dir)
            ad_w = {k: v.astype(mx.float16) for k, v in mx.load(str(adapter_dir / "adapters.safetensors")).items()}
            shipped = (ad_w, {**ad_cfg, "model": str(base_dir.resolve())})
            extra.update({"base": str(base_dir.resolve()), "adapter": str(adapter_dir.resolve())})
        else:  # compensated
            net, qconfig = _quantize_affine(net, config, bits, group_size)
            w, cfg, summary = _compensation(src, net, bits, group_size, rank, correction, target_bpw, adapter_dir)
            shipped = (w, cfg)
            extra["compensation"] = summary
            _log(f"compensated: rank-{summary['rank']} {correction} correction on {summary['tensors']} tensors "
                 f"removes {summary['error_removed_mean']:.1%} of the quantization error on average")

    provenance = quantized_provenance(
        src, bits=bits, group_size=group_size, recipe=recipe, mode=recipe if recipe in FIXED_MODES else "affine",
        data=data_desc, layer_bits={},
        **({"recipe_details": {k: v for k, v in extra.items() if k != "compensation"}} if extra else {}))
    if "compensation" in extra:
        provenance["compensation"] = {k: v for k, v in extra["compensation"].items() if k != "per_tensor"}
    if shipped is not None:
        provenance["shipped_adapter"] = SHIPPED_ADAPTER
    with atomic_output_dir(out, force) as tmp:
        with contextlib.redirect_stdout(sys.stderr):
            save(tmp, str(weights_src), net, tokenizer, qconfig, donate_model=True)
            del net
            if shipped is not None:
                _adapter_files(tmp, *shipped)
            # Bits per weight as validate measures them: everything mlx-lm loads, adapter included;
            # loading here also proves mlx_lm.load serves the output.
            try:
                adapter_path = str(tmp / SHIPPED_ADAPTER) if shipped is not None else None
                check, _ = load(str(tmp), adapter_path=adapter_path, lazy=True)
            except Exception as exc:
                raise QtoolsError(f"mlx-lm cannot load the {recipe} output: {exc}") from None
            bpw = float(compute_bits_per_weight(check))
            del check
        provenance["bits_per_weight"] = bpw
        (tmp / PROVENANCE).write_text(json.dumps(provenance, indent=2) + "\n")
    out = Path(out)
    return {
        "out": str(out),
        "source": str(src),
        "bits": bits,
        "group_size": group_size,
        "recipe": recipe,
        "data": data_desc,
        "layer_overrides": 0,
        "bits_per_weight": bpw,
        "disk_bytes": dir_size(out),
        "source_disk_bytes": dir_size(src),
        "seconds": time.perf_counter() - tic,
        **extra,
    }
