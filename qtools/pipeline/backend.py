"""What MLX's CPU backend on Linux costs a validation run, said once before it starts.

On Linux (no Metal) MLX runs on the CPU: its GatherMM, the MoE expert matmul, exists only
in float32, and quantized matmuls run ~25x slower than float16 ones (docs/linux.md).
"""

from __future__ import annotations

import sys


def _on_cpu() -> bool:
    import mlx.core as mx

    return mx.default_device() == mx.cpu


def _is_moe(config: dict) -> bool:
    keys = ("num_experts", "num_local_experts", "n_routed_experts", "moe_intermediate_size")
    return any(config.get(k) for k in keys) or "moe" in str(config.get("model_type", ""))


def cpu_backend_note(model) -> None:
    """One line on stderr when a quantized or MoE model (a model directory or its config dict)
    will run on MLX's CPU backend on Linux."""
    if not sys.platform.startswith("linux") or not _on_cpu():
        return
    if not isinstance(model, dict):
        from ..io.modeldir import read_config

        model = read_config(model)
    config = model
    quantized = bool(config.get("quantization") or config.get("quantization_config"))
    moe = _is_moe(config)
    if not (quantized or moe):
        return
    parts = []
    if moe:
        parts.append("runs MoE expert matmuls (GatherMM) only in float32")
    if quantized:
        parts.append("runs quantized matmuls ~25x slower than float16")
    print(f"Note: MLX's CPU backend on Linux {' and '.join(parts)}: expect validation to take far longer "
          "than on Apple Silicon (docs/linux.md)", file=sys.stderr)
