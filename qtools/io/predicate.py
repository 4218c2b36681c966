"""The model's own quantization choices (mlx-lm's `quant_predicate`) and how ours compose with them.

mlx-lm's quantize_model uses a model's own predicate only when none is passed, so any recipe
predicate silently replaced it (qwen3_moe keeps its router `mlp.gate` at 8 bits). Here the
model's choices stand: a layer it keeps in float stays float, a layer it gives b bits gets b,
or more where a recipe asks for more (never less); ours decide everywhere else.
"""

from __future__ import annotations

from typing import Callable


def own_predicate(model) -> Callable | None:
    """The model class's quant_predicate (a property in mlx-lm), None if it has none."""
    try:
        return getattr(model, "quant_predicate", None)
    except Exception:
        return None


def combine(own, ours, bits: int):
    """One layer's answer from the model's own predicate's and ours (True, False or params).
    Where ours has no opinion (True) the model's answer stands as mlx-lm would use it; an
    explicit choice of ours wins only where it keeps more precision."""
    if own is False or ours is False:  # float is above every bit-width
        return False
    if ours is True or own is True:
        return own if ours is True else ours
    return own if int(own.get("bits", bits)) >= int(ours.get("bits", bits)) else ours


def compose(own: Callable | None, ours: Callable | None, bits: int) -> Callable | None:
    """A predicate that never lowers what the model's own predicate keeps."""
    if own is None:
        return ours
    if ours is None:
        return own

    def predicate(path, module):
        return combine(own(path, module), ours(path, module), bits)

    return predicate


# mlx-lm's model helpers: a model file that imports only these defines its whole class itself.
_HELPERS = {"activations", "base", "cache", "pipeline", "rope_utils", "switch_layers"}


def _surely_no_predicate(model_type) -> bool:
    """True when mlx-lm's model file for `model_type` neither defines a quant_predicate nor
    imports another model it could inherit one from, read as text: importing mlx-lm (and
    transformers with it) costs ~1.7 s, more than delta-survival takes on a 1 GB model."""
    import re

    from ..compat import mlx_lm_model_source, mlx_lm_remaps, mlx_lm_root

    if mlx_lm_root() is None or not isinstance(model_type, str):
        return False
    text = mlx_lm_model_source(model_type)
    if text is None:
        # a type mlx-lm remaps (mistral -> llama) goes to mlx-lm; one it does not know has no predicate
        return not mlx_lm_remaps(model_type)
    imported = set(re.findall(r"^from \.(\w+) import", text, flags=re.M))
    return "quant_predicate" not in text and imported <= _HELPERS


def own_choices(config: dict, group_size: int) -> dict:
    """{module path: False | params} where the model's own predicate departs from the default
    (True), for the model a config.json describes. Built lazily from the config, no weights
    read; {} when mlx-lm does not know the model type or it has no predicate."""
    if _surely_no_predicate(config.get("model_type")):
        return {}
    try:
        from ..compat import mlx_lm_model_classes

        model_cls, args_cls = mlx_lm_model_classes(config)
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
            out[path] = choice
    return out
