"""`qtools compare logs/*.json`: side-by-side table, verdicts, recommendation, plot."""

import json
import math

import click

from ..pipeline.compare import Criteria, check_plot, compare, format_comparison, plot_comparison, public
from ..pipeline.scoring import DEFAULT_MIN_ACCURACY
from .options import Number


class CategoryMinimum(click.ParamType):
    """NAME=MIN, MIN an accuracy between 0 and 1 (field_access=0.8)."""

    name = "NAME=MIN"

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        name, sep, raw = str(value).partition("=")
        try:
            minimum = float(raw)
        except ValueError:
            minimum = math.nan
        if not sep or not name.strip() or not 0 <= minimum <= 1:  # nan is refused here too
            self.fail(f"{value!r}: use NAME=MIN with MIN between 0 and 1 (field_access=0.8)", param, ctx)
        return name.strip(), minimum


def _min_category(ctx, param, values):
    out = {}
    for name, minimum in values:
        if name in out:
            raise click.BadParameter(f"{name} is given twice", ctx, param)
        out[name] = minimum
    return out


@click.command("compare")
@click.argument("logs", nargs=-1, type=click.Path())
@click.option("--survival", type=click.Path(), default=None,
              help="`qtools delta-survival --json` output (found among LOGS if not given).")
@click.option("--min-accuracy", type=Number(0, 1), default=DEFAULT_MIN_ACCURACY, show_default=True)
@click.option("--max-critical", type=click.IntRange(0), default=0, show_default=True)
@click.option("--max-gen-s", type=Number(0), default=3.0, show_default=True,
              help="Most mean generation seconds per query.")
@click.option("--max-memory-gb", type=Number(0), default=20.0, show_default=True,
              help="Most peak memory in GB.")
@click.option("--min-category", type=CategoryMinimum(), multiple=True, callback=_min_category,
              help="Least accuracy in one suite category, e.g. field_access=0.8 (repeatable).")
@click.option("--plot", type=click.Path(), default=None, help="Write a PNG: bits vs accuracy, size, predicted survival.")
@click.option("--json", "as_json", is_flag=True, help="Print the comparison as JSON.")
def compare_cmd(logs, survival, min_accuracy, max_critical, max_gen_s, max_memory_gb, min_category, plot, as_json):
    """Compare validate LOGS: metrics as rows, models as columns, winner, verdict, recommendation."""
    criteria = Criteria(min_accuracy, max_critical, max_gen_s, max_memory_gb, min_category)
    if plot:
        plot = check_plot(plot, [*logs, survival])  # before the comparison; never over an input
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
