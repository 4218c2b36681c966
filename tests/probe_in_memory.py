"""The probe as it was before it streamed (kept here for comparison only): the whole float model
loaded, each case answered alone (stream_generate), then per bit-width the whole model
fake-quantized in memory and every case scored in right-padded batches."""

import dataclasses

import numpy as np

import qtools.pipeline.probe as P
from qtools.io.suite import load_suite
from qtools.pipeline import runner
from qtools.pipeline.retention import build_sequences


def in_memory_probe(model, suite_path, bits, group_size=64) -> dict:
    """{case id: {"float": record, "<bits>": record}} with read_decision's records."""
    suite = load_suite(suite_path)
    cases, _skipped = P.decision_cases(suite)
    probe_suite = dataclasses.replace(suite, cases=cases)
    net, tok, _config, _s = runner.load_model(model)
    fit = P.check_fit(tok, suite, cases, model)
    seqs = build_sequences(net, tok, suite=probe_suite, progress=False)
    answers = [t[s + 1:] for t, s in seqs]
    out, specs = {}, []
    for case, answer, (_lp, rows, top) in zip(cases, answers, runner.score_batches(net, seqs)):
        spec = P.decision_spec(case, suite, tok, answer, rows, fit, model)
        specs.append(spec)
        out[case.id] = {"float": P.read_decision(case, suite, spec, rows, top, answer, fit), "answer": answer}
    originals = [(m, m.weight) for _n, m in runner.quantizable_modules(net, group_size)]
    for b in bits:
        for m, w in originals:
            m.weight = w
        runner.fake_quantize(net, b, group_size)
        for case, spec, answer, (_lp, rows, top) in zip(cases, specs, answers, runner.score_batches(net, seqs)):
            out[case.id][str(b)] = P.read_decision(case, suite, spec, rows, top, answer, fit)
    return out


def assert_same_predictions(report: dict, before: dict, tol: float = 1e-3) -> float:
    """The probe's report agrees with the in-memory probe case by case; returns the largest margin gap."""
    worst = 0.0
    for c in report["cases"]:
        old = before[c["id"]]
        for key, new in [("float", c["float"]), *c["by_bits"].items()]:
            ref = old[key]
            assert (new["got"], new["correct"]) == (ref["got"], ref["correct"]), (c["id"], key)
            if "critical" in new:
                assert new["critical"] == ref["critical"], (c["id"], key)
            if np.isfinite(ref["margin"]):
                worst = max(worst, abs(new["margin"] - ref["margin"]))
    assert worst <= tol, worst
    return worst
