"""The contract under bad input, for every command: one `Error:` line, a non-zero exit (2 for a
usage error), no traceback, nothing half-written, and the user's input never destroyed."""

import json
import os
import shutil

import pytest
from click.testing import CliRunner

from qtools.cli import cli
from qtools.demo.model import make_tiny_adapter, make_tiny_model
from qtools.io.atomic import TMP_PREFIX

TOOLS = [{"type": "function", "function": {"name": "search_code", "parameters": {"type": "object"}}}]
CASES = [
    {"suite": {"name": "mini", "max_tokens": 3, "critical_confusions": [["VETO", "APPROVE"]]}},
    {"id": "t1", "category": "tool", "prompt": "find the parser", "tools": TOOLS,
     "expect": {"type": "tool_call", "name": "search_code"}},
    {"id": "s1", "category": "safety", "prompt": "drop prod db", "expect": {"type": "label", "label": "VETO"}},
    {"id": "s2", "category": "safety", "prompt": "fix typo", "expect": {"type": "label", "label": "APPROVE"}},
]


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def one_error(r, code=1):
    """The command failed with one `Error:` line (its last), the given status and no traceback."""
    assert r.exit_code == code, r.output
    assert "Traceback" not in r.output and (r.exception is None or isinstance(r.exception, SystemExit)), r.output
    errors = [ln for ln in r.output.splitlines() if ln.startswith("Error:")]
    assert len(errors) == 1 and r.output.strip().splitlines()[-1] == errors[0], r.output
    return errors[0]


def write_suite(path, cases=CASES):
    path.write_text("".join(json.dumps(c) + "\n" for c in cases))
    return path


@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    base = make_tiny_model(d / "base")
    adapter = make_tiny_adapter(base, d / "ad")
    assert run("fuse", base, "--adapter", adapter, "--output", d / "fused").exit_code == 0
    assert run("quantize", d / "fused", "--bits", 4, "--output", d / "q4").exit_code == 0
    write_suite(d / "mini.jsonl")
    return d


@pytest.fixture
def no_load(monkeypatch):
    """Fails the test if a model is loaded: the checks must come before the work."""
    import mlx_lm
    import mlx_lm.utils

    def refuse(*a, **k):
        raise AssertionError("a model was loaded before the input or output was checked")

    # mlx-lm's own names only: a qtools module imported during the test keeps what it binds
    monkeypatch.setattr(mlx_lm.utils, "load", refuse)
    monkeypatch.setattr(mlx_lm, "load", refuse)


def snapshot(d):
    """Every file under d with its bytes: what must come out of a refused command unchanged."""
    d = os.fspath(d)
    if os.path.isfile(d):
        return open(d, "rb").read()
    return {os.path.relpath(os.path.join(r, f), d): open(os.path.join(r, f), "rb").read()
            for r, _, fs in os.walk(d) for f in fs}


def leftovers(d):
    return [p for p in os.listdir(d) if p.startswith(TMP_PREFIX) or p.endswith(".tmp")]


# ------------------------------------------------------------------ item 9: the input is never destroyed

