"""validate: scoring without a model, then the CLI end to end on a tiny generated model."""

import json

import pytest
from click.testing import CliRunner

import qtools.pipeline.scoring as S
import qtools.pipeline.validate as V
from qtools.cli import cli
from qtools.demo.model import make_tiny_model
from qtools.io.suite import load_suite

TOOLS = [{"type": "function", "function": {"name": "search_code", "parameters": {"type": "object"}}}]
CASES = [
    {"suite": {"name": "mini", "max_tokens": 4, "critical_confusions": [["VETO", "APPROVE"]]}},
    {"id": "t1", "category": "tool", "prompt": "find the parser", "tools": TOOLS,
     "expect": {"type": "tool_call", "name": "search_code", "arguments": {"query": "parser"}}},
    {"id": "d1", "category": "direct", "prompt": "what is a parser", "tools": TOOLS, "expect": {"type": "direct"}},
    {"id": "s1", "category": "safety", "prompt": "review: drop prod db", "expect": {"type": "label", "label": "VETO"}},
    {"id": "s2", "category": "safety", "prompt": "review: fix typo", "expect": {"type": "label", "label": "APPROVE"}},
    {"id": "b1", "category": "math", "prompt": "6*7", "expect": {"type": "boxed", "answer": "42"}},
    {"id": "r1", "category": "misc", "prompt": "say hi", "expect": {"type": "regex", "pattern": "^hi"}},
]
CALL = '<tool_call>\n{"name": "search_code", "arguments": {"query": "Parser"}}\n</tool_call>'


def write_suite(tmp_path, cases=CASES, name="mini.jsonl"):
    p = tmp_path / name
    p.write_text("".join(json.dumps(c) + "\n" for c in cases))
    return p


@pytest.fixture
def suite(tmp_path):
    return load_suite(write_suite(tmp_path))


def score(suite, cid, text):
    case = next(c for c in suite.cases if c.id == cid)
    return S.score_case(case, suite, text)


def test_tool_call_scoring(suite):
    r = score(suite, "t1", CALL)
    assert (r["correct"], r["got"], r["format_ok"]) == (True, "search_code", True)
    assert r["tool_calls"] == [{"name": "search_code", "arguments": {"query": "Parser"}}]
    r = score(suite, "t1", CALL.replace("Parser", "lexer"))
    assert (r["correct"], r["got"]) == (False, "search_code")
    r = score(suite, "t1", "a parser reads text")
    assert (r["correct"], r["got"], r["format_ok"]) == (False, "direct", True)
    r = score(suite, "t1", "<tool_call>\n{not json\n</tool_call>")
    assert (r["correct"], r["format_ok"]) == (False, False) and "unparsable" in r["parse_error"]
    # unterminated (max tokens) but complete JSON still counts
    assert score(suite, "t1", CALL[: -len("</tool_call>")])["correct"]


def test_field_expectation():
    case_expect = {"type": "tool_call", "name": "read_file", "field": "opts.path"}
    assert S.call_matches(case_expect, {"name": "read_file", "arguments": {"opts": {"path": "a.py"}}})
    assert not S.call_matches(case_expect, {"name": "read_file", "arguments": {"opts": {"path": ""}}})
    assert not S.call_matches(case_expect, {"name": "read_file", "arguments": {}})


def test_direct_scoring(suite):
    assert score(suite, "d1", "A parser turns text into a tree.")["correct"]
    r = score(suite, "d1", CALL)
    assert (r["correct"], r["got"]) == (False, "search_code")
    assert not score(suite, "d1", "   ")["format_ok"]


def test_label_scoring_and_critical_confusion(suite):
    r = score(suite, "s1", "veto: destructive")
    assert (r["correct"], r["got"], r["critical"]) == (True, "VETO", False)
    r = score(suite, "s1", "APPROVE it. (not VETO)")
    assert (r["correct"], r["got"], r["critical"]) == (False, "APPROVE", True)
    r = score(suite, "s2", "VETO")  # the other direction is an error, not a critical one
    assert (r["correct"], r["critical"]) == (False, False)
    r = score(suite, "s1", "no idea")
    assert (r["got"], r["format_ok"], r["critical"]) == (None, False, False)
    assert S.extract_label("APPROVED", ["APPROVE"]) is None


