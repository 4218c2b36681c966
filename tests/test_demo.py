"""Tests for the demo models: tiny fixtures, tokenizer, chat template, suite schema."""

import json
from pathlib import Path

import mlx.core as mx
import pytest

from qtools.demo import data
from qtools.demo.model import make_tiny_adapter, make_tiny_model
from qtools.demo.tokenizer import build_tokenizer

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("m") / "tiny")


def test_make_tiny_model_loads_and_generates(tiny):
    from mlx_lm import generate, load

    cfg = json.loads((tiny / "config.json").read_text())
    assert cfg["model_type"] == "qwen3" and cfg["hidden_size"] == 64
    assert cfg["num_hidden_layers"] == 2
    w = mx.load(str(tiny / "model.safetensors"))
    assert w["model.layers.0.self_attn.q_proj.weight"].dtype == mx.float16
    model, tok = load(str(tiny))
    out = generate(model, tok, "hello", max_tokens=3)
    assert isinstance(out, str)


def test_make_tiny_model_deterministic(tmp_path):
    a = make_tiny_model(tmp_path / "a", seed=3, dtype="float32", hidden_size=128, num_layers=1)
    b = make_tiny_model(tmp_path / "b", seed=3, dtype="float32", hidden_size=128, num_layers=1)
    wa, wb = mx.load(str(a / "model.safetensors")), mx.load(str(b / "model.safetensors"))
    assert wa.keys() == wb.keys()
    assert all(mx.array_equal(wa[k], wb[k]).item() for k in wa)
    assert wa["model.embed_tokens.weight"].dtype == mx.float32
    assert (a / "tokenizer.json").read_text() == (b / "tokenizer.json").read_text()


@pytest.mark.parametrize("dora", [False, True])
def test_make_tiny_adapter_loads_with_mlx_lm(tiny, tmp_path, dora):
    from mlx_lm import load

    ad = make_tiny_adapter(tiny, tmp_path / "ad", rank=4, scale=2.0, dora=dora)
    cfg = json.loads((ad / "adapter_config.json").read_text())
    assert cfg["fine_tune_type"] == ("dora" if dora else "lora")
    assert cfg["lora_parameters"]["rank"] == 4 and cfg["num_layers"] == 2
    w = mx.load(str(ad / "adapters.safetensors"))
    b = w["model.layers.1.self_attn.v_proj.lora_b"]
    assert b.shape[0] == 4 and float(mx.abs(b).max()) > 0
    assert ("model.layers.0.self_attn.q_proj.m" in w) == dora
    base, tok = load(str(tiny))
    tuned, _ = load(str(tiny), adapter_path=str(ad))
    x = mx.array([tok.encode("review: delete the old logs")])
    assert float(mx.abs(tuned(x) - base(x)).max()) > 0


def test_make_tiny_adapter_bad_key(tiny, tmp_path):
    from qtools import QtoolsError

    with pytest.raises(QtoolsError, match="no linear layer"):
        make_tiny_adapter(tiny, tmp_path / "ad", keys=("self_attn.nope",))


def test_tokenizer_round_trip():
    tok = build_tokenizer()
    for text in [data.tool_call_text("the billing module"), "review: drop the main branch",
                 '{"query": "ünïcode \\" quotes"}\n\ttabs']:
        assert tok.decode(tok.encode(text).ids, skip_special_tokens=False) == text
    assert tok.token_to_id("<tool_call>") is not None


def test_chat_template_and_tool_parser(tiny):
    from mlx_lm import load

    _, tok = load(str(tiny))
    assert tok.has_tool_calling and tok.tool_call_start == "<tool_call>"
    ex = data.base_examples()
    tool_ex = next(e for e in ex if "tool_calls" in e["messages"][-1])
    text = tok.apply_chat_template(tool_ex["messages"], tools=tool_ex["tools"], tokenize=False)
    assert "tools: search_code" in text
    body = text.split("<tool_call>")[1].split("</tool_call>")[0]
    call = tok.tool_parser(body)
    assert call["name"] == "search_code" and call["arguments"]["query"]
    prompt = tok.apply_chat_template(tool_ex["messages"][:1], tools=tool_ex["tools"],
                                     add_generation_prompt=True, tokenize=False)
    assert prompt.endswith("<|im_start|>assistant\n") and text.startswith(prompt)


def test_suite_file_matches_generator():
    path = REPO / "suites" / "demo.jsonl"
    lines = path.read_text().splitlines()
    assert [json.loads(x) for x in lines] == data.suite_records()
    header, cases = json.loads(lines[0]), [json.loads(x) for x in lines[1:]]
    assert header["suite"]["name"] == "demo"
    assert 40 <= len(cases) <= 80
    assert len({c["id"] for c in cases}) == len(cases)
    for c in cases:
        assert c["category"] in ("tool_call", "direct", "safety")
        assert c["messages"][0]["role"] == "user"
        exp = c["expect"]
        assert exp["type"] in ("tool_call", "direct", "label")
        if exp["type"] == "label":
            assert exp["label"] in exp["labels"]
        if "critical" in c:
            assert c["critical"]["expected"] == exp["label"]
    cats = {k: sum(c["category"] == k for c in cases) for k in ("tool_call", "direct", "safety")}
    assert min(cats.values()) >= 10


