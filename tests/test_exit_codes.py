"""Exit codes a script can act on: 0 pass, 3 the verdict failed (a result), 1 error, 2 usage error."""

import json
import os
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner
from helpers import qtools_wrapper

import qtools
import qtools.pipeline.validate as V
from qtools.cli import COMMANDS, cli
from qtools.demo.model import make_tiny_model

REPO = Path(__file__).resolve().parents[1]
SUITE = [{"id": "a", "category": "x", "prompt": "say hi", "expect": {"type": "regex", "pattern": "^hi"}},
         {"id": "b", "category": "x", "prompt": "say yo", "expect": {"type": "regex", "pattern": "^yo"}}]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("ec") / "tiny")


@pytest.fixture
def suite(tmp_path):
    p = tmp_path / "s.jsonl"
    p.write_text("".join(json.dumps(c) + "\n" for c in SUITE))
    return p


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def test_codes_are_named():
    assert (qtools.EXIT_ERROR, qtools.EXIT_USAGE, qtools.EXIT_VERDICT_FAILED) == (1, 2, 3)


@pytest.mark.parametrize("answer, code", [("hi", 0), ("no", 3)])
def test_validate_verdict(model, suite, tmp_path, monkeypatch, answer, code):
    monkeypatch.setattr(V, "generate_one", lambda m, t, p, n: (answer, 1, 0.01))
    r = run("validate", model, "--suite", suite, "--output", tmp_path / "l.json", "--min-accuracy", 0.5)
    assert r.exit_code == code, r.output
    assert json.loads((tmp_path / "l.json").read_text())["verdict"] == ("pass" if code == 0 else "fail")
    assert "Error" not in r.output


