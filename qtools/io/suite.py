"""Validation suites: JSONL, one case a line, checked line by line.

A case: {"id", "category", "prompt" | "messages", "tools"?, "expect", "critical"?,
"max_tokens"?}. `expect.type` is one of tool_call, direct, label, regex, boxed.
An optional first line {"suite": {"name", "max_tokens", "critical_confusions",
"labels", "system"}} sets suite-wide options. Every bad line is a QtoolsError that
names the file and the line number.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import QtoolsError
from .chat import messages_problem, tools_problem

EXPECT_TYPES = ("tool_call", "direct", "label", "regex", "boxed")
DEFAULT_MAX_TOKENS = 64
HEADER_KEYS = {"name", "max_tokens", "critical_confusions", "labels", "system", "description"}


@dataclass
class Case:
    id: str
    category: str
    expect: dict
    line: int
    prompt: str | None = None
    messages: list | None = None
    tools: list | None = None
    critical: dict | None = None
    max_tokens: int | None = None

    @property
    def expected(self) -> str:
        """The expected behaviour as one short string (for tables and confusions)."""
        return expected_label(self.expect)


@dataclass
class Suite:
    name: str
    path: str
    cases: list = field(default_factory=list)
    max_tokens: int = DEFAULT_MAX_TOKENS
    critical_confusions: list = field(default_factory=list)
    labels: list = field(default_factory=list)
    system: str | None = None

    @property
    def categories(self) -> list:
        seen = []
        for case in self.cases:
            if case.category not in seen:
                seen.append(case.category)
        return seen


def expected_label(expect: dict) -> str:
    kind = expect["type"]
    if kind == "tool_call":
        return expect.get("name") or "tool_call"
    if kind == "direct":
        return "direct"
    if kind == "label":
        return expect["label"]
    if kind == "boxed":
        return str(expect["answer"])
    return f"/{expect['pattern']}/"


class _LineError(Exception):
    pass


def _check_str(obj: dict, key: str, what: str, required: bool = True):
    value = obj.get(key)
    if value is None:
        if required:
            raise _LineError(f"{what} lacks {key!r}")
        return None
    if not isinstance(value, str) or not value:
        raise _LineError(f"{what} {key!r} must be a non-empty string")
    return value


def _parse_expect(expect: Any) -> dict:
    if expect is None:
        raise _LineError(
            "no expected behaviour: add \"expect\": {\"type\": ...} "
            f"(one of {', '.join(EXPECT_TYPES)})"
        )
    if not isinstance(expect, dict):
        raise _LineError("\"expect\" must be an object with a \"type\"")
    kind = expect.get("type")
    if kind not in EXPECT_TYPES:
        raise _LineError(
            f"unknown expectation type {kind!r}: use one of {', '.join(EXPECT_TYPES)}"
        )
    what = f"expect ({kind})"
    if kind == "tool_call":
        _check_str(expect, "name", what, required=False)
        args = expect.get("arguments")
        if args is not None and not isinstance(args, dict):
            raise _LineError("expect (tool_call) 'arguments' must be an object")
        _check_str(expect, "field", what, required=False)
    elif kind == "label":
        _check_str(expect, "label", what)
        labels = expect.get("labels")
        if labels is not None:
            if not isinstance(labels, list) or not all(isinstance(x, str) and x for x in labels):
                raise _LineError("expect (label) 'labels' must be a list of strings")
            if expect["label"] not in labels:
                raise _LineError(f"expect (label) {expect['label']!r} is not in its 'labels'")
    elif kind == "regex":
        pattern = _check_str(expect, "pattern", what)
        try:
            re.compile(pattern)
        except re.error as exc:
            raise _LineError(f"expect (regex) pattern does not compile: {exc}") from None
    elif kind == "boxed":
        answer = expect.get("answer")
        if answer is None or isinstance(answer, (dict, list, bool)):
            raise _LineError("expect (boxed) lacks 'answer' (a string or number)")
        expect = {**expect, "answer": str(answer)}
    return expect


def _parse_messages(messages: Any) -> list:
    problem = messages_problem(messages)
    if problem:
        raise _LineError(problem)
    return messages


def _parse_case(obj: Any, line: int) -> Case:
    if not isinstance(obj, dict):
        raise _LineError("a case must be a JSON object")
    case_id = obj.get("id")
    if case_id is None or isinstance(case_id, (dict, list, bool)) or str(case_id) == "":
        raise _LineError("case lacks 'id'")
    category = obj.get("category", "default")
    if not isinstance(category, str) or not category:
        raise _LineError("'category' must be a non-empty string")
    prompt, messages = obj.get("prompt"), obj.get("messages")
    if prompt is None and messages is None:
        raise _LineError("case has neither 'prompt' nor 'messages'")
    if prompt is not None and messages is not None:
        raise _LineError("case has both 'prompt' and 'messages': give one")
    if prompt is not None and (not isinstance(prompt, str) or not prompt):
        raise _LineError("'prompt' must be a non-empty string")
    if messages is not None:
        messages = _parse_messages(messages)
    tools = obj.get("tools")
    if tools is not None and tools_problem(tools):
        raise _LineError(tools_problem(tools))
    expect = _parse_expect(obj.get("expect"))
    critical = obj.get("critical")
    if critical is not None:
        if not isinstance(critical, dict):
            raise _LineError("'critical' must be an object {\"expected\", \"forbidden\"}")
        forbidden = critical.get("forbidden")
        if not isinstance(forbidden, list) or not forbidden or not all(isinstance(x, str) for x in forbidden):
            raise _LineError("'critical' needs 'forbidden': a non-empty list of strings")
        critical = {"expected": critical.get("expected", expected_label(expect)), "forbidden": forbidden}
    max_tokens = obj.get("max_tokens")
    if max_tokens is not None and (not isinstance(max_tokens, int) or max_tokens < 1):
        raise _LineError("'max_tokens' must be a positive integer")
    return Case(
        id=str(case_id), category=category, expect=expect, line=line, prompt=prompt,
        messages=messages, tools=tools, critical=critical, max_tokens=max_tokens,
    )


def _apply_header(suite: Suite, header: Any) -> None:
    if not isinstance(header, dict):
        raise _LineError("\"suite\" header must be an object")
    unknown = set(header) - HEADER_KEYS
    if unknown:
        raise _LineError(f"unknown suite header key(s): {', '.join(sorted(unknown))}")
    if "name" in header:
        suite.name = _check_str(header, "name", "suite header")
    if "max_tokens" in header:
        mt = header["max_tokens"]
        if not isinstance(mt, int) or isinstance(mt, bool) or mt < 1:
            raise _LineError("suite header 'max_tokens' must be a positive integer")
        suite.max_tokens = mt
    pairs = header.get("critical_confusions", [])
    if not isinstance(pairs, list) or not all(
        isinstance(p, list) and len(p) == 2 and all(isinstance(x, str) for x in p) for p in pairs
    ):
        raise _LineError("'critical_confusions' must be a list of [expected, forbidden] pairs")
    suite.critical_confusions = [list(p) for p in pairs]
    labels = header.get("labels", [])
    if not isinstance(labels, list) or not all(isinstance(x, str) and x for x in labels):
        raise _LineError("suite header 'labels' must be a list of strings")
    suite.labels = labels
    if "system" in header:
        suite.system = _check_str(header, "system", "suite header")


def load_suite(path: str | Path) -> Suite:
    """Read and check a suite file; raise QtoolsError naming the bad line."""
    path = Path(path)
    if not os.path.isfile(path):  # os.path: a name too long for the file system does not exist either
        raise QtoolsError(f"suite {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise QtoolsError(f"cannot read suite {path}: {exc}") from None
    suite = Suite(name=path.stem, path=str(path))
    seen_ids: dict = {}
    first = True
    for lineno, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            try:
                obj = json.loads(raw)
            except json.JSONDecodeError as exc:
                raise _LineError(f"invalid JSON ({exc.msg} at column {exc.colno})") from None
            if isinstance(obj, dict) and "suite" in obj:
                if not first:
                    raise _LineError("the \"suite\" header must be the first line")
                _apply_header(suite, obj["suite"])
            else:
                case = _parse_case(obj, lineno)
                if case.id in seen_ids:
                    raise _LineError(f"duplicate id {case.id!r} (first on line {seen_ids[case.id]})")
                seen_ids[case.id] = lineno
                suite.cases.append(case)
        except _LineError as exc:
            raise QtoolsError(f"{path}:{lineno}: {exc}") from None
        first = False
    if not suite.cases:
        raise QtoolsError(f"{path}: the suite has no cases")
    return suite
