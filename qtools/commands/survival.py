"""`qtools delta-survival` and `qtools quant-error`."""

import json

import click
from tabulate import tabulate

from .. import SUPPORTED_BITS, SUPPORTED_GROUP_SIZES
from ..io.atomic import check_output, check_writable, write_json_atomic
from ..survival.analyze import delta_survival, quant_error
from .options import Supported, ValuesOption

_bits_option = click.option(
    "--bits", "bits", cls=ValuesOption, type=Supported("bits", SUPPORTED_BITS, "MLX affine quantization"),
    multiple=True, default=SUPPORTED_BITS, show_default=True,
    help="Bit-widths to analyse (repeat or list: --bits 4 5 6).",
)
_group_option = click.option("--group-size", type=Supported("group size", SUPPORTED_GROUP_SIZES, "MLX"),
                             default=64, show_default=True, help="Quantization group size.")
_json_option = click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
_threads_option = click.option("--threads", type=click.IntRange(min=0), default=0, help="Worker threads (0: all cores).")


def _fmt(v, spec=".3f"):
    if v is None:
        return "-"
    if isinstance(v, float) and v >= 1e9:
        return "inf"
    return format(v, spec)


def _summary_table(report, with_delta):
    rows = []
    for b in report["bits"]:
        s = report["summary"][str(b)]
        row = [b, f"{report['bits_per_weight'][str(b)]:.2f}", _fmt(s["rmse"], ".2e"), _fmt(s["rel_rmse"], ".4f"),
               _fmt(s["step_median"], ".2e")]
        if with_delta:
            v = report["verdict"].get(str(b))
            row += [_fmt(s.get("delta_to_step")), _fmt(s.get("delta_retention")), _fmt(s.get("cosine")),
                    _fmt(s.get("sign_agreement")), _fmt(s.get("codes_changed"), ".4f"),
                    _fmt(s.get("subspace_snr"), ".2f"),
                    "survives" if v else ("rounded away" if v is not None else
                                          "probe" if str(b) in report.get("verdict", {}) else "-")]
        rows.append(row)
    headers = ["bits", "bits/w", "rmse", "rel rmse", "step (median)"]
    if with_delta:
        headers += ["delta/step", "delta_retention", "cosine", "sign agree", "codes chg", "subspace SNR", "verdict"]
    return tabulate(rows, headers=headers, tablefmt="simple")


def _print_skipped(report):
    if report["skipped"]:
        click.echo(f"\nSkipped {len(report['skipped'])} tensor(s) mlx-lm would not quantize:")
        for s in report["skipped"][:10]:
            click.echo(f"  {s['name']} {s['shape']}: {s['reason']}")


@click.command("delta-survival")
@click.argument("model", type=click.Path(), required=False)
@click.option("--adapter", type=click.Path(), default=None, help="mlx-lm adapter directory the model was fused from.")
@click.option("--base", type=click.Path(), default=None,
              help="Base model directory (delta = fused - base; without MODEL, the base the adapter is fused into on the fly).")
@_bits_option
@_group_option
@_json_option
@click.option("--output", "-o", type=click.Path(dir_okay=False), default=None,
              help="Also write the JSON report to this file (written whole or not at all).")
