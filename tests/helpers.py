"""Helpers several test modules share (pytest puts tests/ on sys.path)."""

import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def qtools_wrapper(tmp_path) -> Path:
    """An executable `qtools` running this checkout's CLI with the tests' Python, for the scripts/."""
    w = tmp_path / "qtools"
    w.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m qtools.cli "$@"\n')
    os.chmod(w, 0o755)
    return w


def assert_one_line_unwritable(r, out, readonly):
    """The command refused an output in a read-only directory with one Error line, exit 1."""
    assert r.exit_code == 1, r.output
    assert r.output.startswith(f"Error: cannot write {out}: {readonly} is not writable (")
    assert len(r.output.strip().splitlines()) == 1


def write_logs(tmp_path, specs, suite: str) -> list:
    """Validation logs, one file per spec, named as validate names them (<model>-<suite>.json)."""
    paths = []
    for spec in specs:
        p = tmp_path / f"{spec['model']}-{suite}.json"
        p.write_text(json.dumps(spec))
        paths.append(p)
    return paths


def fused_trio(d: Path, keys=("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj"), rank: int = 4):
    """A tiny float16 base, a LoRA adapter on `keys`, and the model `qtools fuse` made of them."""
    from click.testing import CliRunner

    from qtools.cli import cli
    from qtools.demo.model import make_tiny_adapter, make_tiny_model

    base = make_tiny_model(d / "base")
    adapter = make_tiny_adapter(base, d / "adapter", keys=list(keys), rank=rank)
    fused = d / "fused"
    r = CliRunner().invoke(cli, ["fuse", str(base), "--adapter", str(adapter), "--output", str(fused)])
    assert r.exit_code == 0, r.output
    return base, adapter, fused
