"""Write failures end in one `Error: ...` line, exit 1 and no half-written output, and what can be
checked before the work starts (a writable output directory, enough free space) is checked first:
quantize, fuse, delta-survival --output, validate's log, and a malformed config.json."""

import builtins
import collections
import errno
import io
import json
import os
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest
from click.testing import CliRunner
from helpers import assert_one_line_unwritable, qtools_wrapper

from qtools.cli import cli
from qtools.io.atomic import TMP_PREFIX

SUITE = [{"id": "a", "category": "x", "prompt": "say hi", "expect": {"type": "regex", "pattern": "^hi"}}]
Usage = collections.namedtuple("Usage", "total used free")


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.fixture
def suite(tmp_path):
    p = tmp_path / "s.jsonl"
    p.write_text("".join(json.dumps(c) + "\n" for c in SUITE))
    return p


def _writable(d):
    probe = d / f"probe-{uuid.uuid4().hex}"
    try:
        probe.write_text("")
    except OSError:
        return False
    probe.unlink()
    return True


@pytest.fixture
def real_readonly(tmp_path):
    """A really read-only directory: mode 0o555, or, as root (who ignores modes), chattr +i."""
    d = tmp_path / "ro"
    d.mkdir()
    os.chmod(d, 0o555)
    immutable = False
    if _writable(d):
        os.chmod(d, 0o755)
        immutable = (shutil.which("chattr") is not None
                     and subprocess.run(["chattr", "+i", str(d)], capture_output=True).returncode == 0)
        if not immutable or _writable(d):
            if immutable:
                subprocess.run(["chattr", "-i", str(d)])
            pytest.skip("cannot make a read-only directory here (root, and no chattr +i on this filesystem)")
    yield d
    if immutable:
        subprocess.run(["chattr", "-i", str(d)])
    os.chmod(d, 0o755)


@pytest.fixture
def simulated_readonly(tmp_path, monkeypatch):
    """A directory whose file system answers EROFS to every new file or directory (runs everywhere)."""
    d = tmp_path / "ro"
    d.mkdir()

    def inside(p):
        try:
            return Path(os.fsdecode(p)).resolve().is_relative_to(d.resolve())
        except (TypeError, ValueError):
            return False

    def guard(real, always=False):
        def wrapper(path, *args, **kwargs):
            mode = args[0] if args else kwargs.get("mode", kwargs.get("flags", "r"))
            writes = (isinstance(mode, int) and mode & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)) or \
                (isinstance(mode, str) and any(c in mode for c in "wax+"))
            if (always or writes) and inside(path):
                raise OSError(errno.EROFS, "Read-only file system", os.fsdecode(path))
            return real(path, *args, **kwargs)
        return wrapper

    monkeypatch.setattr(os, "open", guard(os.open))
    monkeypatch.setattr(os, "mkdir", guard(os.mkdir, always=True))
    monkeypatch.setattr(builtins, "open", guard(builtins.open))
    monkeypatch.setattr(io, "open", guard(io.open))
    return d


@pytest.fixture(params=["real", "simulated"])
def readonly(request):
    return request.getfixturevalue(f"{request.param}_readonly")


@pytest.fixture
def no_load(monkeypatch):
    """Fails the test if a model is loaded: the checks must come before the work."""
    import mlx_lm.utils

    import qtools.pipeline.validate as V

    def refuse(*a, **k):
        raise AssertionError("the model was loaded before the output was checked")

    monkeypatch.setattr(mlx_lm.utils, "load", refuse)
    monkeypatch.setattr(mlx_lm.utils, "load_model", refuse)
    monkeypatch.setattr(V, "load_model", refuse)


def _leftovers(d):
    return [p.name for p in Path(d).iterdir() if p.name.startswith(TMP_PREFIX)] if Path(d).is_dir() else []


# ------------------------------------------------------------------ quantize

