"""Quantize a model larger than memory: mlx-lm's quantize_model planned on the model's skeleton,
then run module by module from a tensor source.

The model class is built from config.json with placeholder weights (lazy zeros of the
stored shapes and dtypes, never evaluated), passed through the class's own `sanitize()`
and `load_weights(strict=True)` as `mlx_lm.load` does, and quantized by
`mlx_lm.utils.quantize_model` with the recipe's predicate. That fixes the output's
names, order, shapes, dtypes and quantization config exactly as mlx-lm's whole-model
path would, without reading a weight. Then each quantized module's real weights are
read from the source, quantized by the module's own `to_quantized` (what
`nn.quantize` calls) and written; peak memory is one module (a stacked MoE expert
tensor is the largest), whatever the model's size.

sanitize() is run on the placeholders themselves: a tensor it passes through
unchanged (the same Python object, maybe renamed) is read as stored; one it builds by
stacking a Hub checkpoint's per-expert tensors is stacked here from the same experts
(io.weights.expert_stacks); anything else it computes cannot be reproduced tensor by
tensor, and `NotStreamable` says so (the caller then loads the model lazily instead).
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import Callable, Protocol

from .. import QtoolsError
from ..io.mlxsave import Spec, bits_per_weight, total_parameters
from ..io.weights import TensorInfo, expert_stacks, mx_dtype

# What a numerical failure inside MLX or numpy looks like; each becomes one `Error:` line.
NUMERICAL_ERRORS = (ArithmeticError, RuntimeError, ValueError, MemoryError)


class NotStreamable(Exception):
    """The model's sanitize() computes a tensor from others in a way the streamed path does not reproduce."""


class TensorSource(Protocol):
    """Name -> tensor of a float model, one at a time (io.weights.MappedTensors: the memory-mapped
    model directory; io.fused.FusedTensors: base + adapter fused on the fly)."""

    def names(self) -> list[str]: ...

    def info(self, name: str) -> TensorInfo: ...  # .shape, .dtype (a safetensors code)

    def get(self, name: str):  # the tensor as an evaluated mx.array; the source holds nothing
        ...


def as_mx(value, code: str):
    """An evaluated mx.array of a source tensor (copied out of the memory map)."""
    import mlx.core as mx
    import numpy as np

    if isinstance(value, mx.array):
        return value
    if code == "BF16":
        return mx.array(np.asarray(value).view(np.uint16)).view(mx.bfloat16)
    if code == "F16":
        return mx.array(np.asarray(value).view(np.float16))
    return mx.array(np.asarray(value))


class Skeleton:
    """The float model as mlx_lm.load builds it, every weight a placeholder, and where each of its
    parameters comes from in the source."""

    def __init__(self, config: dict, source: TensorSource, what: str = "model"):
        import mlx.core as mx

        from ..compat import mlx_lm_model_classes

        self.config, self.source, self.what = config, source, what
        specs = {n: (source.info(n).shape, source.info(n).dtype) for n in source.names()}
        try:
            if config.get("model_file") is not None:
                raise ValueError("it needs a custom model file (model_file), which qtools does not run")
            model_cls, args_cls = mlx_lm_model_classes(config)
            model = model_cls(args_cls.from_dict(config))
        except Exception as exc:  # mlx-lm raises many kinds for a config it cannot build
            raise QtoolsError(f"cannot load {what}: {exc}") from None
        self.codes = {n: code for n, (_, code) in specs.items()}
        placeholders = {n: mx.zeros(shape, mx_dtype(code)) for n, (shape, code) in specs.items()}
        by_id = {id(v): n for n, v in placeholders.items()}
        try:
            weights = model.sanitize(dict(placeholders)) if hasattr(model, "sanitize") else dict(placeholders)
        except Exception as exc:
            raise QtoolsError(f"cannot load {what}: {exc}") from None
        infos = {n: TensorInfo(n, code, tuple(shape), Path(n), 0, 0) for n, (shape, code) in specs.items()}
        try:
            stacks = expert_stacks(infos)
        except QtoolsError:
            stacks = {}
        self.source_of: dict[str, tuple] = {}  # parameter -> (source names...): one, or the experts stacked
        for name, v in weights.items():
            src = by_id.get(id(v))
            if src is not None:
                self.source_of[name] = (src,)
                continue
            parts = stacks.get(name)
            if (parts and tuple(v.shape) == (len(parts), *parts[0].shape)
                    and v.dtype == mx_dtype(parts[0].dtype)):
                self.source_of[name] = tuple(p.name for p in parts)
                continue
            raise NotStreamable(f"{config.get('model_type')}: sanitize() computes {name}")
        try:
            model.load_weights(list(weights.items()), strict=True)
        except Exception as exc:
            raise QtoolsError(f"cannot load {what}: {exc}") from None
        model.eval()
        self.model = model

    def read(self, name: str):
        """The real value of the float model's parameter `name` (evaluated), from the source."""
        import mlx.core as mx

        srcs = self.source_of[name]
        parts = []
        for s in srcs:
            parts.append(as_mx(self.source.get(s), self.codes[s]))
            mx.eval(parts[-1])
        value = parts[0] if len(parts) == 1 else mx.stack(parts)
        mx.eval(value)
        return value


