"""The fused model `qtools fuse` writes, computed one tensor at a time from base + adapter.

The one home of "the fused value of a tensor". `qtools fuse` streams it to disk,
`qtools delta-survival --base B --adapter A` analyses it without writing it, and
quantize can read it the same way. The model is mlx-lm's own, loaded lazily: the
base is memory-mapped by `mx.load` and nothing is read until a tensor is asked
for, so mlx-lm's `sanitize` (renamed keys, stacked Hub experts, a dropped tied
lm_head) and its module order give the names and layout, and each value is the
graph `qtools fuse` always evaluated (fuse_module_f32, then mlx-lm's
dequantize_model and set_dtype), evaluated for that tensor alone.

    view = FusedView("base", "adapters", dtype="float16")
    view.names()              # tensor names in the order a reader lists the fused model's files
    view.files                # [(shard file name, [TensorInfo])]: mlx-lm's shards, as `qtools fuse` writes them
    view.info(name)           # TensorInfo: dtype code ("F16"), shape, nbytes (no value computed)
    view.array(name)          # the exact value, an evaluated mx.array, held until release(name)
    view.raw(name)            # the same as numpy (16-bit floats as uint16), like SafetensorsModel.raw
    view.release(name)        # drop it; a tensor is computed once (a second array() is an error)
    for name, arr in view.items():   # every tensor in names() order, one at a time; the view keeps
        ...                          # no reference, so each is freed when the caller drops it
    view.config               # the config.json `qtools fuse` writes (quantization removed, torch_dtype)
    view.fused_modules        # the adapter's modules, fused in float32
    view.base_quantization    # the base's quantization config (None for a float base)
    view.close()

Peak memory is the one tensor being computed (its float32 temporaries), not the model.

Where MLX's matmul is netlib's reference BLAS (Linux, CPU device), the plain-LoRA weights on a
float base are computed by the native kernel (fuse_native, csrc/fuse.cpp) instead of their graph,
to the same bits, with the base read from its memory map; the other tensors that mlx-lm keeps as
the base stores them are their memory maps (or the kernel's astype of them). The graph is the
reference everywhere else (DoRA, a quantized base, a tensor mlx-lm's sanitize rewrote, macOS).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .. import QtoolsError
from .adapters import check_adapter_dir
from .modeldir import check_model_dir
from .shards import plan_files
from .weights import SafetensorsModel, TensorIndex, TensorInfo, count_nonfinite_raw, dtype_code, mx_dtype

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


def lora_delta(module):
    """(base layer, sb, at) of an mlx-lm LoRA/DoRA module, its delta being sb @ at in float32 exactly as
    mlx-lm's fuse writes it (LoRALinear/DoRALinear: (scale * B^T) @ A^T; LoRASwitchLinear:
    (scale * B) @ A per expert; LoRAEmbedding/DoRAEmbedding: (scale * A) @ B); None for another kind.
    The one home of those factors: fuse_module_f32's graph and the native fuse both use it."""
    import mlx.core as mx
    from mlx_lm.tuner.dora import DoRAEmbedding, DoRALinear
    from mlx_lm.tuner.lora import LoRAEmbedding, LoRALinear, LoRASwitchLinear

    kinds = (LoRALinear, DoRALinear, LoRASwitchLinear, LoRAEmbedding, DoRAEmbedding)
    if not isinstance(module, kinds):
        return None
    f32 = mx.float32
    scale = float(module.scale)
    a, b = module.lora_a.astype(f32), module.lora_b.astype(f32)
    if isinstance(module, (LoRALinear, DoRALinear)):
        return module.linear, scale * b.T, a.T
    if isinstance(module, LoRASwitchLinear):
        return module.linear, scale * b, a.reshape(b.shape[0], -1, a.shape[-1])
    return module.embedding, scale * a, b


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
    delta = lora_delta(module)
    if delta is None:
        return module.fuse(dequantize=True)
    base, sb, at = delta
    w = _weight_f32(base) + sb @ at
    if isinstance(module, (LoRALinear, DoRALinear)):
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
        num_experts, out_dims, in_dims = w.shape
        has_bias = "bias" in base
        fused = SwitchLinear(in_dims, out_dims, num_experts, bias=has_bias)
        fused.weight = w.astype(dtype)
        if has_bias:
            fused.bias = base.bias.astype(dtype)
        return fused
    assert isinstance(module, (LoRAEmbedding, DoRAEmbedding))
    if isinstance(module, DoRAEmbedding):
        w = (module.m.astype(f32) / mx.linalg.norm(w, axis=1))[:, None] * w
    fused = nn.Embedding(*w.shape)
    fused.weight = w.astype(dtype)
    return fused


