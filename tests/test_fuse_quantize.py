"""fuse and quantize on tiny generated models: numerics, provenance, bad input, atomic writes."""

import errno
import json

import mlx.core as mx
import pytest
from click.testing import CliRunner
from helpers import qtools_wrapper

from qtools.cli import cli
from qtools.demo.model import make_tiny_adapter, make_tiny_model
from qtools.io.atomic import TMP_PREFIX

Q = "model.layers.1.self_attn.q_proj"


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("base") / "base")


@pytest.fixture(scope="module")
def adapter(base, tmp_path_factory):
    return make_tiny_adapter(base, tmp_path_factory.mktemp("ad") / "ad", scale=2.0)


@pytest.fixture(scope="module")
def fused(base, adapter, tmp_path_factory):
    out = tmp_path_factory.mktemp("fused") / "fused_f16"
    r = CliRunner().invoke(cli, ["fuse", str(base), "--adapter", str(adapter), "--output", str(out)])
    assert r.exit_code == 0, r.output
    return out


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def weights(path):
    name = "adapters.safetensors" if (path / "adapters.safetensors").exists() else "model.safetensors"
    return mx.load(str(path / name))


def expected_fused(w, adapter, name, scale=2.0):
    ad = weights(adapter)
    a, b = ad[f"{name}.lora_a"].astype(mx.float32), ad[f"{name}.lora_b"].astype(mx.float32)
    return (w.astype(mx.float32) + (scale * b.T) @ a.T).astype(mx.float16)


def test_fuse_is_float32_math_saved_float16(base, adapter, fused):
    got = weights(fused)[f"{Q}.weight"]
    assert got.dtype == mx.float16
    want = expected_fused(weights(base)[f"{Q}.weight"], adapter, Q)
    assert mx.array_equal(got, want).item()
    # Untouched layers are carried over bit for bit.
    k = "model.layers.0.mlp.down_proj.weight"
    assert mx.array_equal(weights(fused)[k], weights(base)[k]).item()


def test_fuse_provenance(base, adapter, fused):
    prov = json.loads((fused / "qtools_provenance.json").read_text())
    assert prov["base"] == str(base.resolve()) and prov["adapter"] == str(adapter.resolve())
    assert (prov["scale"], prov["rank"], prov["dtype"], prov["fuse_dtype"]) == (2.0, 4, "float16", "float32")
    assert f"{Q}" in prov["fused_modules"]
    cfg = json.loads((fused / "config.json").read_text())
    assert "quantization" not in cfg


def test_fuse_dequantizes_quantized_base(base, adapter, tmp_path):
    q4 = tmp_path / "base_4bit"
    assert run("quantize", base, "--bits", 4, "--output", q4).exit_code == 0
    out = tmp_path / "fused"
    r = run("fuse", q4, "--adapter", adapter, "--output", out)
    assert r.exit_code == 0, r.output
    assert "base dequantized" in r.output
    assert "quantization" not in json.loads((out / "config.json").read_text())
    wq = weights(q4)
    deq = mx.dequantize(wq[f"{Q}.weight"], wq[f"{Q}.scales"], wq[f"{Q}.biases"], group_size=64, bits=4)
    assert mx.array_equal(weights(out)[f"{Q}.weight"], expected_fused(deq, adapter, Q)).item()
    assert weights(out)["model.layers.0.mlp.down_proj.weight"].dtype == mx.float16