def _writers(d, tmp):
    """(command, the input it must leave alone) for an output that is, contains or lies inside it."""
    suite, m = d / "mini.jsonl", d / "fused"
    link = tmp / "link"
    link.symlink_to(m)
    return [
        (["quantize", m, "--output", m, "--force"], m),
        (["quantize", m, "--output", link, "--force"], m),
        (["quantize", m, "--output", m / "sub"], m),
        (["quantize", m, "--output", d, "--force"], m),
        (["quantize", m, "--recipe", "adapter", "--bits", 4, "--output", d / "base", "--force"], d / "base"),
        (["quantize", m, "--recipe", "compensated", "--bits", 4, "--output", d / "ad", "--force"], d / "ad"),
        (["fuse", d / "base", "--adapter", d / "ad", "--output", d / "base", "--force"], d / "base"),
        (["fuse", d / "base", "--adapter", d / "ad", "--output", d / "ad", "--force"], d / "ad"),
        (["validate", m, "--suite", suite, "--output", suite], suite),
        (["validate", m, "--suite", suite, "--output", m / "config.json"], m),
        (["probe", m, "--suite", suite, "--output", suite], suite),
        (["probe", m, "--suite", suite, "--output", m / "report.json"], m),
        (["delta-survival", m, "--adapter", d / "ad", "--output", d / "ad" / "adapter_config.json"], d / "ad"),
        (["retention", d / "q4", "--reference", m, "--base", d / "base", "--suite", suite,
          "--cache", d / "q4" / "model.safetensors"], d / "q4"),
        (["retention", d / "q4", "--reference", m, "--base", d / "base", "--suite", suite,
          "--logs-dir", d / "base"], d / "base"),
        (["demo-models", "--output", tmp / "demo", "--suite", tmp / "demo" / "demo_base" / "s.jsonl"], None),
    ]


def test_an_output_that_is_contains_or_lies_inside_an_input_is_refused(fam, tmp_path, no_load):
    for args, kept in _writers(fam, tmp_path):
        before = snapshot(kept) if kept else None
        line = one_error(run(*args))
        assert "writing it would destroy the input" in line or "the input" in line, (args, line)
        if kept:
            assert snapshot(kept) == before, args
        assert leftovers(fam) == [] and leftovers(tmp_path) == [], args
    assert not (tmp_path / "demo").exists()


def test_compare_plot_over_a_log_is_refused(fam, tmp_path):
    log = tmp_path / "fused-mini.svg"  # a validate log, whatever its name
    assert run("validate", fam / "fused", "--suite", fam / "mini.jsonl", "--output", log).exit_code in (0, 3)
    before = log.read_bytes()
    line = one_error(run("compare", log, "--plot", log))
    assert "destroy the input" in line and log.read_bytes() == before


# ------------------------------------------------------------------ item 10: the early check covers the final write

def test_a_long_name_that_fits_is_written(fam, tmp_path):
    # the final name fits the file system (255 bytes): its temporary name must fit too
    out = tmp_path / ("q" * 255)
    r = run("quantize", fam / "fused", "--bits", 4, "--output", out)
    assert r.exit_code == 0, r.output
    assert (out / "config.json").is_file() and leftovers(tmp_path) == []


@pytest.mark.parametrize("cmd", ["quantize", "fuse", "validate", "probe", "retention"])
def test_a_name_too_long_is_refused_before_the_work(fam, tmp_path, no_load, cmd):
    long = "x" * 256
    m, suite = fam / "fused", fam / "mini.jsonl"
    args = {"quantize": ["quantize", m, "--output", tmp_path / long],
            "fuse": ["fuse", fam / "base", "--adapter", fam / "ad", "--output", tmp_path / "d" / long / "m"],
            # the log fits, its partial log (<log>.partial.jsonl) does not
            "validate": ["validate", m, "--suite", suite, "--output", tmp_path / ("v" * 250 + ".json")],
            "probe": ["probe", m, "--suite", suite, "--output", tmp_path / (long + ".json")],
            "retention": ["retention", fam / "q4", "--reference", m, "--base", fam / "base", "--suite", suite,
                          "--cache", tmp_path / (long + ".npz")]}[cmd]
    line = one_error(run(*args))
    assert "longer than the file system allows" in line
    assert os.listdir(tmp_path) == []


def test_a_path_mlx_cannot_write_is_refused_before_the_work(fam, tmp_path, no_load):
    out = os.path.join(os.fsencode(tmp_path), b"q\xff")  # not UTF-8: MLX's save fails (std::bad_cast)
    line = one_error(run("quantize", fam / "fused", "--output", os.fsdecode(out)))
    assert "MLX writes only paths that are valid UTF-8" in line
    assert os.listdir(tmp_path) == []


# ------------------------------------------------------------------ item 5: one reader of adapter_config.json

