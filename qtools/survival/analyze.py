"""delta-survival and quant-error: per-tensor MLX quantization statistics.

Every tensor mlx-lm would quantize is read once from its memory map; the
native kernel computes the statistics for all requested bit-widths in that
one pass. Statistics are then aggregated per layer, per module kind and per
model (weighted by |D|^2), and a minimum bit-width is predicted.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .. import SUPPORTED_BITS, SUPPORTED_GROUP_SIZES, QtoolsError
from ..format import progress as progress_bar
from ..io.adapters import Adapter, LowRankDelta
from ..io.fused import FusedView
from ..io.modeldir import PROVENANCE, read_provenance
from ..io.weights import FLOAT_DTYPES, SafetensorsModel
from .rule import Bracket, Rule, check_set

SNR_CAP = 1e9
KIND_PATTERNS = [
    ("q", "q_proj"), ("k", "k_proj"), ("v", "v_proj"), ("o", "o_proj"),
    ("gate", "gate_proj"), ("up", "up_proj"), ("down", "down_proj"),
    ("embed", "embed_tokens"), ("lm_head", "lm_head"),
]
_LAYER_RE = re.compile(r"layers\.(\d+)\.")
# An MoE router (qwen/deepseek `mlp.gate`, mixtral `block_sparse_moe.gate`, gpt-oss `mlp.router`):
# its own kind, never lumped with the experts' or the dense MLP's gate_proj.
_ROUTER_RE = re.compile(r"\.(gate|router)\.weight$")
# Statistics that exist only where a delta does, weighted by |D|^2 over tensors.
DELTA_STATS = ("delta_rms", "delta_to_step", "delta_retention", "cosine", "sign_agreement",
               "codes_changed", "delta_snr", "subspace_snr", "delta_to_noise", "weight_snr")


def noise_stats(s: dict) -> dict:
    """What the base's quantization noise is where the delta acts, from a tensor's statistics at
    one bit-width: delta_to_noise = |D|^2 / |Q(W) - W|^2 (the delta's energy against all the
    noise the fused weights get, base included) and weight_snr = |W|^2 / |Q(W) - W|^2.
    Derived from rmse, rel_rmse and delta_rms alone, so cached reports get them too."""
    rmse, rel, d = s.get("rmse"), s.get("rel_rmse"), s.get("delta_rms")
    if rmse is None or d is None:
        return {}
    if rmse <= 0:
        return {"delta_to_noise": SNR_CAP, "weight_snr": SNR_CAP}
    return {"delta_to_noise": min((d / rmse) ** 2, SNR_CAP),
            "weight_snr": min(1.0 / rel ** 2, SNR_CAP) if rel else SNR_CAP}


def bits_per_weight(bits: int, group_size: int) -> float:
    """Affine storage cost: the codes plus a 16-bit scale and bias per group."""
    return bits + 32.0 / group_size


def module_kind(name: str) -> str:
    if _ROUTER_RE.search(name):
        return "router"
    for kind, pat in KIND_PATTERNS:
        if pat in name:
            return kind
    parts = name.split(".")
    return parts[-2] if len(parts) > 1 else name


def layer_index(name: str):
    m = _LAYER_RE.search(name)
    return int(m.group(1)) if m else None


def quantizable(info) -> str | None:
    """Why mlx-lm would not quantize this tensor, or None if it would."""
    if not info.name.endswith(".weight") or len(info.shape) < 2:
        return "not a matrix"
    if not info.is_float:
        return f"dtype {info.dtype}"
    return None


@dataclass
class DeltaSource:
    base: SafetensorsModel | None = None
    adapter: Adapter | None = None
    deltas: Mapping[str, LowRankDelta] = field(default_factory=dict)
    base_quant: dict | None = None
    recorded: bool = False  # found in the fused model's provenance record, not given

    @property
    def delta_from(self) -> str:
        """Where D comes from: the base (D = fused - base) whenever one is used, else the adapter."""
        return "base" if self.base is not None else "adapter"

    def describe(self) -> dict:
        why = None
        if self.base is not None and self.adapter is not None and self.adapter.is_dora:
            why = "DoRA rescales whole rows: the delta needs the base"
        return {
            "base": str(self.base.path) if self.base else None,
            "adapter": str(self.adapter.path) if self.adapter else None,
            "delta_from": self.delta_from,
            "recorded": self.recorded,
            "why": why,
        }

    def close(self) -> None:
        """Unmap the base and adapter files (the deltas are float32 copies)."""
        for st in (self.base, self.adapter):
            if st is not None:
                st.close()


def resolve_delta_source(model: SafetensorsModel, adapter=None, base=None) -> DeltaSource:
    """Adapter and/or base given, else the fused directory's provenance record, where the recorded
    adapter is preferred: its delta is exact, while fused - base also carries the rounding of the
    base to the fused dtype (and needs the base's layout to match)."""
    recorded = False
    if adapter is None and base is None:
        prov = read_provenance(model.path)
        if prov is None:
            raise QtoolsError(
                f"{model.path}: no delta source; give --adapter or --base "
                f"(a model fused by `qtools fuse` records them in {PROVENANCE})"
            )
        adapter = prov.get("adapter") if prov.get("adapter") and Path(prov["adapter"]).exists() else None
        base = prov.get("base") if prov.get("base") and Path(prov["base"]).exists() else None
        if adapter is None and base is None:
            raise QtoolsError(
                f"{model.path / PROVENANCE}: the recorded base and adapter no longer exist; give --adapter or --base"
            )
        recorded = True
        if adapter is not None and not Adapter(adapter).is_dora:
            base = None  # the adapter alone gives the exact delta
    src = DeltaSource(recorded=recorded)
    if adapter is not None:
        src.adapter = Adapter(adapter)
        src.deltas = src.adapter.deltas(model, lazy=True)  # one module's factors in memory at a time
        if src.adapter.is_dora and base is None:
            recorded_base = src.adapter.base_model
            if recorded_base and Path(recorded_base).is_dir():
                base = recorded_base
            else:
                raise QtoolsError(
                    f"{src.adapter.path}: a DoRA adapter rescales whole rows, so its delta needs the base model: give --base"
                )
    if base is not None:
        # a Hub base's per-expert tensors are read as mlx-lm's stacked ones when the fused model has those
        stacked = any(".switch_mlp." in n for n in model.names())
        src.base = SafetensorsModel(base, stack_experts=stacked)
        src.base_quant = src.base.quantization
        _check_same_tensors(model, src.base)
    return src


def _logical_shape(base: SafetensorsModel, name: str, quant: dict | None):
    info = base.info(name)
    params = _base_quant_params(base, name, quant)
    if params is None:
        return info.shape
    bits = params["bits"]
    return (*info.shape[:-1], info.shape[-1] * 32 // bits)


def _base_quant_params(base, name, quant):
    if not quant or base.info(name).dtype != "U32":
        return None
    path = name[: -len(".weight")]
    p = quant.get(path, quant)
    if p is False:
        return None
    return {"bits": p.get("bits", quant.get("bits")), "group_size": p.get("group_size", quant.get("group_size")),
            "mode": p.get("mode", quant.get("mode", "affine"))}


def _check_same_tensors(model: SafetensorsModel, base: SafetensorsModel):
    def weights(m, quant):
        skip = set()
        if quant:
            for n in m.names():
                if n.endswith(".scales") or n.endswith(".biases"):
                    if n.rsplit(".", 1)[0] + ".weight" in m:
                        skip.add(n)
        return [n for n in m.names() if n not in skip]

    fused = set(weights(model, None))
    basen = set(weights(base, base.quantization))
    only_f = sorted(fused - basen)
    only_b = sorted(basen - fused)
    if only_f:
        raise QtoolsError(f"base {base.path} has no tensor {only_f[0]!r} (the fused model has it): not the same model")
    if only_b:
        raise QtoolsError(f"base {base.path} has tensor {only_b[0]!r} that the fused model lacks: not the same model")
    for n in fused:
        fs = model.info(n).shape
        bs = _logical_shape(base, n, base.quantization)
        if tuple(fs) != tuple(bs):
            raise QtoolsError(f"tensor {n!r}: fused shape {list(fs)} but base shape {list(bs)}")


def _base_tensor(src: DeltaSource, name: str):
    """The base weight as (raw 2-D array, dtype name); a quantized base is dequantized as mlx-lm fuses it."""
    info = src.base.info(name)
    params = _base_quant_params(src.base, name, src.base_quant)
    if params is None:
        if info.dtype not in FLOAT_DTYPES:
            raise QtoolsError(f"base tensor {name!r} has dtype {info.dtype}")
        return src.base.raw(name), FLOAT_DTYPES[info.dtype]
    import mlx.core as mx

    stem = name[: -len(".weight")]
    w = mx.array(np.array(src.base.raw(name)))
    scales = _mx_from(src.base, stem + ".scales")
    biases = _mx_from(src.base, stem + ".biases") if stem + ".biases" in src.base else None
    deq = mx.dequantize(w, scales, biases, group_size=params["group_size"], bits=params["bits"], mode=params["mode"])
    if deq.dtype == mx.float32:
        return np.array(deq), "float32"
    dtype = "bfloat16" if deq.dtype == mx.bfloat16 else "float16"
    return np.array(deq.view(mx.uint16)), dtype


def _mx_from(st: SafetensorsModel, name: str):
    import mlx.core as mx

    info = st.info(name)
    raw = np.array(st.raw(name))
    if info.dtype == "BF16":
        return mx.array(raw).view(mx.bfloat16)
    if info.dtype == "F16":
        return mx.array(raw.view(np.float16))
    return mx.array(raw)


def _tensor_stats(r: dict, bits: list[int], has_delta: bool, has_sub: bool) -> dict:
    n = int(r["n"])
    w_rms = math.sqrt(r["w2"] / n) if n else 0.0
    d2 = float(r["d2"])
    out = {}
    for i, b in enumerate(bits):
        # np.median(steps) and np.percentile(sqrt(group_sse / group_size), [50, 99]), from the kernel
        step_median = float(r["step_median"][i])
        p50, p99 = r["group_rmse_p50"][i], r["group_rmse_p99"][i]
        rmse = math.sqrt(r["sse"][i] / n)
        s = {
            "rmse": rmse,
            "rel_rmse": rmse / w_rms if w_rms > 0 else 0.0,
            "max_abs_err": float(r["max_abs"][i]),
            "step_median": step_median,
            "group_rmse_p50": float(p50),
            "group_rmse_p99": float(p99),
        }
        if has_delta and d2 > 0:
            err2 = float(r["err2"][i])
            delta_rms = math.sqrt(d2 / n)
            s.update({
                "delta_rms": delta_rms,
                "delta_to_step": delta_rms / step_median if step_median > 0 else SNR_CAP,
                "delta_retention": float(r["dot"][i]) / d2,
                "cosine": float(r["dot"][i]) / math.sqrt(float(r["dq2"][i]) * d2) if r["dq2"][i] > 0 else 0.0,
                "sign_agreement": int(r["sign_agree"][i]) / int(r["nonzero_d"]) if r["nonzero_d"] else 0.0,
                "codes_changed": int(r["changed"][i]) / n,
                "delta_snr": min(d2 / err2, SNR_CAP) if err2 > 0 else SNR_CAP,
            })
            s.update(noise_stats(s))
            if has_sub:
                noise = float(r["sub_noise"][i])
                s["subspace_snr"] = min(float(r["sub_d2"]) / noise, SNR_CAP) if noise > 0 else SNR_CAP
        out[str(b)] = s
    return out


# Ratios of delta energy to noise pool as total energy over total noise (the |D|^2-weighted
# harmonic mean): one very clean tensor must not hide another's noise.
POOLED_RATIOS = ("delta_snr", "subspace_snr", "delta_to_noise", "weight_snr")


def pool(stat: str, pairs) -> float:
    """Aggregate one statistic over tensors from (|D|^2, value) pairs: weighted mean, or for
    the SNRs total signal over total noise."""
    pairs = list(pairs)
    wsum = sum(w for w, _ in pairs)
    if stat in POOLED_RATIOS:
        noise = sum(w / max(v, 1.0 / SNR_CAP) for w, v in pairs)
        return min(wsum / noise, SNR_CAP) if noise > 0 else SNR_CAP
    return sum(w * v for w, v in pairs) / wsum


def _aggregate(tensors: list[dict], bits: list[int]) -> dict:
    """Quantization error pooled over elements; delta statistics weighted by |D|^2."""
    out = {}
    n_tot = sum(t["_n"] for t in tensors)
    w2_tot = sum(t["_w2"] for t in tensors)
    for b in map(str, bits):
        sse = sum(t["by_bits"][b]["rmse"] ** 2 * t["_n"] for t in tensors)
        s = {
            "rmse": math.sqrt(sse / n_tot) if n_tot else 0.0,
            "rel_rmse": math.sqrt(sse / w2_tot) if w2_tot else 0.0,
            "max_abs_err": max((t["by_bits"][b]["max_abs_err"] for t in tensors), default=0.0),
            "step_median": (sum(t["by_bits"][b]["step_median"] * t["_n"] for t in tensors) / n_tot) if n_tot else 0.0,
        }
        with_delta = [t for t in tensors if t["_d2"] > 0 and "delta_retention" in t["by_bits"][b]]
        wsum = sum(t["_d2"] for t in with_delta)
        if wsum > 0:
            for key in DELTA_STATS:
                vals = [(t["_d2"], t["by_bits"][b].get(key)) for t in with_delta]
                if all(v is not None for _, v in vals):
                    s[key] = pool(key, vals)
            s["delta_tensors"] = len(with_delta)
        out[b] = s
    return out


def reaggregate(tensors: list[dict], bits: list[int]) -> tuple[dict, list[dict]]:
    """(summary, layers) rebuilt from a report's per-tensor JSON entries, with the current
    pooling: cached reports follow the aggregation code rather than freezing it."""
    rebuilt = []
    for t in tensors:
        n = 1
        for d in t["shape"]:
            n *= int(d)
        top = t["by_bits"][str(bits[0])]
        w_rms = top["rmse"] / top["rel_rmse"] if top.get("rel_rmse") else 0.0
        d_rms = top.get("delta_rms", 0.0)
        by_bits = {b: {**v, **noise_stats(v)} if "delta_rms" in v else v for b, v in t["by_bits"].items()}
        rebuilt.append({**t, "by_bits": by_bits, "_n": n, "_w2": w_rms ** 2 * n, "_d2": d_rms ** 2 * n})
    layer_ids = sorted({t["layer"] for t in rebuilt if t.get("layer") is not None})
    layers = [{"layer": i, "by_bits": _aggregate([t for t in rebuilt if t.get("layer") == i], bits)}
              for i in layer_ids]
    return _aggregate(rebuilt, bits), layers


def _as_float32(raw: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "float16":
        return raw.view(np.float16).astype(np.float32)
    if dtype == "bfloat16":
        return (raw.astype(np.uint32) << 16).view(np.float32)
    return np.asarray(raw, dtype=np.float32)


def _round_to(x: np.ndarray, dtype: str) -> np.ndarray:
    """float32 values rounded to dtype (round to nearest even, as MLX's astype), back in float32."""
    if dtype == "float16":
        return x.astype(np.float16).astype(np.float32)
    if dtype == "bfloat16":
        u = x.view(np.uint32)
        u = (u + (np.uint32(0x7FFF) + ((u >> 16) & np.uint32(1)))) & np.uint32(0xFFFF0000)
        return u.view(np.float32)
    return x


def unchanged_by_fine_tune(w1, dtype1: str, w0, dtype0: str, chunk: int = 1 << 20) -> bool:
    """True when the fused weight is the base weight rounded to the fused dtype, element for
    element: the tensor's only delta is the dtype conversion of saving (a bf16 base saved as
    float16 rounds its subnormals), which is no fine-tune delta. Read in chunks; a tensor the
    fine-tune changed usually differs in its first chunk."""
    a, b = w1.reshape(-1), w0.reshape(-1)
    for i in range(0, a.size, chunk):
        if not np.array_equal(_as_float32(a[i : i + chunk], dtype1),
                              _round_to(_as_float32(b[i : i + chunk], dtype0), dtype1)):
            return False
    return True


def _own_bits(own: dict, name: str, bits: list[int], group_size: int):
    """For a tensor the model's own quant_predicate sets (qwen3_moe's router: 8 bits), the
    (bits, group size) it really gets when the model is quantized at each requested bit-width,
    or why it is not analysed; (None, None) for the rest (io.predicate.combine)."""
    choice = own.get(name[: -len(".weight")]) if name.endswith(".weight") else None
    if choice is None:
        return None, None
    if choice is False:
        return None, "kept in float by the model's own quant_predicate (mlx-lm)"
    b_own, g_own = int(choice.get("bits", 0)), int(choice.get("group_size", group_size))
    mode = choice.get("mode", "affine")
    if mode != "affine" or b_own not in SUPPORTED_BITS or g_own not in SUPPORTED_GROUP_SIZES:
        return None, f"the model's own quant_predicate gives it {mode} {b_own}-bit, group {g_own}: not analysed"
    return {b: (b_own, g_own) for b in bits}, None


def analyze(
    model: str | Path | FusedView,
    bits=SUPPORTED_BITS,
    group_size: int = 64,
    adapter=None,
    base=None,
    with_delta: bool = True,
    threads: int = 0,
    progress: bool = True,
) -> dict:
    """Analyse every quantizable tensor of a model directory (or of a FusedView: the fused model
    computed on the fly, never written); returns the JSON-able report."""
    from .. import _ext
    from ..io.predicate import own_choices

    bits = sorted(set(int(b) for b in bits))  # the CLI checked them; the kernel checks them again
    t0 = time.perf_counter()
    m = model if isinstance(model, FusedView) else SafetensorsModel(model)
    if m.quantization:
        raise QtoolsError(f"{m.path}: the model is already quantized; analyse the float (fused float16) model")
    src = resolve_delta_source(m, adapter, base) if with_delta else None
    own = own_choices(m.config, group_size) if m.config else {}

    todo, skipped = [], []
    for name, info in m.tensors.items():
        why = quantizable(info)
        if why == "not a matrix":
            continue
        if why is None and info.shape[-1] % group_size:
            why = f"last dimension {info.shape[-1]} not divisible by group size {group_size} (mlx-lm leaves it unquantized)"
        fixed = None
        if why is None:
            fixed, why = _own_bits(own, name, bits, group_size)
        if why:
            skipped.append({"name": name, "shape": list(info.shape), "reason": why})
        else:
            todo.append((info, fixed))
    if not todo:
        raise QtoolsError(f"{m.path}: no tensor can be quantized with group size {group_size}")

    tensors = []
    bar = progress_bar(todo, "tensors", enabled=progress and len(todo) >= 8, unit="tensor")
    for info, fixed in bar:
        name = info.name
        cols = info.shape[-1]
        experts = info.shape[0] if len(info.shape) == 3 else 1
        w1 = m.raw(name).reshape(-1, cols)
        dtype = FLOAT_DTYPES[info.dtype]
        kwargs = {}
        delta = src.deltas.get(name) if src else None
        unchanged = src is not None and src.base is None and delta is None
        if src and src.base is not None:
            w0, w0_dtype = _base_tensor(src, name)
            if unchanged_by_fine_tune(w1, dtype, w0, w0_dtype):
                unchanged = True
            else:
                kwargs.update(w0=w0.reshape(-1, cols), w0_dtype=w0_dtype)
        elif delta is not None:
            kwargs.update(bt=delta.bt, at=delta.at)
        if delta is not None and not unchanged:
            if delta.experts != experts:
                raise QtoolsError(f"adapter for {name!r} has {delta.experts} experts, the weight has {experts}")
            u, v = delta.subspace()
            kwargs.update(u=u, v=v)
        has_delta = src is not None and not unchanged
        # one kernel pass per group size, at the bits each requested width really gives the tensor
        plan = fixed or {b: (b, group_size) for b in bits}
        by_bits, r = {}, None
        for gs in sorted({g for _, g in plan.values()}):
            widths = sorted({eb for eb, g in plan.values() if g == gs})
            try:
                r = _ext.analyze(w1, dtype, widths, gs, experts=experts, threads=threads, **kwargs)
            except ValueError as exc:
                raise QtoolsError(f"tensor {name!r}: {exc}") from None
            if r["nonfinite"]:
                raise QtoolsError(f"tensor {name!r} in {info.file}: {r['nonfinite']} NaN or Inf values")
            stats = _tensor_stats(r, widths, has_delta, "u" in kwargs)
            by_bits.update({str(b): stats[str(eb)] for b, (eb, g) in plan.items() if g == gs})
        m.release(name)
        if src and src.base is not None and name in src.base:
            src.base.release(name)
        d2 = float(r["d2"]) if has_delta else 0.0
        entry = {
            "name": name,
            "shape": list(info.shape),
            "dtype": dtype,
            "kind": module_kind(name),
            "layer": layer_index(name),
            "by_bits": {str(b): by_bits[str(b)] for b in bits},
            "_n": int(r["n"]),
            "_w2": float(r["w2"]),
            "_d2": d2,
        }
        if fixed:
            entry["effective_bits"] = {str(b): eb for b, (eb, _) in plan.items()}
        if src is not None and (unchanged or d2 == 0):
            entry["unchanged"] = True
        tensors.append(entry)
    m.close()
    if src is not None:
        src.close()

    summary = _aggregate(tensors, bits)
    by_kind = {k: _aggregate([t for t in tensors if t["kind"] == k], bits) for k in sorted({t["kind"] for t in tensors})}
    layer_ids = sorted({t["layer"] for t in tensors if t["layer"] is not None})
    layers = [{"layer": i, "by_bits": _aggregate([t for t in tensors if t["layer"] == i], bits)} for i in layer_ids]

    report = {
        "model": m.label if isinstance(m, FusedView) else str(m.path),
        "group_size": group_size,
        "bits": bits,
        "bits_per_weight": {str(b): bits_per_weight(b, group_size) for b in bits},
        "summary": summary,
        "by_kind": by_kind,
        "layers": layers,
        "skipped": skipped,
        "notes": [],
    }
    fixed_names = [t["name"] for t in tensors if "effective_bits" in t]
    if fixed_names:
        report["notes"].append(
            f"{len(fixed_names)} tensor(s) judged at the bits the model's own quant_predicate gives them "
            f"(kept by mlx-lm whatever BITS is; effective_bits in the JSON), e.g. {fixed_names[0]}")
    if src is not None:
        if "delta_retention" not in summary[str(bits[0])]:
            raise QtoolsError("the delta is zero in every quantizable tensor: nothing to predict (is this the fused model?)")
        rule = Rule.load(available=summary[str(max(bits))])
        predicted, verdict = rule.predict(summary, layers, bits)
        report["delta_source"] = src.describe()
        report["unchanged"] = {
            "criterion": (
                "fused weight == base weight rounded to the fused dtype, element for element (only the dtype "
                "conversion of saving differs): no fine-tune delta, excluded from the delta statistics"
                if src.base is not None else
                "no adapter module for the tensor (or an all-zero lora_b): excluded from the delta statistics"),
            "tensors": [t["name"] for t in tensors if t.get("unchanged")],
        }
        if src.adapter is None:
            report["notes"].append(
                "subspace_snr not computed: the subspace SNR needs the adapter's factors (lora_a, lora_b), "
                "and the delta comes from --base alone; give --adapter too")
        report["threshold"] = rule.to_dict()
        report["verdict"] = verdict
        report["predicted_min_bits"] = predicted
        answer = bracket_answer(Bracket.load(), summary, layers, bits)
        if answer is not None:
            report["bracket"] = {k: answer[k] for k in ("survives_at", "rounded_away_at", "rule", "probe", "check")}
            # The weights tier's answer is the bracket's (the study judges it: docs/study.md): kept
            # at >= a, rounded away at <= b, the bit-widths between neither (None: the probe's). The
            # point rule's single guess is kept beside it; held out it is optimistic far more often.
            report["point_prediction"] = {"predicted_min_bits": predicted, "verdict": verdict}
            report["predicted_min_bits"] = answer["survives_at"]
            report["verdict"] = answer["verdict"]
        report["weakest_layers"] = _weakest_layers(layers, bits, rule.statistic)
    for t in tensors:
        for k in ("_n", "_w2", "_d2"):
            t.pop(k)
    report["tensors"] = tensors
    report["elapsed_s"] = time.perf_counter() - t0
    return report


def bracket_answer(bracket, summary: dict, layers: list, bits) -> dict | None:
    """The weights tier's answer from a report's statistics (summary, layers): survives at >= a,
    rounded away at <= b, each bit-width's verdict (True, False, None: left to the probe) and what
    to run the probe on (rule.check_set: the bit-widths between, and both ends, which are
    extrapolated from the study's fine-tunes, and the rounded-away end may be the threshold
    itself: docs/study.md). None without a bracket, or without its statistic."""
    if bracket is None or (summary.get(str(max(bits))) or {}).get(bracket.statistic) is None:
        return None
    a, b = bracket.predict(summary, layers, bits)
    between = [x for x in bits if (b is None or x > b) and (a is None or x < a)]
    return {"survives_at": a, "rounded_away_at": b, "rule": bracket.to_dict(), "probe": between,
            "check": check_set(bits, a, b),
            "verdict": {str(x): True if a is not None and x >= a else False if b is not None and x <= b else None
                        for x in bits}}


def _weakest_layers(layers: list[dict], bits: list[int], stat: str, k: int = 5) -> list[dict]:
    """Layers ordered by the deciding statistic at the lowest bit-width where it is defined."""
    rows = []
    for L in layers:
        vals = {b: L["by_bits"][str(b)].get(stat) for b in bits}
        if all(v is None for v in vals.values()):
            continue
        rows.append({"layer": L["layer"], "statistic": stat, "by_bits": {str(b): v for b, v in vals.items()}})
    low = str(min(bits))
    rows.sort(key=lambda r: (r["by_bits"][low] if r["by_bits"][low] is not None else math.inf))
    return rows[:k]


def delta_survival(model=None, bits=SUPPORTED_BITS, group_size=64, adapter=None, base=None, threads=0, progress=True):
    """delta-survival of a fused model directory, or, with model None, of base + adapter fused on the
    fly (the values `qtools fuse` would write, none written): the same report as on that fused model."""
    if model is None:
        return _delta_survival_unfused(base, adapter, bits, group_size, threads, progress)
    return analyze(model, bits, group_size, adapter=adapter, base=base, with_delta=True, threads=threads, progress=progress)


def _delta_survival_unfused(base, adapter, bits, group_size, threads, progress):
    if base is None or adapter is None:
        raise QtoolsError("without a fused model, give both --base and --adapter (the model is fused on the fly)")
    view = FusedView(base, adapter, dtype="float16")
    # The delta the fused model's provenance would give: the adapter's own, exact; a DoRA delta
    # rescales whole rows and needs the base (fused - base).
    ad = Adapter(adapter)
    dora = ad.is_dora
    ad.close()
    try:
        return analyze(view, bits, group_size, adapter=adapter, base=base if dora else None, with_delta=True,
                       threads=threads, progress=progress)
    finally:
        view.close()


def quant_error(model, bits=SUPPORTED_BITS, group_size=64, threads=0, progress=True):
    return analyze(model, bits, group_size, with_delta=False, threads=threads, progress=progress)
