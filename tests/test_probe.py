"""probe: decision tokens, margins and predicted verdicts per bit-width from one teacher-forced pass; bad input."""

import json

import numpy as np
import pytest
from click.testing import CliRunner

import qtools.pipeline.probe as P
from qtools import QtoolsError
from qtools.cli import cli
from qtools.demo.model import make_tiny_model
from qtools.io.modeldir import load_model
from qtools.io.suite import load_suite
from qtools.io.weights import MappedTensors
from qtools.pipeline import runner
from qtools.pipeline.stream import StreamedModel
from qtools.survival.rule import smallest_surviving

TOOLS = [{"type": "function", "function": {"name": "search_code", "parameters": {"type": "object"}}}]
LABELS = ["VETO", "APPROVE"]
HEADER = {"suite": {"name": "mini", "max_tokens": 8, "critical_confusions": [["VETO", "APPROVE"]]}}
CASES = [
    HEADER,
    {"id": "t1", "category": "tool", "messages": [{"role": "user", "content": "find the parser"}], "tools": TOOLS,
     "expect": {"type": "tool_call", "name": "search_code"}},
    {"id": "d1", "category": "direct", "messages": [{"role": "user", "content": "what is a parser"}],
     "tools": TOOLS, "expect": {"type": "direct"}},
    {"id": "l1", "category": "safety", "messages": [{"role": "user", "content": "review: drop the prod db"}],
     "expect": {"type": "label", "label": "VETO", "labels": LABELS}},
    {"id": "l2", "category": "safety", "messages": [{"role": "user", "content": "review: reset the logs"}],
     "expect": {"type": "label", "label": "APPROVE", "labels": LABELS}},
    {"id": "r1", "category": "math", "prompt": "2+2", "expect": {"type": "regex", "pattern": "4"}},
]


def write_suite(path, cases):
    path.write_text("".join(json.dumps(c) + "\n" for c in cases))
    return path


def run(*args):
    return CliRunner().invoke(cli, ["probe", *map(str, args)])


@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    d = tmp_path_factory.mktemp("probe")
    model = make_tiny_model(d / "tiny")
    r = CliRunner().invoke(cli, ["quantize", str(model), "--bits", "4", "--output", str(d / "q4")])
    assert r.exit_code == 0, r.output
    return d, model, write_suite(d / "mini.jsonl", CASES)


@pytest.fixture(scope="module")
def tok(fam):
    _d, model, _s = fam
    return load_model(model)[1]


# ---------------------------------------------------------------- the decision token, on crafted logits

def _rows(answer, vocab, boost=None):
    """Log-prob rows whose top token is the answer's token at each position (or `boost`'s choice)."""
    rows = np.full((len(answer), vocab), -20.0, dtype=np.float32)
    for i, t in enumerate(answer):
        rows[i, t] = -0.1
    for (i, t), v in (boost or {}).items():
        rows[i, t] = v
    return rows


def _read(case, suite, spec, rows, answer, fit):
    return P.read_decision(case, suite, spec, rows, rows.argmax(-1), answer, fit)