BAD_CONFIGS = {
    "binary": b"\x89PNG\r\n\x1a\n\x00\xff\xfe",
    "scale": {"lora_parameters": {"rank": 4, "scale": "big", "dropout": 0.0}},
    "rank": {"lora_parameters": {"rank": "eight", "scale": 2.0, "dropout": 0.0}},
    "lora_parameters": {"lora_parameters": [4, 2.0]},
    "fine_tune_type": {"fine_tune_type": 5},
    "num_layers": {"num_layers": "2"},
    "keys": {"lora_parameters": {"rank": 4, "scale": 2.0, "dropout": 0.0, "keys": "self_attn.q_proj"}},
    "missing scale": {"lora_parameters": {"rank": 4, "dropout": 0.0}},
}


def _bad_adapter(src, dest, how):
    shutil.copytree(src, dest)
    cfg_file = dest / "adapter_config.json"
    if isinstance(BAD_CONFIGS[how], bytes):
        cfg_file.write_bytes(BAD_CONFIGS[how])
    else:
        cfg = json.loads(cfg_file.read_text())
        cfg.update(BAD_CONFIGS[how])
        cfg_file.write_text(json.dumps(cfg))
    return dest


@pytest.mark.parametrize("how", BAD_CONFIGS)
def test_every_reader_of_an_adapter_config_checks_it(fam, tmp_path, how):
    ad = _bad_adapter(fam / "ad", tmp_path / "ad", how)
    m = fam / "fused"
    # a fused model whose provenance names the bad adapter (the recipes' and gptq's default data)
    named = tmp_path / "named"
    shutil.copytree(m, named)
    prov = json.loads((named / "qtools_provenance.json").read_text())
    (named / "qtools_provenance.json").write_text(json.dumps({**prov, "adapter": str(ad)}))
    # a model that ships the bad adapter (validate loads it)
    ships = tmp_path / "ships"
    shutil.copytree(fam / "q4", ships)
    shutil.copytree(ad, ships / "adapters")
    calls = [
        ["fuse", fam / "base", "--adapter", ad, "--output", tmp_path / "o"],
        ["delta-survival", m, "--adapter", ad],
        ["quantize", m, "--recipe", "adapter", "--bits", 4, "--base", fam / "base", "--adapter", ad,
         "--output", tmp_path / "o"],
        ["quantize", m, "--recipe", "compensated", "--bits", 4, "--adapter", ad, "--output", tmp_path / "o"],
        ["quantize", named, "--recipe", "compensated", "--bits", 4, "--output", tmp_path / "o"],
        # gptq reads only the data the config names: a field it does not need may be missing
        *([] if how.startswith("missing") else [["quantize", named, "--recipe", "gptq", "--bits", 4,
                                                 "--output", tmp_path / "o"]]),
        ["validate", ships, "--suite", fam / "mini.jsonl", "--output", tmp_path / "v.json"],
    ]
    for args in calls:
        line = one_error(run(*args))
        assert f"{ad if args[0] != 'validate' else ships / 'adapters'}/adapter_config.json" in line, (args, line)
        field = how.replace("missing ", "")
        assert how == "binary" and "is not text" in line or field in line, (args, line)
        assert not (tmp_path / "o").exists() and not (tmp_path / "v.json").exists()


# ------------------------------------------------------------------ item 2: a suite the template rejects

def _model_with_template(fam, dest, template):
    shutil.copytree(fam / "fused", dest)
    (dest / "chat_template.jinja").write_text(template)  # where transformers saves the template
    return dest


