"""retention: KL from the float reference on tiny models, the reference cache, bad input, compare's row."""

import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

import qtools.pipeline.retention as RT
from qtools.cli import cli
from qtools.demo.model import make_tiny_adapter, make_tiny_model

TOOLS = [{"type": "function", "function": {"name": "search_code", "parameters": {"type": "object"}}}]
CASES = [
    {"suite": {"name": "mini", "max_tokens": 6}},
    {"id": "a", "category": "tool", "prompt": "find the parser", "tools": TOOLS, "expect": {"type": "direct"}},
    {"id": "b", "category": "direct", "prompt": "what is a parser", "expect": {"type": "direct"}},
    {"id": "c", "category": "direct", "prompt": "explain the search index", "expect": {"type": "direct"}},
]


def run(*args):
    return CliRunner().invoke(cli, ["retention", *map(str, args)])


@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    d = tmp_path_factory.mktemp("ret")
    base = make_tiny_model(d / "base")
    adapter = make_tiny_adapter(base, d / "ad", scale=2.0, b_std=0.05)
    fused = d / "fused"
    assert CliRunner().invoke(cli, ["fuse", str(base), "--adapter", str(adapter), "--output", str(fused)]).exit_code == 0
    for b in (3, 8):
        r = CliRunner().invoke(cli, ["quantize", str(fused), "--bits", str(b), "--output", str(d / f"q{b}")])
        assert r.exit_code == 0, r.output
    suite = d / "mini.jsonl"
    suite.write_text("".join(json.dumps(c) + "\n" for c in CASES))
    return d, suite


def test_kl_topk_matches_exact_kl_with_full_vocab():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(5, 10)), rng.normal(size=(5, 10))
    p = a - np.log(np.exp(a).sum(-1, keepdims=True))
    q = b - np.log(np.exp(b).sum(-1, keepdims=True))
    exact = (np.exp(p) * (p - q)).sum(-1)
    tail = np.full(5, np.log(1e-30))
    assert np.allclose(RT.kl_topk(p, tail, q, tail), exact, atol=1e-6)
    # top-3 + tail bucket: a lower bound on the exact KL (log-sum inequality)
    order = np.argsort(-p, axis=-1)[:, :3]
    pk, qk = np.take_along_axis(p, order, -1), np.take_along_axis(q, order, -1)
    approx = RT.kl_topk(pk, RT.tail_logp(pk), qk, RT.tail_logp(qk))
    assert np.all(approx <= exact + 1e-9) and np.all(approx >= 0)


def test_self_kl_is_zero_and_8bit_beats_3bit(fam):
    d, suite = fam
    logs = d / "logs"
    r = run("--reference", d / "fused", "--base", d / "base", d / "fused", d / "q8", d / "q3",
            "--suite", suite, "--logs-dir", logs, "--json")
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    by = {m["model"]: m for m in res["models"]}
    assert by["fused"]["kl"]["mean"] == 0 and by["fused"]["logit_retention"] == 1.0
    assert by["fused"]["kl"]["same_top_rate"] == 1.0
    assert res["base"]["mean"] > 0
    assert by["q8"]["logit_retention"] > by["q3"]["logit_retention"]
    assert by["q8"]["logit_retention"] > 0.9
    assert res["tokens"] > 3 and not res["reference_cached"]
    log = json.loads((logs / "retention-q8.json").read_text())
    assert log["qtools_retention"] == 1 and log["suite"] == "mini" and log["top_k"] == 32
    assert set(log["kl"]) == {"mean", "p50", "p90", "p99", "max", "same_top_rate"}
    assert (logs / "retention-ref-fused-mini.npz").is_file()

    # The second run reads the reference from the cache and gets the same numbers.
    r = run("--reference", d / "fused", "--base", d / "base", d / "q8", "--suite", suite, "--logs-dir", logs, "--json")
    again = json.loads(r.stdout)
    assert again["reference_cached"] and again["models"][0]["kl"] == by["q8"]["kl"]

    # A changed suite invalidates the cache.
    suite2 = d / "mini2.jsonl"
    suite2.write_text("".join(json.dumps(c) + "\n" for c in CASES[:2]))
    r = run("--reference", d / "fused", "--base", d / "base", d / "q8", "--suite", suite2,
            "--cache", logs / "retention-ref-fused-mini.npz", "--logs-dir", logs, "--json")
    assert r.exit_code == 0 and "stale" in r.stderr and not json.loads(r.stdout)["reference_cached"]


