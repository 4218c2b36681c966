"""Calibrate delta-survival's threshold against behaviour on a grid of fine-tunes.

For every fine-tune of every family (a base recipe -- outlier gain, depth -- and
a task; the same fine-tuning recipes on each: learning rates, lengths, LoRA
scales, ranks, adapted modules and seeds) we record the statistics
delta-survival computes from the weights and the behaviour of the fused model
quantized at each bit-width. A bit-width *passes* when validation passes, as
`qtools validate` judges it: accuracy >= min_accuracy and no critical
(VETO->APPROVE) error. The true threshold is the smallest bit-width that
passes with every larger one; fine-tunes whose float16 model does not pass
have none and are left out. A rule (statistic, aggregation, threshold) is
judged leave-one-family-out beside the constant guess, then fitted on all families.

One module per job: grid (which families and fine-tunes), measure (behaviour on
fake-quantized weights), run (train, fuse, measure, cache; `calibrate()`),
fit (the rule, its scores and how far they can be trusted), report
(docs/calibration.md and its plot).
"""