class Plan:
    """What quantize_model does to a model, known before any weight is read: the tensors mlx-lm's
    save would write (Spec, in parameter order), the config it would write, the quantized modules
    and their bits; `produce(name)` computes one output tensor."""

    specs: list[Spec]
    qconfig: dict
    quantized_bits: dict
    keep_vision_config: bool
    model: object  # the quantized model (placeholders or real weights)

    def total_parameters(self) -> int:
        return total_parameters(self.specs, self.quantized_bits)

    def bits_per_weight(self, extra_bytes: int = 0) -> float:
        return bits_per_weight(self.specs, self.quantized_bits, extra_bytes)

    def produce(self, name: str):
        raise NotImplementedError

    def close(self) -> None:
        pass


def _record_quantize(model, config, group_size, bits, mode, predicate):
    """mlx_lm.utils.quantize_model(model, ...) and the arguments nn.quantize gave each module's
    to_quantized (a predicate's dict, else the defaults)."""
    from mlx_lm.utils import quantize_model

    from ..io.predicate import own_predicate

    inner = predicate or own_predicate(model)  # quantize_model's own rule when given none
    decided: dict = {}

    def recording(path, module):
        r = inner(path, module) if inner is not None else True
        if isinstance(r, dict):
            decided[path] = {k: v for k, v in r.items() if k != "quantize_input" or v}  # as nn.quantize passes it
        elif r:
            decided[path] = {"group_size": group_size, "bits": bits, "mode": mode}
        return r

    # mlx-lm prints an [INFO] bits-per-weight line; the command reports bits per weight itself, and a
    # failure later must stay one `Error:` line
    with contextlib.redirect_stdout(io.StringIO()):
        model, qconfig = quantize_model(model, config, group_size, bits, mode=mode, quant_predicate=recording)
    return model, qconfig, decided


def _quantized_bits(model) -> dict:
    return {p: int(m.bits) for p, m in model.named_modules() if hasattr(m, "bits") and "scales" in m}


def _check_finite(path: str, outputs: dict) -> None:
    import mlx.core as mx

    for k, v in outputs.items():
        if mx.issubdtype(v.dtype, mx.floating) and not mx.all(mx.isfinite(v)).item():
            raise QtoolsError(f"quantizing {path} gave NaN or Inf values in {k}")


