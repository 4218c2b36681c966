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
    from ..io.predicate import own_predicate

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


_KERNEL_DTYPES = {"float16": "float16", "bfloat16": "bfloat16", "float32": "float32"}
# Elements per block the kernel quantizes at once: bounds its float32 output and codes in flight.
BLOCK_ELEMENTS = 1 << 23


def _stored(deq, dtype: str):
    """The kernel's float32 values in the tensor's dtype, as numpy (16-bit floats as uint16); exact:
    each value is one the dtype holds (mx.dequantize's output in it)."""
    import numpy as np

    if dtype == "float16":
        return deq.astype(np.float16).view(np.uint16)
    if dtype == "bfloat16":
        return (deq.view(np.uint32) >> 16).astype(np.uint16)
    return deq


def quantized_values(todo: dict) -> dict:
    """{name: mx.dequantize(mx.quantize(w)) in w's dtype} for {name: (w, bits, group size)}: the
    values a quantized layer computes with.

    Computed by qtools' kernel (bit-exact with MLX, tests/test_kernel.py) in blocks of rows on
    parallel threads (it releases the GIL): faster than MLX's CPU quantize, and what is held at
    once is the result plus a few blocks, not float32 temporaries of every tensor. MLX's own
    quantize where the kernel does not apply."""
    import os
    from concurrent.futures import ThreadPoolExecutor

    import mlx.core as mx
    import numpy as np

    from .. import SUPPORTED_BITS, SUPPORTED_GROUP_SIZES, _ext

    out, jobs = {}, []
    results = {}
    for name, (w, bits, gs) in todo.items():
        dtype = _KERNEL_DTYPES.get(str(w.dtype).rsplit(".", 1)[-1])
        if dtype is None or w.ndim < 2 or bits not in SUPPORTED_BITS or gs not in SUPPORTED_GROUP_SIZES \
                or w.shape[-1] % gs:
            q, s, b = mx.quantize(w, group_size=gs, bits=bits)
            out[name] = mx.dequantize(q, s, b, group_size=gs, bits=bits).astype(w.dtype)
            continue
        flat = w.reshape(-1, w.shape[-1])  # groups run along the last axis: experts stack as rows
        raw = flat.view(mx.uint16) if dtype != "float32" else flat
        mx.eval(raw)  # MLX in this thread only; the kernel alone runs in the pool
        raw = np.asarray(raw)
        results[name] = np.empty(raw.shape, raw.dtype)
        step = max(1, BLOCK_ELEMENTS // raw.shape[1])
        jobs += [(name, r, raw[r:r + step], dtype, bits, gs) for r in range(0, raw.shape[0], step)]

    def run(job):
        name, r, block, dtype, bits, gs = job
        deq = _ext.quantize_dequantize(np.ascontiguousarray(block), dtype, bits, gs)[3]
        results[name][r:r + block.shape[0]] = _stored(deq, dtype)

    if jobs:
        with ThreadPoolExecutor(max_workers=min(len(jobs), os.cpu_count() or 1)) as pool:
            list(pool.map(run, jobs))
    del jobs
    for name in list(results):
        w = todo[name][0]
        arr = mx.array(results.pop(name))
        out[name] = (arr.view(w.dtype) if arr.dtype != w.dtype else arr).reshape(w.shape)
        mx.eval(out[name])
    return out


def quantized_value(w, bits: int, group_size: int):
    """mx.dequantize(mx.quantize(w)) in w's dtype (quantized_values for one tensor)."""
    return quantized_values({"w": (w, bits, group_size)})["w"]


def fake_quantize(model, bits: int, group_size: int = 64, exact_delta_from: dict | None = None) -> None:
    """Replace every weight mlx-lm would quantize by its quantize->dequantize image, in place.

    exact_delta_from: {parameter name: base weight}. Each weight W then becomes
    Q(W0) + (W - W0): the base quantized, the fine-tuning delta kept exactly. What the
    model still loses that way is the base's quantization noise, not the delta's rounding.
    """
    import mlx.core as mx

    modules = dict(model.named_modules())
    plan = quant_plan(model, bits, group_size)
    src = {name: modules[name].weight if exact_delta_from is None else exact_delta_from[f"{name}.weight"]
           for name in plan}
    values = quantized_values({name: (src[name], b, gs) for name, (b, gs) in plan.items()})
    for name in plan:
        module = modules[name]
        w, wq = module.weight, values[name]
        if exact_delta_from is not None:
            wq = wq.astype(mx.float32) + (w.astype(mx.float32) - src[name].astype(mx.float32))
        module.weight = wq.astype(w.dtype)
    mx.eval(model.parameters())
