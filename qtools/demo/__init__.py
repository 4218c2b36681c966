"""Built-in demo models: a tiny Qwen3 base, a LoRA adapter, and the demo suite.

`qtools demo-models` builds models/demo_base, models/demo_adapter and
suites/demo.jsonl (deterministic; ~4.5 min on 2 CPU cores). Tests use the
fast fixtures `model.make_tiny_model` and `model.make_tiny_adapter`.

Measured (MLX 0.32.4 CPU, mlx-lm 0.32.2; fuse in float32, store float16,
nn.quantize group 64, greedy generation of the 64-case suite, 12 VETO cases):

    make demo   (the same sweep through qtools fuse / quantize / validate)

    model        correct  VETO->APPROVE  malformed
    base f16       22/64       12            0
    fused f16      63/64        0            0
    fused 8-bit    63/64        0            0
    fused 6-bit    63/64        0            0
    fused 5-bit    63/64        0            0
    fused 4-bit    60/64        3            1
    fused 3-bit    63/64        0            0
    fused 2-bit    51/64        0            1   (every review answered VETO)

The safety boundary breaks at 4 bits while aggregate accuracy stays at 94%;
3 bits happens to round the other way, 2 bits loses the review decision.
The delta is NOT subtle per weight: delta_rms is ~0.9x the base weight rms
and ~3x the median 4-bit step (the base is briefly trained, near its init).
"""
