"""`qtools calibrate`: fit delta-survival's threshold against behaviour."""

import json

import click

from ..calibrate.run import calibrate
from ..survival.rule import RULE_FILE


@click.command("calibrate")
@click.option("--base", type=click.Path(), default="models/demo_base", show_default=True,
              help="Base model the fine-tunes are trained on.")
@click.option("--suite", type=click.Path(), default="suites/demo.jsonl", show_default=True)
@click.option("--work-dir", type=click.Path(), default="models/calibration", show_default=True,
              help="Adapters, fused models and cached results (a rerun resumes).")
@click.option("--docs-dir", type=click.Path(), default="docs", show_default=True)
@click.option("--min-accuracy", type=float, default=0.8, show_default=True,
              help="Validation passes at this accuracy with no critical error (as qtools validate judges).")
@click.option("--jobs", type=int, default=2, show_default=True, help="Training runs in parallel (processes).")
@click.option("--json", "as_json", is_flag=True)
def calibrate_cmd(base, suite, work_dir, docs_dir, min_accuracy, jobs, as_json):
    """Train a grid of demo fine-tunes, measure their behavioural threshold, fit the rule."""
    res = calibrate(base, suite, RULE_FILE, work_dir, docs_dir, min_accuracy, jobs=jobs)
    if as_json:
        click.echo(json.dumps(res))
        return
    r, t, h = res["rule"], res["train"], res["held_out"]
    click.echo(f"Rule: {r['statistic']} ({r['aggregate']}) >= {r['min']:.4g}")
    click.echo(f"Training: {t['exact']}/{t['n']} exact, {t['optimistic']} optimistic")
    click.echo(f"Held out: {h['exact']}/{h['n']} exact ({h['exact_rate']:.0%}), {h['optimistic']} optimistic, "
               f"worst optimistic miss {h['worst_optimistic_steps']} step(s)")
    click.echo(f"Report: {docs_dir}/calibration.md; rule: {res['rule_file']}")
