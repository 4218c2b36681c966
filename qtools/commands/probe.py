"""`qtools probe MODEL --suite S --bits 2 3 4 5 6 8`: predict validate's verdict per bit-width from logits."""

import json

import click

from .. import SUPPORTED_BITS, SUPPORTED_GROUP_SIZES
from ..io.atomic import check_output, check_writable, write_json_atomic
from ..pipeline.probe import format_probe, probe
from ..pipeline.scoring import DEFAULT_MIN_ACCURACY
from .options import Number, Supported, ValuesOption


@click.command("probe")
@click.argument("model", type=click.Path(), required=False)
@click.option("--suite", default="suites/demo.jsonl", show_default=True, type=click.Path(), help="Suite JSONL file.")
@click.option("--bits", "bits", cls=ValuesOption, multiple=True,
              type=Supported("bits", SUPPORTED_BITS, "MLX affine quantization"),
              help="Bit-widths to probe a float model at (repeat or list: --bits 4 5 6) [default: all]; "
                   "not for an already-quantized model, which is probed as it is.")
@click.option("--group-size", type=Supported("group size", SUPPORTED_GROUP_SIZES, "MLX"), default=None,
              help="Quantization group size for a float model [default: 64].")
@click.option("--min-accuracy", type=Number(0, 1), default=DEFAULT_MIN_ACCURACY, show_default=True,
              help="Predicted verdict fails below this accuracy (as validate's).")
@click.option("--max-tokens", type=click.IntRange(min=1), default=None, help="Override the suite's max tokens per answer.")
@click.option("--reference", type=click.Path(), default=None,
              help="Teacher-force the greedy answers of this model (loaded whole, same tokenizer), e.g. the "
                   "8-bit model, instead of generating the float model's own layer by layer (one read of "
                   "the float model per generated token); or of a qtools validate log of such a model on the "
                   "same suite: its answers are read, not generated again.")
@click.option("--base", type=click.Path(), default=None,
              help="Without MODEL: the base the --adapter is fused into on the fly, pass by pass (no fused model "
                   "on disk; each pass over the weights costs a streamed fuse).")
@click.option("--adapter", type=click.Path(), default=None, help="Without MODEL: the adapter fused on the fly.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
@click.option("--output", "-o", type=click.Path(dir_okay=False), default=None,
              help="Also write the JSON report to this file (written whole or not at all).")
def probe_cmd(model, suite, bits, group_size, min_accuracy, max_tokens, reference, base, adapter, as_json, output):
    """Predict accuracy, critical errors and the verdict of MODEL at each bit-width from one
    teacher-forced pass per case: the margin of the expected decision at its decision token.
    A float model is read layer by layer, never whole: its size is not bounded by memory.
    Without MODEL, --base and --adapter are fused on the fly, layer by layer, at every pass."""
    if model is None and (base is None or adapter is None):
        raise click.UsageError("give MODEL, or --base and --adapter to fuse on the fly")

    if output:
        # before the probe's minutes of work, not after; never over the model or the suite
        check_writable(check_output(output, [model, base, adapter, suite, reference]), file=True)
    report = probe(model, suite, bits=[int(b) for b in bits],
                   group_size=None if group_size is None else int(group_size), min_accuracy=min_accuracy,
                   max_tokens=max_tokens, progress=not as_json, reference=reference, base=base, adapter=adapter)
    if output:
        write_json_atomic(output, report)
    if as_json:
        click.echo(json.dumps(report))
        return
    click.echo(format_probe(report))
