"""The one quantize pipeline: checks -> a recipe from RECIPES -> one save with provenance.

Every recipe goes through the same checks before any work: the source is a float
model, the output is free, writable, not the source (nor inside it, nor holding
it) and its disk has room for the estimated output, no weight is NaN or Inf.
Then the recipe (RECIPES: name -> Recipe) returns a Plan of what to write, and
one save writes it inside `atomic_output_dir` with its provenance: any failure,
a numerical one inside a recipe included, is one `Error:` line and leaves nothing.

The recipes that quantize tensor by tensor (uniform, mlx-lm's mixed_3_6 /
mixed_4_6, survival, MLX's mxfp4 / nvfp4 / mxfp8, adapter's base, compensated)
never load the model: streamed.py plans mlx-lm's quantize_model on the model's
skeleton and computes each tensor from the memory map as it is written, with
the same names, dtypes and bytes as mlx-lm's whole-model path. awq, gptq, dwq
and dynamic run calibration passes over the whole model: they load it, once the
machine is known to have the memory they need.

`layer_bits` ({"model.layers.3.mlp.down_proj": 8, ...}) keeps chosen layers at
other bit-widths (or unquantized with 0/None) through mlx-lm's per-layer
quantization config; `survival` (recipe.py) is BITS everywhere except the
tensors whose fine-tuning delta dies at BITS.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .. import SUPPORTED_BITS, BadValue, QtoolsError
from ..io.atomic import atomic_output_dir, check_output, check_writable
from ..io.modeldir import (
    PROVENANCE,
    SHIPPED_ADAPTER,
    check_model_dir,
    dir_size,
    quantized_provenance,
    read_config,
    read_provenance,
    weights_bytes,
)
from ..io.weights import MappedTensors, SafetensorsModel, check_finite
from . import recipes_mlx as rm
from .streamed import NUMERICAL_ERRORS, NotStreamable, Plan, Skeleton, StreamedPlan, plan_loaded

# Recipes that take BITS besides uniform and survival (the fixed formats and mixed_* set their own).
BITS_RECIPES = ("awq", "gptq", "dwq", "dynamic", "adapter", "compensated")
NONFINITE_HINT = "quantizing would spread it over its whole group; fix the model that wrote it"


@dataclass
class Job:
    """A checked request: what is quantized, how, into where."""
    src: Path  # MODEL
    out: Path
    force: bool
    recipe: str
    bits: int
    group_size: int
    config: dict  # the config.json of what is quantized
    opts: dict  # the recipe's options, defaults filled in
    layer_bits: dict | None = None
    quant_predicate: Callable | None = None
    weights_src: Path | None = None  # what is quantized: MODEL, or the base for `adapter`
    base: Path | None = None
    adapter: Path | None = None
    records: list | None = None
    data_desc: str | None = None
    # Where the streamed recipes read weights_src's tensors (streamed.TensorSource); None: its memory map.
    # A view that fuses base + adapter on the fly can stand in, so no fused model need be on disk.
    source: object = None
    # The fused model is base + adapter fused on the fly (io.fused.FusedView): no fused model on disk.
    fused_view: object = None


@dataclass
class Quantized:
    """What a recipe hands the save."""
    plan: Plan
    mode: str = "affine"
    layer_bits: dict = field(default_factory=dict)
    report: dict = field(default_factory=dict)  # extra report fields
    provenance: dict = field(default_factory=dict)  # extra provenance fields
    shipped: Callable | None = None  # () -> (adapter weights, adapter_config, report fields), after the weights
    tokenizer: object = None


@dataclass(frozen=True)
class Recipe:
    run: Callable[[Job], Quantized]
    options: tuple = ()  # the recipe options it takes
    top_bits: Callable[[Job], float] = lambda job: job.bits  # most bits any weight may get (free-space estimate)


# ---------------------------------------------------------------- predicates

def make_predicate(
    model, bits: int, group_size: int, recipe: str = "uniform", layer_bits: dict | None = None
) -> Callable | None:
    """The quant_predicate for mlx_lm.utils.quantize_model (None = uniform), composed with the
    model's own predicate: what mlx-lm keeps (qwen3_moe's router at 8 bits) is never lowered."""
    from ..io.predicate import compose, own_predicate

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


# ---------------------------------------------------------------- the model, streamed or loaded

def _plan(job: Job, bits: int, group_size: int, mode: str = "affine",
          predicate_for: Callable | None = None, streamed_only: str | None = None) -> Plan:
    """mlx-lm's quantize_model of job.weights_src as a Plan: streamed from the memory map, or, for
    a model whose sanitize() the streamed path cannot reproduce, lazily loaded by mlx-lm (then
    written tensor by tensor all the same). predicate_for(model) -> the recipe's quant_predicate."""
    src = job.weights_src
    source = job.source if job.source is not None else MappedTensors(src)
    try:
        skeleton = Skeleton(job.config, source, what=f"model {src}")
        predicate = predicate_for(skeleton.model) if predicate_for else None
        return StreamedPlan(skeleton, group_size, bits, mode, predicate)
    except NotStreamable as exc:
        if streamed_only or job.source is not None:  # mlx-lm can load only a model directory
            raise QtoolsError(f"{streamed_only or 'quantize'} cannot run on this model ({exc}, which the "
                              "streamed quantization does not reproduce)") from None
        source.close()
        print(f"[quantize] {exc}: loading the model (lazily) instead of streaming it", file=sys.stderr)
    net = _load(src, lazy=True)[0]
    predicate = predicate_for(net) if predicate_for else None
    return plan_loaded(net, job.config, group_size, bits, mode, predicate)