def test_text_source(fam, tmp_path):
    d, _ = fam
    text = tmp_path / "t.txt"
    text.write_text("the parser reads the search index\n\nexplain garbage collection to me\n")
    r = run("--reference", d / "fused", "--base", d / "base", d / "fused", "--text", text, "--logs-dir", tmp_path)
    assert r.exit_code == 0, r.output
    assert "every token scored" in r.output and "| fused" in r.output


def test_bad_input(fam, tmp_path):
    d, suite = fam
    common = ["--base", d / "base", "--suite", suite, "--logs-dir", tmp_path]
    r = run("--reference", tmp_path / "nope", *common, d / "q8")
    assert r.exit_code == 1 and "Error: reference model" in r.output and "does not exist" in r.output
    r = run("--reference", d / "fused", *common, tmp_path / "missing")
    assert r.exit_code == 1 and "does not exist" in r.output
    other = tmp_path / "other"
    shutil.copytree(d / "q8", other)
    cfg = json.loads((other / "config.json").read_text())
    cfg["vocab_size"] += 7
    (other / "config.json").write_text(json.dumps(cfg))
    r = run("--reference", d / "fused", *common, other)
    assert r.exit_code == 1 and "vocabulary" in r.output and "not the same model family" in r.output
    r = run("--reference", d / "fused", *common, "--text", suite, d / "q8")
    assert r.exit_code == 2 and "not both" in r.output  # a usage error
    r = run("--reference", d / "fused", "--base", d / "base", "--suite", tmp_path / "no.jsonl", d / "q8")
    assert r.exit_code == 1 and "does not exist" in r.output
    r = run("--reference", d / "fused", *common)
    assert r.exit_code == 2  # no QUANTIZED: usage error
    assert not list(tmp_path.glob("retention-*.json"))


def test_compare_shows_logit_retention(tmp_path):
    from qtools.pipeline.compare import compare, format_comparison

    def vlog(model, bits, acc):
        return {"qtools_log": 1, "model": model, "suite": "demo", "quantized": bits < 16, "bits": bits,
                "mixed": False, "bits_per_weight": bits + 0.5, "disk_bytes": bits * 1000, "accuracy": acc,
                "correct": int(acc * 10), "total": 10, "critical_errors": 0, "format_compliance": 1.0,
                "load_s": 0.1, "first_gen_s": 0.1, "mean_gen_s": 0.1, "tokens_per_s": 10.0,
                "peak_memory_gb": 0.01, "per_category": {}, "cases": [], "created": "2025"}

    paths = []
    for name, bits, acc in (("fused_f16", 16, 1.0), ("fused_4bit", 4, 0.9), ("fused_3bit", 3, 0.7)):
        p = tmp_path / f"{name}-demo.json"
        p.write_text(json.dumps(vlog(name, bits, acc)))
        paths.append(p)
    for name, ret in (("fused_4bit", 0.93), ("fused_3bit", 0.41)):
        p = tmp_path / f"retention-{name}.json"
        p.write_text(json.dumps({"qtools_retention": 1, "model": name, "suite": "demo", "logit_retention": ret,
                                 "kl": {"mean": 0.01}, "created": "2025"}))
        paths.append(p)
    res = compare(paths)
    rows = res["comparisons"][0]["rows"]
    names = [r["metric"] for r in rows]
    row = rows[names.index("logit_retention")]
    assert names.index("logit_retention") == names.index("accuracy") + 1
    assert row["values"] == {"fused_f16": None, "fused_4bit": 0.93, "fused_3bit": 0.41}
    assert row["winner"] == "fused_4bit"
    assert "logit_retention" in format_comparison(res)


def test_compare_refuses_a_retention_log_of_an_older_qtools(tmp_path):
    from click.testing import CliRunner

    from qtools.cli import cli

    old = tmp_path / "retention-fused_4bit.json"
    old.write_text(json.dumps({"qtools_retention": 1, "model": "fused_4bit", "suite": "demo", "retention": 0.9}))
    r = CliRunner().invoke(cli, ["compare", str(old)])
    assert r.exit_code == 1
    assert r.output.strip() == (f"Error: {old} has no logit_retention: it was written by an older qtools; "
                                "run `qtools retention` again")