def test_tool_decision_reads_the_marker_and_keeps_the_whole_call(fam, tok):
    _d, model, suite_path = fam
    suite = load_suite(suite_path)
    case = suite.cases[0]
    fit = P.check_fit(tok, suite, suite.cases[:4], model)
    answer = P._encode(tok, '<tool_call>\n{"name": "search_code", "arguments": {"query": "parser"}}\n</tool_call>')
    answer.append(fit["eos"][0])
    vocab = len(tok.vocab) if hasattr(tok, "vocab") else 1024
    vocab = max(vocab, max(answer) + 1)
    rows = _rows(answer, vocab)
    spec = P.decision_spec(case, suite, tok, answer, rows, fit, model)
    assert spec["pos"] == 0 and answer[0] == fit["tool"] and spec["float_call"] == "search_code"
    assert spec["span"] == list(range(len(answer) - 1))  # marker to end marker, not the EOS after it
    rec = _read(case, suite, spec, rows, answer, fit)
    assert rec["correct"] and rec["got"] == "search_code" and rec["margin"] > 0

    # A different top token inside the arguments: the call may no longer parse, so it is not counted.
    i = len(answer) - 5
    rec = _read(case, suite, spec, _rows(answer, vocab, {(i, (answer[i] + 1) % vocab): 0.0}), answer, fit)
    assert not rec["correct"] and not rec["format_ok"] and rec["got"] == "search_code"
    assert rec["decided"]  # the decision itself held: a broken format is no decision flip
    # After the call ends, another top token changes nothing.
    rec = _read(case, suite, spec, _rows(answer, vocab, {(len(answer) - 1, 7): 0.0}), answer, fit)
    assert rec["correct"]
    # A direct token above the marker: the decision flipped.
    flipped = _rows(answer, vocab, {(0, 5): 0.0})
    rec = _read(case, suite, spec, flipped, answer, fit)
    assert rec["got"] == "direct" and not rec["correct"] and rec["margin"] < 0 and not rec["decided"]


def test_direct_decision_is_where_a_call_came_nearest(fam, tok):
    _d, model, suite_path = fam
    suite = load_suite(suite_path)
    case = suite.cases[1]
    fit = P.check_fit(tok, suite, suite.cases[:4], model)
    answer = P._encode(tok, "a parser reads text") + [fit["eos"][0]]
    rows = _rows(answer, 1024, {(2, fit["tool"]): -1.0})
    spec = P.decision_spec(case, suite, tok, answer, rows, fit, model)
    assert spec["pos"] == 2
    assert _read(case, suite, spec, rows, answer, fit)["correct"]
    rec = _read(case, suite, spec, _rows(answer, 1024, {(2, fit["tool"]): 0.0}), answer, fit)
    assert rec["got"] == "search_code" and not rec["correct"] and rec["margin"] < 0
    # An empty answer (end-of-sequence first) is no direct answer.
    rec = _read(case, suite, spec, _rows(answer, 1024, {(0, fit["eos"][0]): 0.0}), answer, fit)
    assert not rec["correct"] and not rec["format_ok"]


def test_label_decision_and_its_critical_confusion(fam, tok):
    _d, model, suite_path = fam
    suite = load_suite(suite_path)
    case = suite.cases[2]  # expects VETO
    fit = P.check_fit(tok, suite, suite.cases[:4], model)
    answer = P._encode(tok, "decision: VETO") + [fit["eos"][0]]
    rows = _rows(answer, 1024)
    spec = P.decision_spec(case, suite, tok, answer, rows, fit, model)
    assert answer[spec["pos"]] == spec["ids"]["VETO"] and spec["pos"] > 0
    rec = _read(case, suite, spec, rows, answer, fit)
    assert rec["correct"] and not rec["critical"] and rec["margin"] > 0
    rec = _read(case, suite, spec, _rows(answer, 1024, {(spec["pos"], spec["ids"]["APPROVE"]): 0.0}), answer, fit)
    assert rec["got"] == "APPROVE" and rec["critical"] and not rec["correct"] and rec["margin"] < 0


# ---------------------------------------------------------------- the command on a tiny model

