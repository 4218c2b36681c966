"""Will this model fit? Estimate its memory and compare with the device's limits.

On Apple Silicon MLX reports the GPU's recommended working-set size; a model
that needs most of it runs, but slowly (the 6-bit slowdown in the findings ran
at 92% of it): a warning. A model that needs more than the machine's memory
(MLX's memory_size, else the system memory) does not run at all, it swaps for
hours: an error before it is loaded. Elsewhere both limits are the system
memory. The estimate is the weights as stored on disk, plus a float16 KV cache
for `context_tokens`, plus a 5% margin for activations and the runtime.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from .. import QtoolsError
from ..io.modeldir import read_config, text_config, weights_bytes

WARN_FRACTION = 0.85
DEFAULT_CONTEXT_TOKENS = 4096
ACTIVATION_MARGIN = 0.05


def kv_cache_bytes(config: dict, context_tokens: int = DEFAULT_CONTEXT_TOKENS) -> int:
    """Keys and values, float16, every layer, `context_tokens` positions."""
    cfg = text_config(config)
    layers = int(cfg.get("num_hidden_layers") or 0)
    heads = int(cfg.get("num_attention_heads") or 0)
    kv_heads = int(cfg.get("num_key_value_heads") or heads or 0)
    head_dim = cfg.get("head_dim") or (int(cfg.get("hidden_size", 0)) // heads if heads else 0)
    return 2 * layers * kv_heads * int(head_dim or 0) * int(context_tokens) * 2


def estimate_bytes(model: str | Path, context_tokens: int = DEFAULT_CONTEXT_TOKENS) -> dict:
    """Memory the model needs to run, in bytes, and its parts."""
    w = weights_bytes(model)
    config = read_config(model, required=False)
    kv = kv_cache_bytes(config, context_tokens)
    margin = int(ACTIVATION_MARGIN * w)
    return {"weights": w, "kv_cache": kv, "margin": margin, "total": w + kv + margin,
            "context_tokens": context_tokens}


def _meminfo_total() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def device_limit() -> tuple[int | None, str]:
    """(bytes, where it came from): MLX's recommended working set, else system memory."""
    try:
        import mlx.core as mx

        info = mx.device_info() if hasattr(mx, "device_info") else {}
        if not info.get("max_recommended_working_set_size") and hasattr(mx, "metal") and mx.metal.is_available():
            info = mx.metal.device_info()
        size = info.get("max_recommended_working_set_size")
        if size:
            return int(size), "MLX max_recommended_working_set_size"
    except Exception:  # an old or odd MLX build: fall back to the system memory
        pass
    return _system_memory()


def _system_memory() -> tuple[int | None, str]:
    try:
        size = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        if size > 0:
            return int(size), "system memory"
    except (ValueError, OSError, AttributeError):
        pass
    size = _meminfo_total()
    return (size, "system memory (/proc/meminfo)") if size else (None, "unknown")


def device_total() -> tuple[int | None, str]:
    """(bytes, where it came from): all the memory the device has (MLX's memory_size on Apple
    Silicon, else the system memory): more than this cannot run without swapping."""
    try:
        import mlx.core as mx

        info = mx.device_info() if hasattr(mx, "device_info") else {}
        if not info.get("memory_size") and hasattr(mx, "metal") and mx.metal.is_available():
            info = mx.metal.device_info()
        if info.get("memory_size"):
            return int(info["memory_size"]), "MLX memory_size"
    except Exception:  # an old or odd MLX build: fall back to the system memory
        pass
    return _system_memory()


def check_fits(need: int, what: str, hint: str = "") -> None:
    """Refuse work that needs more memory than the device has, before it loads anything."""
    total, source = device_total()
    if total and need > total:
        raise QtoolsError(f"{what} needs about {need / 1e9:.1f} GB of memory, more than the {total / 1e9:.1f} GB "
                          f"this machine has ({source}): it would swap for hours" + (f"; {hint}" if hint else ""))


def check_memory(model: str | Path, context_tokens: int = DEFAULT_CONTEXT_TOKENS,
                 warn_fraction: float = WARN_FRACTION, warn: bool = True, stream=None, refuse: bool = True) -> dict:
    """Estimate vs limits, before the model loads: an error above the device's total memory (with
    `refuse`), a warning on stderr above `warn_fraction` of its recommended working set. Returns
    the log fields."""
    est = estimate_bytes(model, context_tokens)
    if refuse:
        check_fits(est["total"], f"model {model} (weights {est['weights'] / 1e9:.1f} GB + KV cache for "
                                 f"{context_tokens} tokens + margin)",
                   "use a smaller bit-width or a machine with more memory")
    limit, source = device_limit()
    pressure = est["total"] / limit if limit else None
    result = {
        "memory_estimate_gb": est["total"] / 1e9,
        "memory_limit_gb": limit / 1e9 if limit else None,
        "memory_pressure": pressure,
        "memory_limit_source": source,
        "memory_warning": bool(pressure is not None and pressure > warn_fraction),
    }
    if warn and result["memory_warning"]:
        print(
            f"warning: {Path(model).name} needs about {est['total'] / 1e9:.1f} GB "
            f"(weights {est['weights'] / 1e9:.1f} GB + KV cache for {context_tokens} tokens + margin), "
            f"{pressure:.0%} of the {limit / 1e9:.1f} GB limit ({source}); above {warn_fraction:.0%} "
            "generation slows down sharply (the 6-bit slowdown in the findings ran at 92%): "
            "use a smaller bit-width or close other apps.",
            file=stream or sys.stderr,
        )
    return result
