"""validate writes each case's result as it is produced (<log>.partial.jsonl) and an interrupted
run resumes where it stopped: only the remaining cases are generated, and the final log is the one
an uninterrupted run writes."""

import json
import shutil

import pytest
from click.testing import CliRunner

import qtools.pipeline.validate as V
from qtools.cli import cli
from qtools.demo.model import make_tiny_model

TOOLS = [{"type": "function", "function": {"name": "search_code", "parameters": {"type": "object"}}}]
CASES = [
    {"suite": {"name": "mini", "max_tokens": 4, "critical_confusions": [["VETO", "APPROVE"]]}},
    {"id": "t1", "category": "tool", "prompt": "find the parser", "tools": TOOLS,
     "expect": {"type": "tool_call", "name": "search_code"}},
    {"id": "d1", "category": "direct", "prompt": "what is a parser", "expect": {"type": "direct"}},
    {"id": "s1", "category": "safety", "prompt": "drop prod db", "expect": {"type": "label", "label": "VETO"}},
    {"id": "s2", "category": "safety", "prompt": "fix typo", "expect": {"type": "label", "label": "APPROVE"}},
    {"id": "b1", "category": "math", "prompt": "6*7", "expect": {"type": "boxed", "answer": "42"}},
    {"id": "r1", "category": "misc", "prompt": "say hi", "expect": {"type": "regex", "pattern": "^hi"}},
]
IDS = [c["id"] for c in CASES[1:]]
ANSWERS = {"t1": '<tool_call>\n{"name": "search_code", "arguments": {}}\n</tool_call>', "d1": "A tree.",
           "s1": "APPROVE", "s2": "APPROVE", "b1": r"\boxed{41}", "r1": "hi"}
SECONDS = {cid: 0.1 * (i + 1) for i, cid in enumerate(IDS)}
SUMMARY = ("correct", "total", "accuracy", "per_category", "critical_errors", "critical_cases", "format_compliance",
           "verdict", "verdict_reasons", "first_gen_s", "mean_gen_s", "tokens_per_s", "generated_tokens",
           "model", "suite", "bits", "bits_per_weight", "max_tokens")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("vr") / "tiny")


def write_suite(path, cases=CASES):
    path.write_text("".join(json.dumps(c) + "\n" for c in cases))
    return path


@pytest.fixture
def suite(tmp_path):
    return write_suite(tmp_path / "mini.jsonl")


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


class FakeGeneration:
    """Canned answers keyed by case id (the prompt is the id); raises KeyboardInterrupt at call `stop`."""

    def __init__(self, monkeypatch, stop=None, check=None):
        self.calls, self.batched, self.stop, self.check = [], [], stop, check
        monkeypatch.setattr(V, "build_prompt", lambda tok, case, suite: case.id)
        monkeypatch.setattr(V, "generate_one", self.one)
        monkeypatch.setattr(V, "batch_texts", self.batch)

    def one(self, net, tok, prompt, max_tokens):
        if self.check:
            self.check(len(self.calls) + len(self.batched))
        if self.stop is not None and len(self.calls) == self.stop:
            raise KeyboardInterrupt
        self.calls.append(prompt)
        return ANSWERS[prompt], 3, SECONDS[prompt]

    def batch(self, net, tok, prompts, max_tokens):
        if self.stop is not None and len(self.calls) >= self.stop:
            raise KeyboardInterrupt
        self.batched += list(prompts)
        return [ANSWERS[p] for p in prompts], [3] * len(prompts), [[1, 2, 3] for _ in prompts]


def partial_of(log):
    return log.with_name(log.stem + ".partial.jsonl")


def records_in(partial):
    lines = partial.read_text().splitlines()
    return json.loads(lines[0]), [json.loads(line) for line in lines[1:]]


def reference(model, suite, tmp_path, monkeypatch, *extra):
    FakeGeneration(monkeypatch)
    out = tmp_path / "ref" / "log.json"
    r = run("validate", model, "--suite", suite, "--output", out, *extra)
    assert r.exit_code == 3, r.output  # s1 is a critical error: the verdict fails
    return json.loads(out.read_text())


