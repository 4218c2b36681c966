"""What MLX's CPU backend on Linux costs a validation run, said once before it starts.

On Linux (no Metal) MLX runs on the CPU: its GatherMM, the MoE expert matmul, exists only
in float32 (a float16 MoE fails with "[GatherMM::eval] Currently only supports float32"),
and quantized matmuls run ~16-25x slower than float16 ones (docs/linux.md).
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
        parts.append("runs MoE expert matmuls (GatherMM) only in float32 (float experts are computed in it)")
    if quantized:
        parts.append("runs quantized matmuls ~25x slower than float16")
    print(f"Note: MLX's CPU backend on Linux {' and '.join(parts)}: expect validation to take far longer "
          "than on Apple Silicon (docs/linux.md)", file=sys.stderr)


def cpu_float32_experts(net, lazy: bool = False) -> int:
    """On the CPU, run float MoE expert matmuls (SwitchLinear) in float32 so GatherMM can: the
    weights stay stored as they are (memory, bits per weight) and are cast per call, the result
    cast back. Quantized experts (gather_qmm) are left alone. lazy: a model built without its
    weights (stream.StreamedModel), whose float16 weights come later: every float expert layer
    is switched. Returns how many were switched."""
    if not _on_cpu():
        return 0
    import mlx.core as mx
    from mlx_lm.models.switch_layers import SwitchLinear

    class Float32SwitchLinear(SwitchLinear):
        def __call__(self, x, indices, sorted_indices=False):
            y = mx.gather_mm(x.astype(mx.float32), self["weight"].astype(mx.float32).swapaxes(-1, -2),
                             rhs_indices=indices, sorted_indices=sorted_indices)
            if "bias" in self:
                y = y + mx.expand_dims(self["bias"][indices], -2)
            return y.astype(x.dtype)

    n = 0
    for _, module in net.named_modules():
        if type(module) is SwitchLinear and (lazy or module.weight.dtype != mx.float32):
            module.__class__ = Float32SwitchLinear
            n += 1
    return n


def prepare_for_cpu(net, model_dir) -> None:
    """Say what the CPU backend costs (one stderr line) and make a float MoE runnable on it."""
    cpu_backend_note(model_dir)
    cpu_float32_experts(net)
