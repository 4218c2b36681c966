"""scripts/outside.sh's judge: a fine-tune outside the study, the tiers' answers beside the sweep's."""

import json

from qtools.calibrate.outside import judge, real_threshold, row, with_probe

BITS = [2, 3, 4, 5, 6, 8]


def _log(bits, verdict, quantized=True):
    return {"qtools_log": 1, "model": f"m{bits}", "bits": bits, "quantized": quantized, "mixed": False,
            "verdict": verdict, "correct": 63, "total": 64}


def test_real_threshold_needs_every_larger_bit_width_passing():
    logs = [_log(16, "pass", quantized=False), *(_log(b, v) for b, v in
                                                 zip(BITS, ["fail", "fail", "pass", "fail", "pass", "pass"]))]
    assert real_threshold(logs)[0] == 6  # 4 passes, 5 does not: 6
    assert real_threshold(logs)[1]["bits"] == 16


def test_the_bracket_settles_and_the_probe_decides_what_it_leaves():
    # survives at >= 6, rounded away at <= 4: the probe checks 4, 5 and 6 (5 between, both ends)
    surv = {"survives_at": 6, "rounded_away_at": 4, "check": [4, 5, 6]}
    ok = {"verdict": "pass"}
    assert with_probe(surv, {"by_bits": {"4": ok, "5": ok, "6": ok}}, BITS) == 4
    assert with_probe(surv, {"by_bits": {"4": {"verdict": "fail"}, "5": ok, "6": ok}}, BITS) == 5
    assert with_probe(surv, None, BITS) == 8  # nothing probed: only 8, above the check set, is kept
    # the end the bracket settles as kept is checked too: where the probe fails it, it is lost
    assert with_probe(surv, {"by_bits": {"6": {"verdict": "fail"}, "5": ok, "4": ok}}, BITS) == 8


def test_judge_reads_a_fine_tunes_logs(tmp_path, monkeypatch):
    """The weights tier is asked again from survival.json's statistics with the rule file's bracket
    and point rule (here fixed), the check set read from the probe of every bit-width."""
    from qtools.survival.rule import Bracket, Rule

    monkeypatch.setattr(Bracket, "load", classmethod(lambda cls, path=None: Bracket("sign_agreement", "weighted",
                                                                                    0.8, 0.3)))
    monkeypatch.setattr(Rule, "load", classmethod(lambda cls, available=None, path=None: Rule("sign_agreement",
                                                                                              "weighted", 0.6)))
    d = tmp_path / "g12-s1"
    d.mkdir()
    for i, (b, v) in enumerate(zip([16, *BITS], ["pass", "fail", "fail", "fail", "pass", "pass", "pass"])):
        (d / f"{i}-demo.json").write_text(json.dumps(_log(b, v, quantized=b != 16)))
    agreement = dict(zip(BITS, [0.1, 0.25, 0.5, 0.7, 0.85, 0.95]))
    (d / "survival.json").write_text(json.dumps({
        "summary": {str(b): {"sign_agreement": v} for b, v in agreement.items()}, "layers": []}))
    # survives at >= 6 (above 0.8), rounded away at <= 3 (at most 0.3): the probe checks 3 4 5 6
    (d / "probe.json").write_text(json.dumps({"predicted_min_bits": 5, "by_bits": {
        "2": {"verdict": "pass"}, "3": {"verdict": "fail"}, "4": {"verdict": "fail"}, "5": {"verdict": "pass"},
        "6": {"verdict": "pass"}, "8": {"verdict": "pass"}}}))
    j = judge(d)
    assert (j["real"], j["bracket"], j["check"], j["bracket_probe"], j["probe_all"], j["point"]) == \
        (5, (6, 3), [3, 4, 5, 6], 5, 5, 5)
    assert j["float16"] == "63/64" and j["float16_passes"]
    assert row(j).startswith("| g12-s1 | 63/64 | 5 | >= 6, <= 3 (probe 3 4 5 6) | 5 | 5 | 5 |")


