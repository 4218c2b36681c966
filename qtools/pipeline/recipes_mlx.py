"""The other quantizers MLX has, and what ships a float16 adapter beside the weights; the
pipeline that runs them all (checks, the recipe table, the one save) is quantize.py.

- `mxfp4`, `nvfp4`, `mxfp8`: MLX's fixed-format modes, with the group size
  and bits mx.quantize requires of each (FIXED_MODES); streamed;
- `awq`, `gptq`, `dwq`, `dynamic`: mlx_lm.quant's functions called as a
  library, calibrated on a local DATA file (never a download): by default the
  fine-tune's own training data when its adapter_config.json names data qtools
  can rebuild (the demo's). They hold the whole model: calibration_memory
  estimates what they need, checked against the machine before loading;
- `adapter`: the base quantized at BITS (streamed) and the fine-tune's adapter
  kept unfused (float16), in OUT/adapters/;
- `compensated`: the fused model at BITS (streamed) plus a float16 low-rank
  correction of the quantization error (compensate.py, computed module by
  module as it is written: Compensation) as an mlx-lm LoRA adapter in OUT/adapters/.

An OUT/adapters/ directory is loaded by qtools (io.modeldir.load_model) and by
`mlx_lm.load(OUT, adapter_path=OUT/adapters)`; bits per weight count it.
"""

from __future__ import annotations

import contextlib
import copy
import json
import sys
from pathlib import Path

from mlx.utils import tree_flatten

from .. import SUPPORTED_BITS, SUPPORTED_GROUP_SIZES, BadValue, QtoolsError
from ..io.modeldir import PROVENANCE, SHIPPED_ADAPTER, check_model_dir, read_provenance

# mode -> (group size, bits), as mx.quantize requires them.
FIXED_MODES = {"mxfp4": (32, 4), "nvfp4": (16, 4), "mxfp8": (32, 8)}
DATA_RECIPES = ("awq", "gptq", "dwq", "dynamic")
ADAPTER_RECIPES = ("adapter", "compensated")
RECIPES = (*FIXED_MODES, *DATA_RECIPES, *ADAPTER_RECIPES)
GPTQ_BITS = (2, 4, 8)  # mlx_lm.quant.gptq packs only these
DEFAULT_EXTRA_BPW = 0.8  # dynamic / compensated target: BITS + 0.8 (4.8 at 4 bits: group overhead 0.5 + 0.3)
# Calibration blocks for awq/gptq/dynamic: 8 x 512 tokens (mlx-lm's awq takes 128 x 512, sized for a GPU;
# on the CPU backend awq on all 12k tokens of the demo's data ran over 8 min per layer on a shared core).
DEFAULT_SEQUENCE_LENGTH = 512
DEFAULT_NUM_SAMPLES = 8


