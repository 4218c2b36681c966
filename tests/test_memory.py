"""Memory estimate vs the device limit: the warning, its threshold, and the validate log fields."""

import json

import pytest

import qtools.pipeline.memory as M
from qtools.demo.model import make_tiny_model


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("m") / "tiny")


def test_estimate_counts_weights_kv_and_margin(model):
    est = M.estimate_bytes(model, context_tokens=1000)
    w = (model / "model.safetensors").stat().st_size
    cfg = json.loads((model / "config.json").read_text())
    kv = 2 * cfg["num_hidden_layers"] * cfg["num_key_value_heads"] * cfg["head_dim"] * 1000 * 2
    assert est["weights"] == w and est["kv_cache"] == kv
    assert est["total"] == w + kv + int(0.05 * w)


def test_warns_above_85_percent(model, monkeypatch, capsys):
    need = M.estimate_bytes(model)["total"]
    monkeypatch.setattr(M, "device_limit", lambda: (int(need / 0.92), "test limit"))
    r = M.check_memory(model)
    err = capsys.readouterr().err
    assert r["memory_warning"] and r["memory_pressure"] == pytest.approx(0.92, abs=1e-3)
    assert "92%" in err and "smaller bit-width" in err and "close other apps" in err


def test_silent_below_85_percent(model, monkeypatch, capsys):
    need = M.estimate_bytes(model)["total"]
    monkeypatch.setattr(M, "device_limit", lambda: (int(need / 0.80), "test limit"))
    r = M.check_memory(model)
    assert not r["memory_warning"] and capsys.readouterr().err == ""
    monkeypatch.setattr(M, "device_limit", lambda: (None, "unknown"))
    r = M.check_memory(model)
    assert r["memory_pressure"] is None and not r["memory_warning"]


def _no_mlx_limit(monkeypatch):
    """MLX reports no recommended working set (as on Linux), whatever machine runs the test."""
    import mlx.core as mx

    monkeypatch.setattr(mx, "device_info", lambda: {}, raising=False)
    monkeypatch.setattr(mx.metal, "is_available", lambda: False)


def test_device_limit_falls_back_to_system_memory(monkeypatch):
    import os

    _no_mlx_limit(monkeypatch)
    assert M.device_limit() == (os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "system memory")


@pytest.mark.skipif(M._meminfo_total() is None, reason="needs /proc/meminfo")
def test_device_limit_falls_back_to_proc_meminfo(monkeypatch):
    import os

    _no_mlx_limit(monkeypatch)

    def no_sysconf(name):
        raise ValueError(name)

    monkeypatch.setattr(os, "sysconf", no_sysconf)
    assert M.device_limit() == (M._meminfo_total(), "system memory (/proc/meminfo)")
    monkeypatch.setattr(M, "_meminfo_total", lambda: None)
    assert M.device_limit() == (None, "unknown")


def test_validate_logs_memory_and_warns_before_loading(model, tmp_path, monkeypatch):
    from click.testing import CliRunner

    from qtools.cli import cli

    suite = tmp_path / "s.jsonl"
    suite.write_text(json.dumps({"suite": {"name": "s", "max_tokens": 2}}) + "\n"
                     + json.dumps({"id": "a", "category": "c", "prompt": "hi", "expect": {"type": "direct"}}) + "\n")
    monkeypatch.setattr(M, "device_limit", lambda: (1000, "test limit"))
    out = tmp_path / "log.json"
    # --min-accuracy 0 and no critical case: the verdict passes whatever the tiny model answers
    r = CliRunner().invoke(cli, ["validate", str(model), "--suite", str(suite), "--output", str(out),
                                 "--min-accuracy", "0"])
    assert r.exit_code == 0, r.output
    log = json.loads(out.read_text())
    assert log["memory_limit_gb"] == pytest.approx(1e-6)
    assert log["memory_pressure"] > 1 and log["memory_estimate_gb"] > 0
    assert "warning:" in r.output  # CliRunner mixes stderr into output


def test_validate_refuses_a_model_larger_than_the_machine_before_loading(model, tmp_path, monkeypatch):
    """Above the device's total memory the model would swap for hours: an error, nothing loaded."""
    from click.testing import CliRunner

    import qtools.pipeline.validate as V
    from qtools.cli import cli

    def refuse(*a, **k):
        raise AssertionError("the model was loaded")

    suite = tmp_path / "s.jsonl"
    suite.write_text(json.dumps({"id": "a", "category": "c", "prompt": "hi", "expect": {"type": "direct"}}) + "\n")
    monkeypatch.setattr(V, "load_model", refuse)
    monkeypatch.setattr(M, "device_total", lambda: (1000, "test total"))
    out = tmp_path / "log.json"
    r = CliRunner().invoke(cli, ["validate", str(model), "--suite", str(suite), "--output", str(out)])
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert r.output.strip().splitlines()[-1].startswith(f"Error: model {model} (weights ")
    assert "more than the 0.0 GB this machine has (test total): it would swap for hours" in r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.jsonl"]  # no log, no partial log


def test_check_memory_refuses_above_the_total_and_warns_near_the_working_set(model, monkeypatch, capsys):
    need = M.estimate_bytes(model)["total"]
    monkeypatch.setattr(M, "device_limit", lambda: (int(need / 0.9), "working set"))
    monkeypatch.setattr(M, "device_total", lambda: (int(need / 0.7), "total"))
    assert M.check_memory(model)["memory_warning"] and "warning:" in capsys.readouterr().err
    monkeypatch.setattr(M, "device_total", lambda: (need - 1, "total"))
    with pytest.raises(M.QtoolsError, match="it would swap for hours"):
        M.check_memory(model)
    assert not M.check_memory(model, refuse=False)["memory_pressure"] is None


def test_device_total_is_mlx_memory_size_else_system_memory(monkeypatch):
    import os

    import mlx.core as mx

    monkeypatch.setattr(mx, "device_info", lambda: {"memory_size": 32 << 30}, raising=False)
    assert M.device_total() == (32 << 30, "MLX memory_size")
    _no_mlx_limit(monkeypatch)
    assert M.device_total() == (os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "system memory")
