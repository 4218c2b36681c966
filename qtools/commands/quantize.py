"""`qtools quantize MODEL --bits B --output O`: MLX affine quantization through mlx-lm."""

import json

import click

from .. import SUPPORTED_BITS, SUPPORTED_GROUP_SIZES
from ..pipeline.quantize import RECIPES, default_output, quantize
from ..format import human_bytes
from .options import Supported


@click.command("quantize")
@click.argument("model", type=click.Path())
@click.option("--bits", type=Supported("bits", SUPPORTED_BITS, "MLX affine quantization"), default=5, show_default=True,
              help="Bits per weight (MLX affine).")
@click.option("--group-size", type=Supported("group size", SUPPORTED_GROUP_SIZES, "MLX"), default=64,
              show_default=True, help="Weights per quantization group.")
@click.option("--recipe", type=click.Choice(RECIPES), default="uniform", show_default=True,
              help="uniform; mlx-lm's mixed_3_6/mixed_4_6 (ignore --bits); or survival: --bits, with the "
                   "tensors where the fine-tuning delta loses most raised until delta-survival's rule "
                   "rates the model as safe as the uniform bit-width it recommends.")
@click.option("--layer-bits", "layer_bits_file", type=click.Path(exists=True, dir_okay=False), default=None,
              help="JSON file {layer path: bits (0 = keep float)} overriding single layers.")
@click.option("--output", "-o", "out", default=None, type=click.Path(),
              help="Output directory [default: models/fused_<bits>bit].")
@click.option("--force", is_flag=True, help="Overwrite an existing output.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def quantize_cmd(model, bits, group_size, recipe, layer_bits_file, out, force, as_json):
    """Quantize MODEL to --bits; report bits per weight and disk size."""
    from .. import QtoolsError

    bits, group_size = int(bits), int(group_size)
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
    out = out or default_output(bits, recipe)
    report = quantize(model, out, bits=bits, group_size=group_size, recipe=recipe,
                      layer_bits=layer_bits, force=force)
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
    ratio = report["disk_bytes"] / report["source_disk_bytes"] if report["source_disk_bytes"] else 0
    click.echo(
        f"quantized {report['source']} -> {report['out']} "
        f"({ {'uniform': f'{bits}-bit', 'survival': f'survival {bits}-bit'}.get(recipe, recipe)}, group {group_size}): "
        f"{report['bits_per_weight']:.3f} bits/weight, {human_bytes(report['disk_bytes'])} "
        f"({ratio:.0%} of {human_bytes(report['source_disk_bytes'])}) in {report['seconds']:.1f} s"
    )