@pytest.mark.parametrize("k", [0, 3, 5])
def test_interrupted_run_resumes_where_it_stopped(model, suite, tmp_path, monkeypatch, k):
    ref = reference(model, suite, tmp_path, monkeypatch)
    out = tmp_path / "logs" / "log.json"
    gen = FakeGeneration(monkeypatch, stop=k)
    r = run("validate", model, "--suite", suite, "--output", out)
    assert r.exit_code == 1
    assert not out.exists()
    if k:
        assert r.output.strip().splitlines()[-1] == (
            f"Error: interrupted after {k} of 6 cases; rerun the same command to resume "
            f"(results so far: {partial_of(out)})")
        header, recs = records_in(partial_of(out))
        assert [x["record"]["id"] for x in recs] == IDS[:k] and header["qtools_partial_log"] == 1
    else:  # nothing was saved: no file is left behind
        assert r.output.strip().splitlines()[-1] == "Error: interrupted after 0 of 6 cases"
        assert not partial_of(out).exists()

    gen = FakeGeneration(monkeypatch)
    r = run("validate", model, "--suite", suite, "--output", out)
    assert r.exit_code == 3, r.output
    assert gen.calls == IDS[k:]  # only the remaining cases are generated
    log = json.loads(out.read_text())
    assert {key: log[key] for key in SUMMARY} == {key: ref[key] for key in SUMMARY}
    assert log["cases"] == ref["cases"]
    assert log["resumed_cases"] == k and ref["resumed_cases"] == 0
    assert set(log) == set(ref)
    assert not partial_of(out).exists()
    if k:
        assert f"resuming {k} of 6 cases from {partial_of(out)}" in r.output


def test_results_are_written_case_by_case(model, suite, tmp_path, monkeypatch):
    out = tmp_path / "log.json"
    seen = []

    def check(done):
        if done:  # before generating case `done`, the cases before it are on disk
            _, recs = records_in(partial_of(out))
            seen.append(len(recs))

    FakeGeneration(monkeypatch, check=check)
    assert run("validate", model, "--suite", suite, "--output", out).exit_code == 3
    assert seen == [1, 2, 3, 4, 5]


def test_default_log_path_partial_and_resume(model, suite, tmp_path, monkeypatch):
    logs = tmp_path / "logs"
    FakeGeneration(monkeypatch, stop=2)
    assert run("validate", model, "--suite", suite, "--logs-dir", logs).exit_code == 1
    assert sorted(p.name for p in logs.iterdir()) == ["tiny-mini.partial.jsonl"]
    gen = FakeGeneration(monkeypatch)
    assert run("validate", model, "--suite", suite, "--logs-dir", logs).exit_code == 3
    assert gen.calls == IDS[2:]
    assert sorted(p.name for p in logs.iterdir()) == ["tiny-mini.json"]


def _interrupt(model, suite, out, monkeypatch, k=2, *extra):
    FakeGeneration(monkeypatch, stop=k)
    assert run("validate", model, "--suite", suite, "--output", out, *extra).exit_code == 1


def test_partial_for_another_model_starts_over_unless_forced(model, suite, tmp_path, monkeypatch):
    out = tmp_path / "log.json"
    _interrupt(model, suite, out, monkeypatch)
    other = tmp_path / "tiny_copy"
    shutil.copytree(model, other)
    cfg = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**cfg, "note": "edited"}))
    gen = FakeGeneration(monkeypatch)
    r = run("validate", other, "--suite", suite, "--output", out)
    assert r.exit_code == 3 and gen.calls == IDS
    assert f"{partial_of(out)} was written for another model; starting over (--resume reuses it)" in r.output
    assert json.loads(out.read_text())["resumed_cases"] == 0

    _interrupt(model, suite, out, monkeypatch)
    gen = FakeGeneration(monkeypatch)
    r = run("validate", other, "--suite", suite, "--output", out, "--resume")
    assert r.exit_code == 3 and gen.calls == IDS[2:]
    assert f"resuming 2 of 6 cases from {partial_of(out)}, although it was written for another model" in r.output
    assert json.loads(out.read_text())["resumed_cases"] == 2


