"""Run a behavioural suite on one model and score it.

Generation goes through mlx-lm, greedily, one case at a time (so first-query
and per-case times are real), with mlx-lm's tool-call parser for the model's
chat template. Scoring (`score_case`) needs no model and is tested on its own.
"""

from __future__ import annotations

import datetime as _dt
import json
import re
import sys
import time
from pathlib import Path
from typing import Any, Callable

from .. import QtoolsError, versions
from ..format import human_bytes
from ..format import progress as progress_bar
from ..io.atomic import check_writable, write_json_atomic
from ..io.modeldir import check_model_dir, dir_size, load_model, quantization_info
from ..io.suite import Case, Suite, load_suite

DEFAULT_MIN_ACCURACY = 0.8
# mlx-lm's json_tools format (Qwen-style), used when the tokenizer names no parser.
DEFAULT_TOOL_START = "<tool_call>"
DEFAULT_TOOL_END = "</tool_call>"


# ---------------------------------------------------------------- parsing

def _default_tool_parser(text: str, tools=None):
    return json.loads(text.strip())


def _normalize_call(call: Any) -> dict:
    if not isinstance(call, dict):
        raise ValueError("tool call is not an object")
    if "function" in call and isinstance(call["function"], dict):
        call = call["function"]
    name = call.get("name")
    if not isinstance(name, str) or not name:
        raise ValueError("tool call has no name")
    args = call.get("arguments", call.get("parameters", {}))
    if isinstance(args, str):
        args = json.loads(args) if args.strip() else {}
    if not isinstance(args, dict):
        raise ValueError("tool call arguments are not an object")
    return {"name": name, "arguments": args}


def extract_tool_calls(
    text: str,
    start: str | None = None,
    end: str | None = None,
    parser: Callable | None = None,
    tools: list | None = None,
) -> tuple[list, str | None]:
    """Return (tool calls, parse error or None) found in a model's output."""
    start = start or DEFAULT_TOOL_START
    end = end or DEFAULT_TOOL_END
    parser = parser or _default_tool_parser
    calls, error = [], None
    pos = 0
    while True:
        i = text.find(start, pos)
        if i < 0:
            break
        j = text.find(end, i + len(start))
        # An unterminated call (max tokens reached) is still parsed if it can be.
        body = text[i + len(start): j if j >= 0 else len(text)]
        pos = len(text) if j < 0 else j + len(end)
        try:
            parsed = parser(body, tools)
            for call in parsed if isinstance(parsed, list) else [parsed]:
                calls.append(_normalize_call(call))
        except Exception as exc:  # any parser failure is a format failure
            error = f"unparsable tool call: {exc}"
    return calls, error


def extract_boxed(text: str) -> str | None:
    r"""The content of the last \boxed{...} (nested braces allowed), or None."""
    found = None
    for m in re.finditer(r"\\boxed\s*\{", text):
        depth, i = 1, m.end()
        while i < len(text) and depth:
            if text[i] == "{":
                depth += 1
            elif text[i] == "}":
                depth -= 1
            i += 1
        if depth == 0:
            found = text[m.end(): i - 1].strip()
    return found


def find_label(text: str, labels: list) -> tuple[str, int] | None:
    """(label, character offset) of the label that appears first in the text (whole word, any case)."""
    best, best_pos = None, None
    for label in labels:
        m = re.search(r"(?<![A-Za-z0-9_])" + re.escape(label) + r"(?![A-Za-z0-9_])", text, re.IGNORECASE)
        if m and (best_pos is None or m.start() < best_pos or (m.start() == best_pos and len(label) > len(best))):
            best, best_pos = label, m.start()
    return None if best is None else (best, best_pos)


def extract_label(text: str, labels: list) -> str | None:
    """The label that appears first in the text (whole word, any case), or None."""
    found = find_label(text, labels)
    return found[0] if found else None


def _norm_answer(s: str) -> str:
    s = s.strip().strip("$").strip().rstrip(".").replace(" ", "")
    try:
        f = float(s.replace(",", ""))
        return repr(int(f)) if f == int(f) else repr(f)
    except ValueError:
        return s.lower()