def test_fuse_dora(base, tmp_path):
    ad = make_tiny_adapter(base, tmp_path / "dora", dora=True, scale=2.0)
    out = tmp_path / "fused"
    r = run("fuse", base, "--adapter", ad, "--output", out, "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["fine_tune_type"] == "dora"
    a = weights(ad)
    w = weights(base)[f"{Q}.weight"].astype(mx.float32)
    w = w + (2.0 * a[f"{Q}.lora_b"].T) @ a[f"{Q}.lora_a"].T
    want = ((a[f"{Q}.m"] / mx.linalg.norm(w, axis=1))[:, None] * w).astype(mx.float16)
    assert mx.allclose(weights(out)[f"{Q}.weight"].astype(mx.float32), want.astype(mx.float32), atol=1e-3).item()


def test_fuse_adapter_for_another_model(adapter, tmp_path):
    other = make_tiny_model(tmp_path / "other", hidden_size=32)
    r = run("fuse", other, "--adapter", adapter, "--output", tmp_path / "x")
    assert r.exit_code == 1
    assert r.output.startswith(f"Error: adapter {adapter} does not match base model {other}: ")
    assert "does not match model parameter shape" in r.output
    assert "Traceback" not in r.output and not (tmp_path / "x").exists()


def test_fuse_bad_inputs(base, adapter, tmp_path):
    (tmp_path / "noconf").mkdir()
    noweights = tmp_path / "noweights"
    noweights.mkdir()
    (noweights / "config.json").write_text("{}")
    cases = [
        ([tmp_path / "nope", "--adapter", adapter], f"Error: base model {tmp_path / 'nope'} does not exist"),
        ([tmp_path / "noconf", "--adapter", adapter],
         f"Error: base model {tmp_path / 'noconf'} has no config.json (not an mlx-lm model directory)"),
        ([noweights, "--adapter", adapter], f"Error: base model {noweights} has no weights (*.safetensors)"),
        ([base, "--adapter", tmp_path / "noconf"], f"Error: adapter {tmp_path / 'noconf'} has no adapter_config.json"),
    ]
    for args, message in cases:
        r = run("fuse", *args, "--output", tmp_path / "o")
        assert (r.exit_code, r.output.strip()) == (1, message)


def test_fuse_refuses_existing_output(base, adapter, fused):
    r = run("fuse", base, "--adapter", adapter, "--output", fused)
    assert r.exit_code == 1
    assert r.output.strip() == f"Error: {fused} already exists; pass --force (make: FORCE=1) to overwrite it"


def test_quantize_reports_and_loads(fused, tmp_path):
    out = tmp_path / "fused_4bit"
    r = run("quantize", fused, "--bits", 4, "--group-size", 64, "--output", out, "--json")
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    assert rep["bits"] == 4 and rep["group_size"] == 64
    assert 4.4 < rep["bits_per_weight"] < 4.7
    assert 0 < rep["disk_bytes"] < rep["source_disk_bytes"]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization"]["bits"] == 4 and cfg["quantization"]["group_size"] == 64
    prov = json.loads((out / "qtools_provenance.json").read_text())
    assert prov["kind"] == "quantized" and prov["bits"] == 4 and prov["adapter"]
    # bit-exact with mx.quantize on the fused float16 weight
    wq, wf = weights(out), weights(fused)[f"{Q}.weight"]
    ref = mx.quantize(wf, group_size=64, bits=4)
    assert mx.array_equal(wq[f"{Q}.weight"], ref[0]).item()
    r = run("quantize", out, "--bits", 4, "--output", tmp_path / "again")
    assert r.exit_code == 1
    assert "is already quantized (4-bit); quantize the float16 fused model instead" in r.output


def test_quantize_layer_bits_and_recipe(fused, tmp_path):
    from mlx_lm import load

    lb = tmp_path / "layers.json"
    lb.write_text(json.dumps({"model.layers.0.mlp.down_proj": 8, "model.layers.1.mlp.down_proj": 0}))
    out = tmp_path / "mixed"
    r = run("quantize", fused, "--bits", 3, "--layer-bits", lb, "--output", out)
    assert r.exit_code == 0, r.output
    model, _ = load(str(out))
    assert model.model.layers[0].mlp.down_proj.bits == 8
    assert not hasattr(model.model.layers[1].mlp.down_proj, "bits")
    assert model.model.layers[0].mlp.up_proj.bits == 3
    lb.write_text(json.dumps({"model.layers.0.mlp.down_proj": 7}))
    r = run("quantize", fused, "--bits", 3, "--layer-bits", lb, "--output", tmp_path / "bad")
    assert (r.exit_code, r.output.strip()) == (
        1, "Error: layer model.layers.0.mlp.down_proj: bits=7 is not supported (use one of 2 3 4 5 6 8 or 0 to keep float)")
    assert not (tmp_path / "bad").exists()
    lb.write_text(json.dumps({"model.layers.9.mlp.down_proj": 8}))
    r = run("quantize", fused, "--bits", 3, "--layer-bits", lb, "--output", tmp_path / "bad")
    assert r.exit_code == 1 and "layers the model does not have: model.layers.9.mlp.down_proj" in r.output
    r = run("quantize", fused, "--recipe", "mixed_4_6", "--output", tmp_path / "m46", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["bits"] == 4


def test_quantize_bad_bits_is_one_error_line(fused, tmp_path):
    # a usage error (exit 2) as delta-survival's and probe's: one Error line naming what MLX supports, nothing written
    r = run("quantize", fused, "--bits", 7, "--output", tmp_path / "q")
    assert r.exit_code == 2 and r.output.endswith(
        "\nError: Invalid value for '--bits': unsupported bits 7: MLX affine quantization supports 2, 3, 4, 5, 6, 8\n")
    assert not (tmp_path / "q").exists()
    r = run("quantize", fused, "--group-size", 48, "--output", tmp_path / "q")
    assert r.exit_code == 2 and r.output.endswith(
        "\nError: Invalid value for '--group-size': unsupported group size 48: MLX supports 16, 32, 64, 128\n")


def _partial_save(exc):
    def save(dst, *args, **kwargs):
        (dst / "config.json").write_text("{}")
        (dst / "model.safetensors").write_bytes(b"partial")
        raise exc
    return save


@pytest.mark.parametrize("exc, message", [
    (KeyboardInterrupt(), "Error: interrupted"),
    (OSError(errno.ENOSPC, "No space left on device"), "Error: no space left on device while writing {out}; the partial output was removed"),
])
def test_interrupted_or_full_disk_quantize_leaves_nothing(fused, tmp_path, monkeypatch, exc, message):
    import qtools.io.mlxsave

    monkeypatch.setattr(qtools.io.mlxsave, "write_weights", _partial_save(exc))  # quantize's streamed save
    out = tmp_path / "models" / "fused_4bit"
    r = run("quantize", fused, "--bits", 4, "--output", out)
    assert r.exit_code == 1
    assert r.output.strip().splitlines()[-1] == message.format(out=out)
    assert not out.exists()
    assert [p for p in out.parent.iterdir() if p.name.startswith(TMP_PREFIX)] == []
    # and validate refuses the missing directory cleanly
    r = run("validate", out, "--suite", "suites/coding_agent.jsonl")
    assert (r.exit_code, r.output.strip()) == (1, f"Error: model {out} does not exist")


def test_sweep_script_continues_past_failed_verdict(fused, tmp_path):
    import os
    import subprocess
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    suite = tmp_path / "s.jsonl"
    suite.write_text(json.dumps({"id": "x", "prompt": "hi", "expect": {"type": "regex", "pattern": "^IMPOSSIBLE$"}}) + "\n")
    env = dict(os.environ, QTOOLS=str(qtools_wrapper(tmp_path)), FROM=str(fused), BITS="8",
               PREFIX=str(tmp_path / "fused"), LOGS=str(tmp_path / "logs"), SUITE=str(suite), MAX_TOKENS="2",
               PYTHONPATH=str(repo))
    p = subprocess.run(["scripts/sweep.sh"], cwd=repo, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert sorted(f.name for f in (tmp_path / "logs").iterdir()) == ["fused_8bit-s.json", "fused_f16-s.json"]
    assert f"failed verdicts: {fused} {tmp_path / 'fused_8bit'}" in p.stdout
    p = subprocess.run(["scripts/sweep.sh"], cwd=repo, env=env, capture_output=True, text=True, timeout=120)
    assert f"== reusing {tmp_path / 'fused_8bit'}" in p.stdout


def test_make_checks_model_and_bits():
    import subprocess
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    p = subprocess.run(["make", "validate"], cwd=repo, capture_output=True, text=True)
    assert p.returncode == 2 and "MODEL is required: make validate MODEL=models/fused_5bit" in p.stderr
    p = subprocess.run(["make", "quantize", "BITS=7"], cwd=repo, capture_output=True, text=True)
    assert p.returncode == 2 and "BITS=7 is not supported: use one of 2 3 4 5 6 8" in p.stderr


def test_recipes_script_resumes_from_its_logs(fused, base, tmp_path):
    """make recipes keeps a validation or retention log newer than its model and the suite: a run
    cut short, or one that adds a recipe, measures only what is missing; a recipe dropped from
    SPECS leaves the comparison; FORCE=1 measures everything again."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    suite = tmp_path / "s.jsonl"
    suite.write_text(json.dumps({"id": "x", "prompt": "hi", "expect": {"type": "regex", "pattern": "^IMPOSSIBLE$"}}) + "\n")
    logs = tmp_path / "logs" / "recipes"
    env = dict(os.environ, QTOOLS=str(qtools_wrapper(tmp_path)), PY=sys.executable, PYTHON=sys.executable,
               FROM=str(fused), BASE=str(base), PREFIX=str(tmp_path / "fused"), LOGS=str(tmp_path / "logs"),
               SUITE=str(suite), MAX_TOKENS="2", PYTHONPATH=str(repo), SPECS="uniform:8")

    def recipes(**extra):
        p = subprocess.run(["scripts/recipes.sh"], cwd=repo, env={**env, **extra}, capture_output=True, text=True,
                           timeout=300)
        assert p.returncode in (0, 3), p.stdout + p.stderr  # compare fails: nothing passes this suite
        return p.stdout

    out = recipes()
    assert out.count("== validate ") == 2 and "== retention of 2 model(s)" in out
    logs_before = {p.name: p.stat().st_mtime_ns for p in logs.glob("*.json")}
    assert set(logs_before) == {"fused_f16-s.json", "fused_8bit-s.json", "retention-fused_f16.json",
                                "retention-fused_8bit.json"}
    out = recipes()
    assert "== validate " not in out and out.count("== validated ") == 2 and "== retention" not in out
    assert {p.name: p.stat().st_mtime_ns for p in logs.glob("*.json")} == logs_before
    out = recipes(SPECS="uniform:8 uniform:4")
    assert out.count("== validate ") == 1 and f"== validate {tmp_path / 'fused_4bit'}" in out
    assert "== retention of 1 model(s)" in out
    recipes(SPECS="uniform:4")
    assert not (logs / "fused_8bit-s.json").exists() and not (logs / "retention-fused_8bit.json").exists()
    out = recipes(SPECS="uniform:4", FORCE="1")
    assert out.count("== validate ") == 2 and "== retention of 2 model(s)" in out
    # the per-recipe table shows each model's logit retention
    ret = json.loads((logs / "retention-fused_4bit.json").read_text())["logit_retention"]
    row = next(line for line in out.splitlines() if line.startswith("fused_4bit "))
    assert f" {ret:.3f} " in row, row
