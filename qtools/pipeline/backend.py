"""What MLX's CPU backend on Linux costs a validation run, said once before it starts.

On Linux (no Metal) MLX runs on the CPU: its GatherMM, the MoE expert matmul, exists only
in float32 (a float16 MoE fails with "[GatherMM::eval] Currently only supports float32"),
and its quantized matmuls, given float16 activations, run 20-50x slower than the same
product in float32 (x86 has no float16 arithmetic): the quantized layers of a model run on the
CPU compute in float32 (cpu_float32_quantized), the weights stay as stored (docs/linux.md).
"""

from __future__ import annotations

import os
import sys

from ..compat import mlx_blas_is_reference as blas_is_reference  # noqa: F401 (stream's name for it)


def _on_cpu() -> bool:
    import mlx.core as mx

    return mx.default_device() == mx.cpu


def _is_moe(config: dict) -> bool:
    keys = ("num_experts", "num_local_experts", "n_routed_experts", "moe_intermediate_size")
    return any(config.get(k) for k in keys) or "moe" in str(config.get("model_type", ""))


def cpu_backend_note(model) -> None:
    """One line on stderr when a quantized or MoE model (a model directory or its config dict)
    will run on MLX's CPU backend on Linux."""
    if not sys.platform.startswith("linux") or not _on_cpu():
        return
    if not isinstance(model, dict):
        from ..io.modeldir import read_config

        model = read_config(model)
    config = model
    quantized = bool(config.get("quantization") or config.get("quantization_config"))
    moe = _is_moe(config)
    if not (quantized or moe):
        return
    parts = []
    if moe:
        parts.append("runs MoE expert matmuls (GatherMM) only in float32 (float experts are computed in it)")
    if quantized:
        parts.append("runs quantized matmuls several times slower than a GPU (they are computed in float32)")
    print(f"Note: MLX's CPU backend on Linux {' and '.join(parts)}: expect validation to take far longer "
          "than on Apple Silicon (docs/linux.md)", file=sys.stderr)


def cpu_float32_experts(net, lazy: bool = False) -> int:
    """On the CPU, run float MoE expert matmuls (SwitchLinear) in float32 so GatherMM can: the
    weights stay stored as they are (memory, bits per weight) and are cast per call, the result
    cast back. Quantized experts (gather_qmm) are left alone. lazy: a model built without its
    weights (stream.StreamedModel), whose float16 weights come later: every float expert layer
    is switched. Returns how many were switched."""
    if not _on_cpu():
        return 0
    import mlx.core as mx
    from mlx_lm.models.switch_layers import SwitchLinear

    class Float32SwitchLinear(SwitchLinear):
        def __call__(self, x, indices, sorted_indices=False):
            y = mx.gather_mm(x.astype(mx.float32), self["weight"].astype(mx.float32).swapaxes(-1, -2),
                             rhs_indices=indices, sorted_indices=sorted_indices)
            if "bias" in self:
                y = y + mx.expand_dims(self["bias"][indices], -2)
            return y.astype(x.dtype)

    n = 0
    for _, module in net.named_modules():
        if type(module) is SwitchLinear and (lazy or module.weight.dtype != mx.float32):
            module.__class__ = Float32SwitchLinear
            n += 1
    return n


def _f32(a):
    """A float scale/bias array in float32 (exact); uint8 scales (mxfp4, nvfp4, mxfp8) and None as they are."""
    import mlx.core as mx

    return a.astype(mx.float32) if a is not None and mx.issubdtype(a.dtype, mx.floating) else a


def cpu_float32_quantized(net) -> int:
    """On the CPU, compute quantized matmuls (QuantizedLinear, a quantized tied head, mlx-lm's
    QuantizedSwitchLinear) in float32: MLX's CPU quantized_matmul and gather_qmm, given float16
    activations, run 20-50x slower than in float32 (measured on this project's x86-64 machine, MLX
    0.32: a 4-bit 4096x2048 product of 256 rows 60 s against 1.4 s; a 128-expert 4-bit gather of
    256 tokens 85 s against 2.1 s). The stored weights, scales and biases are untouched (memory,
    bits per weight); x, the affine scales and biases are cast per call (exactly), the result is
    cast back to x's dtype, as the GPU kernels accumulate in float32 and round once. Returns how
    many modules were switched."""
    if not _on_cpu():
        return 0
    import mlx.core as mx
    import mlx.nn as nn
    from mlx_lm.models.switch_layers import QuantizedSwitchLinear

    def qmm(m, x):
        return mx.quantized_matmul(x.astype(mx.float32), m["weight"], scales=_f32(m["scales"]),
                                   biases=_f32(m.get("biases")), transpose=True, group_size=m.group_size,
                                   bits=m.bits, mode=m.mode)

    class Float32QuantizedLinear(nn.QuantizedLinear):
        def __call__(self, x):
            y = qmm(self, x)
            if "bias" in self:
                y = y + self["bias"]
            return y.astype(x.dtype)

    class Float32QuantizedEmbedding(nn.QuantizedEmbedding):
        def as_linear(self, x):
            return qmm(self, x).astype(x.dtype)

    class Float32QuantizedSwitchLinear(QuantizedSwitchLinear):
        def __call__(self, x, indices, sorted_indices=False):
            y = mx.gather_qmm(x.astype(mx.float32), self["weight"], _f32(self["scales"]), _f32(self.get("biases")),
                              rhs_indices=indices, transpose=True, group_size=self.group_size, bits=self.bits,
                              mode=self.mode, global_scale=self.global_scale, sorted_indices=sorted_indices)
            if "bias" in self:
                y = y + mx.expand_dims(self["bias"][indices], -2)
            return y.astype(x.dtype)

    swap = {nn.QuantizedLinear: Float32QuantizedLinear, nn.QuantizedEmbedding: Float32QuantizedEmbedding,
            QuantizedSwitchLinear: Float32QuantizedSwitchLinear}
    n = 0
    for _, module in net.named_modules():
        new = swap.get(type(module))
        if new is not None:
            module.__class__ = new
            n += 1
    return n