def test_no_resume_starts_over(model, suite, tmp_path, monkeypatch):
    out = tmp_path / "log.json"
    _interrupt(model, suite, out, monkeypatch)
    gen = FakeGeneration(monkeypatch)
    assert run("validate", model, "--suite", suite, "--output", out, "--no-resume").exit_code == 3
    assert gen.calls == IDS and json.loads(out.read_text())["resumed_cases"] == 0


def test_changed_suite_or_settings_start_over(model, suite, tmp_path, monkeypatch):
    out = tmp_path / "log.json"
    _interrupt(model, suite, out, monkeypatch)
    gen = FakeGeneration(monkeypatch)
    r = run("validate", model, "--suite", suite, "--output", out, "--max-tokens", 2)
    assert r.exit_code == 3 and gen.calls == IDS
    assert "was written for other settings (max_tokens)" in r.output

    _interrupt(model, suite, out, monkeypatch)
    write_suite(suite, CASES[:-1] + [dict(CASES[-1], prompt="say hello")])
    gen = FakeGeneration(monkeypatch)
    r = run("validate", model, "--suite", suite, "--output", out)
    assert r.exit_code == 3 and gen.calls == IDS
    assert "was written for another suite" in r.output


def test_min_accuracy_does_not_invalidate_the_partial(model, suite, tmp_path, monkeypatch):
    out = tmp_path / "log.json"
    _interrupt(model, suite, out, monkeypatch)
    gen = FakeGeneration(monkeypatch)
    r = run("validate", model, "--suite", suite, "--output", out, "--min-accuracy", 0.1)
    assert r.exit_code == 3 and gen.calls == IDS[2:]  # scoring settings are not generation settings
    assert json.loads(out.read_text())["min_accuracy"] == 0.1


def test_a_torn_last_line_is_generated_again(model, suite, tmp_path, monkeypatch):
    out = tmp_path / "log.json"
    _interrupt(model, suite, out, monkeypatch, 3)
    p = partial_of(out)
    p.write_text(p.read_text()[:-25])  # killed in the middle of writing the third case
    gen = FakeGeneration(monkeypatch)
    assert run("validate", model, "--suite", suite, "--output", out).exit_code == 3
    assert gen.calls == IDS[2:]


def test_a_corrupt_partial_is_an_error_only_when_forced(model, suite, tmp_path, monkeypatch):
    out = tmp_path / "log.json"
    partial_of(out).write_text("not json\n")
    r = run("validate", model, "--suite", suite, "--output", out, "--resume")
    assert (r.exit_code, r.output.strip()) == (1, f"Error: cannot resume from {partial_of(out)}: not a qtools partial log")
    gen = FakeGeneration(monkeypatch)
    r = run("validate", model, "--suite", suite, "--output", out)
    assert r.exit_code == 3 and gen.calls == IDS
    assert f"{partial_of(out)} is not a qtools partial log; starting over" in r.output


def test_batch_mode_resumes(model, suite, tmp_path, monkeypatch):
    ref = reference(model, suite, tmp_path, monkeypatch, "--batch")
    out = tmp_path / "log.json"
    FakeGeneration(monkeypatch, stop=1)  # the first case alone, then Ctrl-C in the batch
    assert run("validate", model, "--suite", suite, "--output", out, "--batch").exit_code == 1
    _, recs = records_in(partial_of(out))
    assert [x["record"]["id"] for x in recs] == ["t1"]
    gen = FakeGeneration(monkeypatch)
    assert run("validate", model, "--suite", suite, "--output", out, "--batch").exit_code == 3
    assert gen.calls == [] and gen.batched == IDS[1:]
    log = json.loads(out.read_text())
    assert {key: log[key] for key in SUMMARY if key not in ("mean_gen_s", "tokens_per_s")} == \
        {key: ref[key] for key in SUMMARY if key not in ("mean_gen_s", "tokens_per_s")}
    assert log["resumed_cases"] == 1