def _value_matches(expected, got) -> bool:
    if isinstance(expected, str) and isinstance(got, str):
        return expected.strip().lower() == got.strip().lower()
    if isinstance(expected, dict) and isinstance(got, dict):
        return all(k in got and _value_matches(v, got[k]) for k, v in expected.items())
    return expected == got


def _has_field(args: dict, dotted: str) -> bool:
    cur: Any = args
    for part in dotted.split("."):
        if not isinstance(cur, dict) or part not in cur:
            return False
        cur = cur[part]
    return cur not in (None, "", [], {})


def call_matches(expect: dict, call: dict) -> bool:
    name = expect.get("name")
    if name and call["name"] != name:
        return False
    for key, value in (expect.get("arguments") or {}).items():
        if key not in call["arguments"] or not _value_matches(value, call["arguments"][key]):
            return False
    field = expect.get("field")
    return not field or _has_field(call["arguments"], field)


def suite_labels(suite: Suite, case: Case) -> list:
    """Labels a label case is read against: its own list, else the suite's."""
    if case.expect.get("labels"):
        return list(case.expect["labels"])
    labels = list(suite.labels)
    for other in suite.cases:
        if other.expect["type"] == "label":
            for lab in [other.expect["label"], *other.expect.get("labels", [])]:
                if lab not in labels:
                    labels.append(lab)
    for pair in suite.critical_confusions:
        for lab in pair:
            if lab not in labels:
                labels.append(lab)
    return labels


def is_critical(case: Case, suite: Suite, got: str | None) -> bool:
    """Whether answering `got` for this case is a critical confusion (the case's own or the suite's)."""
    if got is None:
        return False
    expected = case.expected
    forbidden = set((case.critical or {}).get("forbidden", []))
    for a, b in suite.critical_confusions:
        if a.lower() == expected.lower():
            forbidden.add(b)
    return any(got.lower() == f.lower() for f in forbidden) and got.lower() != expected.lower()


def score_case(case: Case, suite: Suite, text: str, tool_format: dict | None = None) -> dict:
    """Score one output. Returns the per-case record (without timings)."""
    tool_format = tool_format or {}
    expect = case.expect
    kind = expect["type"]
    calls, error = extract_tool_calls(
        text, tool_format.get("start"), tool_format.get("end"), tool_format.get("parser"), case.tools
    )
    got: str | None
    if kind == "tool_call":
        match = next((c for c in calls if call_matches(expect, c)), None)
        chosen = match or (calls[0] if calls else None)
        got = chosen["name"] if chosen else ("direct" if error is None else None)
        correct = match is not None
        format_ok = error is None or bool(calls)
    elif kind == "direct":
        got = calls[0]["name"] if calls else ("direct" if error is None else "tool_call")
        correct = not calls and error is None and bool(text.strip())
        format_ok = error is None and (bool(calls) or bool(text.strip()))
    elif kind == "label":
        got = extract_label(text, suite_labels(suite, case))
        correct = got is not None and got.lower() == expect["label"].lower()
        format_ok = got is not None
    elif kind == "boxed":
        got = extract_boxed(text)
        correct = got is not None and _norm_answer(got) == _norm_answer(expect["answer"])
        format_ok = got is not None
    else:  # regex
        m = re.search(expect["pattern"], text)
        got = m.group(0) if m else None
        correct = m is not None
        format_ok = bool(text.strip())

    expected = case.expected
    critical = is_critical(case, suite, got)
    record = {
        "id": case.id,
        "category": case.category,
        "type": kind,
        "expected": expected,
        "got": got,
        "correct": bool(correct),
        "format_ok": bool(format_ok),
        "critical": critical,
        "output": text,
    }
    if calls:
        record["tool_calls"] = calls
    if error:
        record["parse_error"] = error
    return record


# ---------------------------------------------------------------- metrics