def test_every_outside_fine_tune_in_one_table_and_a_tally(tmp_path, monkeypatch):
    from qtools.calibrate.outside import judge_all, tally
    from qtools.survival.rule import Bracket, Rule

    monkeypatch.setattr(Bracket, "load", classmethod(lambda cls, path=None: Bracket("sign_agreement", "weighted",
                                                                                    0.8, 0.3)))
    monkeypatch.setattr(Rule, "load", classmethod(lambda cls, available=None, path=None: Rule("sign_agreement",
                                                                                              "weighted", 0.6)))
    agreement = dict(zip(BITS, [0.1, 0.25, 0.5, 0.7, 0.85, 0.95]))
    for name, float_verdict, real in (("a-s1", "pass", 4), ("b-s2", "fail", 6)):
        d = tmp_path / name
        d.mkdir()
        (d / "f16.json").write_text(json.dumps(_log(16, float_verdict, quantized=False)))
        for b in BITS:
            (d / f"{b}.json").write_text(json.dumps(_log(b, "pass" if b >= real else "fail")))
        (d / "survival.json").write_text(json.dumps({"summary": {str(b): {"sign_agreement": v}
                                                                 for b, v in agreement.items()}}))
        (d / "probe.json").write_text(json.dumps(
            {"predicted_min_bits": real, "by_bits": {str(b): {"verdict": "pass" if b >= real else "fail"}
                                                     for b in BITS}}))
    judged = judge_all(tmp_path)
    assert [j["fine_tune"] for j in judged] == ["a-s1", "b-s2"]
    text = tally(judged)
    assert text.startswith("Of 2 fine-tunes, 1 pass float16")
    # a-s1, truly 4: bracket >= 6 pessimistic, its check 3 4 5 6 probed: 4; point rule (0.6) 5; constant none
    assert "| weights bracket (upper end) | 0 | 0 | 1 |" in text
    assert "| bracket + probe of its check set | 1 | 0 | 0 |" in text
    assert "| point rule | 0 | 0 | 1 |" in text


def test_nothing_to_judge_is_one_error_line(tmp_path, capsys):
    from qtools.calibrate.outside import main

    assert main([str(tmp_path)]) == 1
    assert capsys.readouterr().err.strip() == (f"Error: {tmp_path}: no qtools validate logs to judge against "
                                               "(scripts/outside.sh writes them)")
    assert main(["--all", str(tmp_path / "nowhere")]) == 1
    assert capsys.readouterr().err.strip().startswith("Error: ")
    assert main([]) == 1


def test_a_study_familys_fine_tune_is_judged_at_the_studys_bar(tmp_path, monkeypatch):
    """Validate passes its float16 model at 62/64 (97%); at the study's bar (outside.build: 98%) it
    is listed, not judged, as the study would leave it out."""
    from qtools.calibrate.outside import BUILD_FILE

    d = tmp_path / "agent-g24-s7"
    d.mkdir()
    (d / "f16.json").write_text(json.dumps({**_log(16, "pass", quantized=False), "correct": 62, "accuracy": 62 / 64,
                                            "critical_errors": 0}))
    for b in BITS:
        (d / f"{b}.json").write_text(json.dumps(_log(b, "pass")))
    assert judge(d)["float16_passes"]
    (d / BUILD_FILE).write_text(json.dumps({"family": "agent-g24", "bar": 0.98}))
    j = judge(d)
    assert not j["float16_passes"] and "62/64, below the study's bar: not judged" in row(j)
    (d / BUILD_FILE).write_text(json.dumps({"family": "agent-g24", "bar": 0.95}))
    assert judge(d)["float16_passes"]