@pytest.mark.parametrize("sub", ["q4", "models/q4"])
def test_quantize_into_a_readonly_dir_is_refused_before_loading(base, readonly, no_load, sub):
    out = readonly / sub
    r = run("quantize", base, "--bits", 4, "--output", out)
    assert r.exit_code == 1, r.output
    assert r.output.startswith(f"Error: cannot write {out}: {readonly} is not writable (")
    assert len(r.output.strip().splitlines()) == 1 and "Traceback" not in r.output
    assert os.listdir(readonly) == []


def _failing_save(exc, free=None, monkeypatch=None):
    def save(dst, *args, **kwargs):
        (Path(dst) / "config.json").write_text("{}")
        (Path(dst) / "model.safetensors").write_bytes(b"partial")
        if free is not None:  # the disk fills up while writing
            monkeypatch.setattr(shutil, "disk_usage", lambda p: Usage(10**9, 10**9 - free, free))
        raise exc
    return save


@pytest.mark.parametrize("exc, free, message", [
    (RuntimeError("[write] Unable to write 1048576 bytes to file."), 4096,
     "Error: no space left on device while writing {out}; the partial output was removed"),
    (OSError(errno.ENOSPC, "No space left on device"), None,
     "Error: no space left on device while writing {out}; the partial output was removed"),
    (RuntimeError("[write] Unable to write 1048576 bytes to file."), 10**8,
     "Error: could not write {out}: [write] Unable to write 1048576 bytes to file.; the partial output was removed"),
    (RuntimeError("[save_safetensors] Failed to open file {out}/model.safetensors"), None,
     "Error: could not write {out}: [save_safetensors] Failed to open file {out}/model.safetensors; "
     "the partial output was removed"),
    (OSError(errno.EROFS, "Read-only file system"), None,
     "Error: could not write {out}: Read-only file system; the partial output was removed"),
])
def test_quantize_write_failure_is_one_line_and_leaves_nothing(base, tmp_path, monkeypatch, exc, free, message):
    import qtools.io.mlxsave

    out = tmp_path / "models" / "q4"
    if isinstance(exc, RuntimeError):
        exc = RuntimeError(str(exc).format(out=out))
    monkeypatch.setattr(qtools.io.mlxsave, "write_weights", _failing_save(exc, free, monkeypatch))  # the streamed save
    r = run("quantize", base, "--bits", 4, "--output", out)
    assert len(r.output.strip().splitlines()) == 1, r.output
    assert (r.exit_code, r.output.strip().splitlines()[-1]) == (1, message.format(out=out))
    assert "Traceback" not in r.output
    assert not out.exists() and _leftovers(out.parent) == []


def test_quantize_checks_free_space_first(base, tmp_path, monkeypatch, no_load):
    monkeypatch.setattr(shutil, "disk_usage", lambda p: Usage(10**9, 10**9 - 5000, 5000))
    out = tmp_path / "q4"
    r = run("quantize", base, "--bits", 4, "--output", out)
    assert r.exit_code == 1
    assert r.output.startswith(f"Error: not enough free space for {out}: it needs about ")
    assert r.output.strip().endswith(f"{tmp_path} has 5.00 KB free")
    assert not out.exists()