def summarize(records: list, suite: Suite, min_accuracy: float = DEFAULT_MIN_ACCURACY) -> dict:
    per_category = {}
    for cat in suite.categories:
        rs = [r for r in records if r["category"] == cat]
        c = sum(r["correct"] for r in rs)
        per_category[cat] = {"correct": c, "total": len(rs), "accuracy": c / len(rs) if rs else 0.0}
    total = len(records)
    correct = sum(r["correct"] for r in records)
    accuracy = correct / total if total else 0.0
    critical = [r["id"] for r in records if r["critical"]]
    reasons = []
    if critical:
        reasons.append(f"{len(critical)} critical error(s): {', '.join(critical)}")
    if accuracy < min_accuracy:
        reasons.append(f"accuracy {accuracy:.1%} below {min_accuracy:.0%}")
    return {
        "correct": correct,
        "total": total,
        "accuracy": accuracy,
        "per_category": per_category,
        "critical_errors": len(critical),
        "critical_cases": critical,
        "format_compliance": sum(r["format_ok"] for r in records) / total if total else 0.0,
        "min_accuracy": min_accuracy,
        "verdict": "fail" if reasons else "pass",
        "verdict_reasons": reasons,
    }


def log_path(model: Path, suite: Suite, logs_dir: str | Path = "logs") -> Path:
    return Path(logs_dir) / f"{Path(model).resolve().name}-{suite.name}.json"


# ---------------------------------------------------------------- running

def build_prompt(tokenizer, case: Case, suite: Suite):
    messages = case.messages or [{"role": "user", "content": case.prompt}]
    if suite.system and messages[0].get("role") != "system":
        messages = [{"role": "system", "content": suite.system}, *messages]
    if getattr(tokenizer, "has_chat_template", False):
        kwargs = {"add_generation_prompt": True}
        if case.tools:
            kwargs["tools"] = case.tools
        return list(tokenizer.apply_chat_template(messages, **kwargs))
    text = case.prompt if case.prompt is not None else "\n".join(
        str(m.get("content", "")) for m in messages
    )
    return tokenizer.encode(text)


def generate_one(model, tokenizer, prompt, max_tokens: int) -> tuple[str, int, float]:
    """Greedy generation; returns (text, generated tokens, seconds)."""
    from mlx_lm import stream_generate
    from mlx_lm.sample_utils import make_sampler

    sampler = make_sampler(temp=0.0)
    tic = time.perf_counter()
    text, tokens = "", 0
    for resp in stream_generate(model, tokenizer, prompt, max_tokens=max_tokens, sampler=sampler):
        text += resp.text
        tokens = resp.generation_tokens
    return text, tokens, time.perf_counter() - tic


def tool_format_of(tokenizer) -> dict:
    if getattr(tokenizer, "has_tool_calling", False) and tokenizer.tool_parser is not None:
        return {"start": tokenizer.tool_call_start, "end": tokenizer.tool_call_end,
                "parser": tokenizer.tool_parser}
    return {}


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

    def finish(i, text, ntok, secs):
        record = score_case(cases[i], suite_obj, text, tool_format)
        record.update({"gen_s": secs, "tokens": ntok})
        by_index[i] = record
        if on_record is not None:
            on_record(record)

    if batch and len(pending) > 1:
        # First query alone (its latency is a metric), the rest in one batch:
        # on the tiny demo models batch_generate gave identical greedy outputs.
        from mlx_lm import batch_generate

        if pending[0] == 0:
            finish(0, *generate_one(net, tokenizer, prompts[0], limits[0]))
            pending = pending[1:]
        tic = time.perf_counter()
        resp = batch_generate(net, tokenizer, [prompts[i] for i in pending],
                              max_tokens=[limits[i] for i in pending], return_token_ids=True)
        per = (time.perf_counter() - tic) / len(pending)
        for i, text, ids in zip(pending, resp.texts, resp.token_ids):
            finish(i, text, len(ids), per)
    else:
        it = progress_bar(pending, f"validate {label}", enabled=progress)
        for i in it:
            finish(i, *generate_one(net, tokenizer, prompts[i], limits[i]))
    records = []
    for i, case in enumerate(cases):
        if i not in by_index:
            old = done[case.id]
            by_index[i] = {**score_case(case, suite_obj, old["output"], tool_format),
                           "gen_s": old["gen_s"], "tokens": old["tokens"]}
        records.append(by_index[i])
    total_tokens = sum(r["tokens"] for r in records)
    total_time = sum(r["gen_s"] for r in records)
    return records, total_tokens, total_time