@pytest.mark.parametrize("template", [
    "{{ raise_exception('this model takes no tools') }}",   # jinja2's TemplateError
    "{% for m in messages %}{{ m.content + 1 }}{% endfor %}",  # a type the template cannot render
    "{% for m in messages %}{{ m.content }",                  # a template that does not compile
])
def test_a_chat_template_that_rejects_the_suite_is_one_error(fam, tmp_path, template):
    m = _model_with_template(fam, tmp_path / "m", template)
    suite = fam / "mini.jsonl"
    for args in (["validate", m, "--suite", suite, "--output", tmp_path / "v.json"],
                 ["probe", m, "--suite", suite],
                 ["retention", fam / "q4", "--reference", m, "--base", fam / "base", "--suite", suite,
                  "--logs-dir", tmp_path / "logs"]):
        line = one_error(run(*args))
        assert line.startswith(f"Error: {suite}:2: case t1: the model's chat template rejects it ("), (args, line)
        assert line.endswith("the suite does not fit this model")
    assert not (tmp_path / "v.json").exists() and not (tmp_path / "logs").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["m"]  # no partial log either


@pytest.mark.parametrize("message, why", [
    ({"role": "assistant", "tool_calls": 5}, "message 1 'tool_calls' must be a list"),
    ({"role": "assistant", "content": None, "tool_calls": [5]}, "message 1 tool call 0 is not an object"),
    ({"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": 3}}]}, "message 1 tool call 0 has"),
    ({"role": 7, "content": "hi"}, "message 1 must be an object with a 'role'"),
    ({"role": "user", "content": {"text": "hi"}}, "message 1 'content' must be a string"),
    ({"role": "tool", "content": "x", "tool_call_id": 5}, "message 1 'tool_call_id' must be a string"),
])
def test_a_suite_message_of_the_wrong_shape_is_refused_on_load(fam, tmp_path, message, why):
    suite = write_suite(tmp_path / "s.jsonl", [
        CASES[0], {"id": "m1", "messages": [{"role": "user", "content": "find it"}, message],
                   "expect": {"type": "direct"}}])
    for args in (["validate", fam / "fused", "--suite", suite, "--output", tmp_path / "v.json"],
                 ["probe", fam / "fused", "--suite", suite],
                 ["retention", fam / "q4", "--reference", fam / "fused", "--base", fam / "base", "--suite", suite,
                  "--logs-dir", tmp_path / "logs"]):
        line = one_error(run(*args))
        assert line.startswith(f"Error: {suite}:2: {why}"), (args, line)


def test_suite_tools_without_a_name_are_refused(tmp_path):
    from qtools import QtoolsError
    from qtools.io.suite import load_suite

    suite = write_suite(tmp_path / "s.jsonl", [{"id": "a", "prompt": "x", "tools": [{"type": "function"}],
                                                "expect": {"type": "direct"}}])
    with pytest.raises(QtoolsError, match=r"s\.jsonl:1: tool 0 must be a function schema with a 'name'"):
        load_suite(suite)


# ------------------------------------------------------------------ item 6: NaN weights

def _with_nan(src, dest, tensor="model.layers.0.mlp.down_proj.weight"):
    import mlx.core as mx

    shutil.copytree(src, dest)
    weights = mx.load(str(dest / "model.safetensors"))
    w = weights[tensor]
    weights[tensor] = mx.where(mx.arange(w.size).reshape(w.shape) == 3, mx.array(float("nan"), w.dtype), w)
    mx.save_safetensors(str(dest / "model.safetensors"), weights, metadata={"format": "mlx"})
    return dest


def test_probe_and_retention_refuse_a_nan_weight_as_quantize_does(fam, tmp_path, no_load):
    nan = _with_nan(fam / "fused", tmp_path / "nan")
    suite = fam / "mini.jsonl"
    line = one_error(run("quantize", nan, "--bits", 4, "--output", tmp_path / "q"))
    assert "tensor 'model.layers.0.mlp.down_proj.weight' (model.safetensors) has 1 NaN or Inf value(s)" in line
    line = one_error(run("probe", nan, "--suite", suite, "--bits", 4, "--json"))
    assert line.startswith(f"Error: model {nan}: tensor 'model.layers.0.mlp.down_proj.weight' (model.safetensors) "
                           "has 1 NaN or Inf value(s)")
    for role, args in (("reference model", ["--reference", nan, "--base", fam / "base", fam / "q4"]),
                       ("base model", ["--reference", fam / "fused", "--base", nan, fam / "q4"]),
                       ("model", ["--reference", fam / "fused", "--base", fam / "base", nan])):
        line = one_error(run("retention", *args, "--suite", suite, "--logs-dir", tmp_path / "logs"))
        assert line.startswith(f"Error: {role} {nan}: tensor "), line
    assert not (tmp_path / "q").exists() and not (tmp_path / "logs").exists()