def log(msg: str) -> None:
    print(f"[quantize] {msg}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def stdout_to_stderr_on_success():
    """mlx-lm prints progress on stdout: pass it to stderr, but drop it when the step fails,
    so a failure is one `Error:` line."""
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        yield
    sys.stderr.write(buf.getvalue())


def check_recipe_args(recipe: str, bits: int, group_size: int | None) -> tuple[int, int]:
    """(bits, group size) a recipe will use, or a clear error."""
    if recipe in FIXED_MODES:
        g, b = FIXED_MODES[recipe]
        if group_size is not None and group_size != g:
            raise BadValue(f"{recipe} quantizes in groups of {g} weights only (got group size {group_size}); "
                           f"leave the group size unset (make: no GROUP=)", "--group-size")
        return b, g
    group_size = 64 if group_size is None else group_size
    if bits not in SUPPORTED_BITS:
        raise BadValue(f"bits={bits} is not supported by MLX affine quantization: use one of "
                       + " ".join(map(str, SUPPORTED_BITS)), "--bits")
    if group_size not in SUPPORTED_GROUP_SIZES:
        raise BadValue(f"group size {group_size} is not supported: use one of "
                       + " ".join(map(str, SUPPORTED_GROUP_SIZES)), "--group-size")
    if recipe == "gptq" and bits not in GPTQ_BITS:
        raise BadValue(f"gptq (mlx_lm.quant.gptq) packs {', '.join(map(str, GPTQ_BITS))} bits only, not {bits}",
                       "--bits")
    return bits, group_size


# ---------------------------------------------------------------- data

def resolve_data(recipe: str, src: Path, data) -> tuple[list, str]:
    """(records, description): DATA if given as a file, or (records, description) the caller found
    (the command finds the demo fine-tune's own training data, qtools.demo.data.training_data_of)."""
    from ..io.calib_data import read_records

    if isinstance(data, tuple):
        return data
    if data is not None:
        return read_records(data), str(Path(data).resolve())
    raise QtoolsError(f"recipe {recipe} calibrates on data: give DATA=<file> (--data), a JSONL file of "
                      "{\"text\"}, {\"messages\"} or {\"prompt\", \"completion\"} records or a .txt file, "
                      "ideally the fine-tune's own training data")


# ---------------------------------------------------------------- fine-tune sources

def resolve_base_adapter(src: Path, base, adapter) -> tuple[Path, Path]:
    """Base model and adapter of a fused model: --base/--adapter, else its provenance."""
    prov = read_provenance(src) or {}
    base = base or prov.get("base")
    adapter = adapter or prov.get("adapter")
    if not base or not adapter:
        raise QtoolsError(f"{src} does not say which base and adapter it was fused from "
                          f"(no {PROVENANCE} with base/adapter): give --base and --adapter")
    base = check_model_dir(base, "base model")
    from ..io.adapters import check_adapter_dir

    adapter, _ = check_adapter_dir(adapter)
    return base, adapter


def check_adapter_matches(adapter: Path, model: Path):
    """The adapter's low-rank deltas (weight name -> LowRankDelta), every shape checked against MODEL."""
    from ..io.adapters import Adapter
    from ..io.weights import SafetensorsModel

    ad = Adapter(adapter)
    if ad.fine_tune_type not in ("lora", "dora"):
        raise QtoolsError(f"adapter {adapter}: fine_tune_type {ad.fine_tune_type!r} cannot ship unfused")
    # mlx-lm stacks a Hub checkpoint's experts on load; the adapter names the stacked switch_mlp
    with SafetensorsModel(model, stack_experts=True) as st:
        try:
            deltas = ad.deltas(st)
        except QtoolsError as exc:
            raise QtoolsError(f"adapter {adapter} does not match model {model}: {exc}") from None
    ad.close()
    return ad, deltas


# ---------------------------------------------------------------- recipes

def _set_top_level(qconfig: dict, bits: int, group_size: int) -> dict:
    # awq's update_config writes a placeholder 4-bit/64 top level; record what was used.
    q = qconfig["quantization"]
    q.update({"bits": bits, "group_size": group_size})
    qconfig["quantization_config"] = q
    return qconfig


def quantize_awq(net, config, bits, group_size, blocks):
    from mlx_lm.quant.awq import AWQ_MODEL_CONFIGS, awq_quantize, update_config

    awq_config = AWQ_MODEL_CONFIGS.get(config.get("model_type"))
    if awq_config is None:
        raise QtoolsError(f"mlx-lm's AWQ does not support {config.get('model_type')!r} models "
                          f"(it does: {', '.join(sorted(AWQ_MODEL_CONFIGS))})")
    # Embeddings at BITS too, so awq compares with uniform BITS on the same layers.
    awq_quantize(net, blocks, awq_config, group_size=group_size, bits=bits,
                 embed_group_size=group_size, embed_bits=bits, n_grid=20)
    return net, _set_top_level(update_config(net, copy.deepcopy(config)), bits, group_size)


def quantize_gptq(net, config, bits, group_size, blocks):
    import mlx.core as mx
    from mlx_lm.quant.gptq import gptq_quantize

    # mlx-lm accumulates each Hessian X^T X in the activations' dtype: in float16 it overflows
    # to inf (NaN scales on the demo's down_proj). Calibrate in float32, store in the model's dtype.
    dtype = next(v.dtype for _, v in tree_flatten(net.parameters()) if mx.issubdtype(v.dtype, mx.floating))
    net.set_dtype(mx.float32)
    net, qconf = gptq_quantize(net, blocks, bits, group_size, fallback_bits=bits, fallback_group_size=group_size)
    net.set_dtype(dtype)
    config = copy.deepcopy(config)
    config["quantization"] = qconf
    config["quantization_config"] = qconf
    return net, config


def quantize_dynamic(net, config, bits, group_size, blocks, target_bpw):
    from mlx_lm.quant.dynamic_quant import estimate_sensitivities, estimate_threshold
    from mlx_lm.utils import quantize_model

    high = next((b for b in SUPPORTED_BITS if b > bits), bits)
    sens = dict(estimate_sensitivities(net, blocks, bits, group_size, high, group_size, batch_size=4))
    threshold = estimate_threshold(net, sens, target_bpw, bits, group_size, high, group_size)

    def predicate(path, module):
        if path in sens and sens[path] > threshold:
            return {"bits": high, "group_size": group_size, "mode": "affine"}
        return True

    def planned_bpw():
        import mlx.nn as nn
        from mlx_lm.utils import compute_bits_per_weight

        trial = copy.deepcopy(net)
        nn.quantize(trial, group_size=group_size, bits=bits,
                    class_predicate=lambda p, m: hasattr(m, "to_quantized") and predicate(p, m))
        return float(compute_bits_per_weight(trial))

    # mlx-lm's bisection returns the midpoint of its last interval, which can raise one layer
    # too many: drop the least sensitive raised layer until the plan fits the target.
    while planned_bpw() > target_bpw and any(v > threshold for v in sens.values()):
        threshold = min(v for v in sens.values() if v > threshold)

    net, qconfig = quantize_model(net, config, group_size, bits, quant_predicate=predicate)
    raised = sorted(p for p, s in sens.items() if s > threshold)
    return net, qconfig, {"high_bits": high, "target_bpw": target_bpw, "raised": raised}


def quantize_dwq(net, config, bits, group_size, seqs, seed, learning_rate, batch_size=4):
    import mlx.core as mx
    import mlx.optimizers as optimizers
    import numpy as np
    from mlx_lm.quant.dwq import dwq_quantize
    from mlx_lm.utils import quantize_model

    if len(seqs) < 2 * batch_size:
        raise QtoolsError(f"dwq needs at least {2 * batch_size} calibration records, the data has {len(seqs)}")
    order = np.random.default_rng(seed).permutation(len(seqs))
    n_valid = min(32, max(batch_size, len(seqs) // 10))
    valid = [seqs[i] for i in order[:n_valid]]
    train = [seqs[i] for i in order[n_valid:]]
    teacher = net
    student = copy.deepcopy(teacher)
    student, qconfig = quantize_model(student, config, group_size, bits)
    dtype = {"float32": mx.float32, "bfloat16": mx.bfloat16}.get(
        str(config.get("torch_dtype") or config.get("dtype")), mx.float16)
    opt = optimizers.Adam(learning_rate=learning_rate, bias_correction=True)
    longest = max(len(t) for t, _ in seqs)
    dwq_quantize(student, lambda batch, idx, split: teacher(batch), opt, train, valid,
                 batch_size=batch_size, max_seq_length=longest, seed=seed, dtype=dtype)
    student.eval()
    return student, qconfig, {"learning_rate": learning_rate, "train_records": len(train),
                              "valid_records": len(valid)}


def adapter_files(tmp: Path, weights: dict, config: dict) -> None:
    import mlx.core as mx

    d = tmp / SHIPPED_ADAPTER
    d.mkdir()
    mx.save_safetensors(str(d / "adapters.safetensors"), weights)
    (d / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")


class Compensation:
    """The compensated recipe's correction, computed module by module as the quantized model is
    written (on_module): for every quantized linear of the adapter's keys (or all of layer 0's),
    lora factors of its quantization error W - deq(Q(W))."""

    def __init__(self, src: Path, qmodel, bits: int, group_size: int, rank: int | None, correction: str,
                 target_bpw: float, adapter: Path | None, planned_bpw: float, total_params: int):
        import mlx.nn as nn

        from . import compensate

        self.src, self.bits, self.group_size, self.correction = src, bits, group_size, correction
        self.deltas, ad_cfg = {}, {}
        if adapter is not None:
            ad, self.deltas = check_adapter_matches(adapter, src)
            ad_cfg = ad.config
        if correction == "subspace" and not self.deltas:
            raise QtoolsError("the subspace correction needs the fine-tune's adapter: give --adapter "
                              f"or fuse with qtools (its {PROVENANCE} names the adapter)")
        layers = qmodel.model.layers
        keys = list((ad_cfg.get("lora_parameters") or {}).get("keys") or [])
        if not keys:
            keys = [k for k, m in layers[0].named_modules() if isinstance(m, nn.QuantizedLinear)]
        self.keys, self.num_layers = keys, len(layers)
        self.targets = {}  # module path -> (out, in)
        self.params = {}  # module path -> (group size, bits) it was quantized with (a router keeps 8 bits)
        for i, layer in enumerate(layers):
            mods = dict(layer.named_modules())
            for k in keys:
                m = mods.get(k)
                if isinstance(m, nn.QuantizedLinear):
                    self.targets[f"model.layers.{i}.{k}"] = (m.weight.shape[0], m.weight.shape[1] * 32 // m.bits)
                    self.params[f"model.layers.{i}.{k}"] = (m.group_size, m.bits)
        if not self.targets:
            raise QtoolsError("no quantized linear layer to correct")
        # Only the keys corrected: mlx-lm would wrap the others (a MoE's switch_mlp) in LoRA layers
        # holding random lora_a it loads nothing into, counted in the model's size.
        self.keys = [k for k in keys if any(p.endswith(f".{k}") for p in self.targets)]
        shapes = list(self.targets.values())
        max_rank = min(min(s) for s in shapes)
        if correction == "subspace":
            max_rank = min(max_rank, min(d.rank for d in self.deltas.values()))
        if rank is None:
            rank = compensate.rank_for_budget(shapes, target_bpw - planned_bpw, total_params, max_rank)
            if rank < 1:
                raise BadValue(f"target {target_bpw:.3f} bits/weight leaves no room for a rank-1 correction "
                               f"({compensate.extra_bits_per_weight(shapes, 1, total_params):.3f} bits/weight) "
                               f"at {bits} bits", "--target-bpw")
        elif rank < 1 or rank > max_rank:
            raise BadValue(f"rank {rank} is out of range for these tensors (1 to {max_rank})", "--rank")
        self.rank = rank
        self.factors: dict = {}
        self.stats: dict = {}

    def on_module(self, path: str, float_params: dict, outputs: dict) -> None:
        import mlx.core as mx
        import numpy as np

        from . import compensate

        if path not in self.targets:
            return
        w1 = np.array(float_params["weight"].astype(mx.float32))
        group_size, bits = self.params[path]
        deq = np.array(mx.dequantize(outputs[f"{path}.weight"], outputs[f"{path}.scales"], outputs[f"{path}.biases"],
                                     group_size=group_size, bits=bits).astype(mx.float32))
        err = w1 - deq
        u = v = None
        if f"{path}.weight" in self.deltas:
            u, v = self.deltas[f"{path}.weight"].subspace()
        try:
            if self.correction == "svd":
                a, b = compensate.svd_factors(err, self.rank)
            else:
                a, b = compensate.subspace_factors(err, u, v, self.rank)
        except np.linalg.LinAlgError as exc:
            raise QtoolsError(f"compensated: the correction of {path} failed ({exc})") from None
        # Float16 as shipped: measure what the stored factors remove.
        a16, b16 = a.astype(np.float16), b.astype(np.float16)
        if not (np.isfinite(a16).all() and np.isfinite(b16).all()):
            raise QtoolsError(f"compensated: the correction of {path} has NaN or Inf values in float16")
        self.stats[path] = {"tensor": path, **compensate.energy_kept(err, a16.astype(np.float32),
                                                                     b16.astype(np.float32), u, v)}
        self.factors[path] = (mx.array(a16), mx.array(b16))

    def result(self) -> tuple[dict, dict, dict]:
        """(adapter weights, adapter_config, summary), once every target module was written."""
        import numpy as np

        missing = [p for p in self.targets if p not in self.factors]
        if missing:
            raise QtoolsError(f"compensated: no correction was computed for {missing[0]}")
        weights = {}
        for path in self.targets:
            weights[f"{path}.lora_a"], weights[f"{path}.lora_b"] = self.factors[path]
        config = {
            "fine_tune_type": "lora",
            "num_layers": self.num_layers,
            "lora_parameters": {"rank": self.rank, "scale": 1.0, "dropout": 0.0, "keys": self.keys},
            "qtools_correction": {"kind": self.correction,
                                  "of": f"{self.bits}-bit group-{self.group_size} quantization error",
                                  "model": str(self.src.resolve())},
        }
        stats = [self.stats[p] for p in self.targets]

        def mean(key):
            vals = [s[key] for s in stats if key in s]
            return float(np.mean(vals)) if vals else None

        summary = {"correction": self.correction, "rank": self.rank, "keys": self.keys, "tensors": len(stats),
                   "error_removed_mean": mean("error_removed"),
                   "subspace_error_removed_mean": mean("subspace_error_removed"), "per_tensor": stats}
        return weights, config, summary


# ---------------------------------------------------------------- memory of the calibrated recipes

def calibration_memory(recipe: str, st, config: dict, cal_tokens: int, batch_tokens: int,
                       float32_experts: bool) -> dict:
    """Bytes awq/gptq/dwq/dynamic need at once, by their parts, conservatively (they hold the whole
    model; read from mlx_lm.quant):

      model     F: the float model as stored (on MLX's CPU, + one layer's MoE experts cast to float32
                for GatherMM, backend.cpu_float32_experts, counted as the largest expert tensor at float32)
      copies    awq: 4 x the largest tensor in float32 (the layer being searched, its trial scales);
                gptq: F32 (set_dtype(float32) of every weight) + the largest tensor's Hessian in float32;
                dwq: F (the student is a deep copy of the teacher before it is quantized)
                     + 6 x the student's scales and biases in float32 (gradients, Adam's two moments);
                dynamic: F (a deep copy fake-quantized at BITS) + 2 x F32 over the quantizable
                     weights (accumulated gradients and one batch's gradients)
      activations  float32: every calibration token's input, output and MLP hidden state of one layer
                (awq/gptq/dynamic: cal_tokens x (2 hidden + intermediate)); a batch's activations kept
                for the backward pass through every layer plus teacher and student logits and their
                gradient (dwq/dynamic: batch_tokens x ((4 hidden + 2 intermediate) x layers + 3 vocab))
    plus 10% for the runtime. F32 = every float weight at 4 bytes."""
    cfg = config.get("text_config", config)
    hidden = int(cfg.get("hidden_size") or 0)
    inter = int(cfg.get("moe_intermediate_size") or cfg.get("intermediate_size") or 0) * max(
        1, int(cfg.get("num_experts_per_tok") or 1))
    layers = int(cfg.get("num_hidden_layers") or 0)
    vocab = int(cfg.get("vocab_size") or 0)
    floats = [i for i in st.tensors.values() if i.is_float]
    stored = sum(i.nbytes for i in floats)
    f32 = sum(4 * i.numel for i in floats)
    quantizable_f32 = sum(4 * i.numel for i in floats if len(i.shape) >= 2)
    largest_f32 = max((4 * i.numel for i in floats), default=0)
    model = stored
    if float32_experts:
        import re

        stacked: dict = {}  # a Hub checkpoint's per-expert tensors summed as mlx-lm stacks them
        for i in floats:
            if ".experts." in i.name or ".switch_mlp." in i.name:
                key = re.sub(r"\.experts\.\d+\.", ".experts.", i.name)
                stacked[key] = stacked.get(key, 0) + 4 * i.numel
        model += max(stacked.values(), default=0)
    layer_acts = 4 * cal_tokens * (2 * hidden + inter)
    backprop = 4 * batch_tokens * ((4 * hidden + 2 * inter) * layers + 3 * vocab)
    copies = {
        "awq": 4 * largest_f32,
        "gptq": f32 + largest_f32,
        "dwq": stored + 6 * 2 * 4 * (quantizable_f32 // 4) // 32,  # scales + biases per group of >= 32
        "dynamic": stored + 2 * quantizable_f32,
    }[recipe]
    acts = {"awq": layer_acts, "gptq": layer_acts, "dwq": backprop, "dynamic": layer_acts + backprop}[recipe]
    total = int(1.1 * (model + copies + acts))
    return {"model": model, "copies": copies, "activations": acts, "total": total}