def test_build_trains_a_recipe_the_studys_grid_never_ran_on_the_familys_cached_base(tmp_path, monkeypatch):
    """--build: the study family's base from the study's cache, the outside recipe trained on its task
    (on qwen3_moe: attention and the router), reused when built alike; anything else one error line."""
    from qtools.calibrate import outside, run
    from qtools.calibrate.grid import study_grid
    from qtools.demo import train

    base = tmp_path / "work" / "bases" / "agent-moe-g24"
    base.mkdir(parents=True)
    (base / "config.json").write_text(json.dumps({"model_type": "qwen3_moe", "num_hidden_layers": 4}))
    monkeypatch.setattr(run, "build_base", lambda work, family, log=None: work / "bases" / family["name"])
    trained = []

    def fake_train(base_dir, out_dir, **recipe):
        trained.append(recipe)
        (out_dir / "adapters.safetensors").write_bytes(b"")

    monkeypatch.setattr(train, "train_adapter", fake_train)
    got = outside.build("agent-moe-g24", 7, tmp_path / "out", work=tmp_path / "work")
    assert got["base"] == str(base) and got["suite"].endswith("agent.jsonl") and got["bar"] == 0.95
    assert trained[0]["task"] == "agent" and trained[0]["seed"] == 7 and "mlp.gate" in trained[0]["keys"]
    assert (trained[0]["rank"], trained[0]["lr"]) not in {(r["rank"], r["lr"]) for r in study_grid()}
    outside.build("agent-moe-g24", 7, tmp_path / "out", work=tmp_path / "work")
    assert len(trained) == 1  # the same recipe and seed: reused
    outside.build("agent-moe-g24", 8, tmp_path / "out", work=tmp_path / "work")
    assert len(trained) == 2
    outside.build("agent-moe-g24", 8, tmp_path / "out", work=tmp_path / "work", keys="all")
    assert len(trained) == 3 and "mlp.switch_mlp.down_proj" in trained[2]["keys"]  # the experts too
    outside.build("agent-moe-g24", 8, tmp_path / "out", work=tmp_path / "work", keys="all")
    assert len(trained) == 3
    # another learning rate is another recipe: trained again, at that rate, the rest as it was
    assert outside.main(["--build", "agent-moe-g24", "8", str(tmp_path / "out"), "all", "2e-3",
                         str(tmp_path / "work")]) == 0
    assert len(trained) == 4 and trained[3]["lr"] == 2e-3 and trained[3]["keys"] == trained[2]["keys"]
    assert {k: v for k, v in trained[3].items() if k != "lr"} == {k: v for k, v in trained[2].items() if k != "lr"}
    assert outside.main(["--build", "agent-moe-g24", "8", str(tmp_path / "out"), "", "0", str(tmp_path / "work")]) == 1
    assert len(trained) == 4
    assert outside.main(["--build", "agent-moe-g24", "8", str(tmp_path / "out"), "experts"]) == 1
    assert outside.main(["--build", "g24", "1", str(tmp_path / "out")]) == 1
    assert outside.main(["--is-study", "access-g24"]) == 0 and outside.main(["--is-study", "g24"]) == 1


def test_a_float16_model_validate_fails_is_named_as_failing_not_as_below_the_bar(tmp_path):
    from qtools.calibrate.outside import BUILD_FILE

    d = tmp_path / "agent-moe-g24-s8"
    d.mkdir()
    (d / "f16.json").write_text(json.dumps({**_log(16, "fail", quantized=False), "critical_errors": 1}))
    (d / BUILD_FILE).write_text(json.dumps({"family": "agent-moe-g24", "bar": 0.95}))
    assert "63/64, fails: not judged" in row(judge(d))


def test_make_outsides_pairs_are_checked_before_anything_is_built(capsys):
    """An unknown family names both kinds it could be; a missing or negative seed, or layer keys on a
    demo-task family or unknown ones, are one error line each; sound pairs of both kinds pass."""
    from qtools.calibrate import outside

    assert outside.main(["--check-pairs", "g12:1", "agent-moe-g24:8", "agent-moe-g24:11:all", "access-g24:7:attention",
                         "agent-moe-g24:13::2e-3", "agent-moe-g24:14:all:0.002"]) == 0
    for pair, says in [("nope:1", "the study's agent-g4"), ("g12", "no seed"), ("g12:-2", "negative"),
                       ("g12:x", "not a whole number"), ("g12:1:all", "only a study family"),
                       ("agent-g24:1:most", "only a study family"), ("g12:1::2e-3", "only a study family"),
                       ("agent-moe-g24:1::-1e-3", "not a positive number"),
                       ("agent-moe-g24:1::fast", "not a positive number"), ("agent-moe-g24:1::nan", "not a positive")]:
        capsys.readouterr()
        assert outside.main(["--check-pairs", "g12:1", pair]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("Error: ") and says in err[0], (pair, err)
    assert outside.main(["--check-pairs"]) == 1


def test_make_outside_with_an_empty_pairs_is_an_error_not_the_default_pairs(tmp_path):
    """`make outside PAIRS=""` hands the script an empty PAIRS: one Error line, nothing built,
    not the default pairs (left out, PAIRS still defaults to them)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / "outside.sh"
    env = dict(os.environ, PAIRS="", PY=sys.executable, QTOOLS="false", OUTSIDE_MODELS=str(tmp_path / "models"))
    p = subprocess.run([str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 1, p.stdout + p.stderr
    err = p.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("Error: PAIRS is empty"), p.stderr
    assert not (tmp_path / "logs").exists() and not (tmp_path / "models").exists() and "==" not in p.stdout
    del env["PAIRS"]  # the defaults: checked, then the first is built (here QTOOLS fails at once)
    p = subprocess.run([str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode != 0 and "== g12, adapter seed 1" in p.stdout
    assert not (tmp_path / "logs" / "outside" / "g12-s1").exists()  # a failed build leaves no log directory
