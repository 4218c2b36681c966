"""Run a behavioural suite on one model, score it, and keep a resumable log.

Generation goes through mlx-lm, greedily, one case at a time (so first-query
and per-case times are real), with mlx-lm's tool-call parser for the model's
chat template. What the suite means (prompts, scoring, the verdict) is
qtools.pipeline.scoring; this module runs models and writes the partial log.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import sys
import time
from pathlib import Path
from typing import Callable

from .. import BadValue, QtoolsError, versions
from ..format import human_bytes
from ..format import progress as progress_bar
from ..io.atomic import check_output, check_writable, write_json_atomic, write_text_atomic
from ..io.modeldir import check_model_dir, dir_size, quantization_info
from ..io.suite import Suite, load_suite
from .runner import batch_texts, generate_one, load_model
from .scoring import DEFAULT_MIN_ACCURACY, build_prompt, score_case, summarize, tool_format_of

__all__ = ["generate_one", "run_cases", "validate", "write_log", "format_report"]

# ---------------------------------------------------------------- running


def run_cases(net, tokenizer, suite_obj: Suite, max_tokens: int | None = None, batch: bool = False,
              progress: bool = False, label: str = "model", done: dict | None = None,
              on_record: Callable[[dict], None] | None = None) -> tuple[list, int, float]:
    """Generate greedily for every case of a loaded model and score the outputs.

    `done` ({case id: record} from an interrupted run) are re-scored from their saved output and
    keep their timings, not generated again; `on_record` receives each new record as soon as it
    exists (validate appends it to the partial log). Returns (records, generated tokens,
    generation seconds), records in suite order.
    """
    tool_format = tool_format_of(tokenizer)
    done = done or {}
    cases = suite_obj.cases
    limits = [max_tokens or c.max_tokens or suite_obj.max_tokens for c in cases]
    pending = [i for i, c in enumerate(cases) if c.id not in done]
    prompts = {i: build_prompt(tokenizer, cases[i], suite_obj) for i in pending}
    by_index = {}

    def finish(i, text, ntok, secs, ids=None):
        record = score_case(cases[i], suite_obj, text, tool_format)
        record.update({"gen_s": secs, "tokens": ntok})
        if ids is not None:  # what `qtools probe --reference LOG` teacher-forces instead of generating
            record["answer_tokens"] = ids
        by_index[i] = record
        if on_record is not None:
            on_record(record)

    if batch and len(pending) > 1:
        # First query alone (its latency is a metric), the rest in one batch:
        # on the tiny demo models batch_generate gave identical greedy outputs.
        if pending[0] == 0:
            finish(0, *generate_one(net, tokenizer, prompts[0], limits[0]))
            pending = pending[1:]
        tic = time.perf_counter()
        texts, counts, ids = batch_texts(net, tokenizer, [prompts[i] for i in pending], [limits[i] for i in pending])
        per = (time.perf_counter() - tic) / len(pending)
        for i, text, n, x in zip(pending, texts, counts, ids):
            finish(i, text, n, per, x)
    else:
        it = progress_bar(pending, f"validate {label}", enabled=progress)
        for i in it:
            finish(i, *generate_one(net, tokenizer, prompts[i], limits[i]))
    records = []
    for i, case in enumerate(cases):
        if i not in by_index:
            old = done[case.id]
            by_index[i] = {**score_case(case, suite_obj, old["output"], tool_format),
                           "gen_s": old["gen_s"], "tokens": old["tokens"],
                           **({"answer_tokens": old["answer_tokens"]} if "answer_tokens" in old else {})}
        records.append(by_index[i])
    total_tokens = sum(r["tokens"] for r in records)
    total_time = sum(r["gen_s"] for r in records)
    return records, total_tokens, total_time


# ---------------------------------------------------------------- partial logs (resume)

def partial_path(log: str | Path) -> Path:
    """<log>.partial.jsonl beside the log (not *.json, so compare never reads it)."""
    log = Path(log)
    return log.with_name(f"{log.stem}.partial.jsonl")


def suite_sha256(suite: str | Path) -> str:
    import hashlib

    return hashlib.sha256(Path(suite).read_bytes()).hexdigest()


def partial_header(model: Path, suite: str | Path, max_tokens: int | None, batch: bool) -> dict:
    """What the saved results depend on: the weights, the suite file, the generation settings and
    the libraries that generate (min_accuracy only judges them, so it is not here)."""
    from ..io.weights import fingerprint

    v = versions()
    return {"qtools_partial_log": 1, "model": model.resolve().name, "model_fingerprint": fingerprint(model),
            "suite_sha256": suite_sha256(suite), "settings": {"max_tokens": max_tokens, "batch": batch},
            "versions": {"mlx": v.get("mlx"), "mlx-lm": v.get("mlx-lm")}}


def _differences(old: dict, new: dict) -> list:
    diffs = []
    if old.get("model_fingerprint") != new["model_fingerprint"]:
        diffs.append("another model")
    if old.get("suite_sha256") != new["suite_sha256"]:
        diffs.append("another suite")
    old_settings = old.get("settings") if isinstance(old.get("settings"), dict) else {}
    settings = [k for k in new["settings"] if old_settings.get(k) != new["settings"][k]]
    if settings:
        diffs.append(f"other settings ({', '.join(settings)})")
    if old.get("versions") != new["versions"]:
        diffs.append("other mlx / mlx-lm versions")
    return diffs


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0


# What a saved case must hold, of its type, to be re-scored and timed as if just generated.
RECORD_FIELDS = {
    "id": lambda v: isinstance(v, str) and v != "",
    "output": lambda v: isinstance(v, str),
    "gen_s": _finite,
    "tokens": lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0,
}


def entry_problem(entry) -> str | None:
    """Why one line of a partial log cannot be reused, or None: the one check of a saved case
    (an object {"record": {id, output, gen_s, tokens, ...}, "peak_memory_gb": number or null})."""
    if not isinstance(entry, dict) or not isinstance(entry.get("record"), dict):
        return "not an object with a record"
    rec = entry["record"]
    for key, check in RECORD_FIELDS.items():
        if key not in rec:
            return f"its record lacks {key!r}"
        if not check(rec[key]):
            return f"its record's {key!r} is {json.dumps(rec[key])[:30]}"
    if entry.get("peak_memory_gb") is not None and not _finite(entry["peak_memory_gb"]):
        return f"its peak_memory_gb is {json.dumps(entry['peak_memory_gb'])[:30]}"
    return None


def read_partial(path: Path) -> tuple[dict | None, list, int]:
    """(header, [{"record": ..., "peak_memory_gb": ...}], damaged) of a partial log: every line
    entry_problem finds fault with (a torn last line of a run killed while writing it, a record
    edited by hand) is left out and counted, so its case is generated again; a case saved twice
    counts once. (None, [], 0) if the file is not a partial log."""
    try:
        lines = path.read_text().splitlines()
        header = json.loads(lines[0]) if lines else None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None, [], 0
    if not isinstance(header, dict) or header.get("qtools_partial_log") != 1:
        return None, [], 0
    entries, seen, damaged = [], set(), 0
    for line in lines[1:]:
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            entry = None
        if entry_problem(entry) is not None:
            damaged += 1
        elif entry["record"]["id"] not in seen:
            seen.add(entry["record"]["id"])
            entries.append(entry)
    return header, entries, damaged


class PartialLog:
    """An append-only JSONL file: a header line, then one line per scored case."""

    def __init__(self, path: Path, header: dict, entries: list):
        self.path, self.count = path, len(entries)
        # Rewritten whole first (dropping a torn line, adopting the current header), then appended to.
        write_text_atomic(path, "".join(json.dumps(x) + "\n" for x in [header, *entries]))
        try:
            self._f = open(path, "a")
        except OSError as exc:
            raise QtoolsError(f"cannot write {path}: {exc.strerror or exc}") from None

    def append(self, record: dict) -> None:
        import mlx.core as mx

        self._f.write(json.dumps({"record": record, "peak_memory_gb": mx.get_peak_memory() / 1e9}) + "\n")
        self._f.flush()  # on disk (in the page cache) before the next case starts
        self.count += 1

    def close(self) -> None:
        self._f.close()


def _resume_entries(partial: Path, header: dict, resume: bool | None, suite_obj: Suite, note) -> list:
    """The saved entries to reuse: all when the partial log matches (or resume=True), else none."""
    if resume is False or not partial.exists():
        return []
    old, entries, damaged = read_partial(partial)
    if old is None:
        if resume:
            raise QtoolsError(f"cannot resume from {partial}: not a qtools partial log")
        note(f"{partial} is not a qtools partial log; starting over")
        return []
    ids = {c.id for c in suite_obj.cases}
    entries = [e for e in entries if e["record"]["id"] in ids]
    diffs = _differences(old, header)
    n = len(suite_obj.cases)
    if diffs and not resume:
        note(f"{partial} was written for {', '.join(diffs)}; starting over (--resume reuses it)")
        return []
    if entries:
        note(f"resuming {len(entries)} of {n} cases from {partial}"
             + (f", although it was written for {', '.join(diffs)}" if diffs else ""))
    if damaged:
        note(f"{damaged} damaged line(s) of {partial} left out: their cases are generated again")
    return entries


def _note(msg: str) -> None:
    print(f"[validate] {msg}", file=sys.stderr, flush=True)


def validate(
    model: str | Path,
    suite: str | Path,
    max_tokens: int | None = None,
    min_accuracy: float = DEFAULT_MIN_ACCURACY,
    progress: bool = True,
    batch: bool = False,
    log: str | Path | None = None,
    resume: bool | None = None,
    note: Callable[[str], None] = _note,
) -> dict:
    """Load MODEL, run SUITE greedily, return the full result (see log format).

    With `log`, the log's directory is checked before the model loads, each case is appended to
    <log>.partial.jsonl as it is scored, the log is written at the end and the partial removed.
    A partial left by an interrupted run is resumed when it matches the model, suite and settings
    (resume=None), always (True) or never (False).
    """
    import mlx.core as mx
    from mlx_lm.utils import compute_bits_per_weight

    path = check_model_dir(model)
    suite_obj = load_suite(suite)
    if max_tokens is not None and max_tokens < 1:
        raise BadValue("--max-tokens must be at least 1", "--max-tokens")
    partial, entries, writer = None, [], None
    if log is not None:
        # before the model loads: a run must never be lost at the end, nor an input overwritten
        log = check_writable(check_output(log, [path, suite]), file=True)
        partial = check_writable(check_output(partial_path(log), [path, suite]), file=True)
        header = partial_header(path, suite, max_tokens, batch)
        entries = _resume_entries(partial, header, resume, suite_obj, note)
        writer = PartialLog(partial, header, entries)
    from .memory import check_memory

    try:
        memory = check_memory(path)  # warns on stderr before a model near the device limit loads
        # runner.load_model: on Linux one line on what the CPU backend costs; float MoE experts in float32
        net, tokenizer, config, load_s = load_model(path)
        tool_format = tool_format_of(tokenizer)

        def on_record(record):
            try:
                writer.append(record)
            except OSError as exc:
                raise QtoolsError(f"cannot write {partial}: {exc.strerror or exc}; {writer.count} of "
                                  f"{len(suite_obj.cases)} cases are saved there: rerun to resume") from None

        try:
            records, total_tokens, total_time = run_cases(
                net, tokenizer, suite_obj, max_tokens, batch, progress, label=path.name,
                done={e["record"]["id"]: e["record"] for e in entries}, on_record=on_record if writer else None)
        except KeyboardInterrupt:
            if writer is None:
                raise
            n = len(suite_obj.cases)
            if not writer.count:
                raise QtoolsError(f"interrupted after 0 of {n} cases") from None
            raise QtoolsError(f"interrupted after {writer.count} of {n} cases; rerun the same "
                              f"command to resume (results so far: {partial})") from None
    finally:
        if writer is not None:
            writer.close()
            if not writer.count:  # nothing to resume: leave no file behind
                partial.unlink(missing_ok=True)

    quant = quantization_info(config)
    disk = dir_size(path)
    peak = max([mx.get_peak_memory() / 1e9] + [e.get("peak_memory_gb") or 0.0 for e in entries])
    result = {
        "qtools_log": 1,
        "model": path.resolve().name,
        "model_path": str(path.resolve()),
        "suite": suite_obj.name,
        "suite_path": str(Path(suite).resolve()),
        "suite_sha256": suite_sha256(suite),
        **{k: quant[k] for k in ("quantized", "bits", "group_size", "mixed")},
        "bits_per_weight": float(compute_bits_per_weight(net)),
        "disk_bytes": disk,
        "disk_gb": disk / 1e9,
        "load_s": load_s,
        "first_gen_s": records[0]["gen_s"],
        "mean_gen_s": total_time / len(records),
        "tokens_per_s": total_tokens / total_time if total_time > 0 else 0.0,
        "generated_tokens": total_tokens,
        "peak_memory_gb": peak,
        **{k: memory[k] for k in ("memory_estimate_gb", "memory_limit_gb", "memory_pressure")},
        "max_tokens": max_tokens or suite_obj.max_tokens,
        "generation": "greedy, " + ("mlx_lm.batch_generate (first query alone)" if batch else "mlx_lm.stream_generate, one case at a time"),
        "tool_parser": getattr(tool_format.get("parser"), "__module__", None) or "json (default)",
        **summarize(records, suite_obj, min_accuracy),
        "cases": records,
        # cases taken from an interrupted run's partial log (their timings are the recorded ones)
        "resumed_cases": len(entries),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "versions": versions(),
    }
    del net
    if log is not None:
        try:
            write_log(result, log)
        except QtoolsError as exc:
            raise QtoolsError(f"{exc}; the results are kept in {partial}: rerun to write the log "
                              "without generating again") from None
        partial.unlink(missing_ok=True)
    return result


def write_log(result: dict, out: str | Path) -> Path:
    return write_json_atomic(out, result)


def format_report(result: dict) -> str:
    from tabulate import tabulate

    rows = [
        [cat, f"{v['correct']}/{v['total']}", f"{v['accuracy']:.0%}"]
        for cat, v in result["per_category"].items()
    ]
    rows.append(["overall", f"{result['correct']}/{result['total']}", f"{result['accuracy']:.1%}"])
    head = tabulate(rows, headers=["category", "correct", "accuracy"], tablefmt="github")
    bits = f"{result['bits']}-bit" + (" (mixed)" if result.get("mixed") else "") if result["quantized"] else f"float{result['bits']}"
    metrics = [
        ["model", f"{result['model']} ({bits})"],
        ["suite", result["suite"]],
        ["critical errors", result["critical_errors"]],
        ["format compliance", f"{result['format_compliance']:.0%}"],
        ["load time", f"{result['load_s']:.2f} s"],
        ["first query", f"{result['first_gen_s']:.2f} s"],
        ["mean generation", f"{result['mean_gen_s']:.2f} s"],
        ["tokens/s", f"{result['tokens_per_s']:.1f}"],
        ["peak memory", human_bytes(result["peak_memory_gb"] * 1e9)],
        *([["memory estimate", f"{human_bytes(result['memory_estimate_gb'] * 1e9)} "
            f"({result['memory_pressure']:.0%} of {human_bytes(result['memory_limit_gb'] * 1e9)})"]]
          if result.get("memory_pressure") is not None else []),
        ["disk size", human_bytes(result["disk_bytes"])],
        ["bits per weight", f"{result['bits_per_weight']:.3f}"],
    ]
    lines = [head, "", tabulate(metrics, tablefmt="plain")]
    failed = [r for r in result["cases"] if not r["correct"] or r["critical"]]
    if failed:
        lines += ["", tabulate(
            [[r["id"], r["category"], r["expected"], r["got"], "CRITICAL" if r["critical"] else ""] for r in failed],
            headers=["failed case", "category", "expected", "got", ""], tablefmt="github")]
    verdict = "PASS" if result["verdict"] == "pass" else "FAIL: " + "; ".join(result["verdict_reasons"])
    lines += ["", f"verdict: {verdict}"]
    return "\n".join(lines)