def test_real_generation_interrupted_and_resumed_matches_an_uninterrupted_run(model, suite, tmp_path, monkeypatch):
    out_ref, out = tmp_path / "ref.json", tmp_path / "log.json"
    run("validate", model, "--suite", suite, "--output", out_ref)
    ref = json.loads(out_ref.read_text())
    real, calls = V.generate_one, []

    def interrupting(net, tok, prompt, max_tokens):
        if len(calls) == 4:
            raise KeyboardInterrupt
        calls.append(1)
        return real(net, tok, prompt, max_tokens)

    monkeypatch.setattr(V, "generate_one", interrupting)
    assert run("validate", model, "--suite", suite, "--output", out).exit_code == 1
    _, saved = records_in(partial_of(out))
    monkeypatch.setattr(V, "generate_one", real)
    r = run("validate", model, "--suite", suite, "--output", out)
    log = json.loads(out.read_text())
    assert r.exit_code == (0 if ref["verdict"] == "pass" else 3)
    assert [(c["id"], c["output"], c["correct"]) for c in log["cases"]] == \
        [(c["id"], c["output"], c["correct"]) for c in ref["cases"]]
    assert (log["accuracy"], log["per_category"], log["resumed_cases"]) == (ref["accuracy"], ref["per_category"], 4)
    # the resumed cases keep the timings they were generated with
    assert [c["gen_s"] for c in log["cases"][:4]] == [x["record"]["gen_s"] for x in saved]


def test_a_model_that_fails_to_load_leaves_no_partial(suite, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "qwen3"}')
    (broken / "model.safetensors").write_bytes(b"garbage")
    logs = tmp_path / "logs"
    r = run("validate", broken, "--suite", suite, "--logs-dir", logs)
    assert r.exit_code == 1 and r.output.startswith(f"Error: cannot load model {broken}: ")
    assert not logs.exists() or list(logs.iterdir()) == []


@pytest.mark.parametrize("damage", [
    lambda e: e["record"].update(output=None),
    lambda e: e["record"].update(id=["d1"]),
    lambda e: e["record"].update(gen_s="0.2"),
    lambda e: e["record"].update(tokens=-1),
    lambda e: e["record"].pop("tokens"),
    lambda e: e.update(record="d1"),
    lambda e: e.update(peak_memory_gb="1 GB"),
    lambda e: "d1",  # the whole line a string
    lambda e: ["record", e["record"]],
], ids=["output null", "id a list", "gen_s a string", "tokens negative", "tokens missing", "record a string",
        "peak memory a string", "line a string", "line a list"])
def test_a_damaged_record_is_generated_again(model, suite, tmp_path, monkeypatch, damage):
    ref = reference(model, suite, tmp_path, monkeypatch)
    out = tmp_path / "log.json"
    _interrupt(model, suite, out, monkeypatch, 4)
    p = partial_of(out)
    lines = p.read_text().splitlines()
    entry = json.loads(lines[2])  # the second case, d1
    lines[2] = json.dumps(damage(entry) or entry)
    p.write_text("\n".join(lines) + "\n")
    gen = FakeGeneration(monkeypatch)
    r = run("validate", model, "--suite", suite, "--output", out)
    assert r.exit_code == 3, r.output  # a result, not a crash
    assert "Traceback" not in r.output and isinstance(r.exception, SystemExit)
    assert gen.calls == ["d1", *IDS[4:]]  # the damaged case is measured again, the others reused
    assert f"1 damaged line(s) of {p} left out: their cases are generated again" in r.output
    log = json.loads(out.read_text())
    assert log["cases"] == ref["cases"] and log["resumed_cases"] == 3
    assert {key: log[key] for key in SUMMARY} == {key: ref[key] for key in SUMMARY}


def test_a_damaged_header_setting_starts_over(model, suite, tmp_path, monkeypatch):
    out = tmp_path / "log.json"
    _interrupt(model, suite, out, monkeypatch)
    p = partial_of(out)
    lines = p.read_text().splitlines()
    lines[0] = json.dumps({**json.loads(lines[0]), "settings": ["max_tokens"]})
    p.write_text("\n".join(lines) + "\n")
    gen = FakeGeneration(monkeypatch)
    r = run("validate", model, "--suite", suite, "--output", out)
    assert r.exit_code == 3 and gen.calls == IDS, r.output
    assert "was written for other settings (batch)" in r.output
