"""`qtools demo-models`: build the demo base model, its LoRA adapter and suite."""

import json

import click

from ..demo.build import demo_models


@click.command("demo-models")
@click.option("--output", "-o", "out_dir", default="models", show_default=True, type=click.Path(file_okay=False),
              help="Directory that receives demo_base/ and demo_adapter/.")
@click.option("--suite", default="suites/demo.jsonl", show_default=True, type=click.Path(dir_okay=False),
              help="Where to (re)write the demo suite; '' to skip.")
@click.option("--force", is_flag=True, help="Rebuild even if complete outputs exist.")
@click.option("--family", default=None,
              help="A calibration family (g4, g12, g24, g36, l8g24): build FAMILY_base and FAMILY_adapter instead.")
@click.option("--seed", type=click.IntRange(min=0), default=None,
              help="The adapter's training seed (default the demo's, 0); 1 gives the calibration's first run.")
@click.option("--json", "as_json", is_flag=True, help="Print the built paths as JSON.")
def demo_models_cmd(out_dir, suite, force, family, seed, as_json):
    """Train the tiny demo base model and its LoRA adapter (deterministic, CPU, a few minutes)."""
    if family is not None:
        from ..calibrate.run import select_families

        family = select_families([family])[0]
    built = demo_models(out_dir=out_dir, suite=suite or None, force=force, family=family, seed=seed)
    if as_json:
        click.echo(json.dumps(built))
    else:
        for k, v in built.items():
            click.echo(f"{k:8s} {v}")