def _one_line(exc: Exception) -> str:
    """mlx-lm's multi-line mismatch report as one line: the first line and up to three details."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()] or [type(exc).__name__]
    detail = lines[0].rstrip(":")
    if len(lines) > 1:
        more = f" (+{len(lines) - 4} more)" if len(lines) > 4 else ""
        detail += ": " + "; ".join(lines[1:4]) + more
    return detail


def _lazy_fused_model(base: Path, adapter: Path, dtype: str, native: bool = False):
    """mlx-lm's model with the adapter fused, every parameter a lazy graph over the base and adapter
    files (nothing read yet): (model, config, fused module names, native plans, untouched). With
    `native`, the plans {fused weight name: _NativeFuse} of the plain-LoRA weights on a float base,
    which FusedView computes with the native kernel instead of their graph; untouched: the names of
    the base tensors mlx-lm's sanitize kept as loaded."""
    import mlx.core as mx
    from mlx.utils import tree_unflatten
    from mlx_lm.tuner.utils import load_adapters
    from mlx_lm.utils import dequantize_model, load_model

    untouched: set[str] = set()  # base tensors mlx-lm's sanitize passed through as they were loaded
    try:
        model, config = load_model(base, lazy=True, **_recording_sanitize(untouched))
    except Exception as exc:
        raise QtoolsError(f"cannot load base model {base}: {exc}") from None
    try:
        model = load_adapters(model, str(adapter))
    except Exception as exc:  # mlx-lm raises ValueError/KeyError/... on a mismatch
        raise QtoolsError(f"adapter {adapter} does not match base model {base}: {_one_line(exc)}") from None
    out_dtype = getattr(mx, dtype)
    modules = [(name, m) for name, m in model.named_modules() if hasattr(m, "fuse")]
    fused = [(name, fuse_module_f32(m, out_dtype)) for name, m in modules]
    if not fused:
        raise QtoolsError(f"adapter {adapter} added no LoRA/DoRA layers to {base}")
    plans = {}
    for name, m in modules if native else ():
        plan = _native_plan(m, f"{name}.weight", untouched)
        if plan is not None:
            plans[f"{name}.weight"] = plan
    model.update_modules(tree_unflatten(fused))
    # Layers the adapter did not touch are dequantized too: one dtype throughout.
    model = dequantize_model(model)
    model.set_dtype(out_dtype)
    return model, config, [name for name, _ in fused], plans, untouched


def _recording_sanitize(untouched: set) -> dict:
    """load_model's get_model_classes, wrapped so that the names of the weights mlx-lm's sanitize
    leaves as loaded (the same array: not renamed, stacked or converted) go into `untouched`: those
    can be read from the base's memory map."""
    from ..compat import mlx_lm_model_classes

    def get_classes(config):
        model_class, args_class = mlx_lm_model_classes(config)

        def make(args):
            model = model_class(args)
            own = getattr(model, "sanitize", None)

            def sanitize(weights):
                # called once: no cycle left to keep the model, and every tensor evaluated later, alive
                del model.sanitize
                loaded = dict(weights)
                out = own(weights) if own is not None else weights
                untouched.update(k for k, v in out.items() if loaded.get(k) is v)
                return out

            model.sanitize = sanitize
            return model

        return make, args_class

    return {"get_model_classes": get_classes}