@pytest.mark.parametrize("seed", range(8))
def test_suite_held_out_from_finetune(seed):
    """Whatever the fine-tune's seed (the calibration grid uses 0-7), no suite prompt is trained on."""
    ft = {e["messages"][0]["content"] for e in data.finetune_examples(seed)}
    suite = {c["messages"][0]["content"] for c in data.suite_records()[1:]}
    assert len(suite) == 64 and len(ft) > 200
    assert not ft & suite


def test_demo_models_cmd_builds_and_reuses(tmp_path, monkeypatch):
    """The command's build/reuse/--force logic, with training stubbed by the fixtures."""
    from click.testing import CliRunner

    from qtools.commands.demo import demo_models_cmd
    from qtools.demo import train

    calls = []

    def fake_base(out, **kw):
        calls.append("base")
        make_tiny_model(out)

    def fake_adapter(base, out, **kw):
        calls.append("adapter")
        make_tiny_adapter(base, out)

    monkeypatch.setattr(train, "train_base", fake_base)
    monkeypatch.setattr(train, "train_adapter", fake_adapter)
    args = ["--output", str(tmp_path / "models"), "--suite", str(tmp_path / "demo.jsonl")]
    res = CliRunner().invoke(demo_models_cmd, args)
    assert res.exit_code == 0, res.output
    assert calls == ["base", "adapter"]
    assert (tmp_path / "demo.jsonl").read_text() == (REPO / "suites" / "demo.jsonl").read_text()
    cfg = json.loads((tmp_path / "models" / "demo_adapter" / "adapter_config.json").read_text())
    assert cfg["model"] == str(tmp_path / "models" / "demo_base")
    assert not [p for p in (tmp_path / "models").iterdir() if p.name.startswith(".")]
    assert CliRunner().invoke(demo_models_cmd, args).exit_code == 0
    assert calls == ["base", "adapter"]  # complete outputs are reused
    (tmp_path / "models" / "demo_adapter" / "adapters.safetensors").unlink()
    assert CliRunner().invoke(demo_models_cmd, args).exit_code == 0
    assert calls == ["base", "adapter", "adapter"]
    assert CliRunner().invoke(demo_models_cmd, args + ["--force"]).exit_code == 0
    assert calls[-2:] == ["base", "adapter"]


def test_demo_models_family_builds_that_familys_base_and_the_demo_adapter_recipe(tmp_path, monkeypatch):
    """--family NAME: the calibration family's base recipe (its gain, its depth) and the demo's
    adapter recipe on every layer of it, with --seed; a changed seed retrains the adapter only, a
    changed family recipe the base too; an unknown family is one Error line."""
    from click.testing import CliRunner

    from qtools.calibrate.grid import default_families
    from qtools.commands.demo import demo_models_cmd
    from qtools.demo import train

    calls = []

    def fake_base(out, **kw):
        calls.append(("base", kw))
        make_tiny_model(out)

    def fake_adapter(base, out, **kw):
        calls.append(("adapter", kw))
        make_tiny_adapter(base, out, seed=kw["seed"])

    monkeypatch.setattr(train, "train_base", fake_base)
    monkeypatch.setattr(train, "train_adapter", fake_adapter)
    models = tmp_path / "models"
    args = ["--output", str(models), "--suite", "", "--family", "l8g24", "--seed", "1"]
    res = CliRunner().invoke(demo_models_cmd, args)
    assert res.exit_code == 0, res.output
    fam = {f["name"]: f for f in default_families()}["l8g24"]
    assert calls[0] == ("base", fam["base"]) and fam["base"]["num_layers"] == 8
    assert calls[1] == ("adapter", {**train.ADAPTER, "num_layers": 8, "seed": 1})
    assert (models / "l8g24_base" / "config.json").exists() and (models / "l8g24_adapter").is_dir()
    assert not (models / "demo_base").exists()
    assert CliRunner().invoke(demo_models_cmd, args).exit_code == 0
    assert len(calls) == 2  # reused
    assert CliRunner().invoke(demo_models_cmd, args[:-1] + ["2"]).exit_code == 0
    assert [c[0] for c in calls[2:]] == ["adapter"] and calls[2][1]["seed"] == 2
    # a corrupt adapter config is retrained, not a traceback
    (models / "l8g24_adapter" / "adapter_config.json").write_text("{not json")
    assert CliRunner().invoke(demo_models_cmd, args[:-1] + ["2"]).exit_code == 0
    assert [c[0] for c in calls[3:]] == ["adapter"]
    calls[3:] = []
    # a base built from another recipe (the family's gain changed since) is rebuilt
    recipe = models / "l8g24_base" / "qtools_base_recipe.json"
    recipe.write_text(json.dumps({**fam["base"], "outlier_gain": 1.0}))
    assert CliRunner().invoke(demo_models_cmd, args).exit_code == 0
    assert [c[0] for c in calls[3:]] == ["base", "adapter"]
    from qtools.cli import cli

    res = CliRunner().invoke(cli, ["demo-models", "--output", str(models), "--suite", "", "--family", "g7"])
    assert res.exit_code == 2  # a value out of range: a usage error
    assert res.output.strip().splitlines()[-1] == ("Error: Invalid value for '--family': unknown family g7; "
                                                   "the calibration's families are g4, g12, g24, g36, l8g24")