def _load(src: Path, lazy: bool):
    from mlx_lm.utils import load

    try:
        return load(str(src), return_config=True, lazy=lazy)
    except Exception as exc:  # mlx-lm raises many kinds for a broken directory
        raise QtoolsError(f"cannot load model {src}: {exc}") from None


# ---------------------------------------------------------------- recipes

def _affine(job: Job) -> Quantized:
    """uniform, mlx-lm's mixed_3_6 / mixed_4_6, survival: MLX affine at BITS, per-layer overrides."""
    layer_bits, report, provenance = job.layer_bits, {}, {}
    if job.recipe == "survival":
        from .recipe import survival_plan

        if job.fused_view is not None:  # delta-survival of base + adapter, fused on the fly as well
            plan = survival_plan(None, job.bits, job.group_size, adapter=job.adapter, base=job.base)
        else:
            plan = survival_plan(job.src, job.bits, job.group_size)
        layer_bits = {**plan["layer_bits"], **(layer_bits or {})}  # explicit --layer-bits win over the plan
        provenance["survival_recipe"] = {k: plan[k] for k in ("rule", "raised", "predicted_min_bits", "value_before",
                                                              "value", "survives", "target")}
        report = {"raised_layers": plan["raised"], "survival_rule": plan["rule"],
                  "predicted_min_bits": plan["predicted_min_bits"], "analysed_tensors": plan["tensors"],
                  "survival_value_before": plan["value_before"], "survival_value": plan["value"],
                  "survival_plan_survives": plan["survives"], "survival_target": plan["target"]}
    base_recipe = "uniform" if job.recipe == "survival" else job.recipe

    def predicate_for(model):
        return job.quant_predicate or make_predicate(model, job.bits, job.group_size, base_recipe, layer_bits)

    return Quantized(_plan(job, job.bits, job.group_size, predicate_for=predicate_for),
                     layer_bits=layer_bits or {}, report=report, provenance=provenance)


def _fixed(job: Job) -> Quantized:
    """MLX's mxfp4 / nvfp4 / mxfp8 (the model's own predicate still applies)."""
    return Quantized(_plan(job, job.bits, job.group_size, mode=job.recipe), mode=job.recipe)


def _adapter(job: Job) -> Quantized:
    """The base at BITS, the fine-tune's adapter shipped unfused in float16."""
    import mlx.core as mx

    from ..io.adapters import check_adapter_dir

    plan = _plan(job, job.bits, job.group_size)
    _, ad_cfg = check_adapter_dir(job.adapter)

    def shipped():
        weights = {k: v.astype(mx.float16) for k, v in mx.load(str(job.adapter / "adapters.safetensors")).items()}
        return weights, {**ad_cfg, "model": str(job.base.resolve())}, {}

    info = {"base": str(job.base.resolve()), "adapter": str(job.adapter.resolve())}
    return Quantized(plan, report=info, provenance={"recipe_details": info}, shipped=shipped)