def prepare_for_cpu(net, model_dir) -> None:
    """Say what the CPU backend costs (one stderr line); make a float MoE runnable on it and its
    quantized matmuls run in float32. (Its float matmuls stay MLX's: numpy's BLAS, which the
    streamed probe uses, forces an evaluation per product, and a generation loop of small products
    gained nothing from it: 32 s against MLX's 36 s for a study fine-tune's float and 4-bit answers
    on a loaded machine, 60 s with two BLAS threads.)"""
    cpu_backend_note(model_dir)
    cpu_float32_experts(net)
    cpu_float32_quantized(net)


# numpy's BLAS where it pays: a product of at least NUMPY_MIN_MACS multiply-adds (below it, the
# copies cost more than MLX's reference sgemm). Measured here (float16 x, weight 256x128): 16 rows
# 0.36 ms by MLX, 0.13 by numpy; 288 rows 4.6 against 0.66; 8192 rows 133 against 13; one row 0.06
# against 0.09. NUMPY_MIN_WEIGHT (any weight) is the tests' switch back to MLX's own. Products with
# fewer rows than NUMPY_MANY_ROWS (a generation step's few tokens) run on one BLAS thread
# (compat.numpy_blas_threads).
NUMPY_MIN_WEIGHT = 1
NUMPY_MIN_MACS = 1 << 18
NUMPY_MANY_ROWS = 64
NUMPY_SLICE = 1 << 24  # weight elements cast to float32 at once