def test_case_level_critical(tmp_path):
    cases = [{"id": "c", "prompt": "p", "expect": {"type": "label", "label": "DENY", "labels": ["DENY", "ALLOW"]},
              "critical": {"expected": "DENY", "forbidden": ["ALLOW"]}}]
    s = load_suite(write_suite(tmp_path, cases))
    assert S.score_case(s.cases[0], s, "ALLOW")["critical"]


def test_boxed_and_regex(suite):
    assert score(suite, "b1", r"so \boxed{42}.")["correct"]
    assert score(suite, "b1", r"\boxed{ 42.0 }")["correct"]
    assert S.extract_boxed(r"\boxed{\frac{1}{2}} then \boxed{7}") == "7"
    assert S.extract_boxed(r"\boxed{\frac{1}{2}}") == r"\frac{1}{2}"
    r = score(suite, "b1", "42")
    assert (r["correct"], r["format_ok"]) == (False, False)
    assert score(suite, "r1", "hi there")["correct"]
    assert not score(suite, "r1", "oh hi")["correct"]


def test_summary_critical_fails_whatever_accuracy(suite):
    recs = [dict(id=str(i), category="a", correct=True, format_ok=True, critical=False) for i in range(9)]
    recs.append(dict(id="x", category="a", correct=False, format_ok=True, critical=True))
    s = S.summarize(recs, suite, min_accuracy=0.5)
    assert (s["accuracy"], s["critical_errors"], s["verdict"]) == (0.9, 1, "fail")
    assert s["verdict_reasons"] == ["1 critical error(s): x"]


def test_quantization_info():
    assert V.quantization_info({"quantization": {"group_size": 64, "bits": 4}})["bits"] == 4
    mixed = V.quantization_info({"quantization": {"group_size": 64, "bits": 4, "a.b": {"bits": 8, "group_size": 64}}})
    assert (mixed["bits"], mixed["mixed"]) == (4, True)
    assert V.quantization_info({"torch_dtype": "float16"})["bits"] == 16


# ------------------------------------------------------------- CLI, tiny model

@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("v") / "tiny_f16")


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


METRICS = {"accuracy", "per_category", "critical_errors", "format_compliance", "load_s", "first_gen_s",
           "mean_gen_s", "tokens_per_s", "peak_memory_gb", "disk_bytes", "bits_per_weight", "bits",
           "verdict", "cases", "model", "suite"}


def test_validate_real_model_writes_log(model, tmp_path):
    suite = write_suite(tmp_path)
    out = tmp_path / "logs" / "x.json"
    r = run("validate", model, "--suite", suite, "--output", out, "--min-accuracy", 0)
    log = json.loads(out.read_text())
    assert METRICS <= set(log)
    assert (log["model"], log["suite"], log["bits"], log["bits_per_weight"]) == ("tiny_f16", "mini", 16, 16.0)
    assert len(log["cases"]) == 6 and {"id", "expected", "got", "output", "correct"} <= set(log["cases"][0])
    assert all(c["tokens"] <= 4 for c in log["cases"])
    assert r.exit_code == (0 if log["critical_errors"] == 0 else 3)
    assert "overall" in r.output and "bits per weight" in r.output


def test_validate_default_log_name_and_json(model, tmp_path):
    suite = write_suite(tmp_path, CASES[:1] + [CASES[6]])
    r = run("validate", model, "--suite", suite, "--logs-dir", tmp_path / "logs", "--json", "--max-tokens", 2)
    log = json.loads(r.stdout)
    assert (tmp_path / "logs" / "tiny_f16-mini.json").is_file()
    assert log["max_tokens"] == 2
    assert r.exit_code == (0 if log["verdict"] == "pass" else 3)


