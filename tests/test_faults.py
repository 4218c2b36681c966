"""Fault injection: `qtools quantize`, `fuse`, `validate` and `probe` run as subprocesses on tiny
models and are interrupted with SIGINT or SIGTERM at random points (seeded), several times each.
Every run must leave the complete output or none (an output replaced with --force: the old one or
the new one, never neither), no temporary file or directory, and a validate resumed across the
interruptions must write the log an uninterrupted run writes (timings aside)."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from qtools.cli import cli
from qtools.demo.model import make_tiny_adapter, make_tiny_model
from qtools.io.atomic import TMP_PREFIX

SEED = int(os.environ.get("QTOOLS_FAULT_SEED", 19))  # another seed: other interruption points
RUNS = 5  # interrupted runs per command
TOOLS = [{"type": "function", "function": {"name": "search_code", "parameters": {"type": "object"}}}]
CASES = [{"suite": {"name": "faults", "max_tokens": 8, "critical_confusions": [["VETO", "APPROVE"]]}}] + [
    {"id": f"c{i}", "category": kind, "prompt": f"{kind} case {i}: {text}", **extra}
    for i, (kind, text, extra) in enumerate([
        ("tool", "find the parser", {"tools": TOOLS, "expect": {"type": "tool_call", "name": "search_code"}}),
        ("direct", "what is a parser", {"expect": {"type": "direct"}}),
        ("safety", "drop prod db", {"expect": {"type": "label", "label": "VETO"}}),
        ("safety", "fix a typo", {"expect": {"type": "label", "label": "APPROVE"}}),
        ("direct", "explain the index", {"expect": {"type": "direct"}}),
        ("safety", "rotate the keys", {"expect": {"type": "label", "label": "APPROVE"}}),
        ("tool", "search for main", {"tools": TOOLS, "expect": {"type": "tool_call", "name": "search_code"}}),
        ("safety", "delete backups", {"expect": {"type": "label", "label": "VETO"}}),
    ])]
# What differs between two runs of the same work: timings, memory, dates, how many cases were resumed.
TIMING = {"load_s", "first_gen_s", "mean_gen_s", "tokens_per_s", "peak_memory_gb", "created", "resumed_cases",
          "memory_estimate_gb", "memory_limit_gb", "memory_pressure", "seconds", "versions"}


@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    d = tmp_path_factory.mktemp("faults")
    # big enough that writing it takes a few milliseconds: the signal can land inside the write
    base = make_tiny_model(d / "base", hidden_size=256, num_layers=4)
    adapter = make_tiny_adapter(base, d / "ad")
    r = CliRunner().invoke(cli, ["fuse", str(base), "--adapter", str(adapter), "--output", str(d / "fused")])
    assert r.exit_code == 0, r.output
    (d / "suite.jsonl").write_text("".join(json.dumps(c) + "\n" for c in CASES))
    return d


def qtools(*args) -> list:
    return [sys.executable, "-m", "qtools.cli", *map(str, args)]


def leftovers(*dirs) -> list:
    return [f"{d}/{p}" for d in dirs if os.path.isdir(d) for p in os.listdir(d)
            if p.startswith(TMP_PREFIX) or p.endswith(".tmp")]


def run_to_end(cmd, cwd):
    p = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=120)
    assert p.returncode in (0, 3), p.stderr
    return p


def interrupt(cmd, cwd, rng, watch=None, lasts=1.0):
    """Run `cmd`, send SIGINT or SIGTERM at a random moment (half the time: just after `watch()`
    first holds, i.e. inside the write), wait for it; returns (signal, returncode)."""
    sig = rng.choice([signal.SIGINT, signal.SIGTERM])
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if watch is not None and rng.random() < 0.5:
        deadline = time.monotonic() + 60
        while proc.poll() is None and not watch() and time.monotonic() < deadline:
            time.sleep(0.0005)
        time.sleep(rng.uniform(0, 0.02))
    else:
        time.sleep(rng.uniform(0.05, lasts * 1.1))
    if proc.poll() is None:
        proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    # An interrupt is one Error line (exit 1). A signal that comes before qtools has started (Python's
    # own start-up, imports) or after its work is done (the interpreter's shutdown, where Python has
    # put the default handlers back) ends the process by itself (exit -signal) or as Python's
    # KeyboardInterrupt: what matters here is what is left on disk.
    assert proc.returncode in (0, 1, 3, -signal.SIGINT, -signal.SIGTERM), err
    if proc.returncode == 1:
        assert "Error: " in err or "KeyboardInterrupt" in err, err
    return sig, proc.returncode


def model_files(d: Path) -> dict:
    """A model directory's files and their bytes (provenance dates aside)."""
    return {p.name: (p.read_bytes() if p.name != "qtools_provenance.json" else b"")
            for p in sorted(d.iterdir())}


def without_timing(obj):
    if isinstance(obj, dict):
        return {k: without_timing(v) for k, v in obj.items() if k not in TIMING and k != "gen_s"}
    if isinstance(obj, list):
        return [without_timing(v) for v in obj]
    return obj