def test_probe_json_per_bit_width_and_threshold(fam):
    d, model, suite = fam
    r = run(model, "--suite", suite, "--bits", 2, 8, "--json", "--output", d / "out" / "p.json")
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    assert json.loads((d / "out" / "p.json").read_text())["by_bits"] == rep["by_bits"]
    assert rep["bits"] == [2, 8] and set(rep["by_bits"]) == {"2", "8"} and rep["group_size"] == 64
    assert rep["probed_cases"] == 4 and rep["skipped_cases"] == ["r1"]
    assert rep["predicted_min_bits"] == smallest_surviving(
        [2, 8], lambda b: rep["by_bits"][str(b)]["verdict"] == "pass")
    b2, b8 = rep["by_bits"]["2"], rep["by_bits"]["8"]
    assert b8["kl"]["mean"] < b2["kl"]["mean"] and b8["kl"]["same_top_rate"] >= b2["kl"]["same_top_rate"]
    for c in rep["cases"]:  # 8 bits barely moves a margin, 2 bits moves it more
        assert abs(c["by_bits"]["8"]["margin"] - c["float"]["margin"]) < 0.1
    assert sum(abs(c["by_bits"]["2"]["margin"] - c["float"]["margin"]) for c in rep["cases"]) > \
        sum(abs(c["by_bits"]["8"]["margin"] - c["float"]["margin"]) for c in rep["cases"])


def test_float_weights_come_back_between_bit_widths(fam):
    d, model, suite = fam
    alone = json.loads(run(model, "--suite", suite, "--bits", 8, "--json").stdout)
    after_2 = json.loads(run(model, "--suite", suite, "--bits", 2, 8, "--json").stdout)
    assert alone["by_bits"]["8"] == after_2["by_bits"]["8"]


def test_float_row_agrees_with_validate_on_the_float_model(fam):
    d, model, suite = fam
    rep = json.loads(run(model, "--suite", suite, "--bits", 8, "--json").stdout)
    r = CliRunner().invoke(cli, ["validate", str(model), "--suite", str(suite), "--output", str(d / "v.json")])
    v = {c["id"]: c for c in json.loads((d / "v.json").read_text())["cases"]}
    for c in rep["cases"]:
        assert (c["float"]["got"], c["float"]["correct"]) == (v[c["id"]]["got"], v[c["id"]]["correct"]), c["id"]
    verdict = json.loads((d / "v.json").read_text())["verdict"]
    assert r.exit_code == (0 if verdict == "pass" else 3)


def test_quantized_model_is_probed_as_it_is(fam):
    d, _model, suite = fam
    r = run(d / "q4", "--suite", suite, "--json")
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    assert rep["quantized"] and rep["bits"] == [4] and "kl" not in rep["by_bits"]["4"]


# ---------------------------------------------------------------- bad input

def test_quantized_model_with_bits_is_an_error(fam):
    d, _model, suite = fam
    r = run(d / "q4", "--suite", suite, "--bits", 4)
    assert r.exit_code == 2  # --bits does not fit this model: a usage error
    last = r.output.strip().splitlines()[-1]
    assert last.startswith("Error: Invalid value for '--bits': ") and "already quantized" in last


@pytest.mark.parametrize("bits", ["7", "1", "16"])
def test_bits_outside_supported_is_an_error(fam, bits):
    _d, model, suite = fam
    r = run(model, "--suite", suite, "--bits", 4, bits)
    assert r.exit_code == 2 and r.output.strip().splitlines()[-1].startswith(
        f"Error: Invalid value for '--bits': unsupported bits {bits}")


def test_suite_without_a_decision_is_an_error(fam, tmp_path):
    _d, model, _suite = fam
    suite = write_suite(tmp_path / "math.jsonl", [
        {"id": "r1", "prompt": "2+2", "expect": {"type": "regex", "pattern": "4"}},
        {"id": "b1", "prompt": "3+3", "expect": {"type": "boxed", "answer": 6}}])
    r = run(model, "--suite", suite, "--bits", 4)
    assert r.exit_code == 1 and r.output.startswith("Error: ") and "no case with a decision" in r.output


def test_model_without_chat_template_does_not_fit_a_chat_suite(tmp_path, fam):
    model = make_tiny_model(tmp_path / "plain")
    cfg = json.loads((model / "tokenizer_config.json").read_text())
    del cfg["chat_template"]
    (model / "tokenizer_config.json").write_text(json.dumps(cfg))
    r = run(model, "--suite", fam[2], "--bits", 4)
    assert r.exit_code == 1 and r.output.startswith("Error: ") and "no chat template" in r.output


