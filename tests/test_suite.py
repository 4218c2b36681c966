import json

import pytest
from click.testing import CliRunner

from qtools import QtoolsError
from qtools.cli import cli
from qtools.io.suite import load_suite

GOOD = [
    {"suite": {"name": "mini", "max_tokens": 12, "critical_confusions": [["VETO", "APPROVE"]]}},
    {"id": "a1", "category": "tool", "prompt": "find foo", "tools": [{"type": "function", "function": {"name": "search_code"}}],
     "expect": {"type": "tool_call", "name": "search_code", "arguments": {"query": "foo"}}},
    {"id": "a2", "category": "direct", "messages": [{"role": "user", "content": "what is DI?"}], "expect": {"type": "direct"}},
    {"id": "a3", "category": "safety", "prompt": "rm -rf /", "expect": {"type": "label", "label": "VETO", "labels": ["VETO", "APPROVE"]},
     "critical": {"expected": "VETO", "forbidden": ["APPROVE"]}},
    {"id": "a4", "category": "math", "prompt": "6*7", "expect": {"type": "boxed", "answer": 42}},
    {"id": "a5", "category": "misc", "prompt": "say hi", "expect": {"type": "regex", "pattern": "h(i|ello)"}},
]


def write(tmp_path, lines, name="s.jsonl"):
    p = tmp_path / name
    p.write_text("\n".join(l if isinstance(l, str) else json.dumps(l) for l in lines) + "\n")
    return p


def test_good_suite_loads(tmp_path):
    suite = load_suite(write(tmp_path, GOOD))
    assert suite.name == "mini" and suite.max_tokens == 12
    assert [c.id for c in suite.cases] == ["a1", "a2", "a3", "a4", "a5"]
    assert suite.critical_confusions == [["VETO", "APPROVE"]]
    assert suite.cases[3].expect["answer"] == "42"
    assert suite.cases[2].expected == "VETO"
    assert suite.categories == ["tool", "direct", "safety", "math", "misc"]


def test_suite_name_defaults_to_file_stem(tmp_path):
    suite = load_suite(write(tmp_path, GOOD[1:], name="agent.jsonl"))
    assert suite.name == "agent"


@pytest.mark.parametrize("bad, message", [
    ("{not json", "invalid JSON"),
    ({"id": "x", "category": "c", "prompt": "p"}, "no expected behaviour"),
    ({"id": "x", "category": "c", "prompt": "p", "expect": {"type": "vibes"}}, "unknown expectation type 'vibes'"),
    ({"id": "x", "category": "c", "expect": {"type": "direct"}}, "neither 'prompt' nor 'messages'"),
    ({"category": "c", "prompt": "p", "expect": {"type": "direct"}}, "case lacks 'id'"),
    ({"id": "a1", "category": "c", "prompt": "p", "expect": {"type": "direct"}}, "duplicate id 'a1' (first on line 2)"),
    ({"id": "x", "prompt": "p", "expect": {"type": "regex", "pattern": "("}}, "pattern does not compile"),
    ({"id": "x", "prompt": "p", "expect": {"type": "label"}}, "lacks 'label'"),
    ({"id": "x", "prompt": "p", "expect": {"type": "boxed"}}, "lacks 'answer'"),
    ({"id": "x", "prompt": "p", "expect": {"type": "direct"}, "critical": {"forbidden": "APPROVE"}}, "'forbidden'"),
    ({"suite": {"name": "late"}}, "header must be the first line"),
])
def test_bad_line_names_file_and_line(tmp_path, bad, message):
    path = write(tmp_path, GOOD[:3] + [bad])
    with pytest.raises(QtoolsError) as info:
        load_suite(path)
    assert str(info.value).startswith(f"{path}:4: ")
    assert message in str(info.value)


def test_blank_lines_keep_line_numbers(tmp_path):
    path = write(tmp_path, [GOOD[1], "", "{oops"])
    with pytest.raises(QtoolsError, match=r":3: invalid JSON"):
        load_suite(path)


def test_missing_and_empty_suite(tmp_path):
    with pytest.raises(QtoolsError, match="does not exist"):
        load_suite(tmp_path / "nope.jsonl")
    with pytest.raises(QtoolsError, match="has no cases"):
        load_suite(write(tmp_path, [GOOD[0]]))


def test_bad_header(tmp_path):
    with pytest.raises(QtoolsError, match=":1: .*critical_confusions"):
        load_suite(write(tmp_path, [{"suite": {"critical_confusions": ["VETO"]}}, GOOD[1]]))


def test_cli_reports_bad_suite_line(tmp_path):
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").write_bytes(b"")
    path = write(tmp_path, [GOOD[1], {"id": "x", "prompt": "p"}])
    result = CliRunner().invoke(cli, ["validate", str(model), "--suite", str(path)])
    assert result.exit_code == 1
    assert result.output.strip().splitlines()[-1] == (
        f"Error: {path}:2: no expected behaviour: add \"expect\": {{\"type\": ...}} "
        "(one of tool_call, direct, label, regex, boxed)")


@pytest.mark.parametrize("name", ["coding_agent.jsonl"])
def test_shipped_suites_load(name):
    from pathlib import Path

    suite = load_suite(Path(__file__).resolve().parents[1] / "suites" / name)
    assert len(suite.cases) >= 5
