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
from ..io.atomic import write_json_atomic
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
              progress: bool = False, label: str = "model") -> tuple[list, int, float]:
    """Generate greedily for every case of a loaded model and score the outputs.

    Returns (records, generated tokens, generation seconds).
    """
    tool_format = tool_format_of(tokenizer)
    records = []
    cases = suite_obj.cases
    limits = [max_tokens or c.max_tokens or suite_obj.max_tokens for c in cases]
    prompts = [build_prompt(tokenizer, c, suite_obj) for c in cases]
    outputs = []  # (text, tokens, seconds)
    if batch and len(cases) > 1:
        # First query alone (its latency is a metric), the rest in one batch:
        # on the tiny demo models batch_generate gave identical greedy outputs.
        from mlx_lm import batch_generate

        outputs.append(generate_one(net, tokenizer, prompts[0], limits[0]))
        tic = time.perf_counter()
        resp = batch_generate(net, tokenizer, prompts[1:], max_tokens=limits[1:], return_token_ids=True)
        per = (time.perf_counter() - tic) / (len(cases) - 1)
        outputs += [(t, len(ids), per) for t, ids in zip(resp.texts, resp.token_ids)]
    else:
        it = range(len(cases))
        if progress:
            from tqdm import tqdm

            it = tqdm(it, desc=f"validate {label}", file=sys.stderr, leave=False)
        outputs = [generate_one(net, tokenizer, prompts[i], limits[i]) for i in it]
    total_tokens, total_time = 0, 0.0
    for case, (text, ntok, secs) in zip(cases, outputs):
        record = score_case(case, suite_obj, text, tool_format)
        record.update({"gen_s": secs, "tokens": ntok})
        records.append(record)
        total_tokens += ntok
        total_time += secs
    return records, total_tokens, total_time


def validate(
    model: str | Path,
    suite: str | Path,
    max_tokens: int | None = None,
    min_accuracy: float = DEFAULT_MIN_ACCURACY,
    progress: bool = True,
    batch: bool = False,
) -> dict:
    """Load MODEL, run SUITE greedily, return the full result (see log format)."""
    import mlx.core as mx
    from mlx_lm.utils import compute_bits_per_weight

    path = check_model_dir(model)
    suite_obj = load_suite(suite)
    if max_tokens is not None and max_tokens < 1:
        raise QtoolsError("--max-tokens must be at least 1")
    from .memory import check_memory

    memory = check_memory(path)  # warns on stderr before a model near the device limit loads
    net, tokenizer, config, load_s = load_model(path)
    tool_format = tool_format_of(tokenizer)

    records, total_tokens, total_time = run_cases(net, tokenizer, suite_obj, max_tokens, batch,
                                                  progress, label=path.name)

    quant = quantization_info(config)
    disk = dir_size(path)
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
        "peak_memory_gb": mx.get_peak_memory() / 1e9,
        **{k: memory[k] for k in ("memory_estimate_gb", "memory_limit_gb", "memory_pressure")},
        "max_tokens": max_tokens or suite_obj.max_tokens,
        "generation": "greedy, " + ("mlx_lm.batch_generate (first query alone)" if batch else "mlx_lm.stream_generate, one case at a time"),
        "tool_parser": getattr(tool_format.get("parser"), "__module__", None) or "json (default)",
        **summarize(records, suite_obj, min_accuracy),
        "cases": records,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "versions": versions(),
    }
    del net
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
