"""The fuse as it was before it streamed (commit a7164fc, qtools/pipeline/fuse.py), kept for the
tests only: the reference the streamed fuse and FusedView must match bit for bit. It loads the
whole base with mlx-lm and saves with mlx-lm's save. Its float32 math (fuse_module_f32) is kept
as it was on purpose: an oracle that imported the new code's math could not catch a change in it.

Fuse a LoRA/DoRA adapter into its base model, in float32, saved as float16.

Like `mlx_lm fuse --dequantize`, but every delta scale * B^T A^T is added in
float32: added in the base's dtype (bfloat16 keeps 8 mantissa bits), most of a
small fine-tune delta is rounded away before quantization ever sees it. A
quantized base is dequantized, never re-quantized at its own bits. The output
carries `qtools_provenance.json` so delta-survival can find base and adapter.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import sys
import time
from pathlib import Path

from qtools import QtoolsError, versions
from qtools.io.adapters import check_adapter_dir
from qtools.io.atomic import atomic_output_dir, check_output_free, check_writable
from qtools.io.modeldir import PROVENANCE, check_model_dir, dir_size
from qtools.io.weights import SafetensorsModel, check_finite
from qtools.pipeline.fuse import output_bytes_estimate

DTYPES = ("float16", "bfloat16", "float32")


def _weight_f32(layer):
    """The layer's weight in float32, dequantized at its native dtype first."""
    import mlx.core as mx

    w = layer.weight
    if "scales" in layer:
        w = mx.dequantize(
            w, layer.scales, layer.get("biases"), group_size=layer.group_size,
            bits=layer.bits, mode=getattr(layer, "mode", "affine"),
        )
    return w.astype(mx.float32)


def fuse_module_f32(module, dtype):
    """Fused replacement for one mlx-lm LoRA/DoRA module, computed in float32.

    Mirrors LoRALinear/DoRALinear/LoRASwitchLinear/LoRAEmbedding/DoRAEmbedding.fuse
    with dequantize=True; unknown adapter kinds fall back to their own fuse().
    """
    import mlx.core as mx
    import mlx.nn as nn
    from mlx_lm.models.switch_layers import SwitchLinear
    from mlx_lm.tuner.dora import DoRAEmbedding, DoRALinear
    from mlx_lm.tuner.lora import LoRAEmbedding, LoRALinear, LoRASwitchLinear

    f32 = mx.float32
    scale = float(module.scale)
    a, b = module.lora_a.astype(f32), module.lora_b.astype(f32)
    if isinstance(module, (LoRALinear, DoRALinear)):
        base = module.linear
        w = _weight_f32(base) + (scale * b.T) @ a.T
        if isinstance(module, DoRALinear):
            w = (module.m.astype(f32) / mx.linalg.norm(w, axis=1))[:, None] * w
        out_dims, in_dims = w.shape
        has_bias = "bias" in base
        fused = nn.Linear(in_dims, out_dims, bias=has_bias)
        fused.weight = w.astype(dtype)
        if has_bias:
            fused.bias = base.bias.astype(dtype)
        return fused
    if isinstance(module, LoRASwitchLinear):
        base = module.linear
        w = _weight_f32(base)
        num_experts, out_dims, in_dims = w.shape
        w = w + (scale * b) @ a.reshape(num_experts, -1, in_dims)
        has_bias = "bias" in base
        fused = SwitchLinear(in_dims, out_dims, num_experts, bias=has_bias)
        fused.weight = w.astype(dtype)
        if has_bias:
            fused.bias = base.bias.astype(dtype)
        return fused
    if isinstance(module, (LoRAEmbedding, DoRAEmbedding)):
        w = _weight_f32(module.embedding) + (scale * a) @ b
        if isinstance(module, DoRAEmbedding):
            w = (module.m.astype(f32) / mx.linalg.norm(w, axis=1))[:, None] * w
        fused = nn.Embedding(*w.shape)
        fused.weight = w.astype(dtype)
        return fused
    return module.fuse(dequantize=True)


