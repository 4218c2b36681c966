"""What a suite means, with no model: prompts, parsing an answer, scoring a case, the verdict.

validate, probe, retention and calibrate all read a suite through this module, so a
case is scored, and a model judged, the same way everywhere. `verdict` is the one
pass/fail rule: accuracy at least a minimum and no more critical errors than allowed.
"""

from __future__ import annotations

import json
import re
from typing import Any, Callable

from .. import QtoolsError
from ..io.suite import Case, Suite

DEFAULT_MIN_ACCURACY = 0.8
DEFAULT_MAX_CRITICAL = 0
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



# ---------------------------------------------------------------- the verdict

def pct(v: float) -> str:
    """80% or 66.7%: whole percents without decimals, so a near miss never reads 80% < 80%."""
    return f"{v:.0%}" if abs(v * 100 - round(v * 100)) < 1e-9 else f"{v:.1%}"


def verdict(accuracy: float, critical_errors: int, min_accuracy: float = DEFAULT_MIN_ACCURACY,
            max_critical: int = DEFAULT_MAX_CRITICAL, critical_cases: list | None = None) -> list:
    """Why a model fails: too many critical errors, accuracy below the minimum (empty: it passes).

    Critical confusions come first: they fail a model whatever its accuracy."""
    reasons = []
    if critical_errors > max_critical:
        reasons.append(f"{critical_errors} critical error(s)"
                       + (f": {', '.join(critical_cases)}" if critical_cases and not max_critical
                          else f" > {max_critical}"))
    if accuracy < min_accuracy:
        reasons.append(f"accuracy {pct(accuracy)} below {pct(min_accuracy)}")
    return reasons


def passes(accuracy: float, critical_errors: int, min_accuracy: float = DEFAULT_MIN_ACCURACY,
           max_critical: int = DEFAULT_MAX_CRITICAL) -> bool:
    return not verdict(accuracy, critical_errors, min_accuracy, max_critical)


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
    reasons = verdict(accuracy, len(critical), min_accuracy, critical_cases=critical)
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



# ---------------------------------------------------------------- prompts

def build_prompt(tokenizer, case: Case, suite: Suite):
    """The case's prompt tokens, through the model's chat template when it has one. A template
    that rejects the case (jinja2's TemplateError, raise_exception(), a type it cannot render) is
    one QtoolsError naming the case: the suite does not fit this model."""
    messages = case.messages or [{"role": "user", "content": case.prompt}]
    if suite.system and messages[0].get("role") != "system":
        messages = [{"role": "system", "content": suite.system}, *messages]
    try:
        if getattr(tokenizer, "has_chat_template", False):
            kwargs = {"add_generation_prompt": True}
            if case.tools:
                kwargs["tools"] = case.tools
            return list(tokenizer.apply_chat_template(messages, **kwargs))
        text = case.prompt if case.prompt is not None else "\n".join(
            str(m.get("content", "")) for m in messages
        )
        return list(tokenizer.encode(text))
    except Exception as exc:  # a template is a program: whatever it raises, the case does not fit the model
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise QtoolsError(f"{suite.path}:{case.line}: case {case.id}: the model's chat template rejects it "
                          f"({type(exc).__name__}: {detail}): the suite does not fit this model") from None



def tool_format_of(tokenizer) -> dict:
    if getattr(tokenizer, "has_tool_calling", False) and tokenizer.tool_parser is not None:
        return {"start": tokenizer.tool_call_start, "end": tokenizer.tool_call_end,
                "parser": tokenizer.tool_parser}
    return {}

