"""Built-in demo models: a tiny Qwen3 base, a LoRA adapter, and the demo suite.

`qtools demo-models` builds models/demo_base, models/demo_adapter and
suites/demo.jsonl (deterministic; ~4.5 min on 2 CPU cores). Tests use the
fast fixtures `model.make_tiny_model` and `model.make_tiny_adapter`.

Measured (MLX 0.32.4 CPU, mlx-lm 0.32.2; fuse in float32, store float16,
nn.quantize group 64, greedy generation of the 64-case suite, 12 VETO cases):

    make demo   (the same sweep through qtools fuse / quantize / validate)

    model        correct  VETO->APPROVE  format ok
    base f16       31/64       12          100%
    fused f16      64/64        0          100%
    fused 8-bit    64/64        0          100%
    fused 6-bit    64/64        0          100%
    fused 5-bit    63/64        0           98%
    fused 4-bit    48/64        3           80%
    fused 3-bit    20/64        0           62%
    fused 2-bit    20/64        0           62%

The fine-tune survives 5 bits and dies at 4 (VETO answered APPROVE), with
delta_rms 0.13x the median 4-bit step: the base sits just on the wrong side
of the decision boundary (data.BASE_PRIORS), so the LoRA only moves the
boundary, and its outlier channels (train.add_outlier_channels) set the
quantization step as in trained LLMs.
"""