@_threads_option
def delta_survival_cmd(model, adapter, base, bits, group_size, as_json, output, threads):
    """Predict, from the weights alone, which bit-widths keep the LoRA delta of MODEL.

    MODEL is the fused float model directory. The delta comes from --adapter,
    --base, or the provenance `qtools fuse` recorded in MODEL. Without MODEL,
    --base and --adapter are fused on the fly, tensor by tensor, with the values
    `qtools fuse` would write: the same report, no fused model on disk.
    """
    if model is None and (base is None or adapter is None):
        raise click.UsageError("give MODEL (a fused model directory), or both --base and --adapter "
                               "(fused on the fly, nothing written)")
    if output:
        check_writable(check_output(output, [model, adapter, base]), file=True)  # before the analysis, not after it
    report = delta_survival(model, bits, group_size, adapter=adapter, base=base, threads=threads,
                            progress=not as_json)
    if output:
        write_json_atomic(output, report)
    if as_json:
        click.echo(json.dumps(report))
        return
    src = report["delta_source"]
    rule = report["threshold"]
    how = "recorded in the model's provenance" if src.get("recorded") else "given"
    if src["delta_from"] == "adapter":
        where = f"adapter {src['adapter']} ({how})"
    else:
        where = f"base {src['base']} (fused - base; {how}{'; ' + src['why'] if src.get('why') else ''})"
    click.echo(f"Model: {report['model']}   group size {report['group_size']}   delta from: {where}")
    unchanged = report.get("unchanged", {}).get("tensors", [])
    if unchanged:
        click.echo(f"{len(unchanged)} tensor(s) unchanged by the fine-tune, left out of the delta statistics")
    click.echo(_summary_table(report, True))
    if report["weakest_layers"]:
        stat = rule["statistic"]
        rows = [[w["layer"]] + [_fmt(w["by_bits"][str(b)], ".3f") for b in report["bits"]] for w in report["weakest_layers"]]
        click.echo(f"\nWeakest layers by {stat}:")
        click.echo(tabulate(rows, headers=["layer"] + [f"{b}-bit" for b in report["bits"]], tablefmt="simple"))
    _print_skipped(report)
    for note in report.get("notes", []):
        click.echo(f"Note: {note}")
    pm = report["predicted_min_bits"]
    tag = " (PROVISIONAL: confirm with make validate)" if rule.get("provisional") else ""
    agg = rule.get("aggregate", "weighted").replace("_", " ")
    click.echo(f"\nRule: survives when {rule['statistic']} ({agg}) >= {rule['min']:.4g}{tag}; {rule['evidence']}")
    br = report.get("bracket")
    if br is not None:
        a, b = br["survives_at"], br["rounded_away_at"]
        parts = [f"survives at >= {a}" if a is not None else "no bit-width settled as surviving",
                 f"rounded away at <= {b}" if b is not None else "none settled as rounded away"]
        between = " ".join(str(x) for x in br["probe"])
        parts.append(f"probe between: {between}" if between else "nothing left between")
        click.echo(f"Bracket ({_bracket_record()}): {', '.join(parts)}")
        point = report["point_prediction"]["predicted_min_bits"]
        click.echo(f"The point rule's single guess: {point if point is not None else 'none of the requested bit-widths'}"
                   f"{_point_record()}")
    if pm is None:
        check = " ".join(str(x) for x in (br or {}).get("check", []))
        click.echo("Predicted minimum bit-width: " + (f"none settled by the weights: qtools probe MODEL --bits {check}"
                                                      if br is not None else
                                                      "none of the requested bit-widths keeps the delta."))
    else:
        click.echo(f"Predicted minimum bit-width: {pm} ({report['bits_per_weight'][str(pm)]:.2f} bits/weight)"
                   + (" (the bracket's)" if br is not None else ""))
        above = [b for b in SUPPORTED_BITS if b > pm]
        if br is not None and br.get("check"):
            click.echo(f"Confirm: qtools probe MODEL --bits {' '.join(str(x) for x in br['check'])} (the bit-widths the "
                       f"weights leave open and both ends of the bracket), then make sweep on the smallest "
                       f"the probe keeps and the one above")
        elif rule.get("provisional") and above:
            # the calibration places the threshold within one bit-width: two evaluations settle it
            click.echo(f'Confirm: make sweep BITS="{pm} {above[0]}" (the predicted bit-width and the one above)')


def _bracket_record() -> str:
    from ..survival.rule import held_out, study_record

    w = held_out(study_record(), "weights_held_out")
    if w is None:
        return "not yet judged held out"
    return f"held out by family in the study: optimistic for {w['optimistic']}/{w['n']}, docs/study.md"


def _point_record() -> str:
    from ..survival.rule import held_out, study_record

    p = held_out(study_record(), "point_held_out")
    if p is None:
        return ""
    return f" (held out by family: optimistic for {p['optimistic']}/{p['n']}; use the bracket)"


@click.command("quant-error")
@click.argument("model", type=click.Path())
@_bits_option
@_group_option
@_json_option
@_threads_option
@click.option("--top", type=click.IntRange(min=1), default=10, show_default=True, help="Tensors listed with the largest relative error.")
def quant_error_cmd(model, bits, group_size, as_json, threads, top):
    """Per-tensor MLX affine quantization error of MODEL (like llama.cpp's quantize-stats)."""
    report = quant_error(model, bits, group_size, threads=threads, progress=not as_json)
    if as_json:
        click.echo(json.dumps(report))
        return
    click.echo(f"Model: {report['model']}   group size {report['group_size']}   tensors {len(report['tensors'])}")
    click.echo(_summary_table(report, False))
    lo = str(report["bits"][0])
    worst = sorted(report["tensors"], key=lambda t: -t["by_bits"][lo]["rel_rmse"])[:top]
    rows = [[t["name"], "x".join(map(str, t["shape"])), t["dtype"]] +
            [_fmt(t["by_bits"][str(b)]["rel_rmse"], ".4f") for b in report["bits"]] for t in worst]
    click.echo(f"\nLargest relative rmse at {lo} bits:")
    click.echo(tabulate(rows, headers=["tensor", "shape", "dtype"] + [f"{b}-bit" for b in report["bits"]], tablefmt="simple"))
    _print_skipped(report)
