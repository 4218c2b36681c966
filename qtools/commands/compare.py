"""`qtools compare logs/*.json`: side-by-side table, verdicts, recommendation, plot."""

import json

import click

from ..pipeline.compare import Criteria, compare, format_comparison, plot_comparison, public


@click.command("compare")
@click.argument("logs", nargs=-1, type=click.Path())
@click.option("--survival", type=click.Path(), default=None,
              help="`qtools delta-survival --json` output (found among LOGS if not given).")
@click.option("--min-accuracy", type=click.FloatRange(0, 1), default=0.8, show_default=True)
@click.option("--max-critical", type=click.IntRange(0), default=0, show_default=True)
@click.option("--max-gen-s", type=click.FloatRange(0), default=3.0, show_default=True,
              help="Most mean generation seconds per query.")
@click.option("--max-memory-gb", type=click.FloatRange(0), default=20.0, show_default=True,
              help="Most peak memory in GB.")
@click.option("--plot", type=click.Path(), default=None, help="Write a PNG: bits vs accuracy, size, predicted survival.")
@click.option("--json", "as_json", is_flag=True, help="Print the comparison as JSON.")
def compare_cmd(logs, survival, min_accuracy, max_critical, max_gen_s, max_memory_gb, plot, as_json):
    """Compare validate LOGS: metrics as rows, models as columns, winner, verdict, recommendation."""
    criteria = Criteria(min_accuracy, max_critical, max_gen_s, max_memory_gb)
    result = compare(logs, survival, criteria)
    written = plot_comparison(result, plot) if plot else None
    if as_json:
        out = public(result)
        out["plot"] = str(written) if written else None
        click.echo(json.dumps(out, indent=2))
        return
    click.echo(format_comparison(result))
    if written:
        click.echo(f"plot: {written}")
