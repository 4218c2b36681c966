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