def _compensated(job: Job) -> Quantized:
    """The model at BITS and a low-rank float16 correction of its quantization error, computed
    module by module as the weights are written."""
    o = job.opts
    plan = _plan(job, job.bits, job.group_size, streamed_only="compensated")
    comp = rm.Compensation(job.src, plan.model, job.bits, job.group_size, o["rank"], o["correction"],
                           o["target_bpw"], job.adapter, plan.bits_per_weight(), plan.total_parameters())
    plan.on_module = comp.on_module

    def shipped():
        weights, cfg, summary = comp.result()
        rm.log(f"compensated: rank-{summary['rank']} {summary['correction']} correction on {summary['tensors']} "
                f"tensors removes {summary['error_removed_mean']:.1%} of the quantization error on average")
        return weights, cfg, {"compensation": summary}

    return Quantized(plan, shipped=shipped)


def _calibrated(job: Job) -> Quantized:
    """mlx_lm.quant's awq / gptq / dwq / dynamic: calibration passes over the whole model in memory."""
    import mlx.core as mx
    from mlx_lm.utils import load_tokenizer

    from ..io.calib_data import token_blocks, tokenize
    from .backend import cpu_float32_experts
    from .memory import check_fits

    o, recipe, bits, group_size = job.opts, job.recipe, job.bits, job.group_size
    try:
        tokenizer = load_tokenizer(job.src, None, eos_token_ids=job.config.get("eos_token_id"))
    except Exception as exc:
        raise QtoolsError(f"cannot load the tokenizer of {job.src}: {exc}") from None
    seqs = tokenize(job.records, tokenizer)
    if not seqs:
        raise QtoolsError("the calibration data holds no text")
    n_tokens = sum(len(t) for t, _ in seqs)
    calibration = {"records": len(seqs), "tokens": n_tokens}
    blocks = None
    if recipe == "dwq":
        cal_tokens, batch_tokens = 0, 4 * max(len(t) for t, _ in seqs)
    else:
        blocks = token_blocks(seqs, o["sequence_length"], num_samples=o["num_samples"], seed=o["seed"])
        calibration.update({"blocks": int(blocks.shape[0]), "block_tokens": int(blocks.shape[1])})
        cal_tokens, batch_tokens = int(blocks.size), (4 * int(blocks.shape[1]) if recipe == "dynamic" else 0)
    with SafetensorsModel(job.src) as st:
        need = rm.calibration_memory(recipe, st, job.config, cal_tokens, batch_tokens,
                                     float32_experts=mx.default_device() == mx.cpu)
    check_fits(need["total"], f"recipe {recipe} holds the whole model: it",
               f"model {need['model'] / 1e9:.1f} GB + copies {need['copies'] / 1e9:.1f} GB + activations "
               f"{need['activations'] / 1e9:.1f} GB; use a streamed recipe (uniform, survival, mxfp4, "
               "compensated, ...)")
    net, _, config = _load(job.src, lazy=False)
    report = {"calibration": calibration}
    with rm.stdout_to_stderr_on_success():
        mx.random.seed(o["seed"])
        cpu_float32_experts(net)  # MLX's CPU GatherMM runs float32 only (a float MoE's experts)
        rm.log(f"{recipe}: calibrating on {len(seqs)} records, {n_tokens} tokens ({job.data_desc})")
        if recipe == "dwq":
            net, qconfig, info = rm.quantize_dwq(net, config, bits, group_size, seqs, o["seed"], o["learning_rate"])
            report.update(info)
        elif recipe == "awq":
            net, qconfig = rm.quantize_awq(net, config, bits, group_size, blocks)
        elif recipe == "gptq":
            net, qconfig = rm.quantize_gptq(net, config, bits, group_size, blocks)
        else:
            net, qconfig, info = rm.quantize_dynamic(net, config, bits, group_size, blocks, o["target_bpw"])
            report.update(info)
    from .streamed import LoadedPlan

    return Quantized(LoadedPlan(net, qconfig), report=report, provenance={"recipe_details": dict(report)},
                     tokenizer=tokenizer)