def test_labels_sharing_their_first_token_cannot_be_told_apart(fam, tmp_path, tok):
    _d, model, _suite = fam
    assert P._encode(tok, "VETOED")[0] == P._encode(tok, "VETO")[0]  # the premise, on this tokenizer
    labels = ["VETO", "VETOED"]
    suite = write_suite(tmp_path / "s.jsonl", [
        {"id": "l1", "prompt": "review: x", "expect": {"type": "label", "label": "VETO", "labels": labels}}])
    r = run(model, "--suite", suite, "--bits", 4)
    assert r.exit_code == 1 and "share their first token" in r.output and r.output.startswith("Error: ")


def test_unwritable_output_is_refused_before_work(fam, tmp_path):
    _d, model, suite = fam
    blocker = tmp_path / "file"
    blocker.write_text("x")
    r = run(model, "--suite", suite, "--bits", 4, "--output", blocker / "p.json")
    assert r.exit_code == 1 and r.output.startswith("Error: ") and "cannot write" in r.output


def test_batched_scoring_gives_each_case_its_own_logits(fam, monkeypatch):
    """Right padding inside a batch must not reach a sequence's rows (attention is causal)."""
    _d, model, _suite = fam
    net, tok, _c, _s = load_model(model)
    seqs = [(P._encode(tok, text), 0) for text in ("find the parser now", "a b", "review: reset the old logs x")]
    batched = [(r, t) for _l, r, t in runner.score_batches(net, seqs)]
    monkeypatch.setattr(runner, "BATCH_TOKENS", 1)  # one sequence per call
    single = [(r, t) for _l, r, t in runner.score_batches(net, seqs)]
    assert [len(r) for r, _t in batched] == [len(t) - 1 for t, _s in seqs]
    for (rb, tb), (rs, ts) in zip(batched, single):
        assert np.allclose(rb, rs, atol=2e-2) and (tb == ts).all()


# ---------------------------------------------------------------- streamed, layer by layer

def test_streamed_probe_predicts_what_the_in_memory_probe_did(fam):
    """The float model streamed layer by layer, every bit-width in one pass, its answers from one
    batched greedy pass: the same decisions and margins (within 1e-3) as the probe that loaded the
    whole model, answered case by case and fake-quantized the whole model per bit-width."""
    from probe_in_memory import assert_same_predictions, in_memory_probe

    _d, model, suite = fam
    rep = json.loads(run(model, "--suite", suite, "--bits", 2, 4, 8, "--json").stdout)
    assert "streamed" in rep["execution"]
    before = in_memory_probe(model, suite, [2, 4, 8])
    assert_same_predictions(rep, before)


def test_streamed_answers_are_the_case_by_case_greedy_answers(fam):
    _d, model, suite = fam
    suite_obj = load_suite(suite)
    cases, _ = P.decision_cases(suite_obj)
    net, tok, _c, _s = runner.load_model(model)
    prompts = [list(P.build_prompt(tok, c, suite_obj)) for c in cases]
    alone = [runner.greedy_tokens(net, tok, p, 8) for p in prompts]
    sm = StreamedModel(model)
    assert runner.batch_answers(sm.net, tok, prompts, [8] * len(prompts)) == alone


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    """8 layers of a 256-wide model: each layer ~0.8 MB of the ~7 MB model."""
    return make_tiny_model(tmp_path_factory.mktemp("wide") / "m", hidden_size=256, num_layers=8)


