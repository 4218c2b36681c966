"""The model's own quantization choices (mlx-lm's `quant_predicate`) and how ours compose with them.

mlx-lm's quantize_model uses a model's own predicate only when none is passed, so any recipe
predicate silently replaced it (qwen3_moe keeps its router `mlp.gate` at 8 bits). Here the
model's choices are floors: a layer it keeps in float stays float, a layer it gives b bits gets
at least b; ours decide everywhere else, and may only raise.
"""

from __future__ import annotations

from typing import Callable

FLOAT = None  # a layer kept unquantized


def own_predicate(model) -> Callable | None:
    """The model class's quant_predicate (a property in mlx-lm), None if it has none."""
    try:
        return getattr(model, "quant_predicate", None)
    except Exception:
        return None


def _bits_of(choice, default_bits: int):
    """bits a predicate answer means: None for float, an int otherwise."""
    if choice is False:
        return FLOAT
    if isinstance(choice, dict):
        return int(choice.get("bits", default_bits))
    return default_bits


def combine(own, ours, bits: int, group_size: int):
    """One layer's answer from the model's own predicate answer and ours (True, False or params)."""
    if own is False or ours is False:  # float is above every bit-width
        return False
    b_own, b_ours = _bits_of(own, bits), _bits_of(ours, bits)
    if isinstance(own, dict) and b_own >= b_ours:
        return {"group_size": group_size, "mode": "affine", **own}
    return ours


def compose(own: Callable | None, ours: Callable | None, bits: int, group_size: int) -> Callable | None:
    """A predicate that never lowers what the model's own predicate keeps."""
    if own is None:
        return ours
    if ours is None:
        return own

    def predicate(path, module):
        return combine(own(path, module), ours(path, module), bits, group_size)

    return predicate


def own_choices(config: dict, group_size: int) -> dict:
    """{module path: False | params} where the model's own predicate departs from the default
    (True), for the model a config.json describes. Built lazily from the config, no weights
    read; {} when mlx-lm does not know the model type or it has no predicate."""
    try:
        from mlx_lm.utils import _get_classes

        model_cls, args_cls = _get_classes(config)
        model = model_cls(args_cls.from_dict(config))
    except Exception:  # an architecture mlx-lm does not build: no predicate to honour
        return {}
    pred = own_predicate(model)
    if pred is None:
        return {}
    out = {}
    for path, module in model.named_modules():
        if not hasattr(module, "to_quantized") or not hasattr(module, "weight"):
            continue
        if module.weight.shape[-1] % group_size:
            continue
        choice = pred(path, module)
        if choice is not True:
            out[path] = False if choice is False else {"group_size": group_size, "mode": "affine", **choice}
    return out