_CALIBRATION_OPTIONS = ("data", "seed", "sequence_length", "num_samples")
RECIPES_TABLE: dict[str, Recipe] = {
    "uniform": Recipe(_affine, ("layer_bits", "quant_predicate")),
    "mixed_3_6": Recipe(_affine, ("layer_bits", "quant_predicate"), top_bits=lambda job: 6),
    "mixed_4_6": Recipe(_affine, ("layer_bits", "quant_predicate"), top_bits=lambda job: 6),
    "survival": Recipe(_affine, ("layer_bits", "quant_predicate"), top_bits=lambda job: 8),
    "mxfp4": Recipe(_fixed),
    "nvfp4": Recipe(_fixed),
    "mxfp8": Recipe(_fixed),
    "awq": Recipe(_calibrated, _CALIBRATION_OPTIONS),
    "gptq": Recipe(_calibrated, _CALIBRATION_OPTIONS),
    "dwq": Recipe(_calibrated, ("data", "seed", "learning_rate")),
    "dynamic": Recipe(_calibrated, (*_CALIBRATION_OPTIONS, "target_bpw"),
                      top_bits=lambda job: next((b for b in SUPPORTED_BITS if b > job.bits), job.bits)),
    "adapter": Recipe(_adapter, ("base", "adapter")),
    "compensated": Recipe(_compensated, ("adapter", "rank", "correction", "target_bpw")),
}
RECIPES = tuple(RECIPES_TABLE)
DEFAULTS = {"seed": 0, "learning_rate": 1e-5, "correction": "svd", "sequence_length": rm.DEFAULT_SEQUENCE_LENGTH,
            "num_samples": rm.DEFAULT_NUM_SAMPLES, "rank": None, "target_bpw": None}


def default_output(bits: int, recipe: str = "uniform", prefix: str = "models/fused") -> str:
    """Where a quantized model goes unless told: <prefix>_<bits>bit, <prefix>_survival_<bits>bit
    <prefix>_<recipe>_<bits>bit for the other recipes that take bits, or <prefix>_<recipe> (the scripts'
    PREFIX replaces models/fused)."""
    suffix = {"uniform": f"{bits}bit", "survival": f"survival_{bits}bit"}.get(recipe, recipe)
    if recipe in BITS_RECIPES:
        suffix = f"{recipe}_{bits}bit"
    return f"{prefix}_{suffix}"


# ---------------------------------------------------------------- checks

def check_float_model(src: Path, config: dict, st: SafetensorsModel, what: str = "model") -> None:
    """Refuse a quantized source: its config says so, or its weights are packed (uint32 + scales)."""
    q = config.get("quantization") or config.get("quantization_config")
    packed = any(n.endswith(".scales") and st.tensors.get(n[: -len("scales")] + "weight") is not None
                 and st.tensors[n[: -len("scales")] + "weight"].dtype == "U32" for n in st.tensors)
    if q or packed:
        bits = q.get("bits") if isinstance(q, dict) else None
        said = f" ({bits}-bit)" if bits else ""
        if what == "model":
            raise QtoolsError(f"{src} is already quantized{said}; quantize the float16 fused model instead")
        raise QtoolsError(f"{what} {src} is already quantized{said}: give the float {what}")


def output_bytes_estimate(st: SafetensorsModel, src: Path, bits: int, group_size: int, recipe: str,
                          layer_bits: dict | None = None, top: float | None = None) -> int:
    """An upper bound of the quantized model's size: every 2-D+ float weight at the most bits the
    recipe may give it (plus a scale and bias of the weight's dtype per group), the rest and the
    other files as they are."""
    if top is None:
        top = {"uniform": bits, "survival": 8}.get(recipe, 6)  # mlx-lm's mixed_L_6 recipes keep some at 6
    if layer_bits:
        top = max([top] + [16 if not b else b for b in layer_bits.values()])
    total = dir_size(src) - weights_bytes(src)
    for info in st.tensors.values():
        if info.is_float and len(info.shape) >= 2:
            per_group = 2 * 8 * info.nbytes // max(info.numel, 1)  # scale + bias bits
            total += min(info.nbytes, int(info.numel * (top + per_group / group_size) / 8))
        else:
            total += info.nbytes
    return total


