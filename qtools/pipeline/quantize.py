"""Quantize a float model with MLX affine quantization, through mlx-lm.

`layer_bits` ({"model.layers.3.mlp.down_proj": 8, ...}) keeps chosen layers at
other bit-widths (or unquantized with 0/None) through mlx-lm's per-layer
quantization config, for survival-aware mixed precision. `recipe` also offers
mlx-lm's mixed_3_6 / mixed_4_6 recipes, and `survival` (qtools.recipe): BITS
everywhere except the tensors whose fine-tuning delta dies at BITS.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from pathlib import Path
from typing import Callable

from .. import BadValue, QtoolsError
from ..io.atomic import atomic_output_dir, check_output, check_writable
from ..io.modeldir import (
    PROVENANCE,
    check_model_dir,
    dir_size,
    provenance_inputs,
    quantized_provenance,
    read_config,
    weights_bytes,
)
from ..io.weights import SafetensorsModel, check_finite
from .recipes_mlx import RECIPES as MLX_RECIPES

RECIPES = ("uniform", "mixed_3_6", "mixed_4_6", "survival", *MLX_RECIPES)


# Recipes that take BITS besides uniform and survival (the fixed formats and mixed_* set their own).
BITS_RECIPES = ("awq", "gptq", "dwq", "dynamic", "adapter", "compensated")


def default_output(bits: int, recipe: str = "uniform", prefix: str = "models/fused") -> str:
    """Where a quantized model goes unless told: <prefix>_<bits>bit, <prefix>_survival_<bits>bit
    <prefix>_<recipe>_<bits>bit for the other recipes that take bits, or <prefix>_<recipe> (the scripts'
    PREFIX replaces models/fused)."""
    suffix = {"uniform": f"{bits}bit", "survival": f"survival_{bits}bit"}.get(recipe, recipe)
    if recipe in BITS_RECIPES:
        suffix = f"{recipe}_{bits}bit"
    return f"{prefix}_{suffix}"


def make_predicate(
    model, bits: int, group_size: int, recipe: str = "uniform", layer_bits: dict | None = None
) -> Callable | None:
    """The quant_predicate for mlx_lm.utils.quantize_model (None = uniform), composed with the
    model's own predicate: what mlx-lm keeps (qwen3_moe's router at 8 bits) is never lowered."""
    from ..survival.predicate import compose, own_predicate

    base = None
    if recipe != "uniform":
        from mlx_lm.convert import mixed_quant_predicate_builder

        try:
            base = mixed_quant_predicate_builder(recipe, model, group_size)
        except ValueError as exc:
            raise QtoolsError(f"recipe {recipe} does not apply to this model: {exc}") from None
    own = own_predicate(model)
    if not layer_bits:
        return compose(own, base, bits)
    known = {name for name, _ in model.named_modules()}
    missing = sorted(set(layer_bits) - known)
    if missing:
        raise QtoolsError(f"layer_bits names layers the model does not have: {', '.join(missing[:5])}")

    def predicate(path, module):
        if path in layer_bits:
            b = layer_bits[path]
            if not b:
                return False
            return {"group_size": group_size, "bits": int(b), "mode": "affine"}
        return base(path, module) if base is not None else True

    return compose(own, predicate, bits)


def output_bytes_estimate(st: SafetensorsModel, src: Path, bits: int, group_size: int, recipe: str,
                          layer_bits: dict | None = None) -> int:
    """An upper bound of the quantized model's size: every 2-D+ float weight at the most bits the
    recipe may give it (plus a float16 scale and bias per group), the rest and the other files as they are."""
    top = {"uniform": bits, "survival": 8}.get(recipe, 6)  # mlx-lm's mixed_L_6 recipes keep some at 6
    if layer_bits:
        top = max([top] + [16 if not b else b for b in layer_bits.values()])
    total = dir_size(src) - weights_bytes(src)
    for info in st.tensors.values():
        if info.is_float and len(info.shape) >= 2:
            total += min(info.nbytes, int(info.numel * (top + 32 / group_size) / 8))
        else:
            total += info.nbytes
    return total


def quantize(
    model: str | Path,
    out: str | Path,
    bits: int = 5,
    group_size: int | None = 64,
    recipe: str = "uniform",
    layer_bits: dict | None = None,
    force: bool = False,
    quant_predicate: Callable | None = None,
    **recipe_options,
) -> dict:
    """Quantize MODEL (a float model dir) into OUT atomically; return a report dict.

    The recipes of recipes_mlx (fixed formats, mlx_lm.quant, adapter, compensated) take
    `recipe_options` (data, base, adapter, rank, correction, target_bpw, ...); group_size
    None is each recipe's default (64, or the fixed format's own)."""
    from mlx_lm.utils import compute_bits_per_weight, load, quantize_model, save

    if recipe not in RECIPES:
        raise BadValue(f"recipe {recipe!r} is not known: use one of {', '.join(RECIPES)}", "--recipe")
    recipe_options = {k: v for k, v in recipe_options.items() if v is not None}
    if recipe in MLX_RECIPES:
        if layer_bits or quant_predicate:
            raise BadValue(f"recipe {recipe} takes no per-layer bit-widths", "--layer-bits")
        from .recipes_mlx import quantize_recipe

        return quantize_recipe(model, out, bits=bits, group_size=group_size, recipe=recipe, force=force,
                               **recipe_options)
    if recipe_options:
        raise BadValue(f"recipe {recipe} takes no {', '.join(sorted(recipe_options))}", "--recipe")
    group_size = 64 if group_size is None else group_size
    if recipe.startswith("mixed_"):
        bits = int(recipe.split("_")[1])  # mixed_L_H: most layers at L bits
    src = check_model_dir(model)
    check_output(out, [src, *(provenance_inputs(src) if recipe == "survival" else [])], force)  # never over an input
    config_src = read_config(src)
    if config_src.get("quantization"):
        q = config_src["quantization"]
        raise QtoolsError(
            f"{src} is already quantized ({q.get('bits')}-bit); quantize the float16 fused model instead"
        )
    with SafetensorsModel(src) as st:
        # What will be written is checked before the work: the output directory and its free space.
        check_writable(out, output_bytes_estimate(st, src, bits, group_size, recipe, layer_bits))
        # One NaN/Inf makes its group's scale NaN: refuse it before anything is loaded or written.
        check_finite(st, f"model {src}",
                     hint="quantizing would spread it over its whole group; fix the model that wrote it")
    tic = time.perf_counter()
    plan = None
    if recipe == "survival":
        from .recipe import survival_plan

        plan = survival_plan(src, bits, group_size)
        # Explicit --layer-bits overrides win over the plan.
        layer_bits = {**plan["layer_bits"], **(layer_bits or {})}
    try:
        net, tokenizer, config = load(str(src), return_config=True, lazy=True)
    except Exception as exc:
        raise QtoolsError(f"cannot load model {src}: {exc}") from None
    base_recipe = "uniform" if recipe == "survival" else recipe
    predicate = quant_predicate or make_predicate(net, bits, group_size, base_recipe, layer_bits)
    with contextlib.redirect_stdout(sys.stderr):  # mlx-lm prints [INFO] lines
        net, qconfig = quantize_model(net, config, group_size, bits, quant_predicate=predicate)
    bpw = float(compute_bits_per_weight(net))

    provenance = quantized_provenance(src, bits=bits, group_size=group_size, recipe=recipe, mode="affine",
                                      data=None, layer_bits=layer_bits or {}, bits_per_weight=bpw)
    if plan is not None:
        provenance["survival_recipe"] = {k: plan[k] for k in ("rule", "raised", "predicted_min_bits", "value_before",
                                                              "value", "survives", "target")}
    with atomic_output_dir(out, force) as tmp:
        with contextlib.redirect_stdout(sys.stderr):
            save(tmp, str(src), net, tokenizer, qconfig, donate_model=True)
        (tmp / PROVENANCE).write_text(json.dumps(provenance, indent=2) + "\n")
    del net
    out = Path(out)
    extra = {}
    if plan is not None:
        extra = {"raised_layers": plan["raised"], "survival_rule": plan["rule"],
                 "predicted_min_bits": plan["predicted_min_bits"], "analysed_tensors": plan["tensors"],
                 "survival_value_before": plan["value_before"], "survival_value": plan["value"],
                 "survival_plan_survives": plan["survives"], "survival_target": plan["target"]}
    return {
        "out": str(out),
        "source": str(src),
        "bits": bits,
        "group_size": group_size,
        "recipe": recipe,
        "layer_overrides": len(layer_bits or {}),
        "bits_per_weight": bpw,
        "disk_bytes": dir_size(out),
        "source_disk_bytes": dir_size(src),
        "seconds": time.perf_counter() - tic,
        **extra,
    }