def test_quantize_malformed_config_is_one_line(base, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(base, bad)
    (bad / "config.json").write_text('{"model_type": "qwen3",')
    r = run("quantize", bad, "--bits", 4, "--output", tmp_path / "q4")
    assert r.exit_code == 1
    assert r.output.strip() == (f"Error: {bad / 'config.json'} is not valid JSON "
                                "(Expecting property name enclosed in double quotes: line 1 column 24 (char 23))")
    (bad / "config.json").write_text("[1, 2]")
    r = run("quantize", bad, "--bits", 4, "--output", tmp_path / "q4")
    assert (r.exit_code, r.output.strip()) == (1, f"Error: {bad / 'config.json'} is not a JSON object")


def test_make_quantize_malformed_config_is_one_line(base, tmp_path):
    """The same through scripts/quantize.sh, as `make quantize` runs it."""

    repo = Path(__file__).resolve().parents[1]
    bad = tmp_path / "bad"
    shutil.copytree(base, bad)
    (bad / "config.json").write_text("{oops")
    env = dict(os.environ, QTOOLS=str(qtools_wrapper(tmp_path)), PYTHONPATH=str(repo), FROM=str(bad), BITS="4", OUT=str(tmp_path / "q"))
    p = subprocess.run(["scripts/quantize.sh"], cwd=repo, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 1
    assert p.stderr.strip().splitlines() == [f"Error: {bad / 'config.json'} is not valid JSON "
                                             "(Expecting property name enclosed in double quotes: line 1 column 2 (char 1))"]


# ------------------------------------------------------------------ fuse

@pytest.mark.parametrize("sub", ["fused", "models/fused"])
def test_fuse_into_a_readonly_dir_is_refused_before_loading(base, adapter, readonly, no_load, sub):
    out = readonly / sub
    r = run("fuse", base, "--adapter", adapter, "--output", out)
    assert_one_line_unwritable(r, out, readonly)


def test_fuse_disk_full_is_one_line_and_leaves_nothing(base, adapter, tmp_path, monkeypatch):
    """The disk fills up after the streamed fuse has written part of a shard."""
    from qtools.io.shards import SafetensorsWriter

    out = tmp_path / "models" / "fused"
    write = SafetensorsWriter.write
    calls = []

    def full(self, name, data):
        calls.append(name)
        if len(calls) > 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        write(self, name, data)

    monkeypatch.setattr(SafetensorsWriter, "write", full)
    r = run("fuse", base, "--adapter", adapter, "--output", out)
    assert (r.exit_code, r.output.strip()) == (
        1, f"Error: no space left on device while writing {out}; the partial output was removed")
    assert not out.exists() and _leftovers(out.parent) == []


def test_fuse_checks_free_space_first(base, adapter, tmp_path, monkeypatch, no_load):
    monkeypatch.setattr(shutil, "disk_usage", lambda p: Usage(10**9, 10**9 - 100, 100))
    out = tmp_path / "fused"
    r = run("fuse", base, "--adapter", adapter, "--output", out)
    assert r.exit_code == 1 and r.output.startswith(f"Error: not enough free space for {out}: it needs about ")
    assert not out.exists()


def test_fuse_free_space_estimate_counts_a_dequantized_base(base, tmp_path):
    """A 4-bit base fused to float16 writes about 16/4.5 times its own size."""
    from qtools.pipeline.fuse import output_bytes_estimate

    q4 = tmp_path / "q4"
    assert run("quantize", base, "--bits", 4, "--output", q4).exit_code == 0
    weights = sum(p.stat().st_size for p in base.glob("*.safetensors"))
    other = sum(p.stat().st_size for p in base.iterdir()) - weights  # tokenizer files, config
    assert abs(output_bytes_estimate(base, "float16") - (weights + other)) < 0.01 * weights
    q4_other = sum(p.stat().st_size for p in q4.iterdir() if p.suffix != ".safetensors")
    assert abs(output_bytes_estimate(q4, "float16") - (weights + q4_other)) < 0.01 * weights
    assert abs(output_bytes_estimate(base, "float32") - (2 * weights + other)) < 0.02 * weights


# ------------------------------------------------------------------ delta-survival --output

@pytest.mark.parametrize("sub", ["survival.json", "logs/survival.json"])
def test_survival_output_in_a_readonly_dir_is_refused_before_the_analysis(base, adapter, readonly, monkeypatch, sub):
    import qtools.commands.survival as S

    monkeypatch.setattr(S, "delta_survival", lambda *a, **k: pytest.fail("analysed before checking --output"))
    out = readonly / sub
    r = run("delta-survival", base, "--adapter", adapter, "--output", out)
    assert_one_line_unwritable(r, out, readonly)


def test_survival_output_full_disk_is_one_line(base, adapter, tmp_path, monkeypatch):
    out = tmp_path / "survival.json"
    real = Path.write_text

    def full(self, *a, **k):
        if self.parent == tmp_path:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, *a, **k)

    monkeypatch.setattr(Path, "write_text", full)
    r = run("delta-survival", base, "--adapter", adapter, "--output", out, "--json")
    assert (r.exit_code, r.output.strip().splitlines()[-1]) == (1, f"Error: cannot write {out}: No space left on device")
    assert os.listdir(tmp_path) == []


# ------------------------------------------------------------------ validate's log

@pytest.mark.parametrize("where", ["logs-dir", "logs-subdir", "out"])
def test_validate_readonly_log_dir_is_refused_before_loading(base, suite, readonly, no_load, where):
    args = {"logs-dir": ["--logs-dir", readonly], "logs-subdir": ["--logs-dir", readonly / "logs"],
            "out": ["--output", readonly / "x.json"]}[where]
    r = run("validate", base, "--suite", suite, *args)
    assert r.exit_code == 1, r.output
    log = readonly / "x.json" if where == "out" else Path(args[1]) / "base-s.json"
    assert r.output.startswith(f"Error: cannot write {log}: {readonly} is not writable (")
    assert len(r.output.strip().splitlines()) == 1


def test_validate_env_LOGS_readonly(base, suite, readonly, no_load, monkeypatch):
    monkeypatch.setenv("LOGS", str(readonly))
    r = run("validate", base, "--suite", suite)
    assert r.exit_code == 1 and r.output.startswith(f"Error: cannot write {readonly / 'base-s.json'}: ")


def test_validate_log_that_is_a_directory_is_refused_before_loading(base, suite, tmp_path, no_load):
    (tmp_path / "log.json").mkdir()
    r = run("validate", base, "--suite", suite, "--output", tmp_path / "log.json")
    assert (r.exit_code, r.output.strip()) == (1, f"Error: cannot write {tmp_path / 'log.json'}: it is a directory")


# ------------------------------------------------------------------ retention's logs and cache

@pytest.fixture
def no_retention_load(monkeypatch):
    import qtools.pipeline.retention as RT

    def refuse(*a, **k):
        raise AssertionError("a model was run before retention's logs directory was checked")

    monkeypatch.setattr(RT, "_load", refuse)


@pytest.mark.parametrize("where", ["logs-dir", "logs-subdir", "cache"])
def test_retention_readonly_logs_dir_is_refused_before_the_work(base, adapter, suite, tmp_path, readonly,
                                                                 no_retention_load, where):
    args = {"logs-dir": ["--logs-dir", readonly], "logs-subdir": ["--logs-dir", readonly / "logs"],
            "cache": ["--logs-dir", tmp_path / "logs", "--cache", readonly / "c.npz"]}[where]
    r = run("retention", base, "--reference", base, "--base", base, "--suite", suite, *args)
    assert r.exit_code == 1, r.output
    written = readonly / "c.npz" if where == "cache" else Path(args[1]) / "retention-base.json"
    assert r.output.startswith(f"Error: cannot write {written}: {readonly} is not writable (")
    assert len(r.output.strip().splitlines()) == 1 and _leftovers(readonly) == []


def test_retention_logs_dir_that_is_a_file_is_refused_before_the_work(base, suite, tmp_path, no_retention_load):
    (tmp_path / "logs").write_text("")
    r = run("retention", base, "--reference", base, "--base", base, "--suite", suite, "--logs-dir", tmp_path / "logs")
    assert (r.exit_code, r.output.strip()) == (
        1, f"Error: cannot write {tmp_path / 'logs' / 'retention-base.json'}: {tmp_path / 'logs'} is not a directory")


def test_an_atomic_write_under_a_file_is_one_error(tmp_path):
    # the cleanup of a write that never started must not raise a second time (FileExistsError, NotADirectoryError)
    from qtools import QtoolsError
    from qtools.io.atomic import write_json_atomic

    (tmp_path / "f").write_text("")
    with pytest.raises(QtoolsError, match=f"cannot write {tmp_path / 'f' / 'x.json'}: "):
        write_json_atomic(tmp_path / "f" / "x.json", {})
    assert os.listdir(tmp_path) == ["f"]
