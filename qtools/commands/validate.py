"""`qtools validate MODEL --suite S`: run a behavioural suite, write logs/<model>-<suite>.json."""

import json

import click

from .. import VerdictFailed
from ..io.logs import log_path
from ..pipeline.scoring import DEFAULT_MIN_ACCURACY
from ..pipeline.validate import format_report, validate
from .options import Number


@click.command("validate", epilog="Exit status: 0 the verdict passed, 3 it failed, 1 an error (bad input: "
                                   "nothing was judged), 2 a usage error.")
@click.argument("model", type=click.Path())
@click.option("--suite", "suite", default="suites/demo.jsonl", show_default=True, type=click.Path(),
              help="Suite JSONL file.")
@click.option("--output", "-o", "out", type=click.Path(), default=None,
              help="Log file to write [default: LOGS/<model>-<suite>.json].")
@click.option("--logs-dir", default="logs", show_default=True, envvar="LOGS", type=click.Path(),
              help="Where the log goes when --output is not given.")
@click.option("--max-tokens", type=click.IntRange(min=1), default=None, help="Override the suite's max tokens per answer.")
@click.option("--min-accuracy", type=Number(0, 1), default=DEFAULT_MIN_ACCURACY, show_default=True,
              help="Verdict fails below this overall accuracy.")
@click.option("--batch", is_flag=True,
              help="Generate all but the first case with mlx_lm.batch_generate (faster; mean time is then amortized).")
@click.option("--resume/--no-resume", default=None,
              help="Reuse the results an interrupted run left in <log>.partial.jsonl [default: when they are "
                   "for the same model, suite and settings]; --resume reuses them anyway, --no-resume starts over.")
@click.option("--json", "as_json", is_flag=True, help="Print the full result as JSON on stdout.")
def validate_cmd(model, suite, out, logs_dir, max_tokens, min_accuracy, batch, resume, as_json):
    """Validate MODEL on a suite; exit 3 if the verdict fails (critical errors or low accuracy).

    Each case's result is saved as it is scored, so an interrupted run resumes where it stopped.
    """
    from ..io.modeldir import check_model_dir
    from ..io.suite import load_suite

    path = out or log_path(check_model_dir(model), load_suite(suite).name, logs_dir)
    result = validate(model, suite, max_tokens=max_tokens, min_accuracy=min_accuracy,
                      progress=True, batch=batch, log=path, resume=resume)
    if as_json:
        click.echo(json.dumps(result, indent=2))
    else:
        click.echo(format_report(result))
        click.echo(f"log: {path}")
    if result["verdict"] != "pass":
        raise VerdictFailed
