"""`qtools calibrate`: fit delta-survival's threshold against behaviour."""

import json

import click

from ..calibrate.run import calibrate
from ..demo.tasks import TASKS
from ..pipeline.scoring import DEFAULT_MIN_ACCURACY
from ..survival.rule import RULE_FILE
from .options import Number


@click.command("calibrate")
@click.option("--suite", type=click.Path(), default="suites/demo.jsonl", show_default=True,
              help="The demo task's suite; families of another task use suites/<task>.jsonl (else generated).")
@click.option("--work-dir", type=click.Path(), default="models/calibration", show_default=True,
              help="Adapters, fused models and cached results (a rerun resumes).")
@click.option("--docs-dir", type=click.Path(), default="docs", show_default=True)
@click.option("--min-accuracy", type=Number(0, 1), default=DEFAULT_MIN_ACCURACY, show_default=True,
              help="Validation passes at this accuracy with no critical error (as qtools validate judges).")
@click.option("--jobs", type=click.IntRange(min=1), default=2, show_default=True, help="Training runs in parallel (processes).")
@click.option("--family", "families", multiple=True,
              help="Calibrate only this family (repeatable; default: all of them, g4 g12 g24 g36 l8g24; "
                   "with --task agent, agent-g4 ...).")
@click.option("--task", type=click.Choice(list(TASKS)), default=None,
              help="The families' task (qtools/demo/tasks.py; default demo): the same base and fine-tune "
                   "recipes pretrained, fine-tuned and measured on it, named <task>-<family>.")
@click.option("--exact-delta/--no-exact-delta", default=False, show_default=True,
              help="Also measure each fine-tune with the delta kept exactly (what sets the threshold: "
                   "the base's noise or the delta's rounding); doubles the measuring time.")
@click.option("--from-cache", is_flag=True,
              help="Train and measure nothing: refit and report from the cached fine-tunes (under a minute).")
@click.option("--study", is_flag=True,
              help="The study's families (agent at gains 4 and 24, 8 layers, hidden 256, qwen3_moe; access) and "
                   "fine-tunes (float16 >= 95%, no critical error), each also measured with real quantized models "
                   "and the probe; results kept in --results-dir.")
@click.option("--results-dir", type=click.Path(), default=None,
              help="Keep each fine-tune's result here (default with --study: calibration/results) instead of in "
                   "--work-dir.")
@click.option("--json", "as_json", is_flag=True)
def calibrate_cmd(suite, work_dir, docs_dir, min_accuracy, jobs, families, task, exact_delta, from_cache, study,
                  results_dir, as_json):
    """Build the families' bases, train a grid of fine-tunes on each, measure their behavioural
    threshold, judge the rule leave-one-family-out and fit it on all families."""
    res = calibrate(suite, RULE_FILE, work_dir, docs_dir, min_accuracy, jobs=jobs, families=list(families),
                    exact_delta=exact_delta, from_cache=from_cache, task=task, study=study, results_dir=results_dir)
    if as_json:
        click.echo(json.dumps(res))
        return
    if "study" in res:
        for g in res["study"]["goals"]:
            click.echo(f"{'met    ' if g['met'] else 'NOT MET'}  {g['goal']}: {g['measured']}")
        click.echo(f"Report: {docs_dir}/study.md; rule and bracket: {res['rule_file']}"
                   + ("" if res["rule_replaced"] else " (delta-survival's rule file unchanged: the study has fewer "
                                                      "usable fine-tunes than its rule was fitted on)"))
        return
    r, t, h = res["rule"], res["train"], res["held_out"]
    click.echo(f"Rule: {r['statistic']} ({r['aggregate']}) >= {r['min']:.4g}")
    click.echo(f"Fitted on all families: {t['exact']}/{t['n']} exact, {t['optimistic']} optimistic")
    click.echo(f"Leave-one-family-out: {h['exact']}/{h['n']} exact ({h['exact_rate']:.0%}), {h['optimistic']} optimistic, "
               f"worst optimistic miss {h['worst_optimistic_steps']} step(s); constant guess "
               f"{res['constant']['exact']}/{res['constant']['n']} exact")
    click.echo(f"Report: {docs_dir}/calibration.md; rule: {res['rule_file']}")