def _shipped_estimate(job: Job, st: SafetensorsModel) -> int:
    """Bytes of a shipped adapter, at most: the adapter's file (float16 or wider), or for compensated
    float16 rank-r factors on every 2-D weight (or the bits-per-weight budget the rank is chosen to fill)."""
    if job.recipe == "adapter":
        return (job.adapter / "adapters.safetensors").stat().st_size
    if job.recipe != "compensated":
        return 0
    if job.opts["rank"]:
        return sum(2 * job.opts["rank"] * (i.shape[0] + i.shape[1]) for i in st.tensors.values()
                   if i.is_float and len(i.shape) == 2)
    n_params = sum(i.numel for i in st.tensors.values())
    return int(n_params * max(0.0, job.opts["target_bpw"] - job.bits) / 8) + (1 << 20)


def mlx_config(model: Path) -> dict:
    """config.json as mlx_lm.load reads it (tagged floats decoded, generation_config's eos ids)."""
    from mlx_lm.utils import load_config

    read_config(model)  # a clean error for a missing or malformed file
    try:
        return load_config(Path(model))
    except (OSError, ValueError) as exc:
        raise QtoolsError(f"cannot read {Path(model) / 'config.json'}: {exc}") from None


def _resolve_bits(recipe: str, bits: int, group_size: int | None) -> tuple[int, int]:
    if recipe.startswith("mixed_"):
        bits = int(recipe.split("_")[1])  # mixed_L_H: most layers at L bits
    return rm.check_recipe_args(recipe, bits, group_size)


# Recipes that read the fused model tensor by tensor only, so base + adapter fused on the fly can
# stand in for it; the others load it whole (awq, gptq, dwq, dynamic) or read it beside their own
# pass (compensated), and need the fused model on disk.
UNFUSED_RECIPES = ("uniform", "mixed_3_6", "mixed_4_6", "survival", "mxfp4", "nvfp4", "mxfp8")


def _unfused_job(out: Path, force, recipe, bits, group_size, opts, layer_bits, quant_predicate, fused) -> Job:
    """The Job for base + adapter fused on the fly (MODEL omitted): the values `qtools fuse` would
    write, computed one tensor at a time, never written."""
    from ..io.fused import FusedTensors, FusedView

    base, adapter = fused
    if base is None or adapter is None:
        raise QtoolsError("without MODEL, give both --base and --adapter: the model is fused on the fly")
    if recipe not in UNFUSED_RECIPES:
        raise QtoolsError(f"recipe {recipe} needs the fused model on disk (qtools fuse writes it); from base + "
                          f"adapter fused on the fly: {', '.join(UNFUSED_RECIPES)}")
    check_output(out, [base, adapter], force)
    view = FusedView(base, adapter, dtype="float16")
    return Job(src=view.base, out=out, force=force, recipe=recipe, bits=bits, group_size=group_size,
               config=dict(view.config), opts=opts, layer_bits=layer_bits, quant_predicate=quant_predicate,
               weights_src=view.base, base=view.base, adapter=view.adapter, source=FusedTensors(base, adapter, view=view),
               fused_view=view)


