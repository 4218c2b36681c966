"""Fake quantization: a float model holding exactly the values a quantized model stores.

Every weight mlx-lm would quantize becomes mx.dequantize(*mx.quantize(w)) in the
weight's own dtype, so one float model in memory can be run at any bit-width
(calibrate, probe) without writing a quantized model to disk.
"""

from __future__ import annotations


def quantizable_modules(model, group_size: int = 64) -> list:
    """(name, module) for every layer mlx-lm's quantize would convert at this group size."""
    return [(name, module) for name, module in model.named_modules()
            if hasattr(module, "to_quantized") and "weight" in module
            and module.weight.shape[-1] % group_size == 0]


def fake_quantize(model, bits: int, group_size: int = 64, exact_delta_from: dict | None = None) -> None:
    """Replace every weight mlx-lm would quantize by its quantize->dequantize image, in place.

    exact_delta_from: {parameter name: base weight}. Each weight W then becomes
    Q(W0) + (W - W0): the base quantized, the fine-tuning delta kept exactly. What the
    model still loses that way is the base's quantization noise, not the delta's rounding.
    """
    import mlx.core as mx

    for name, module in quantizable_modules(model, group_size):
        w = module.weight
        src = w if exact_delta_from is None else exact_delta_from[f"{name}.weight"]
        q, s, b = mx.quantize(src, group_size=group_size, bits=bits)
        wq = mx.dequantize(q, s, b, group_size=group_size, bits=bits)
        if exact_delta_from is not None:
            wq = wq.astype(mx.float32) + (w.astype(mx.float32) - src.astype(mx.float32))
        module.weight = wq.astype(w.dtype)
    mx.eval(model.parameters())