class _NativeFuse:
    """One plain-LoRA weight on a float base, for the native kernel: the base weight (lazy, its stored
    dtype) or the name it has in the base's files, and the lazy float32 factors sb, at of lora_delta."""

    def __init__(self, weight, stored: str | None, sb, at, experts: int):
        self.weight, self.stored, self.sb, self.at, self.experts = weight, stored, sb, at, experts


def _native_plan(module, name: str, untouched: set):
    """A _NativeFuse for a plain LoRA module (LoRALinear, LoRASwitchLinear, LoRAEmbedding) on a float
    base; None for DoRA, a quantized base or another kind (their MLX graph is used)."""
    import mlx.core as mx
    from mlx_lm.tuner.lora import LoRAEmbedding, LoRALinear, LoRASwitchLinear

    if type(module) not in (LoRALinear, LoRASwitchLinear, LoRAEmbedding):
        return None
    layer, sb, at = lora_delta(module)
    if "scales" in layer or layer.weight.dtype not in (mx.float16, mx.bfloat16, mx.float32):
        return None
    w = layer.weight
    experts = w.shape[0] if w.ndim == 3 else 1
    return _NativeFuse(w, name if name in untouched else None, sb, at, experts)


# A large base tensor is converted this many bytes at a time, each part's pages dropped once read:
# resident memory stays near the output, not the output plus the input's map.
NATIVE_PART_BYTES = 64 << 20


