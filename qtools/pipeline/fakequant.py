"""Fake quantization: a float model holding exactly the values a quantized model stores.

Every weight mlx-lm would quantize becomes mx.dequantize(*mx.quantize(w)) in the
weight's own dtype, so one float model in memory can be run at any bit-width
(calibrate, probe) without writing a quantized model to disk. Which weights, and at
which bit-width, is decided as mlx-lm's quantize_model decides it: the model's own
quant_predicate stands (qwen3_moe keeps its router `mlp.gate` at 8 bits).
"""

from __future__ import annotations


def quantizable_modules(model, group_size: int = 64) -> list:
    """(name, module) for every layer mlx-lm's quantize would convert at this group size."""
    return [(name, module) for name, module in model.named_modules()
            if hasattr(module, "to_quantized") and "weight" in module
            and module.weight.shape[-1] % group_size == 0]


def quant_plan(model, bits: int, group_size: int = 64) -> dict:
    """{module path: (bits, group size)} of every layer mlx-lm's quantize_model would quantize at
    `bits`, the model's own quant_predicate honoured as mlx-lm honours it (a layer it keeps float is
    left out, one it gives other parameters gets them). Reads shapes only: a lazily built model will do."""
    from ..survival.predicate import own_predicate

    own = own_predicate(model)
    plan = {}
    for name, module in quantizable_modules(model, group_size):
        choice = True if own is None else own(name, module)
        if choice is False:
            continue
        params = choice if isinstance(choice, dict) else {}
        if params.get("mode", "affine") != "affine":
            continue  # not an affine layer: fake quantization holds affine values only
        plan[name] = (int(params.get("bits", bits)), int(params.get("group_size", group_size)))
    return plan


def quantized_value(w, bits: int, group_size: int):
    """mx.dequantize(mx.quantize(w)) in w's dtype: the value a quantized layer computes with."""
    import mlx.core as mx

    q, s, b = mx.quantize(w, group_size=group_size, bits=bits)
    return mx.dequantize(q, s, b, group_size=group_size, bits=bits).astype(w.dtype)


def fake_quantize(model, bits: int, group_size: int = 64, exact_delta_from: dict | None = None) -> None:
    """Replace every weight mlx-lm would quantize by its quantize->dequantize image, in place.

    exact_delta_from: {parameter name: base weight}. Each weight W then becomes
    Q(W0) + (W - W0): the base quantized, the fine-tuning delta kept exactly. What the
    model still loses that way is the base's quantization noise, not the delta's rounding.
    """
    import mlx.core as mx

    modules = dict(model.named_modules())
    for name, (b, gs) in quant_plan(model, bits, group_size).items():
        module = modules[name]
        w = module.weight
        src = w if exact_delta_from is None else exact_delta_from[f"{name}.weight"]
        wq = quantized_value(src, b, gs)
        if exact_delta_from is not None:
            wq = wq.astype(mx.float32) + (w.astype(mx.float32) - src.astype(mx.float32))
        module.weight = wq.astype(w.dtype)
    mx.eval(model.parameters())