class StreamedPlan(Plan):
    """quantize_model planned on the skeleton; each quantized module computed from the source when
    its first tensor is written, kept until its last one is."""

    def __init__(self, skeleton: Skeleton, group_size: int, bits: int, mode: str = "affine",
                 predicate: Callable | None = None, on_module: Callable | None = None):
        from mlx.utils import tree_flatten

        self.skeleton = skeleton
        floats = dict(skeleton.model.named_modules())  # the float modules, before quantize_model replaces them
        model, self.qconfig, decided = _record_quantize(skeleton.model, skeleton.config, group_size, bits,
                                                        mode, predicate)
        self.model = model
        self.specs = [Spec(n, tuple(v.shape), v.dtype) for n, v in tree_flatten(model.parameters())]
        self.quantized_bits = _quantized_bits(model)
        self.keep_vision_config = "vision_tower" in getattr(model, "model", {})
        quantized = dict(model.named_modules())
        self._to_quantized = {p: decided[p] for p in self.quantized_bits}
        self._float = {p: floats[p] for p in self._to_quantized}
        self._owner = {}
        for p in self._to_quantized:
            for k, _ in tree_flatten(quantized[p].parameters()):
                self._owner[f"{p}.{k}"] = p
        self._cache: dict[str, dict] = {}
        self.on_module = on_module

    def produce(self, name: str):
        import mlx.core as mx

        p = self._owner.get(name)
        if p is None:  # kept as stored (norms, a layer kept in float)
            return self.skeleton.read(name)
        if p not in self._cache:
            self._cache[p] = self._quantize_module(p)
        outputs = self._cache[p]
        value = outputs.pop(name)
        if not outputs:
            del self._cache[p]
            mx.clear_cache()
        return value

    def close(self) -> None:
        close = getattr(self.skeleton.source, "close", None)
        if close is not None:
            close()

    def _quantize_module(self, p: str) -> dict:
        import mlx.core as mx
        from mlx.utils import tree_flatten, tree_unflatten

        fm = self._float[p]
        placeholders = tree_flatten(fm.parameters())
        real = {k: self.skeleton.read(f"{p}.{k}") for k, _ in placeholders}
        try:
            fm.update(tree_unflatten(list(real.items())))
            qm = fm.to_quantized(**self._to_quantized[p])
            outputs = {f"{p}.{k}": v for k, v in tree_flatten(qm.parameters())}
            mx.eval(outputs)
        except NUMERICAL_ERRORS as exc:
            raise QtoolsError(f"quantizing {p} failed: {exc}") from None
        finally:
            fm.update(tree_unflatten(placeholders))  # the module holds placeholders again
        _check_finite(p, outputs)
        if self.on_module is not None:
            self.on_module(p, real, outputs)
        return outputs


class LoadedPlan(Plan):
    """A model already quantized in memory (the calibrated recipes, or a model that cannot be
    streamed): its parameters written as they are, each dropped once written."""

    def __init__(self, model, qconfig: dict):
        import mlx.core as mx
        from mlx.utils import tree_flatten, tree_map

        self.model, self.qconfig = model, qconfig
        self._params = dict(tree_flatten(model.parameters()))
        self.specs = [Spec(n, tuple(v.shape), v.dtype) for n, v in self._params.items()]
        self.quantized_bits = _quantized_bits(model)
        self.keep_vision_config = "vision_tower" in getattr(model, "model", {})
        # as mlx-lm's save(donate_model=True): the written dict holds the only references
        model.update(tree_map(lambda _: mx.array([]), model.parameters()))

    def produce(self, name: str):
        import mlx.core as mx

        value = self._params.pop(name)
        try:
            mx.eval(value)
        except NUMERICAL_ERRORS as exc:
            raise QtoolsError(f"computing {name} failed: {exc}") from None
        if mx.issubdtype(value.dtype, mx.floating) and not mx.all(mx.isfinite(value)).item():
            raise QtoolsError(f"the quantized model's tensor {name} has NaN or Inf values")
        return value


def plan_loaded(model, config: dict, group_size: int, bits: int, mode: str = "affine",
                predicate: Callable | None = None) -> LoadedPlan:
    """quantize_model on a model in memory (or lazily loaded), as a Plan."""
    model, qconfig, _ = _record_quantize(model, config, group_size, bits, mode, predicate)
    return LoadedPlan(model, qconfig)