def fuse_native(w, w_dtype: str, sb, at, experts: int, dtype: str, out=None):
    """float32(w) + sb @ at rounded to `dtype`, as MLX's CPU graph computes it with a reference BLAS
    (_ext.fuse_lora): w raw (16-bit floats as uint16), sb and at float32 numpy arrays, the dtypes as
    safetensors codes ("F16", "BF16", "F32"). Returns the raw result, shaped as w, and how many of
    its values are NaN or Inf. out: the array to write into (shaped as w), else a new one."""
    from .. import _ext

    cols = w.shape[-1]
    if out is None:
        out = np.empty(w.shape, np.float32 if dtype == "F32" else np.uint16)
    nonfinite = _ext.fuse_lora(w.reshape(-1, cols), w_dtype, sb.reshape(w.size // cols, sb.shape[-1]),
                               at.reshape(-1, cols), out.reshape(-1, cols), dtype, experts=experts)
    return out, nonfinite


def as_numpy(arr):
    """An evaluated mx.array as a C-contiguous numpy array over the same memory (a copy only for a
    strided view); 16-bit floats as uint16, as SafetensorsModel.raw stores them."""
    import mlx.core as mx

    if arr.dtype in (mx.float16, mx.bfloat16):
        arr = arr.view(mx.uint16)
    mx.eval(arr)
    out = np.asarray(memoryview(arr))
    return out if out.flags.c_contiguous else np.ascontiguousarray(out)


class FusedView(TensorIndex):
    """The fused model, tensor by tensor (see the module docstring for the API).

    Reads like a SafetensorsModel (tensors, names, info, raw, release, config, path), so
    code written for a fused model directory runs on base + adapter unchanged.
    """

    def __init__(self, base: str | Path, adapter: str | Path, dtype: str = "float16",
                 shard_bytes: int | None = None, native: bool | None = None):
        """shard_bytes: the shard size `files` plans for (mlx-lm's 5 GB by default). native: compute
        plain-LoRA weights on a float base with the native kernel (fuse_native), the same bits as
        their MLX graph; by default where MLX's matmul is the reference BLAS (Linux CPU), whose
        results the kernel reproduces and outruns; elsewhere the graph runs on MLX's own matmul."""
        from mlx.utils import tree_flatten
        from mlx_lm.utils import get_total_parameters

        if dtype not in DTYPES:
            raise QtoolsError(f"dtype {dtype!r} is not supported: use one of {', '.join(DTYPES)}")
        self.base = check_model_dir(base, "base model")
        self.adapter, self.adapter_config = check_adapter_dir(adapter)
        self.dtype = dtype
        self.path = self.base
        self.label = f"{self.base} + adapter {self.adapter}"
        if native is None:
            from ..compat import mlx_blas_is_reference

            native = mlx_blas_is_reference()
        # every shard's header is checked here, before any value is read lazily; kept open for the
        # native fuse, which reads base weights from their memory maps
        self._st = SafetensorsModel(self.base)
        try:
            model, config, fused, self._native, untouched = _lazy_fused_model(self.base, self.adapter, dtype, native)
        except BaseException:
            self._st.close()
            raise
        self._lazy = dict(tree_flatten(model.parameters()))
        self.fused_modules = fused
        # With `native`, a float tensor outside the fused modules that mlx-lm keeps as the base stores
        # it is its memory map when in the output dtype (astype to its own dtype: the same bits),
        # else the native kernel's astype of it (rank 0): never read into MLX.
        inside = tuple(f"{m}." for m in fused)
        mapped = {n: self._st.info(n) for n, arr in self._lazy.items() if native and n in untouched
                  and not n.startswith(inside) and n in self._st and self._st.info(n).shape == tuple(arr.shape)
                  and self._st.info(n).nbytes
                  and self._st.info(n).dtype in ("F16", "BF16", "F32") and dtype_code(arr.dtype) in ("F16", "BF16", "F32")}
        self._stored = {n for n, i in mapped.items() if i.dtype == dtype_code(self._lazy[n].dtype)}
        self._convert = set(mapped) - self._stored
        self.total_parameters = get_total_parameters(model)
        # mlx-lm's save keeps vision_config only for a model that keeps its vision tower
        self.keep_vision_config = "vision_tower" in getattr(model, "model", {})
        self.base_quantization = config.get("quantization")
        config.pop("quantization", None)
        config.pop("quantization_config", None)
        config["torch_dtype"] = dtype
        self.config = config
        infos = []
        for name, arr in self._lazy.items():  # mlx-lm's save order
            code = dtype_code(arr.dtype)
            if code is None:
                raise QtoolsError(f"tensor {name!r} of the fused model has dtype {arr.dtype}, which safetensors cannot hold")
            infos.append(TensorInfo(name, code, tuple(arr.shape), self.label, -1, arr.nbytes))
        # The order a reader lists the fused model in: mlx-lm's shards, each in its header's order.
        self.files = plan_files(infos, shard_bytes)
        self.tensors: dict[str, TensorInfo] = {i.name: i for _, group in self.files for i in group}
        self._done: dict = {}
        self.native_tensors = 0  # tensors computed by the native fuse so far
        self._nonfinite: dict[str, int] = {}  # their NaN/Inf counts, which the kernel counts as it writes
        self._hub = None  # the base with a Hub checkpoint's experts stacked, once a native plan needs it

    # -- SafetensorsModel's reading interface
    @property
    def quantization(self):
        return None

    def _no_tensor(self, name: str) -> str:
        return f"{self.label}: the fused model has no tensor named {name!r}"

    def _take(self, name: str):
        """The lazy value of `name`, dropped from the view (the view keeps no reference to it)."""
        self.info(name)
        if name not in self._lazy:
            raise QtoolsError(f"{self.label}: tensor {name!r} was already read and released (a FusedView is read once)")
        return self._lazy.pop(name)

    def readable(self, name: str) -> bool:
        """Whether array(name) can still compute the tensor (held, or not yet read)."""
        return name in self._done or name in self._lazy

    def array(self, name: str):
        """The fused tensor as an evaluated mx.array, held until release(name)."""
        if name not in self._done:
            self._done[name] = self._compute(name)
        value = self._done[name]
        if isinstance(value, np.ndarray):  # the native fuse's
            self._done[name] = value = self._to_mx(name, value)
        return value

    def raw(self, name: str):
        """The fused tensor as numpy, zero-copy: float16/bfloat16 as uint16, as SafetensorsModel.raw."""
        if name not in self._done:
            self._done[name] = self._compute(name)
        value = self._done[name]
        return value if isinstance(value, np.ndarray) else as_numpy(value)

    def _compute(self, name: str):
        """The value of `name`: an evaluated mx.array, or a raw numpy array (the native fuse's, or
        the base's memory map of a tensor stored as it is)."""
        arr = self._take(name)
        plan = self._native.pop(name, None)
        if name in self._stored:
            return self._st.raw(name)  # its graph (an astype to its own dtype) is never evaluated
        if name in self._convert:
            return self._astype_native(name)
        if plan is None:
            self._eval(name, arr)
            return arr
        del arr
        return self._fuse_native(name, plan)

    def _fuse_native(self, name: str, plan: _NativeFuse):
        import mlx.core as mx

        try:
            mx.eval(plan.sb, plan.at)
            sb, at = np.array(plan.sb, np.float32, order="C"), np.array(plan.at, np.float32, order="C")
            w, w_code = self._base_weight(name, plan)
            code = self.info(name).dtype
            if isinstance(w, np.ndarray):
                out, self._nonfinite[name] = fuse_native(w, w_code, sb, at, plan.experts, code)
            else:  # a Hub checkpoint's experts, one at a time from their maps
                out = np.empty(self.info(name).shape, np.float32 if code == "F32" else np.uint16)
                sb, at = sb.reshape(plan.experts, -1, sb.shape[-1]), at.reshape(plan.experts, -1, at.shape[-1])
                self._nonfinite[name] = sum(fuse_native(we, w_code, sb[e], at[e], 1, code, out=out[e])[1]
                                            for e, we in enumerate(w))
        except Exception as exc:  # a base file changed or unreadable since its header was checked
            raise QtoolsError(f"{self.label}: cannot read or fuse tensor {name!r}: {exc}") from None
        finally:
            if plan.stored is not None and plan.stored in self._st:
                self._st.release(plan.stored)  # its pages may go: RSS stays near one tensor
        self.native_tensors += 1
        return out

    def _astype_native(self, name: str):
        """The base tensor `name` in the output dtype, converted by the native kernel (rank 0)."""
        info = self._st.info(name)
        try:
            w = self._st.raw(name)
            w = w.reshape(-1, w.shape[-1]) if w.ndim > 1 else w.reshape(1, -1)
            out = np.empty(w.shape, np.float32 if self.info(name).dtype == "F32" else np.uint16)
            step = max(1, NATIVE_PART_BYTES // max(1, w[0].nbytes))
            none = np.empty((w.shape[0], 0), np.float32), np.empty((0, w.shape[1]), np.float32)
            n = 0
            for r in range(0, w.shape[0], step):  # in parts, each part's pages dropped once read
                n += fuse_native(w[r:r + step], info.dtype, none[0][r:r + step], none[1], 1, self.info(name).dtype,
                                 out=out[r:r + step])[1]
                self._st.release(name, upto=(r + step) * w[0].nbytes)
            self._nonfinite[name] = n
        except Exception as exc:  # a base file changed or unreadable since its header was checked
            raise QtoolsError(f"{self.label}: cannot read or fuse tensor {name!r}: {exc}") from None
        finally:
            self._st.release(name)
        return out.reshape(info.shape)

    def _base_weight(self, name: str, plan: _NativeFuse):
        """(raw base weight, its dtype code) of a native plan: its memory map where mlx-lm kept the
        tensor as loaded, the memory maps of a Hub checkpoint's experts in mlx-lm's stacking order
        (an iterator), else MLX's value of it."""
        want = (dtype_code(plan.weight.dtype), tuple(plan.weight.shape))
        if plan.stored is not None and plan.stored in self._st:
            info = self._st.info(plan.stored)
            if (info.dtype, info.shape) == want:
                return self._st.raw(plan.stored), info.dtype
        if plan.experts > 1 and plan.stored is None:
            if self._hub is None:  # opened once, the first time: a layout it does not know stays MLX's
                try:
                    self._hub = SafetensorsModel(self.base, stack_experts=True)
                except QtoolsError:
                    self._hub = False
            if self._hub and self._hub.is_stack(name) and (self._hub.info(name).dtype, self._hub.info(name).shape) == want:
                return self._hub.raw_parts(name), want[0]
        return as_numpy(plan.weight), want[0]

    def _to_mx(self, name: str, raw):
        import mlx.core as mx

        arr = mx.array(raw)
        return arr if raw.dtype != "uint16" else arr.view(mx_dtype(self.info(name).dtype))

    def _eval(self, name: str, arr) -> None:
        import mlx.core as mx

        try:
            mx.eval(arr)
        except Exception as exc:  # a base file changed or unreadable since its header was checked
            raise QtoolsError(f"{self.label}: cannot read or fuse tensor {name!r}: {exc}") from None

    def release(self, name: str) -> None:
        self._done.pop(name, None)
        if name in self._stored:
            self._st.release(name)  # the memory map's pages may go

    def count_nonfinite(self, name: str, raw) -> int:
        """NaN/Inf values of the tensor `name` whose raw value is `raw`: counted by the native fuse
        as it wrote them, else read from `raw`."""
        n = self._nonfinite.pop(name, None)
        return count_nonfinite_raw(raw, self.info(name).dtype) if n is None else n

    def items(self):
        """(name, evaluated mx.array) for every tensor not yet read, in names() order, one at a time:
        the view holds none of them, so each is freed once the caller lets it go."""
        for name, value in self._remaining():
            yield name, self._to_mx(name, value) if isinstance(value, np.ndarray) else value
            del value

    def raw_items(self):
        """(name, raw numpy array) as items() gives them, without the native fuse's copy into MLX:
        what a writer wants (16-bit floats as uint16)."""
        for name, value in self._remaining():
            yield name, value if isinstance(value, np.ndarray) else as_numpy(value)
            del value

    def _remaining(self):
        mapped = None
        for name in self.names():
            if name in self._lazy:
                value = self._compute(name)
                yield name, value
                del value
                if mapped is not None:  # the one before: a writer is done with it, or reads it
                    self._st.release(mapped)  # again from the page cache (a read-only file map)
                mapped = name if name in self._stored else None
        if mapped is not None:
            self._st.release(mapped)

    def provenance(self) -> dict:
        """The fields of qtools_provenance.json that describe the fuse (fuse adds created/versions)."""
        lora = self.adapter_config.get("lora_parameters", {})
        return {
            "qtools_provenance": 1,
            "kind": "fused",
            "base": str(self.base.resolve()),
            "adapter": str(self.adapter.resolve()),
            "fine_tune_type": self.adapter_config.get("fine_tune_type", "lora"),
            "scale": lora.get("scale"),
            "rank": lora.get("rank"),
            "keys": lora.get("keys"),
            "num_layers": self.adapter_config.get("num_layers"),
            "dtype": self.dtype,
            "fuse_dtype": "float32",
            "base_quantization": self.base_quantization,
            "fused_modules": list(self.fused_modules),
        }

    def close(self) -> None:
        self._lazy.clear()
        self._done.clear()
        self._native.clear()
        self._nonfinite.clear()
        self._stored.clear()
        self._convert.clear()
        self._st.close()
        if self._hub:
            self._hub.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class FusedTensors:
    """Base + adapter fused on the fly as a tensor source read many times (a streamed model reads
    every tensor once per pass over the weights): names(), info(name), get(name) -> evaluated
    mx.array, close(). A FusedView computes a tensor once, so a tensor asked for again opens a
    fresh view: each pass over the weights costs what the streamed fuse costs, with no fused
    model on disk."""

    def __init__(self, base: str | Path, adapter: str | Path, dtype: str = "float16", view: FusedView | None = None):
        """view: an open FusedView of the same base, adapter and dtype to start from."""
        self._args = (base, adapter, dtype)
        self.view = view if view is not None else FusedView(base, adapter, dtype)
        self.path, self.config = self.view.base, self.view.config

    def names(self) -> list[str]:
        return self.view.names()

    def info(self, name: str) -> TensorInfo:
        return self.view.info(name)

    def get(self, name: str):
        if not self.view.readable(name):  # a new pass over the weights
            self.view.close()
            self.view = FusedView(*self._args)
        arr = self.view.array(name)
        self.view.release(name)
        return arr

    def close(self) -> None:
        self.view.close()