def _matmul_t(x, w, bias=None):
    """x @ w.T (+ bias) in float32, cast back to x's dtype: as MLX's CPU computes a float16 matmul
    (the operands cast to float32, one rounding of the float32 result); by numpy's BLAS when large."""
    import mlx.core as mx
    import numpy as np

    lead = x.shape[:-1]
    xs = x.reshape(-1, x.shape[-1]).astype(mx.float32)
    if w.size < NUMPY_MIN_WEIGHT or xs.shape[0] * w.size < NUMPY_MIN_MACS:
        ws = w.astype(mx.float32)
        y = xs @ ws.T if bias is None else mx.addmm(bias.astype(mx.float32), xs, ws.T)
        return y.reshape(*lead, w.shape[0]).astype(x.dtype)
    from ..compat import numpy_blas_threads

    mx.eval(xs)
    xn = np.asarray(xs)
    y = np.empty((xn.shape[0], w.shape[0]), np.float32)
    step = max(1, NUMPY_SLICE // w.shape[1])  # a large weight (the head) is cast to float32 a slice at a time
    with numpy_blas_threads(1 if xs.shape[0] < NUMPY_MANY_ROWS else (os.cpu_count() or 1)):
        for r in range(0, w.shape[0], step):
            part = w[r:r + step].astype(mx.float32)
            mx.eval(part)
            np.matmul(xn, np.asarray(part).T, out=y[:, r:r + step])
            del part
    if bias is not None:
        b = bias.astype(mx.float32)
        mx.eval(b)
        y += np.asarray(b)
    return mx.array(y).reshape(*lead, w.shape[0]).astype(x.dtype)


def _gather_matmul_t(x, w, indices, fq=None):
    """MoE experts: x times w[indices].T per row, as mx.gather_mm(x, w.swapaxes(-1, -2),
    rhs_indices=indices) computes in float32 (x: (..., M, K) broadcast against indices' shape, w:
    (E, N, K)), cast back to x's dtype; rows grouped by expert, each expert's product by numpy's
    BLAS on its float32 weight (cast one expert at a time: the stacked experts are never held in
    float32). fq: (bits, group size): each expert's weight is first replaced by the values a
    quantized model holds (fakequant.quantized_value; groups run along the last axis, so an expert
    at a time gives the stacked tensor's values), so no fake-quantized copy of the stacked experts
    is ever held."""
    import mlx.core as mx
    import numpy as np

    from ..compat import numpy_blas_threads

    lead = tuple(np.broadcast_shapes(tuple(x.shape[:-2]), tuple(indices.shape)))
    m, k = x.shape[-2:]
    xs = mx.broadcast_to(x, (*lead, m, k)).reshape(-1, m, k).astype(mx.float32)
    idx = mx.broadcast_to(indices, lead).reshape(-1)
    mx.eval(xs, idx)
    xn, en = np.asarray(xs), np.asarray(idx)
    y = np.empty((xn.shape[0], m, w.shape[1]), np.float32)
    order = np.argsort(en, kind="stable")
    experts, starts = np.unique(en[order], return_index=True)
    bounds = [*starts[1:], order.size]
    with numpy_blas_threads(1 if order.size * m < NUMPY_MANY_ROWS else (os.cpu_count() or 1)):
        for e, lo, hi in zip(experts, starts, bounds):
            rows = order[lo:hi]
            we = w[int(e)]
            if fq is not None:
                from .fakequant import quantized_value

                we = quantized_value(we, *fq)
            we = we.astype(mx.float32)
            mx.eval(we)
            y[rows] = (xn[rows].reshape(-1, k) @ np.asarray(we).T).reshape(len(rows), m, -1)
            del we
    return mx.array(y).reshape(*lead, m, w.shape[1]).astype(x.dtype)


def numpy_blas_linears(net) -> int:
    """Route a float model's Linear layers, a tied embedding's as_linear (_matmul_t) and MoE
    experts (SwitchLinear: _gather_matmul_t) through numpy's BLAS, for eager layer-by-layer runs
    on MLX's CPU backend where it links a reference BLAS (blas_is_reference). The class of each module is swapped, its parameters untouched.
    Returns how many were switched."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx_lm.models.switch_layers import SwitchLinear

    class NumpyLinear(nn.Linear):
        numpy_blas = True  # its weight may be held in float32 (stream._Unit casts it once)

        def __call__(self, x):
            return _matmul_t(x, self["weight"], self["bias"] if "bias" in self else None)

    class NumpyEmbedding(nn.Embedding):
        def as_linear(self, x):
            return _matmul_t(x, self["weight"])

    class NumpySwitchLinear(SwitchLinear):
        # set_fake_quant: the weight held is the float one; the values a quantized model holds are
        # computed an expert at a time where they are multiplied (stream._Unit: no second copy)
        fake_quant_per_expert = True

        def __call__(self, x, indices, sorted_indices=False):
            w = self["weight"]
            fq = self.__dict__.get("_qtools_fq")
            if w[0].size < NUMPY_MIN_WEIGHT or x.size // x.shape[-1] * w[0].size < NUMPY_MIN_MACS:
                if fq is not None:
                    from .fakequant import quantized_value

                    w = quantized_value(w, *fq)
                y = mx.gather_mm(x.astype(mx.float32), w.astype(mx.float32).swapaxes(-1, -2),
                                 rhs_indices=indices, sorted_indices=sorted_indices).astype(x.dtype)
            else:
                y = _gather_matmul_t(x, w, indices, fq)
            if "bias" in self:
                y = y + mx.expand_dims(self["bias"][indices], -2)
            return y

    swap = {nn.Linear: NumpyLinear, nn.Embedding: NumpyEmbedding}
    n = 0
    for _, module in net.named_modules():
        if isinstance(module, SwitchLinear):  # float experts (cpu_float32_experts' class too)
            module.__class__ = NumpySwitchLinear
            n += 1
            continue
        new = swap.get(type(module))
        if new is not None:
            module.__class__ = new
            n += 1
    return n


def set_fake_quant(module, fq) -> None:
    """Run a numpy_blas_linears MoE experts module (fake_quant_per_expert) at fq = (bits, group
    size): its float weight multiplied as the values a quantized model holds, computed an expert at
    a time; None: as stored."""
    object.__setattr__(module, "_qtools_fq", None if fq is None else (int(fq[0]), int(fq[1])))


_LIBC: list = []


def release_freed_memory() -> None:
    """Give freed memory back to the system: MLX's buffer cache, and on Linux glibc's heap, which
    keeps freed blocks below its (growing) mmap threshold: layer after layer, the process's
    resident memory otherwise grows to several layers' worth of freed buffers."""
    import mlx.core as mx

    mx.clear_cache()
    if not sys.platform.startswith("linux"):
        return
    if not _LIBC:
        import ctypes

        try:
            _LIBC.append(ctypes.CDLL("libc.so.6").malloc_trim)
        except (OSError, AttributeError):  # not glibc (musl): nothing to trim
            _LIBC.append(None)
    if _LIBC[0] is not None:
        _LIBC[0](0)
