"""Shared formatting: sizes, and progress bars that stay off pipes and logs."""

import io
import sys

from click.testing import CliRunner

from qtools.cli import cli
from qtools.demo.model import make_tiny_adapter, make_tiny_model
from qtools.format import human_bytes, progress


def test_human_bytes():
    assert human_bytes(512) == "512 B"
    assert human_bytes(1.5e9) == "1.50 GB"


def test_progress_is_silent_on_a_pipe(monkeypatch):
    err = io.StringIO()  # not a terminal, like a pipe or a 2>file capture
    monkeypatch.setattr(sys, "stderr", err)
    assert list(progress(range(20), "work")) == list(range(20))
    assert err.getvalue() == ""


def test_progress_disabled_returns_the_iterable():
    items = [1, 2, 3]
    assert progress(items, "work", enabled=False) is items


def test_delta_survival_writes_no_bar_into_captured_stderr(tmp_path):
    base, adapter = tmp_path / "base", tmp_path / "adapter"
    make_tiny_model(base, hidden_size=64, num_layers=2, seed=0)  # 15 tensors: a bar would be shown
    make_tiny_adapter(base, adapter, rank=2, scale=1.0, seed=1)
    res = CliRunner().invoke(cli, ["delta-survival", str(base), "--adapter", str(adapter), "--bits", "4"])
    assert res.exit_code == 0, res.output
    assert "\r" not in res.stderr and "tensors:" not in res.stderr, res.stderr