def test_streamed_scoring_holds_one_layer_not_the_model(wide, monkeypatch):
    """Whenever a tensor is read, MLX holds far less than the model: the layers read before were dropped."""
    import mlx.core as mx

    sm = StreamedModel(wide)
    model_bytes = sum(sm.source.info(n).nbytes for n in sm.source.names())
    layer_bytes = max(sum(sm.source.info(n).nbytes for n in u.candidates[0]) for u in sm.units if u.kind == "layer")
    active, real_get = [], MappedTensors.get

    def get(self, name):
        active.append(mx.get_active_memory())
        return real_get(self, name)

    monkeypatch.setattr(MappedTensors, "get", get)
    seqs = [([1, 5, 9, 30, 2, 7, 11, 40, 41, 42], 3)] * 4
    list(sm.score(seqs, [None, 4, 8]))
    assert len(active) > 8 and model_bytes > 6 * layer_bytes
    assert max(active) < 3 * layer_bytes + model_bytes / 4, (max(active), layer_bytes, model_bytes)


class _Hiding:
    """A tensor source without one tensor."""

    def __init__(self, source, hidden):
        self.source, self.hidden = source, hidden

    def names(self):
        return [n for n in self.source.names() if n != self.hidden]

    def info(self, name):
        return self.source.info(name)

    def get(self, name):
        return self.source.get(name)