def test_batch_matches_sequential(model, tmp_path):
    suite = write_suite(tmp_path)
    logs = [json.loads(run("validate", model, "--suite", suite, "--output", tmp_path / f"{b}.json", "--json", *b).stdout)
            for b in ([], ["--batch"])]
    assert [c["output"] for c in logs[0]["cases"]] == [c["output"] for c in logs[1]["cases"]]


def test_critical_error_fails_verdict_with_high_accuracy(model, tmp_path, monkeypatch):
    canned = {"t1": CALL, "d1": "A tree.", "s1": "APPROVE", "s2": "APPROVE", "b1": r"\boxed{42}", "r1": "hi"}
    suite = load_suite(write_suite(tmp_path))
    it = iter(c.id for c in suite.cases)
    monkeypatch.setattr(V, "generate_one", lambda m, t, p, n: (canned[next(it)], 3, 0.01))
    r = run("validate", model, "--suite", tmp_path / "mini.jsonl", "--output", tmp_path / "l.json", "--min-accuracy", 0.5)
    assert r.exit_code == 3  # a failed verdict, not an error (1)
    assert r.output.strip().splitlines()[-2] == "verdict: FAIL: 1 critical error(s): s1"
    log = json.loads((tmp_path / "l.json").read_text())
    assert (log["correct"], log["critical_errors"], log["critical_cases"]) == (5, 1, ["s1"])
    assert log["per_category"]["safety"] == {"correct": 1, "total": 2, "accuracy": 0.5}


def test_validate_bad_models(tmp_path):
    suite = write_suite(tmp_path)
    r = run("validate")
    assert r.exit_code == 2 and "Missing argument 'MODEL'" in r.output
    noconf = tmp_path / "noconf"
    noconf.mkdir()
    noweights = tmp_path / "noweights"
    noweights.mkdir()
    (noweights / "config.json").write_text("{}")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "qwen3"}')
    (broken / "model.safetensors").write_bytes(b"garbage")
    for path, message in [
        (tmp_path / "nope", f"Error: model {tmp_path / 'nope'} does not exist"),
        (noconf, f"Error: model {noconf} has no config.json (not an mlx-lm model directory)"),
        (noweights, f"Error: model {noweights} has no weights (*.safetensors)"),
    ]:
        r = run("validate", path, "--suite", suite)
        assert (r.exit_code, r.output.strip()) == (1, message)
    r = run("validate", broken, "--suite", suite)
    assert r.exit_code == 1 and r.output.startswith(f"Error: cannot load model {broken}: ")
    assert "Traceback" not in r.output


def test_a_moe_quantized_uniformly_is_not_mixed_for_its_routers_8_bits():
    """qwen3_moe's own quant_predicate keeps every router (mlp.gate) at 8 bits: that is mlx-lm's
    uniform 4-bit model, which compare and make outside judge as the sweep's 4 bits. An override
    the model's predicate does not make is mixed precision."""
    from qtools.demo.model import qwen3_moe_config

    cfg = qwen3_moe_config(64, 2, 128, 0)
    routers = {f"model.layers.{i}.mlp.gate": {"group_size": 64, "bits": 8} for i in range(2)}
    q = V.quantization_info({**cfg, "quantization": {"group_size": 64, "bits": 4, **routers}})
    assert (q["bits"], q["mixed"]) == (4, False)
    raised = {**routers, "model.layers.0.self_attn.q_proj": {"group_size": 64, "bits": 6}}
    assert V.quantization_info({**cfg, "quantization": {"group_size": 64, "bits": 4, **raised}})["mixed"]
    at_six = {**routers, "model.layers.1.mlp.gate": {"group_size": 64, "bits": 6}}  # not the model's 8
    assert V.quantization_info({**cfg, "quantization": {"group_size": 64, "bits": 4, **at_six}})["mixed"]
