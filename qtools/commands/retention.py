"""`qtools retention --reference F --base B QUANTIZED...`: fine-tune retention from logits."""

import json

import click

from ..io.atomic import check_output, check_writable, write_json_atomic
from ..io.logs import log_path
from ..pipeline.retention import DEFAULT_TOP_K, format_retention, retention


@click.command("retention")
@click.argument("quantized", nargs=-1, required=True, type=click.Path())
@click.option("--reference", default="models/fused_f16", show_default=True, type=click.Path(),
              help="The float fused model (the fine-tune, unquantized).")
@click.option("--base", default="models/demo_base", show_default=True, type=click.Path(),
              help="The base model the fine-tune started from.")
@click.option("--suite", default=None, type=click.Path(),
              help="Suite JSONL: prompts + the reference's greedy answers are scored [default: suites/demo.jsonl].")
@click.option("--text", default=None, type=click.Path(),
              help="A text file instead of a suite: every token of each paragraph is scored.")
@click.option("--top-k", type=click.IntRange(min=1), default=DEFAULT_TOP_K, show_default=True,
              help="Reference log-probs kept per token; the rest is one tail bucket.")
@click.option("--max-tokens", type=click.IntRange(min=1), default=None, help="Override the suite's answer length.")
@click.option("--cache", default=None, type=click.Path(dir_okay=False),
              help="Reference top-k cache (.npz), reused while reference and prompts are unchanged "
                   "[default: LOGS/retention-ref-<reference>-<suite>.npz].")
@click.option("--logs-dir", default="logs", show_default=True, envvar="LOGS", type=click.Path(),
              help="Where logs/retention-<model>.json go.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON on stdout.")
def retention_cmd(quantized, reference, base, suite, text, top_k, max_tokens, cache, logs_dir, as_json):
    """KL of each QUANTIZED model (and of --base) from the float --reference, and the logit_retention
    1 - KL(reference||quantized) / KL(reference||base): 1 keeps the fine-tune, 0 is back to the base."""
    from pathlib import Path

    if suite is None and text is None:
        suite = "suites/demo.jsonl"
    stem = Path(suite or text).stem
    cache = cache or str(Path(logs_dir) / f"retention-ref-{Path(reference).resolve().name}-{stem}.npz")
    # Every file it will write is checked before the models run: writable, and not into an input.
    logs = [log_path(Path(q), logs_dir=logs_dir, kind="retention") for q in quantized]
    for out in [*logs, cache]:
        check_writable(check_output(out, [reference, base, *quantized, suite, text]), file=True)
    result = retention(reference, base, list(quantized), suite=suite, text=text, top_k=top_k, cache=cache,
                       max_tokens=max_tokens, progress=not as_json)
    written = [str(write_json_atomic(log_path(m["model"], logs_dir=logs_dir, kind="retention"), m)) for m in result["models"]]
    if as_json:
        click.echo(json.dumps({**result, "logs": written}, indent=2))
        return
    click.echo(format_retention(result))
    click.echo("logs: " + ", ".join(written))