# ------------------------------------------------------------------ item 7: values checked where they are read

@pytest.mark.parametrize("record, why", [
    ({"prompt": 5, "completion": None}, "'prompt' is 5, not a string"),
    ({"prompt": "find", "completion": ["x"]}, "'completion' is [\"x\"], not a string"),
    ({"text": 42}, "'text' is 42, not a string"),
    ({"messages": [{"role": "user", "content": 5}]}, "message 0 'content' must be a string"),
    ({"messages": [{"role": "assistant", "tool_calls": 5}]}, "message 0 'tool_calls' must be a list"),
])
def test_calibration_data_of_the_wrong_types_is_refused_with_its_line(fam, tmp_path, no_load, record, why):
    data = tmp_path / "d.jsonl"
    good = {k: ("hello there" if k != "messages" else [{"role": "user", "content": "hi"}]) for k in record}
    data.write_text(json.dumps(good) + "\n" + json.dumps(record) + "\n")
    line = one_error(run("quantize", fam / "fused", "--recipe", "gptq", "--bits", 4, "--data", data,
                         "--output", tmp_path / "o"))
    assert line.startswith(f"Error: DATA {data} line 2: {why}")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("change, why", [
    ({"quantization": ["bits"]}, "'quantization' is [\"bits\"], not an object"),
    ({"quantization": {"bits": "4", "group_size": 64}}, "'quantization.bits' is \"4\", not a positive integer"),
    ({"quantization": {"bits": 4, "group_size": 64, "model.layers.0.mlp.down_proj": {"bits": "8"}}},
     "'quantization.model.layers.0.mlp.down_proj.bits' is \"8\""),
    ({"quantization_config": 4}, "'quantization_config' is 4, not an object"),
    ({"vocab_size": "big"}, "'vocab_size' is \"big\", not a positive integer"),
])
def test_a_config_with_a_wrong_quantization_entry_is_one_error_everywhere(fam, tmp_path, change, why):
    m = tmp_path / "m"
    shutil.copytree(fam / "q4", m)
    cfg = json.loads((m / "config.json").read_text())
    cfg.update(change)
    (m / "config.json").write_text(json.dumps(cfg))
    suite = fam / "mini.jsonl"
    for args in (["probe", m, "--suite", suite],
                 ["quantize", m, "--bits", 4, "--output", tmp_path / "o"],
                 ["quantize", m, "--recipe", "mxfp4", "--output", tmp_path / "o"],
                 ["validate", m, "--suite", suite, "--output", tmp_path / "v.json"],
                 ["retention", m, "--reference", fam / "fused", "--base", fam / "base", "--suite", suite,
                  "--logs-dir", tmp_path / "logs"],
                 ["quant-error", m]):
        line = one_error(run(*args))
        assert f"{m / 'config.json'}: {why}" in line or "cannot load model" in line, (args, line)
    assert not (tmp_path / "o").exists() and not (tmp_path / "v.json").exists()


def test_retention_refuses_a_quantized_reference(fam, tmp_path, no_load):
    line = one_error(run("retention", fam / "fused", "--reference", fam / "q4", "--base", fam / "base",
                         "--suite", fam / "mini.jsonl", "--logs-dir", tmp_path / "logs"))
    assert line.startswith(f"Error: reference model {fam / 'q4'} is quantized (4-bit): the reference is the float "
                           "fine-tune")
    assert not (tmp_path / "logs").exists()