def _check(model, out, bits, group_size, recipe, layer_bits, force, quant_predicate, options,
           fused=(None, None)) -> Job:
    """Every check, before any work: a Job, or one clear error."""
    from .compensate import CORRECTIONS

    if recipe not in RECIPES_TABLE:
        raise BadValue(f"recipe {recipe!r} is not known: use one of {', '.join(RECIPES)}", "--recipe")
    spec = RECIPES_TABLE[recipe]
    given = {k: v for k, v in {**options, "layer_bits": layer_bits or None,
                               "quant_predicate": quant_predicate}.items() if v is not None}
    extra = sorted(set(given) - set(spec.options))
    if "data" in extra:
        raise BadValue(f"recipe {recipe} takes no calibration data (DATA is for {', '.join(rm.DATA_RECIPES)})", "--data")
    if {"layer_bits", "quant_predicate"} & set(extra):
        raise BadValue(f"recipe {recipe} takes no per-layer bit-widths", "--layer-bits")
    if extra:
        raise BadValue(f"recipe {recipe} takes no {', '.join(extra)}", "--recipe")
    bits, group_size = _resolve_bits(recipe, bits, group_size)
    opts = {**{k: v for k, v in DEFAULTS.items() if k in spec.options}, **given}
    if "target_bpw" in spec.options and opts["target_bpw"] is None:
        opts["target_bpw"] = bits + rm.DEFAULT_EXTRA_BPW
    if "sequence_length" in spec.options and (opts["sequence_length"] < 8 or opts["num_samples"] == 0
                                              or opts["num_samples"] < -1):
        raise BadValue("--sequence-length must be at least 8 and --num-samples at least 1 (or -1: all)", "--sequence-length")
    if "correction" in spec.options and opts["correction"] not in CORRECTIONS:
        raise BadValue(f"correction {opts['correction']!r} is not one of {', '.join(CORRECTIONS)}", "--correction")

    out = Path(out)
    if model is None:
        job = _unfused_job(out, force, recipe, bits, group_size, opts, layer_bits, quant_predicate, fused)
        src = job.src
    else:
        src = check_model_dir(model)
        check_output(out, [src], force)
        config = mlx_config(src)
        job = Job(src=src, out=out, force=force, recipe=recipe, bits=bits, group_size=group_size, config=config,
                  opts=opts, layer_bits=layer_bits, quant_predicate=quant_predicate, weights_src=src)
        with SafetensorsModel(src) as st:
            check_float_model(src, config, st)

    # What the recipe reads besides MODEL.
    if recipe in rm.DATA_RECIPES:
        job.records, job.data_desc = rm.resolve_data(recipe, src, opts.get("data"))
    if job.fused_view is not None:
        pass  # base and adapter are the model: checked by the fused view
    elif recipe == "adapter":
        job.base, job.adapter = rm.resolve_base_adapter(src, opts.get("base"), opts.get("adapter"))
        check_output(out, [job.base, job.adapter])
        job.weights_src, job.config = job.base, mlx_config(job.base)
        with SafetensorsModel(job.base) as st:
            check_float_model(job.base, job.config, st, "base")
        rm.check_adapter_matches(job.adapter, job.base)
    elif recipe == "compensated":
        # The fine-tune's adapter (for its keys and subspace): --adapter, else the provenance's if present.
        from ..io.adapters import check_adapter_dir

        prov_adapter = (read_provenance(src) or {}).get("adapter")
        if opts.get("adapter") is not None or (prov_adapter and Path(prov_adapter).is_dir()):
            job.adapter, _ = check_adapter_dir(opts.get("adapter") or prov_adapter)
            check_output(out, [job.adapter])
            rm.check_adapter_matches(job.adapter, src)

    # What will be written: the output directory and its free space.
    if job.fused_view is not None:  # the fused model's tensors as the view will compute them
        need = output_bytes_estimate(job.fused_view, job.weights_src, bits, group_size, recipe, layer_bits,
                                     top=spec.top_bits(job))
    else:
        with SafetensorsModel(job.weights_src) as st:
            need = output_bytes_estimate(st, job.weights_src, bits, group_size, recipe, layer_bits,
                                         top=spec.top_bits(job))
            need += _shipped_estimate(job, st)
    check_writable(out, need)

    # One NaN/Inf makes its group's scale NaN: refuse it before anything is loaded or written.
    inputs = [(src, f"base model {src}" if job.fused_view is not None else f"model {src}")]
    if job.weights_src != src:
        inputs.append((job.weights_src, f"base model {job.weights_src}"))
    for path, what in inputs:
        with SafetensorsModel(path) as st:
            check_finite(st, what, hint=NONFINITE_HINT)
    if job.adapter is not None:
        ad = SafetensorsModel.from_file(job.adapter / "adapters.safetensors")
        try:
            check_finite(ad, f"adapter {job.adapter}", hint="fix the fine-tune that wrote it")
        finally:
            ad.close()
    return job


# ---------------------------------------------------------------- the one save

