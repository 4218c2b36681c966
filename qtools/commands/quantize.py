"""`qtools quantize MODEL --bits B --output O`, or `qtools quantize --base B --adapter A --bits B`
(base + adapter fused on the fly, no fused model on disk): MLX quantization of the fused model."""

import json

import click

from .. import SUPPORTED_BITS, SUPPORTED_GROUP_SIZES
from ..format import human_bytes
from ..pipeline.quantize import RECIPES, default_output, quantize
from ..pipeline.recipes_mlx import DATA_RECIPES
from .options import Number, SamplesCount, Supported


@click.command("quantize")
@click.argument("model", type=click.Path(), required=False)
@click.option("--bits", type=Supported("bits", SUPPORTED_BITS, "MLX affine quantization"), default=5, show_default=True,
              help="Bits per weight (MLX affine).")
@click.option("--group-size", type=Supported("group size", (16, *SUPPORTED_GROUP_SIZES), "MLX"), default=None,
              help="Weights per quantization group [default: 64; mxfp4/mxfp8 32, nvfp4 16, the only ones they take].")
@click.option("--recipe", type=click.Choice(RECIPES), default="uniform", show_default=True,
              help="uniform; mlx-lm's mixed_3_6/mixed_4_6 (ignore --bits); survival: --bits, with the "
                   "tensors where the fine-tuning delta loses most raised until delta-survival's rule "
                   "rates the model as safe as the uniform bit-width it recommends; MLX's mxfp4/nvfp4/mxfp8 "
                   "(fixed bits, ignore --bits); mlx-lm's awq/gptq/dwq/dynamic (calibrated on --data); "
                   "adapter (base at --bits + the fine-tune's float16 adapter, unfused); compensated "
                   "(--bits + a float16 low-rank correction of the quantization error as an adapter).")
@click.option("--data", type=click.Path(), default=None,
              help="Calibration data for awq/gptq/dwq/dynamic: JSONL ({text} / {messages} / {prompt, completion}) "
                   "or .txt [default: the fine-tune's training data when its adapter_config.json names it].")
@click.option("--num-samples", type=SamplesCount(), default=None,
              help="awq/gptq/dynamic: calibration blocks of --sequence-length tokens, -1 for all [default: 8].")
@click.option("--sequence-length", type=click.IntRange(min=8), default=None, help="awq/gptq/dynamic: tokens per block [default: 512].")
@click.option("--base", type=click.Path(), default=None,
              help="Without MODEL: the base the adapter is fused into on the fly (no fused model on disk). "
                   "adapter recipe: the float base model [default: from the fused model's provenance].")
@click.option("--adapter", type=click.Path(), default=None,
              help="Without MODEL: the adapter fused on the fly. adapter/compensated recipes: the fine-tune's "
                   "adapter [default: from the provenance].")
@click.option("--rank", type=click.IntRange(min=1), default=None,
              help="compensated: rank of the correction [default: the largest within --target-bpw].")
@click.option("--correction", type=click.Choice(["svd", "subspace"]), default=None,
              help="compensated: svd (best rank-r approximation of the error) or subspace (the error inside "
                   "the adapter's subspace) [default: svd].")
@click.option("--target-bpw", type=Number(0, min_open=True), default=None,
              help="dynamic/compensated: bits per weight to fill [default: BITS + 0.8, 4.8 at 4 bits].")
@click.option("--layer-bits", "layer_bits_file", type=click.Path(exists=True, dir_okay=False), default=None,
              help="JSON file {layer path: bits (0 = keep float)} overriding single layers.")
@click.option("--output", "-o", "out", default=None, type=click.Path(),
              help="Output directory [default: models/fused_<bits>bit].")