def test_base_examples_exact_class_proportions():
    """Every request gets the class's label proportion exactly: no per-combination noise."""
    from collections import Counter, defaultdict

    ex = data.base_examples(copies=20)
    by_prompt = defaultdict(Counter)
    for e in ex:
        reply = e["messages"][-1]
        label = "tool" if "tool_calls" in reply else reply["content"]
        by_prompt[e["messages"][0]["content"]][label] += 1
    for v, o, is_repo in data.ask_combos():
        c = by_prompt[f"{v} {o}"]
        assert sum(c.values()) == 20
        assert c["tool"] == round(20 * data.BASE_PRIORS["tool|repo" if is_repo else "tool|concept"])
    for v, o, lab in data.review_combos():
        c = by_prompt[f"review: {v} {o}"]
        assert c["VETO"] == round(20 * data.BASE_PRIORS["veto|critical" if lab == "VETO" else "veto|disposable"])
        assert c["VETO"] + c["APPROVE"] == 20
    # right ranking, wrong side: the positive label is the minority in every class
    assert all(p < 0.5 for p in data.BASE_PRIORS.values())
    assert data.BASE_PRIORS["veto|critical"] > data.BASE_PRIORS["veto|disposable"]


def test_outlier_channels_preserve_the_function_and_widen_the_step(tmp_path):
    """The outlier gain is folded in exactly (same logits) and sets every group's range."""
    import numpy as np
    from mlx_lm import load

    from qtools.demo.train import add_outlier_channels

    path = make_tiny_model(tmp_path / "m", hidden_size=128, intermediate_size=256, num_layers=2)
    model, _ = load(str(path))
    model.set_dtype(mx.float32)
    config = json.loads((path / "config.json").read_text())
    tokens = mx.array([[5, 17, 42, 9, 77, 3, 120, 64]])
    before = model(tokens)
    w_before = {k: np.array(getattr(model.model.layers[0].mlp, k).weight) for k in ("up_proj", "down_proj")}
    add_outlier_channels(model, config, gain=16.0, seed=0)
    after = model(tokens)
    np.testing.assert_allclose(np.array(after), np.array(before), rtol=1e-4, atol=1e-4)
    down = np.array(model.model.layers[0].mlp.down_proj.weight)
    # one column per 64-group is 16x larger; the others are untouched
    ratio = np.abs(down).max(axis=0) / np.abs(w_before["down_proj"]).max(axis=0)
    for g in range(0, down.shape[1], 64):
        r = ratio[g:g + 64]
        assert np.sum(np.isclose(r, 16.0, rtol=1e-5)) == 1 and np.sum(np.isclose(r, 1.0)) == 63
    # the group range, hence the quantization step, grows several-fold
    rng_before = np.ptp(w_before["down_proj"].reshape(-1, 64), axis=1)
    rng_after = np.ptp(down.reshape(-1, 64), axis=1)
    assert np.median(rng_after / rng_before) > 3


def test_training_data_of_a_demo_fused_model_is_its_finetune_data_not_the_suite(tmp_path):
    import json

    from qtools.demo.data import finetune_examples, suite_records, training_data_of

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps(
        {"data": "qtools.demo.data.finetune_examples(seed=3, split_seed=0)"}))
    fused = tmp_path / "fused"
    fused.mkdir()
    (fused / "qtools_provenance.json").write_text(json.dumps({"adapter": str(adapter)}))
    records, desc = training_data_of(fused)
    assert records == finetune_examples(seed=3, split_seed=0) and "seed=3" in desc
    trained = {r["messages"][0]["content"] for r in records}
    suite = {c["messages"][0]["content"] for c in suite_records()[1:]}
    assert trained and suite and not trained & suite  # calibration data never holds a suite case
    (adapter / "adapter_config.json").write_text(json.dumps({"data": "somewhere/else.jsonl"}))
    assert training_data_of(fused) is None
    assert training_data_of(tmp_path / "no_provenance") is None