def _write(job: Job, q: Quantized, tmp: Path) -> tuple[float, dict]:
    """The quantized model into tmp: weights streamed, config, tokenizer, a shipped adapter;
    returns bits per weight and the shipped adapter's report fields."""
    import mlx.core as mx

    from ..io import mlxsave

    plan = q.plan
    mlxsave.write_weights(tmp, plan.specs, plan.produce, plan.total_parameters())
    tokenizer = q.tokenizer
    if tokenizer is None:
        from mlx_lm.utils import load_tokenizer

        try:
            tokenizer = load_tokenizer(job.weights_src, None, eos_token_ids=job.config.get("eos_token_id"))
        except Exception as exc:
            raise QtoolsError(f"cannot load the tokenizer of {job.weights_src}: {exc}") from None
    with contextlib.redirect_stdout(sys.stderr):
        mlxsave.write_model_files(tmp, job.weights_src, plan.qconfig, tokenizer, plan.keep_vision_config)
    extra_bytes, fields = 0, {}
    if q.shipped is not None:
        weights, cfg, fields = q.shipped()
        for k, v in weights.items():
            if not mx.all(mx.isfinite(v)).item():
                raise QtoolsError(f"the {job.recipe} adapter's tensor {k} has NaN or Inf values")
        rm.adapter_files(tmp, weights, cfg)
        extra_bytes = sum(v.nbytes for v in weights.values())
        # Loading here proves mlx_lm.load serves the output with its adapter (lazily: nothing is read).
        try:
            from mlx_lm.utils import load

            with contextlib.redirect_stdout(sys.stderr):
                load(str(tmp), adapter_path=str(tmp / SHIPPED_ADAPTER), lazy=True)
        except Exception as exc:
            raise QtoolsError(f"mlx-lm cannot load the {job.recipe} output: {exc}") from None
    return plan.bits_per_weight(extra_bytes), fields


def quantize(
    model: str | Path | None,
    out: str | Path,
    bits: int = 5,
    group_size: int | None = 64,
    recipe: str = "uniform",
    layer_bits: dict | None = None,
    force: bool = False,
    quant_predicate: Callable | None = None,
    **recipe_options,
) -> dict:
    """Quantize MODEL (a float model dir) into OUT atomically; return a report dict. With MODEL
    None, base and adapter (recipe_options) are fused on the fly, one tensor at a time, with the
    values `qtools fuse` would write: no fused model on disk (UNFUSED_RECIPES).

    recipe_options (data, base, adapter, rank, correction, target_bpw, seed, learning_rate,
    sequence_length, num_samples) go to the recipes that take them; group_size None is each
    recipe's default (64, or the fixed format's own)."""
    options = {k: v for k, v in recipe_options.items() if v is not None}
    fused = (None, None)
    if model is None and recipe != "adapter":  # the adapter recipe never reads the fused model
        fused = (options.pop("base", None), options.pop("adapter", None))
    elif model is None:
        model = options.get("base")
        if model is None:
            raise QtoolsError("without MODEL, give both --base and --adapter")
    job = _check(model, out, bits, group_size, recipe, layer_bits, force, quant_predicate, options, fused)
    tic = time.perf_counter()
    try:
        q = RECIPES_TABLE[recipe].run(job)
        provenance = quantized_provenance(
            job.src, bits=job.bits, group_size=job.group_size, recipe=recipe, mode=q.mode, data=job.data_desc,
            layer_bits=q.layer_bits, **q.provenance,
            **({"record": job.fused_view.provenance()} if job.fused_view is not None else {}))
        with atomic_output_dir(job.out, force) as tmp:
            try:
                bpw, shipped_fields = _write(job, q, tmp)
            finally:
                q.plan.close()
            provenance["bits_per_weight"] = bpw
            if "compensation" in shipped_fields:
                provenance["compensation"] = {k: v for k, v in shipped_fields["compensation"].items()
                                              if k != "per_tensor"}
            if q.shipped is not None:
                provenance["shipped_adapter"] = SHIPPED_ADAPTER
            (tmp / PROVENANCE).write_text(json.dumps(provenance, indent=2) + "\n")
    except QtoolsError:
        raise
    except NUMERICAL_ERRORS as exc:  # inside MLX, numpy or mlx_lm.quant (atomic_output_dir removed the output)
        raise QtoolsError(f"recipe {recipe} failed: {type(exc).__name__}: {exc}") from None
    return {
        "out": str(job.out),
        "source": (f"{job.base} + {job.adapter} (fused on the fly)" if job.fused_view is not None
                   else str(job.src)),
        "bits": job.bits,
        "group_size": job.group_size,
        "recipe": recipe,
        "data": job.data_desc,
        "layer_overrides": len(q.layer_bits or {}),
        "bits_per_weight": bpw,
        "disk_bytes": dir_size(job.out),
        "source_disk_bytes": dir_size(job.src),
        "seconds": time.perf_counter() - tic,
        **q.report,
        **shipped_fields,
    }
