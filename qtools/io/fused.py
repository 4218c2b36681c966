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
"""

from __future__ import annotations

from pathlib import Path

from .. import QtoolsError
from .adapters import check_adapter_dir
from .modeldir import check_model_dir
from .shards import plan_files
from .weights import SafetensorsModel, TensorInfo, dtype_code

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


def _one_line(exc: Exception) -> str:
    """mlx-lm's multi-line mismatch report as one line: the first line and up to three details."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()] or [type(exc).__name__]
    detail = lines[0].rstrip(":")
    if len(lines) > 1:
        more = f" (+{len(lines) - 4} more)" if len(lines) > 4 else ""
        detail += ": " + "; ".join(lines[1:4]) + more
    return detail


def _lazy_fused_model(base: Path, adapter: Path, dtype: str):
    """mlx-lm's model with the adapter fused, every parameter a lazy graph over the base and adapter
    files (nothing read yet): (model, config, fused module names)."""
    import mlx.core as mx
    from mlx.utils import tree_unflatten
    from mlx_lm.tuner.utils import load_adapters
    from mlx_lm.utils import dequantize_model, load_model

    try:
        model, config = load_model(base, lazy=True)
    except Exception as exc:
        raise QtoolsError(f"cannot load base model {base}: {exc}") from None
    try:
        model = load_adapters(model, str(adapter))
    except Exception as exc:  # mlx-lm raises ValueError/KeyError/... on a mismatch
        raise QtoolsError(f"adapter {adapter} does not match base model {base}: {_one_line(exc)}") from None
    out_dtype = getattr(mx, dtype)
    fused = [(name, fuse_module_f32(m, out_dtype)) for name, m in model.named_modules() if hasattr(m, "fuse")]
    if not fused:
        raise QtoolsError(f"adapter {adapter} added no LoRA/DoRA layers to {base}")
    model.update_modules(tree_unflatten(fused))
    # Layers the adapter did not touch are dequantized too: one dtype throughout.
    model = dequantize_model(model)
    model.set_dtype(out_dtype)
    return model, config, [name for name, _ in fused]


def as_numpy(arr):
    """An evaluated mx.array as a C-contiguous numpy array over the same memory (a copy only for a
    strided view); 16-bit floats as uint16, as SafetensorsModel.raw stores them."""
    import mlx.core as mx
    import numpy as np

    if arr.dtype in (mx.float16, mx.bfloat16):
        arr = arr.view(mx.uint16)
    mx.eval(arr)
    out = np.asarray(memoryview(arr))
    return out if out.flags.c_contiguous else np.ascontiguousarray(out)


class FusedView:
    """The fused model, tensor by tensor (see the module docstring for the API).

    Reads like a SafetensorsModel (tensors, names, info, raw, release, config, path), so
    code written for a fused model directory runs on base + adapter unchanged.
    """

    def __init__(self, base: str | Path, adapter: str | Path, dtype: str = "float16",
                 shard_bytes: int | None = None):
        """shard_bytes: the shard size `files` plans for (mlx-lm's 5 GB by default)."""
        from mlx.utils import tree_flatten
        from mlx_lm.utils import get_total_parameters

        if dtype not in DTYPES:
            raise QtoolsError(f"dtype {dtype!r} is not supported: use one of {', '.join(DTYPES)}")
        self.base = check_model_dir(base, "base model")
        self.adapter, self.adapter_config = check_adapter_dir(adapter)
        self.dtype = dtype
        self.path = self.base
        self.label = f"{self.base} + adapter {self.adapter}"
        with SafetensorsModel(self.base):
            pass  # every shard's header is checked here, before any value is read lazily
        model, config, fused = _lazy_fused_model(self.base, self.adapter, dtype)
        self._lazy = dict(tree_flatten(model.parameters()))
        self.fused_modules = fused
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

    # -- SafetensorsModel's reading interface
    @property
    def quantization(self):
        return None

    def names(self) -> list[str]:
        return list(self.tensors)

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise QtoolsError(f"{self.label}: the fused model has no tensor named {name!r}") from None

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
            arr = self._take(name)
            self._eval(name, arr)
            self._done[name] = arr
        return self._done[name]

    def _eval(self, name: str, arr) -> None:
        import mlx.core as mx

        try:
            mx.eval(arr)
        except Exception as exc:  # a base file changed or unreadable since its header was checked
            raise QtoolsError(f"{self.label}: cannot read or fuse tensor {name!r}: {exc}") from None

    def raw(self, name: str):
        """The fused tensor as numpy, zero-copy: float16/bfloat16 as uint16, as SafetensorsModel.raw."""
        return as_numpy(self.array(name))

    def release(self, name: str) -> None:
        self._done.pop(name, None)

    def items(self):
        """(name, evaluated mx.array) for every tensor not yet read, in names() order, one at a time:
        the view holds none of them, so each is freed once the caller lets it go."""
        for name in self.names():
            if name in self._lazy:
                arr = self._take(name)
                self._eval(name, arr)
                yield name, arr
                del arr

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