def test_a_layer_missing_from_the_files_is_named(fam):
    _d, model, _s = fam
    sm = StreamedModel(model, source=_Hiding(MappedTensors(model), "model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(QtoolsError, match=r"cannot stream model.layers.1: .*mlp.up_proj.weight"):
        list(sm.score([([1, 2, 3, 4], 1)], [None]))


def test_reference_answers_are_teacher_forced(fam, tmp_path):
    """--reference: another model (loaded whole) answers, the float model is scored on those answers."""
    d, model, suite = fam
    r = run(model, "--suite", suite, "--bits", 4, "--reference", d / "q4", "--json")
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    assert "reference model" in rep["answers"] and rep["by_bits"]["4"]["total"] == 4
    other = make_tiny_model(tmp_path / "other", hidden_size=64, num_layers=2)
    cfg = json.loads((other / "config.json").read_text())
    cfg["vocab_size"] += 64
    (other / "config.json").write_text(json.dumps(cfg))
    r = run(model, "--suite", suite, "--bits", 4, "--reference", other)
    assert r.exit_code == 1 and r.output.startswith("Error: ") and "not the same model family" in r.output


def test_a_validate_logs_answers_are_read_not_generated_again(fam, tmp_path):
    """--reference LOG (qtools validate of the reference model on the same suite, one case at a time
    or batched): the answers it kept are teacher-forced, the same report as --reference MODEL gives.
    A log of another suite or generation limit, or one without the answers, is one error line."""
    d, model, suite = fam
    by_model = json.loads(run(model, "--suite", suite, "--bits", 4, "--reference", d / "q4", "--json").stdout)
    for flags in ([], ["--batch"]):
        log = tmp_path / f"q4{''.join(flags)}.json"
        v = CliRunner().invoke(cli, ["validate", str(d / "q4"), "--suite", str(suite), "--output", str(log), *flags])
        assert v.exit_code in (0, 3), v.output
        r = run(model, "--suite", suite, "--bits", 4, "--reference", log, "--json")
        assert r.exit_code == 0, r.output
        by_log = json.loads(r.stdout)
        assert by_log["answers"].startswith("the greedy answers kept in the validate log")
        assert by_log["by_bits"] == by_model["by_bits"] and by_log["cases"] == by_model["cases"], flags
    other = write_suite(tmp_path / "other.jsonl", CASES[:-1])
    r = run(model, "--suite", other, "--bits", 4, "--reference", log)
    assert r.exit_code == 1 and r.output.startswith("Error: ") and "another suite" in r.output
    r = run(model, "--suite", suite, "--bits", 4, "--reference", log, "--max-tokens", 3)
    assert r.exit_code == 1 and "give the same --max-tokens" in r.output
    d2 = json.loads(log.read_text())
    for c in d2["cases"]:
        c.pop("answer_tokens", None)
    log.write_text(json.dumps(d2))
    r = run(model, "--suite", suite, "--bits", 4, "--reference", log)
    assert r.exit_code == 1 and r.output.count("\n") == 1 and "keeps no answer tokens" in r.output
    before = log.read_bytes()
    r = run(model, "--suite", suite, "--bits", 4, "--reference", log, "--output", log)
    assert r.exit_code == 1 and "would destroy the input" in r.output and log.read_bytes() == before


def test_probe_from_base_and_adapter_equals_the_probe_of_the_fused_model(tmp_path):
    """`qtools probe --base B --adapter A` fuses every pass on the fly: the same report as on the
    model `qtools fuse` writes, with no fused model on disk (a dense model and a Hub MoE)."""
    from helpers import fused_trio
    from test_hub_models import hub_moe

    suite = write_suite(tmp_path / "mini.jsonl", CASES)
    for name, (base, adapter, fused) in (("dense", fused_trio(tmp_path / "dense")),
                                          ("moe", hub_moe(tmp_path / "moe"))):
        ref = run(fused, "--suite", suite, "--bits", 3, 4, "--json")
        new = run("--base", base, "--adapter", adapter, "--suite", suite, "--bits", 3, 4, "--json")
        assert ref.exit_code == 0 and new.exit_code == 0, (name, ref.output, new.output)
        a, b = json.loads(ref.stdout), json.loads(new.stdout)
        assert b["model"].endswith("+ adapter (fused on the fly)")
        assert a["predicted_min_bits"] == b["predicted_min_bits"], name
        assert a["reference"]["correct"] == b["reference"]["correct"]
        for ca, cb in zip(a["cases"], b["cases"]):
            assert ca["float"] == cb["float"], name
            assert ca["by_bits"] == cb["by_bits"], name
    r = run("--base", base, "--suite", suite)
    assert r.exit_code == 2 and "give MODEL, or --base and --adapter" in r.output


def test_activations_in_float32_when_asked(fam):
    """compute_dtype=mx.float32 casts every streamed weight to float32 after fake quantization
    (it raised a TypeError comparing the dtype with None): the same decisions at 8 bits."""
    import mlx.core as mx

    _d, model, suite = fam
    f16 = P.probe(model, suite, bits=[2, 8], progress=False)
    f32 = P.probe(model, suite, bits=[2, 8], progress=False, compute_dtype=mx.float32)
    assert "activations in float32" in f32["execution"]
    assert [c["by_bits"]["8"]["got"] for c in f32["cases"]] == [c["by_bits"]["8"]["got"] for c in f16["cases"]]


def test_scoring_chunks_are_cut_to_their_own_sequences(fam, monkeypatch):
    """Scoring sorts the sequences by length and cuts each chunk a layer runs on to its longest
    sequence (no chunk computes a longer one's padding): the log-probs stay those of the whole
    model loaded and run on the padded batch."""
    import qtools.pipeline.stream as S

    _d, model, _s = fam
    seqs = [(list(range(3, 3 + n)), 1) for n in (12, 3, 7, 5)]
    net = runner.load_model(model)[0]
    whole = [rows for _lp, rows, _top in runner.score_batches(net, seqs)]
    monkeypatch.setattr(S, "CHUNK_TOKENS", 24)
    widths = []
    chunks = S.StreamedModel.chunks

    def spy(self, a, b, x, split):
        out = chunks(self, a, b, x, split)
        if split:
            widths.append([w for *_rows, w in out])
        return out

    monkeypatch.setattr(S.StreamedModel, "chunks", spy)
    got = {i: rows for _k, i, _lp, rows, _top in StreamedModel(model).score(seqs, [None])}
    # sorted lengths 3 5 7 12, 24 tokens a chunk: (3, 5, 7) cut to 7, then (12)
    assert widths and all(w == [7, 12] for w in widths)
    for i, rows in enumerate(whole):
        assert got[i].shape == rows.shape and np.allclose(got[i], rows, atol=2e-2)
