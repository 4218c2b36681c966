import errno

import pytest

from qtools import QtoolsError
from qtools.io.atomic import TMP_PREFIX, atomic_output_dir


def _leftovers(parent):
    return [p.name for p in parent.iterdir() if p.name.startswith(TMP_PREFIX)]


def test_success_renames_into_place(tmp_path):
    out = tmp_path / "models" / "fused_5bit"
    with atomic_output_dir(out) as tmp:
        assert tmp.parent == out.parent and tmp != out
        (tmp / "config.json").write_text("{}")
        assert not out.exists()
    assert (out / "config.json").read_text() == "{}"
    assert _leftovers(out.parent) == []


def test_existing_output_refused_without_force(tmp_path):
    out = tmp_path / "m"
    out.mkdir()
    with pytest.raises(QtoolsError) as info:
        with atomic_output_dir(out):
            pass
    assert str(out) in str(info.value)
    assert "--force" in str(info.value) and "FORCE=1" in str(info.value)


def test_force_replaces_existing(tmp_path):
    out = tmp_path / "m"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with atomic_output_dir(out, force=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["new.txt"]
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("exc", [RuntimeError("boom"), KeyboardInterrupt()])
def test_failure_leaves_nothing(tmp_path, exc):
    out = tmp_path / "m"
    with pytest.raises(type(exc)):
        with atomic_output_dir(out) as tmp:
            (tmp / "config.json").write_text("{}")
            raise exc
    assert not out.exists()
    assert _leftovers(tmp_path) == []


def test_failure_with_force_keeps_old_output(tmp_path):
    out = tmp_path / "m"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_output_dir(out, force=True):
            raise RuntimeError("boom")
    assert (out / "old.txt").read_text() == "old"


def test_full_disk_is_clean_error(tmp_path):
    out = tmp_path / "m"
    with pytest.raises(QtoolsError, match="no space left on device while writing"):
        with atomic_output_dir(out):
            raise OSError(errno.ENOSPC, "No space left on device")
    assert not out.exists()
    assert _leftovers(tmp_path) == []


def test_sigterm_cleans_up(tmp_path):
    import os
    import signal

    out = tmp_path / "m"
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt):
        with atomic_output_dir(out) as tmp:
            (tmp / "config.json").write_text("{}")
            os.kill(os.getpid(), signal.SIGTERM)
    assert not out.exists() and _leftovers(tmp_path) == []
    assert signal.getsignal(signal.SIGTERM) is before


def test_validate_refuses_leftover_temp_dir(tmp_path):
    from click.testing import CliRunner

    from qtools.cli import cli

    left = tmp_path / f"{TMP_PREFIX}fused_4bit-1-abc"
    left.mkdir()
    (left / "config.json").write_text("{}")
    (left / "model.safetensors").write_bytes(b"")
    r = CliRunner().invoke(cli, ["validate", str(left), "--suite", "suites/coding_agent.jsonl"])
    assert (r.exit_code, r.output.strip()) == (
        1, f"Error: model {left} is an unfinished qtools output (an interrupted write): delete it")


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_a_signal_inside_a_deferred_block_acts_after_it(sig):
    import os
    import signal

    from qtools.io.atomic import signals_deferred, sigterm_interrupts

    done = []
    with pytest.raises(KeyboardInterrupt), sigterm_interrupts():
        with signals_deferred():
            os.kill(os.getpid(), getattr(signal, sig))
            done.append("renamed")  # the block runs to its end
        done.append("after")  # never reached: the signal acts as the block ends
    assert done == ["renamed"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_an_interrupt_between_the_renames_keeps_the_old_output(tmp_path, monkeypatch):
    """Ctrl-C while the old output is moved aside and the new one moved in: the target is never
    left without an output (old or new) and nothing temporary stays."""
    import os
    import signal

    out = tmp_path / "m"
    out.mkdir()
    (out / "old.txt").write_text("old")
    real = os.replace
    calls = []

    def replace(a, b):
        calls.append(b)
        real(a, b)
        if len(calls) == 1:  # just after the old output moved aside
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        with atomic_output_dir(out, force=True) as tmp:
            (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["new.txt"]  # the renames finished first
    assert _leftovers(tmp_path) == []


def test_gzipped_json_records_are_deterministic_and_read_back(tmp_path):
    """A .gz record (the calibration study's per-fine-tune results, kept under version control):
    the same object gives the same bytes, and it reads back; a damaged one reads as None."""
    from qtools.io.atomic import read_json_or_none, write_json_atomic

    obj = {"id": "a/b", "x": [1.5, None, "s"], "n": {"k": 2}}
    a, b = tmp_path / "a.json.gz", tmp_path / "b.json.gz"
    write_json_atomic(a, obj)
    write_json_atomic(b, obj)
    assert a.read_bytes() == b.read_bytes() and a.read_bytes()[:2] == b"\x1f\x8b"
    assert read_json_or_none(a) == obj
    a.write_bytes(a.read_bytes()[:10])
    assert read_json_or_none(a) is None
