"""Calibrate delta-survival's threshold against behaviour on a grid of fine-tunes.

For every fine-tune of the demo family (different learning rates, lengths,
LoRA scales, ranks, adapted modules and seeds) we record the statistics
delta-survival computes from the weights and the behaviour of the fused model
quantized at each bit-width. A bit-width *passes* when validation passes, as
`qtools validate` judges it: accuracy >= min_accuracy and no critical
(VETO->APPROVE) error. The true threshold is the smallest bit-width that
passes with every larger one; fine-tunes whose float16 model does not pass
have none and are left out. A rule (statistic, aggregation, threshold) is
fitted on a training split and judged on the rest.

One module per job: grid (which fine-tunes), measure (behaviour on
fake-quantized weights), run (train, fuse, measure, cache; `calibrate()`),
fit (the rule, its scores and how far they can be trusted), report
(docs/calibration.md and its plot).
"""