def test_validate_error_and_usage_codes(model, suite, tmp_path):
    r = run("validate", tmp_path / "nope", "--suite", suite)
    assert (r.exit_code, r.output.strip()) == (1, f"Error: model {tmp_path / 'nope'} does not exist")
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{oops\n")
    r = run("validate", model, "--suite", bad)
    assert r.exit_code == 1 and r.output.startswith(f"Error: {bad}")
    r = run("validate", model, "--suite", suite, "--min-accuracy", 2)
    assert r.exit_code == 2 and "Invalid value for '--min-accuracy'" in r.output


def test_validate_help_documents_the_codes():
    text = " ".join(run("validate", "--help").output.split())
    assert "Exit status: 0 the verdict passed, 3 it failed, 1 an error (bad input: nothing was judged), " \
           "2 a usage error." in text


def test_every_command_reports_bad_input_as_exit_1(tmp_path):
    missing = tmp_path / "missing"
    (tmp_path / "a_file").write_text("")
    calls = {
        "delta-survival": ["delta-survival", missing],
        "quant-error": ["quant-error", missing],
        "fuse": ["fuse", missing, "--adapter", missing, "--output", tmp_path / "o"],
        "quantize": ["quantize", missing, "--output", tmp_path / "o"],
        "validate": ["validate", missing],
        "probe": ["probe", missing],
        "compare": ["compare", missing / "x.json"],
        "retention": ["retention", missing, "--reference", missing, "--base", missing, "--cache", tmp_path / "c.npz",
                      "--logs-dir", tmp_path],
        "demo-models": ["demo-models", "--output", tmp_path / "a_file" / "models", "--suite", ""],
        "calibrate": ["calibrate", "--suite", missing, "--work-dir", tmp_path / "w", "--docs-dir", tmp_path / "d"],
    }
    assert set(calls) == set(COMMANDS)
    for name, args in calls.items():
        r = run(*args)
        assert r.exit_code == 1, (name, r.output)
        assert r.output.strip().splitlines()[-1].startswith("Error: "), (name, r.output)
        assert "Traceback" not in r.output, name


def _env(tmp_path, **extra):
    return dict(os.environ, QTOOLS=str(qtools_wrapper(tmp_path)), PYTHONPATH=str(REPO), LOGS=str(tmp_path / "logs"), MAX_TOKENS="2",
                **extra)


def test_validate_script_passes_the_codes_through(model, suite, tmp_path):
    env = _env(tmp_path, MODEL=str(model), SUITE=str(suite))
    p = subprocess.run(["scripts/validate.sh"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 3, p.stderr  # a random tiny model answers neither "hi" nor "yo"
    env["MODEL"] = str(tmp_path / "nope")
    p = subprocess.run(["scripts/validate.sh"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 1 and f"Error: model {tmp_path / 'nope'} does not exist" in p.stderr


def test_sweep_stops_on_an_error(model, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "x", "prompt": "hi"}\n')  # no expect: the suite is bad input
    env = _env(tmp_path, FROM=str(model), BITS="8", PREFIX=str(tmp_path / "m"), SUITE=str(bad))
    p = subprocess.run(["scripts/sweep.sh"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 1, p.stdout + p.stderr
    assert f"Error: {bad}" in p.stderr
    assert "failed verdicts" not in p.stdout  # it stopped at the first error
    assert p.stdout.count("== validate") == 1


# A value out of range is a usage error (2) in every command, whichever check finds it: the option's
# type, or a check that needs another option (gptq's bits, group size 16 outside nvfp4).
OUT_OF_RANGE = [
    ["quantize", "M", "--bits", "7"],
    ["quantize", "M", "--bits", "four"],
    ["quantize", "M", "--group-size", "100"],
    ["quantize", "M", "--group-size", "abc"],
    ["quantize", "M", "--group-size", "16"],
    ["quantize", "M", "--recipe", "gptq", "--bits", "3"],
    ["quantize", "M", "--recipe", "nvfp4", "--group-size", "64"],
    ["quantize", "M", "--recipe", "gptq", "--bits", "4", "--num-samples", "0"],
    ["quantize", "M", "--recipe", "gptq", "--bits", "4", "--sequence-length", "4"],
    ["quantize", "M", "--recipe", "compensated", "--rank", "0"],
    ["quantize", "M", "--recipe", "compensated", "--target-bpw", "nan"],
    ["quantize", "M", "--recipe", "compensated", "--target-bpw", "-1"],
    ["probe", "M", "--bits", "7"],
    ["probe", "M", "--group-size", "100"],
    ["probe", "M", "--min-accuracy", "1.5"],
    ["probe", "M", "--min-accuracy", "nan"],
    ["probe", "M", "--max-tokens", "0"],
    ["validate", "M", "--max-tokens", "0"],
    ["validate", "M", "--min-accuracy", "nan"],
    ["retention", "M", "--top-k", "0"],
    ["retention", "M", "--max-tokens", "-3"],
    ["delta-survival", "M", "--bits", "9"],
    ["delta-survival", "M", "--threads", "-1"],
    ["quant-error", "M", "--group-size", "48"],
    ["quant-error", "M", "--top", "0"],
    ["compare", "x.json", "--min-accuracy", "inf"],
    ["compare", "x.json", "--max-gen-s", "nan"],
    ["compare", "x.json", "--max-memory-gb", "-1"],
    ["compare", "x.json", "--min-category", "a=nan"],
    ["calibrate", "--jobs", "0"],
    ["calibrate", "--min-accuracy", "2"],
    ["demo-models", "--seed", "-1"],
    ["demo-models", "--family", "g7"],
    ["fuse", "M", "--adapter", "A", "--dtype", "int8"],
]


@pytest.mark.parametrize("args", OUT_OF_RANGE, ids=" ".join)
def test_a_value_out_of_range_is_a_usage_error(tmp_path, args):
    r = run(*args, *(["--output", tmp_path / "o"] if args[0] in ("quantize", "fuse") else []))
    assert r.exit_code == 2, r.output
    last = r.output.strip().splitlines()[-1]
    assert last.startswith("Error: Invalid value for '--"), r.output
    assert "Traceback" not in r.output and not (tmp_path / "o").exists()


def test_a_library_value_error_names_the_option():
    from qtools import BadValue, QtoolsError
    from qtools.pipeline.recipes_mlx import check_recipe_args

    with pytest.raises(BadValue) as info:
        check_recipe_args("gptq", 3, None)
    assert isinstance(info.value, QtoolsError) and info.value.option == "--bits"


def test_an_interrupt_outside_a_command_is_one_error_line(monkeypatch, capsys):
    """A Ctrl-C or SIGTERM while click parses the arguments (or exits after the command) was
    click's "Aborted!"; it is `Error: interrupted`, exit 1, as inside a command (test_faults)."""
    import pytest

    from qtools.cli import LazyGroup, main

    def interrupted(*_a, **_k):
        raise KeyboardInterrupt

    monkeypatch.setattr(LazyGroup, "make_context", interrupted)
    with pytest.raises(SystemExit) as exc:
        main(["fuse", "--help"])
    assert exc.value.code == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == "Error: interrupted"