def old_fuse(
    base: str | Path,
    adapter: str | Path,
    out: str | Path,
    dtype: str = "float16",
    force: bool = False,
) -> dict:
    """Fuse ADAPTER into BASE and write OUT atomically; return a report dict."""
    import mlx.core as mx
    from mlx.utils import tree_flatten, tree_unflatten
    from mlx_lm.tuner.utils import load_adapters
    from mlx_lm.utils import dequantize_model, load, save

    if dtype not in DTYPES:
        raise QtoolsError(f"dtype {dtype!r} is not supported: use one of {', '.join(DTYPES)}")
    base_path = check_model_dir(base, "base model")
    adapter_path, adapter_cfg = check_adapter_dir(adapter)
    check_output_free(out, force)
    check_writable(out, output_bytes_estimate(base_path, dtype))
    # Non-finite inputs first, so a NaN in the output below can only be an overflow of the fuse.
    hint = "the input is already broken, not an overflow of the fused weights; fix the model that wrote it"
    with SafetensorsModel(base_path) as st:
        check_finite(st, f"base model {base_path}", hint)
    with SafetensorsModel.from_file(adapter_path / "adapters.safetensors") as st:
        check_finite(st, f"adapter {adapter_path}", hint)

    tic = time.perf_counter()
    try:
        model, tokenizer, config = load(str(base_path), return_config=True)
    except Exception as exc:
        raise QtoolsError(f"cannot load base model {base_path}: {exc}") from None
    base_quant = config.get("quantization")
    try:
        model = load_adapters(model, str(adapter_path))
    except Exception as exc:  # mlx-lm raises ValueError/KeyError/... on a mismatch
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()] or [type(exc).__name__]
        detail = lines[0].rstrip(":")
        if len(lines) > 1:
            more = f" (+{len(lines) - 4} more)" if len(lines) > 4 else ""
            detail += ": " + "; ".join(lines[1:4]) + more
        raise QtoolsError(
            f"adapter {adapter_path} does not match base model {base_path}: {detail}"
        ) from None

    out_dtype = getattr(mx, dtype)
    fused = [(name, fuse_module_f32(m, out_dtype)) for name, m in model.named_modules() if hasattr(m, "fuse")]
    if not fused:
        raise QtoolsError(f"adapter {adapter_path} added no LoRA/DoRA layers to {base_path}")
    model.update_modules(tree_unflatten(fused))
    # Layers the adapter did not touch are dequantized too: one dtype throughout.
    model = dequantize_model(model)
    model.set_dtype(out_dtype)
    params = dict(tree_flatten(model.parameters()))
    mx.eval(params)
    bad = [k for k, v in params.items() if mx.issubdtype(v.dtype, mx.floating) and not mx.isfinite(v).all().item()]
    if bad:
        raise QtoolsError(
            f"fused weights overflow {dtype} in {bad[0]} (and {len(bad) - 1} more); use --dtype float32 or bfloat16"
        )
    config.pop("quantization", None)
    config.pop("quantization_config", None)
    config["torch_dtype"] = dtype

    lora = adapter_cfg.get("lora_parameters", {})
    provenance = {
        "qtools_provenance": 1,
        "kind": "fused",
        "base": str(base_path.resolve()),
        "adapter": str(adapter_path.resolve()),
        "fine_tune_type": adapter_cfg.get("fine_tune_type", "lora"),
        "scale": lora.get("scale"),
        "rank": lora.get("rank"),
        "keys": lora.get("keys"),
        "num_layers": adapter_cfg.get("num_layers"),
        "dtype": dtype,
        "fuse_dtype": "float32",
        "base_quantization": base_quant,
        "fused_modules": [name for name, _ in fused],
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "versions": versions(),
    }
    with atomic_output_dir(out, force) as tmp:
        # mlx-lm prints progress on stdout; keep stdout for our report / --json.
        with contextlib.redirect_stdout(sys.stderr):
            save(tmp, str(base_path), model, tokenizer, config, donate_model=False)
        (tmp / PROVENANCE).write_text(json.dumps(provenance, indent=2) + "\n")
    out = Path(out)
    return {
        "out": str(out),
        "base": provenance["base"],
        "adapter": provenance["adapter"],
        "fine_tune_type": provenance["fine_tune_type"],
        "fused_modules": len(fused),
        "dequantized_base": base_quant is not None,
        "dtype": dtype,
        "disk_bytes": dir_size(out),
        "seconds": time.perf_counter() - tic,
    }