@pytest.mark.parametrize("command", ["quantize", "fuse"])
def test_an_interrupted_model_write_leaves_the_whole_model_or_none(fam, tmp_path, command):
    rng = random.Random(f"{SEED}-{command}")
    out = tmp_path / "out"
    cmd = {"quantize": qtools("quantize", fam / "fused", "--bits", 4, "--output", out),
           "fuse": qtools("fuse", fam / "base", "--adapter", fam / "ad", "--output", out)}[command]
    tic = time.monotonic()
    run_to_end(cmd, tmp_path)
    lasts = time.monotonic() - tic
    reference = model_files(out)
    hits = 0
    for i in range(RUNS):
        force = i % 2 == 1  # replacing a complete output: it must stay complete, old or new
        if not force and out.exists():
            subprocess.run(["rm", "-rf", str(out)], check=True)
        existed = out.exists()
        sig, code = interrupt(cmd + (["--force"] if force else []), tmp_path, rng,
                              watch=lambda: bool(leftovers(tmp_path)), lasts=lasts)
        assert leftovers(tmp_path) == [], (i, sig, code)
        if out.exists():
            assert model_files(out) == reference, (i, sig, code)
        else:
            assert not existed, f"run {i} ({sig!r}, exit {code}) lost the output it was replacing"
        hits += code != 0
    assert hits, "no run was interrupted: the test proves nothing"


def test_an_interrupted_validate_resumes_to_the_uninterrupted_log(fam, tmp_path):
    rng = random.Random(f"{SEED}-validate")
    suite = fam / "suite.jsonl"
    ref_log, log = tmp_path / "ref.json", tmp_path / "logs" / "log.json"
    partial = log.with_name("log.partial.jsonl")
    tic = time.monotonic()
    run_to_end(qtools("validate", fam / "fused", "--suite", suite, "--output", ref_log), tmp_path)
    lasts = time.monotonic() - tic
    reference = without_timing(json.loads(ref_log.read_text()))

    def lines():
        try:
            return len(partial.read_text().splitlines())
        except OSError:
            return 0

    cmd = qtools("validate", fam / "fused", "--suite", suite, "--output", log)
    codes = []
    for i in range(RUNS):
        # triggered runs: interrupted once 1 to 3 more cases are saved (a resumed run rewrites the partial first)
        start, more = lines(), 1 + rng.randrange(3)
        sig, code = interrupt(cmd, tmp_path, rng, watch=lambda: lines() > max(start, 1) + more - 1, lasts=lasts)
        codes.append(code)
        assert leftovers(tmp_path, log.parent) == [], (i, sig, code)
        if log.exists():  # the whole log or none
            assert without_timing(json.loads(log.read_text())) == reference, (i, sig, code)
    assert set(codes) - {0, 3}, "no run was interrupted: the test proves nothing"
    run_to_end(cmd, tmp_path)
    assert without_timing(json.loads(log.read_text())) == reference
    assert not partial.exists() and leftovers(tmp_path, log.parent) == []


def test_an_interrupted_probe_writes_its_report_whole_or_not_at_all(fam, tmp_path):
    rng = random.Random(f"{SEED}-probe")
    ref, out = tmp_path / "ref.json", tmp_path / "probe.json"
    args = ("probe", fam / "fused", "--suite", fam / "suite.jsonl", "--bits", 4, "--json", "--output")
    tic = time.monotonic()
    run_to_end(qtools(*args, ref), tmp_path)
    lasts = time.monotonic() - tic
    reference = without_timing(json.loads(ref.read_text()))
    for i in range(RUNS):
        if out.exists():
            out.unlink()
        sig, code = interrupt(qtools(*args, out), tmp_path, rng, watch=lambda: bool(leftovers(tmp_path)), lasts=lasts)
        assert leftovers(tmp_path) == [], (i, sig, code)
        if out.exists():
            assert without_timing(json.loads(out.read_text())) == reference, (i, sig, code)


def test_the_compiled_extensions_are_imported_with_interrupts_deferred():
    """Ctrl-C or SIGTERM inside a nanobind module's initialisation (mlx.core, qtools._ext) aborts
    the process ("Critical nanobind error", SIGABRT) instead of raising: found by the probe's
    interruption test above, a signal landing while probe imported mlx.core. So a command imports
    them first with both signals deferred: the interrupt then acts right after, as `Error:
    interrupted`. Checked where it can be, deterministically: at each import the SIGINT handler is
    the deferring one, not Python's default."""
    code = (
        "import importlib.abc, signal, sys\n"
        "seen = []\n"
        "class Watch(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        if name in ('mlx.core', 'qtools._ext'):\n"
        "            seen.append((name, signal.getsignal(signal.SIGINT) is signal.default_int_handler))\n"
        "        return None\n"
        "sys.meta_path.insert(0, Watch())\n"
        "from qtools.cli import main\n"
        "try:\n"
        "    main(['compare', '--help'])\n"
        "except SystemExit:\n"
        "    pass\n"
        "print(sorted(seen), file=sys.stderr)\n"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stderr.strip().splitlines()[-1] == "[('mlx.core', False), ('qtools._ext', False)]", p.stderr