@click.option("--force", is_flag=True, help="Overwrite an existing output.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def quantize_cmd(model, bits, group_size, recipe, data, num_samples, sequence_length, base, adapter, rank, correction, target_bpw,
                 layer_bits_file, out, force, as_json):
    """Quantize MODEL to --bits, or, without MODEL, --base with --adapter fused on the fly, tensor by
    tensor (uniform, mixed_*, survival, mxfp4/nvfp4/mxfp8, adapter); report bits per weight and size."""
    if model is None and (base is None or adapter is None):
        raise click.UsageError("give MODEL, or --base and --adapter to fuse on the fly")
    from .. import BadValue, QtoolsError

    bits, group_size = int(bits), (int(group_size) if group_size else None)
    layer_bits = None
    if layer_bits_file:
        try:
            with open(layer_bits_file) as f:
                layer_bits = json.load(f)
        except (OSError, ValueError) as exc:
            raise QtoolsError(f"cannot read --layer-bits {layer_bits_file}: {exc}") from None
        if not isinstance(layer_bits, dict):
            raise QtoolsError(f"--layer-bits {layer_bits_file} must hold a JSON object")
        for path, b in layer_bits.items():
            if b and b not in SUPPORTED_BITS:
                raise QtoolsError(f"layer {path}: bits={b} is not supported (use one of "
                                  f"{' '.join(map(str, SUPPORTED_BITS))} or 0 to keep float)")
    if group_size == 16 and recipe != "nvfp4":  # 16 is nvfp4's group, not an affine one
        raise BadValue(f"group size 16 is not supported by {recipe}: MLX affine quantization supports "
                       + ", ".join(map(str, SUPPORTED_GROUP_SIZES)), "--group-size")
    if data is None and recipe in DATA_RECIPES:
        from ..demo.data import training_data_of

        data = training_data_of(model) if model is not None else None  # the demo fine-tune's own training data, never the suite's cases
    out = out or default_output(bits, recipe)
    report = quantize(model, out, bits=bits, group_size=group_size, recipe=recipe,
                      layer_bits=layer_bits, force=force, data=data, base=base, adapter=adapter,
                      rank=rank, correction=correction, target_bpw=target_bpw, num_samples=num_samples,
                      sequence_length=sequence_length)
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    if recipe == "survival":
        raised = report["raised_layers"]
        rule = report["survival_rule"]
        agg = rule.get("aggregate", "weighted").replace("_", " ")
        click.echo(f"survival recipe: {len(raised)} of {report['analysed_tensors']} tensors raised above "
                   f"{bits} bits (rule: {rule['statistic']} ({agg}) >= {rule['min']:.4g})")
        before, after = report["survival_value_before"], report["survival_value"]
        target = report["survival_target"]
        if target["uniform_bits"] is not None:
            click.echo(f"  target: {rule['statistic']} >= {target['value']:.4g}, its value at uniform "
                       f"{target['uniform_bits']} bits (the bit-width the rule recommends)")
        if before is not None:
            verdict = ("reaches the target" if report["survival_plan_survives"]
                       else "still short of the target even at 8 bits")
            click.echo(f"  model {rule['statistic']}: {before:.4g} at uniform {bits} bits -> {after:.4g} "
                       f"with these raised ({verdict})")
        for r in raised:
            value = "-" if r["value_at_bits"] is None else f"{r['value_at_bits']:.3g}"
            click.echo(f"  {r['layer']}: {bits} -> {r['bits']} bits ({rule['statistic']} {value} at {bits})")
    label = {"uniform": f"{bits}-bit", "survival": f"survival {bits}-bit"}.get(recipe, recipe)
    if recipe in ("awq", "gptq", "dwq", "dynamic", "adapter", "compensated"):
        label = f"{recipe} {bits}-bit"
    if "compensation" in report:
        c = report["compensation"]
        click.echo(f"compensated: rank-{c['rank']} {c['correction']} correction on {c['tensors']} tensors "
                   f"({', '.join(c['keys'])}), shipped in {report['out']}/adapters; it removes "
                   f"{c['error_removed_mean']:.1%} of the quantization error"
                   + (f", {c['subspace_error_removed_mean']:.1%} of it inside the fine-tune's subspace"
                      if c.get("subspace_error_removed_mean") is not None else ""))
    if report.get("data"):
        click.echo(f"calibrated on {report['data']}")
    ratio = report["disk_bytes"] / report["source_disk_bytes"] if report["source_disk_bytes"] else 0
    click.echo(
        f"quantized {report['source']} -> {report['out']} "
        f"({label}, group {report['group_size']}): "
        f"{report['bits_per_weight']:.3f} bits/weight, {human_bytes(report['disk_bytes'])} "
        f"({ratio:.0%} of {human_bytes(report['source_disk_bytes'])}) in {report['seconds']:.1f} s"
    )
