"""`qtools fuse BASE --adapter A --output O`: fuse a LoRA/DoRA adapter in float32."""

import json

import click

from ..format import human_bytes
from ..pipeline.fuse import DTYPES, fuse


@click.command("fuse")
@click.argument("base", type=click.Path())
@click.option("--adapter", required=True, type=click.Path(), help="Adapter directory (adapter_config.json + adapters.safetensors).")
@click.option("--output", "-o", "out", default="models/fused_f16", show_default=True, type=click.Path(),
              help="Output model directory.")
@click.option("--dtype", type=click.Choice(DTYPES), default="float16", show_default=True,
              help="Saved dtype (the fuse itself is always float32).")
@click.option("--force", is_flag=True, envvar="QTOOLS_FORCE", help="Overwrite an existing output.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def fuse_cmd(base, adapter, out, dtype, force, as_json):
    """Fuse --adapter into BASE (an mlx-lm model directory) (float32 math, float16 output) with provenance for delta-survival."""
    report = fuse(base, adapter, out, dtype=dtype, force=force)
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    note = ", base dequantized" if report["dequantized_base"] else ""
    click.echo(
        f"fused {report['fused_modules']} {report['fine_tune_type']} layers into {report['out']} "
        f"({report['dtype']}, fused in float32{note}): {human_bytes(report['disk_bytes'])} "
        f"in {report['seconds']:.1f} s"
    )
