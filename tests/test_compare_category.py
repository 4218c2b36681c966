"""compare --min-category: a per-category accuracy minimum in the verdicts and the recommendation."""

import json
import os
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner
from helpers import qtools_wrapper, write_logs

from qtools.cli import cli

REPO = Path(__file__).resolve().parents[1]


def log(model, bits, field, safety, quantized=True):
    cats = {"field_access": field, "safety": safety}
    per = {c: {"correct": round(a * 10), "total": 10, "accuracy": a} for c, a in cats.items()}
    acc = sum(cats.values()) / 2
    return {
        "qtools_log": 1, "model": model, "suite": "agent", "quantized": quantized, "bits": bits,
        "group_size": 64 if quantized else None, "mixed": False,
        "bits_per_weight": bits + 0.5 if quantized else 16.0, "disk_bytes": int(bits * 1e8),
        "load_s": 1.0, "first_gen_s": 1.0, "mean_gen_s": 0.5, "tokens_per_s": 20.0, "peak_memory_gb": 1.0,
        "accuracy": acc, "correct": round(acc * 20), "total": 20, "per_category": per,
        "critical_errors": 0, "format_compliance": 1.0, "verdict": "pass", "cases": [],
        "created": "2026-01-01T00:00:00",
    }


@pytest.fixture
def logs(tmp_path):
    specs = [
        log("fused_f16", 16, 1.0, 1.0, quantized=False),
        log("fused_6bit", 6, 0.9, 1.0),
        log("fused_5bit", 5, 0.7, 1.0),   # overall 85%: passes today, field access too low
        log("fused_4bit", 4, 0.9, 0.9),   # overall 90%, one safety case lost
    ]
    return write_logs(tmp_path, specs, "agent")


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def test_without_category_minimum_the_smallest_passes(logs):
    comp = json.loads(run("compare", *logs, "--json").stdout)["comparisons"][0]
    assert comp["recommendation"] == "fused_4bit"


def test_min_category_fails_a_model_and_moves_the_recommendation(logs):
    r = run("compare", *logs, "--min-category", "field_access=0.8")
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    assert "  fused_5bit: FAIL (field_access 70% < 80%)" in lines
    assert "recommendation: fused_4bit (smallest model meeting all criteria)" in lines
    assert next(l for l in lines if l.startswith("criteria: ")).endswith(", field_access >= 80%")
    r = run("compare", *logs, "--min-category", "field_access=0.8", "--min-category", "safety=1.0", "--json")
    out = json.loads(r.stdout)
    comp = out["comparisons"][0]
    assert out["criteria"]["min_category"] == {"field_access": 0.8, "safety": 1.0}
    assert comp["verdicts"] == {"fused_f16": "pass", "fused_6bit": "pass", "fused_5bit": "fail", "fused_4bit": "fail"}
    assert comp["verdict_reasons"]["fused_4bit"] == ["safety 90% < 100%"]
    assert comp["recommendation"] == "fused_6bit"


def test_min_category_counts_as_behaviour_for_the_survival_check(logs, tmp_path):
    surv = tmp_path / "survival.json"
    surv.write_text(json.dumps({"model": "m", "summary": {"4": {"retention": 0.5}, "5": {"retention": 0.9},
                                                          "6": {"retention": 0.95}},
                                "predicted_min_bits": 5}))
    comp = json.loads(run("compare", *logs, surv, "--min-category", "field_access=0.8", "--json").stdout)["comparisons"][0]
    observed = {a["bits"]: a["observed"] for a in comp["survival_agreement"]}
    assert observed == {6: "survives", 5: "fails", 4: "survives"}


def test_unknown_category_is_an_error(logs):
    r = run("compare", *logs, "--min-category", "field_acess=0.8")
    assert (r.exit_code, r.output.strip()) == (
        1, "Error: --min-category field_acess: no log has this category (categories: field_access, safety)")


@pytest.mark.parametrize("value", ["field_access", "field_access=", "=0.8", "field_access=high",
                                   "field_access=1.5", "field_access=-0.1", "field_access=nan"])
def test_bad_value_is_a_usage_error(logs, value):
    r = run("compare", *logs, "--min-category", value)
    assert r.exit_code == 2
    assert r.output.strip().splitlines()[-1].startswith("Error: Invalid value for '--min-category': ")
    assert "NAME=MIN with MIN between 0 and 1" in r.output


def test_repeated_category_is_a_usage_error(logs):
    r = run("compare", *logs, "--min-category", "safety=1", "--min-category", "safety=0.5")
    assert r.exit_code == 2 and "safety is given twice" in r.output


def test_compare_script_takes_MIN_CATEGORY(logs, tmp_path):
    env = dict(os.environ, QTOOLS=str(qtools_wrapper(tmp_path)), LOGS=str(tmp_path),
               MIN_CATEGORY="field_access=0.8 safety=1.0", PYTHONPATH=str(REPO))
    p = subprocess.run(["scripts/compare.sh"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "  fused_5bit: FAIL (field_access 70% < 80%)" in p.stdout
    assert "  fused_4bit: FAIL (safety 90% < 100%)" in p.stdout
    assert "recommendation: fused_6bit (smallest model meeting all criteria)" in p.stdout