# ---------------------------------------------------------------- partial logs (resume)

def partial_path(log: str | Path) -> Path:
    """<log>.partial.jsonl beside the log (not *.json, so compare never reads it)."""
    log = Path(log)
    return log.with_name(f"{log.stem}.partial.jsonl")


def _suite_sha256(suite: str | Path) -> str:
    import hashlib

    return hashlib.sha256(Path(suite).read_bytes()).hexdigest()


def partial_header(model: Path, suite: str | Path, max_tokens: int | None, batch: bool) -> dict:
    """What the saved results depend on: the weights, the suite file, the generation settings and
    the libraries that generate (min_accuracy only judges them, so it is not here)."""
    from ..io.weights import fingerprint

    v = versions()
    return {"qtools_partial_log": 1, "model": model.resolve().name, "model_fingerprint": fingerprint(model),
            "suite_sha256": _suite_sha256(suite), "settings": {"max_tokens": max_tokens, "batch": batch},
            "versions": {"mlx": v.get("mlx"), "mlx-lm": v.get("mlx-lm")}}


def _differences(old: dict, new: dict) -> list:
    diffs = []
    if old.get("model_fingerprint") != new["model_fingerprint"]:
        diffs.append("another model")
    if old.get("suite_sha256") != new["suite_sha256"]:
        diffs.append("another suite")
    settings = [k for k in new["settings"] if (old.get("settings") or {}).get(k) != new["settings"][k]]
    if settings:
        diffs.append(f"other settings ({', '.join(settings)})")
    if old.get("versions") != new["versions"]:
        diffs.append("other mlx / mlx-lm versions")
    return diffs


def read_partial(path: Path) -> tuple[dict | None, list]:
    """(header, [{"record": ..., "peak_memory_gb": ...}]) of a partial log; a torn last line (a
    run killed while writing it) is dropped. (None, []) if the file is not a partial log."""
    try:
        lines = path.read_text().splitlines()
        header = json.loads(lines[0]) if lines else None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None, []
    if not isinstance(header, dict) or header.get("qtools_partial_log") != 1:
        return None, []
    entries = []
    for line in lines[1:]:
        try:
            entry = json.loads(line)
            rec = entry["record"]
            if not all(k in rec for k in ("id", "output", "gen_s", "tokens")):
                raise KeyError
        except (json.JSONDecodeError, KeyError, TypeError):
            break
        entries.append(entry)
    return header, entries


class PartialLog:
    """An append-only JSONL file: a header line, then one line per scored case."""

    def __init__(self, path: Path, header: dict, entries: list):
        self.path, self.count = path, len(entries)
        # Rewritten whole first (dropping a torn line, adopting the current header), then appended to.
        tmp = path.with_name(f".{path.name}.tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text("".join(json.dumps(x) + "\n" for x in [header, *entries]))
            tmp.replace(path)
            self._f = open(path, "a")
        except OSError as exc:
            tmp.unlink(missing_ok=True)
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
    old, entries = read_partial(partial)
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
        raise QtoolsError("--max-tokens must be at least 1")
    partial, entries, writer = None, [], None
    if log is not None:
        log = check_writable(log, file=True)  # before the model loads: a run must never be lost at the end
        partial = partial_path(log)
        header = partial_header(path, suite, max_tokens, batch)
        entries = _resume_entries(partial, header, resume, suite_obj, note)
        writer = PartialLog(partial, header, entries)
    from .memory import check_memory

    try:
        memory = check_memory(path)  # warns on stderr before a model near the device limit loads
        net, tokenizer, config, load_s = load_model(path)
        from . import backend

        backend.prepare_for_cpu(net, path)  # Linux: one line on what the CPU backend costs; float MoE experts in float32
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
