"""Logit probe: predict validate's verdict per bit-width from one teacher-forced pass per case.

The float model answers every decision case of the suite once, greedily, all cases in one
batch (or a --reference model answers). Then every case's prompt + answer is scored at every
precision at once: the float model is streamed layer by layer from its memory-mapped files
(stream.StreamedModel), each layer read once and applied to one copy of the batch per
precision, its weights fake-quantized for each bit-width (the exact values mx.quantize
stores, in the weights' dtype, the model's own quant_predicate honoured), so the model's
size is not bounded by memory. From that pass come, per case, the log-probs at the decision
token and, over the whole answer, KL / same-top-token from the float model as `qtools
retention` measures them. An already-quantized model is loaded whole and probed as it is.

The decision token is the first answer token where the case's decision is made:
- tool_call / direct: where the float answer opens its tool call (the tool-call
  marker's first token), or, for an answer without one, the answer position where a tool
  call came nearest to starting (the float model's smallest direct-vs-tool margin).
  The tool decision's token is the marker; the direct decision's is the best token
  that is neither the marker nor end-of-sequence.
- label: where the float answer's first label starts (position 0 if it has none);
  each label's decision token is its first token as it would be written there.
regex and boxed cases have no decision token: they are skipped and counted.

margin = log p(expected decision's token) - log p(best competing decision's token).
A case is predicted correct when the expected decision's token is the top token at
the decision token and the format is intact (a direct answer does not start with
end-of-sequence; a tool call keeps the float's tokens, marker to end marker, as the
top tokens all along). A predicted critical error is a critical confusion whose
forbidden decision is top. Verdicts use validate's own summary (accuracy >= min
accuracy, no critical error).
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import time
from pathlib import Path

import numpy as np

from .. import SUPPORTED_BITS, SUPPORTED_GROUP_SIZES, BadValue, QtoolsError, versions
from ..io.modeldir import check_model_dir, load_tokenizer, quantization_info, read_config, text_config
from ..io.suite import Suite, load_suite
from ..io.weights import check_model_finite
from ..survival.rule import probe_evidence, smallest_surviving
from . import backend, runner
from .retention import DEFAULT_TOP_K, kl_same_top, kl_stats, tail_logp, topk_rows
from .scoring import (
    DEFAULT_MIN_ACCURACY,
    DEFAULT_TOOL_END,
    DEFAULT_TOOL_START,
    build_prompt,
    call_matches,
    extract_tool_calls,
    find_label,
    is_critical,
    suite_labels,
    summarize,
    tool_format_of,
)

DECISION_TYPES = ("tool_call", "direct", "label")
DEFAULT_GROUP_SIZE = 64


# ---------------------------------------------------------------- inputs

def decision_cases(suite_obj: Suite) -> tuple[list, list]:
    """(cases with a decision token, ids of those without: regex / boxed)."""
    probed = [c for c in suite_obj.cases if c.expect["type"] in DECISION_TYPES]
    skipped = [c.id for c in suite_obj.cases if c.expect["type"] not in DECISION_TYPES]
    if not probed:
        raise QtoolsError(f"suite {suite_obj.path} has no case with a decision to probe (tool_call, direct or "
                          "label); regex and boxed cases have no decision token: use qtools validate")
    return probed, skipped


def check_bits(bits, group_size, quant: dict, path: Path) -> tuple[list, int | None]:
    """The bit-widths to probe and the group size; a quantized model takes neither."""
    if quant["quantized"]:
        if bits or group_size is not None:
            raise BadValue(f"{path} is already quantized ({quant['bits']}-bit, group size "
                           f"{quant['group_size']}): probe it without --bits/--group-size, "
                           "or give the float model to probe other bit-widths", "--bits" if bits else "--group-size")
        return [quant["bits"]], quant["group_size"]
    bad = [b for b in bits if b not in SUPPORTED_BITS]
    if bad:
        raise BadValue(f"bits {bad[0]} is not supported: use {', '.join(map(str, SUPPORTED_BITS))}", "--bits")
    group_size = DEFAULT_GROUP_SIZE if group_size is None else group_size
    if group_size not in SUPPORTED_GROUP_SIZES:
        raise BadValue(f"group size {group_size} is not supported: use "
                       f"{', '.join(map(str, SUPPORTED_GROUP_SIZES))}", "--group-size")
    return sorted(set(bits or SUPPORTED_BITS)), group_size


def _encode(tokenizer, text: str) -> list:
    try:
        return list(tokenizer.encode(text, add_special_tokens=False))
    except TypeError:  # tokenizers without the keyword add nothing anyway
        return list(tokenizer.encode(text))


def _first_token(tokenizer, text: str, what: str, path: Path) -> int:
    ids = _encode(tokenizer, text)
    unk = getattr(tokenizer, "unk_token_id", None)
    if not ids or (unk is not None and ids[0] == unk):
        raise QtoolsError(f"{what} {text!r} has no first token in {path}'s vocabulary: the suite does not fit "
                          "this model")
    return int(ids[0])


def _label_ids(tokenizer, labels: list, lead: str, path: Path, case_id: str) -> dict:
    """{label: its first token when written after `lead`}; labels sharing it cannot be told apart."""
    ids = {lab: _first_token(tokenizer, lead + lab, "label", path) for lab in labels}
    seen: dict = {}
    for lab, i in ids.items():
        if i in seen:
            raise QtoolsError(f"labels {seen[i]!r} and {lab!r} (case {case_id}) share their first token in "
                              f"{path}'s vocabulary: the decision token cannot tell them apart")
        seen[i] = lab
    return ids


def check_fit(tokenizer, suite_obj: Suite, cases: list, path: Path) -> dict:
    """What the decision tokens need from the model's tokenizer, or an Error naming the misfit."""
    chat = any(c.messages is not None or c.tools or suite_obj.system for c in cases)
    if chat and not getattr(tokenizer, "has_chat_template", False):
        raise QtoolsError(f"{path}'s tokenizer has no chat template, but suite {suite_obj.path} gives chat "
                          "messages, tools or a system prompt: the suite does not fit this model")
    eos = set(getattr(tokenizer, "eos_token_ids", None) or ())
    if getattr(tokenizer, "eos_token_id", None) is not None:
        eos.add(tokenizer.eos_token_id)
    fit = {"eos": sorted(int(i) for i in eos)}
    if any(c.expect["type"] in ("tool_call", "direct") for c in cases):
        fmt = tool_format_of(tokenizer)
        marker = fmt.get("start") or DEFAULT_TOOL_START
        # A call opens with the marker's first token (as a label with its first token).
        tool = _first_token(tokenizer, marker, "the tool-call marker", path)
        fit.update(tool=tool, tool_end=fmt.get("end") or DEFAULT_TOOL_END, tool_format=fmt)
    for c in cases:
        if c.expect["type"] == "label":
            _label_ids(tokenizer, suite_labels(suite_obj, c), "", path, c.id)
    return fit


# ---------------------------------------------------------------- decision tokens

def _offsets(tokenizer, answer: list) -> list:
    """Character offset in the decoded answer where each token's text starts."""
    return [len(tokenizer.decode(answer[:i])) for i in range(len(answer) + 1)]


def _direct_best(rows: np.ndarray, fit: dict, first: bool) -> np.ndarray:
    """log p of the direct decision per row: the best token that does not open a tool call
    (nor, on the answer's first token, end the answer: an empty answer is no direct answer)."""
    masked = rows.copy()
    masked[..., [fit["tool"], *(fit["eos"] if first else [])]] = -np.inf
    return masked.max(axis=-1)


def decision_spec(case, suite_obj: Suite, tokenizer, answer: list, rows: np.ndarray, fit: dict,
                  path: Path) -> dict:
    """Where the float answer makes the case's decision, and each decision's token there."""
    text = tokenizer.decode(answer)
    if case.expect["type"] in ("tool_call", "direct"):
        tool = fit["tool"]
        if tool in answer:
            pos = answer.index(tool)
        else:  # no call: where a call came nearest to starting
            best = _direct_best(rows, fit, first=False)
            best[0] = _direct_best(rows[0], fit, first=True)
            pos = int(np.argmin(best - rows[:, tool]))
        spec = {"kind": "tool", "pos": pos, "span": [pos]}
        fmt = fit["tool_format"]
        calls, _err = extract_tool_calls(text, fmt.get("start"), fmt.get("end"), fmt.get("parser"), case.tools)
        spec["float_calls"] = tool in answer
        # A marker without a parsable call reproduced token for token stays unparsable: not a match.
        spec["float_call_matches"] = case.expect["type"] == "tool_call" and any(
            call_matches(case.expect, c) for c in calls)
        if tool in answer and calls:
            spec["float_call"] = calls[0]["name"]
            # The whole call, marker to end marker: only a call reproduced token for token is known to
            # parse (a changed argument token can derail the JSON after it), so none counts as intact
            # on less: the probe may be pessimistic here, never optimistic.
            off = _offsets(tokenizer, answer)
            end = len(answer) - 1
            for i in range(pos, len(answer)):
                if fit["tool_end"] in text[off[pos]:off[i + 1]]:
                    end = i
                    break
            spec["span"] = list(range(pos, end + 1))
        return spec
    labels = suite_labels(suite_obj, case)
    found = find_label(text, labels)  # where validate would read the label
    pos, lead = 0, ""
    if found is not None:
        off = _offsets(tokenizer, answer)
        pos = max(i for i in range(len(answer)) if off[i] <= found[1])
        lead = text[off[pos]:found[1]]
    ids = _label_ids(tokenizer, labels, lead, path, case.id)
    if found is not None and answer[pos] not in ids.values():
        ids[found[0]] = int(answer[pos])  # the float's own spelling (labels match in any case)
    return {"kind": "label", "pos": pos, "ids": ids}


def _only_tool(case) -> str | None:
    """The name a call must have when the case offers a single tool."""
    names = [(t.get("function") or t).get("name") for t in case.tools or []]
    return names[0] if len(names) == 1 else None


def read_decision(case, suite_obj: Suite, spec: dict, rows: np.ndarray, top: np.ndarray, answer: list,
                  fit: dict) -> dict:
    """One case's record at one precision: the decision that is top, the margin, correctness."""
    row = rows[spec["pos"]]
    argmax = int(top[spec["pos"]])
    if spec["kind"] == "tool":
        lp_tool, lp_direct = float(row[fit["tool"]]), float(_direct_best(row, fit, spec["pos"] == 0))
        want_tool = case.expect["type"] == "tool_call"
        margin = (lp_tool - lp_direct) if want_tool else (lp_direct - lp_tool)
        decision = "tool" if argmax == fit["tool"] else (
            None if argmax in fit["eos"] and spec["pos"] == 0 else "direct")
        if decision == "tool":
            intact = all(int(top[i]) == answer[i] for i in spec["span"])
            got = spec.get("float_call") or case.expect.get("name") or _only_tool(case) or "tool_call"
            # Without a call in the float answer the call's tokens are unseen: the decision decides.
            correct = want_tool and (not spec["float_calls"] or (spec["float_call_matches"] and intact))
        else:
            intact = int(top[0]) not in fit["eos"]  # an empty answer is no direct answer
            got = "direct" if decision == "direct" else None
            correct = not want_tool and decision == "direct" and intact
        format_ok = decision is not None and intact
        decided = decision == ("tool" if want_tool else "direct")
    else:
        ids, expected = spec["ids"], case.expect["label"]
        others = [float(row[i]) for lab, i in ids.items() if lab != expected]
        margin = float(row[ids[expected]]) - max(others) if others else float("inf")
        got = next((lab for lab, i in ids.items() if i == argmax), None)
        correct = decided = got is not None and got.lower() == expected.lower()
        format_ok = got is not None
    return {"id": case.id, "category": case.category, "type": case.expect["type"], "expected": case.expected,
            "got": got, "correct": bool(correct), "format_ok": bool(format_ok),
            "critical": is_critical(case, suite_obj, got), "margin": margin, "decided": bool(decided)}


# ---------------------------------------------------------------- summaries

def _precision_summary(records: list, probe_suite: Suite, min_accuracy: float, float_records, kl, same):
    s = summarize(records, probe_suite, min_accuracy)
    margins = np.array([r["margin"] for r in records], dtype=np.float64)
    out = {k: s[k] for k in ("correct", "total", "accuracy", "per_category", "critical_errors", "critical_cases",
                             "format_compliance", "verdict", "verdict_reasons")}
    out["margin"] = {"min": float(margins.min()), "p10": float(np.percentile(margins, 10)),
                     "median": float(np.median(margins))}
    if float_records is not None:
        flips = [r["id"] for r, f in zip(records, float_records)
                 if np.sign(r["margin"]) != np.sign(f["margin"]) or (f["decided"] and not r["decided"])]
        out["flips"], out["flipped_cases"] = len(flips), flips
    if kl is not None:
        out["kl"] = kl_stats(kl, same)
    return out


# ---------------------------------------------------------------- entry point

def _check_vocabulary(ref: Path, path: Path) -> None:
    want = text_config(read_config(path)).get("vocab_size")
    got = text_config(read_config(ref)).get("vocab_size")
    if want and got and want != got:
        raise QtoolsError(f"reference {ref} has a vocabulary of {got} tokens but {path} has {want}: "
                          "not the same model family")


def _check_tokenizer(ref: Path, ref_tok, tokenizer, path: Path) -> None:
    if ref_tok.get_vocab() != tokenizer.get_vocab():
        raise QtoolsError(f"reference {ref} has another tokenizer than {path}: its answers cannot be "
                          "teacher-forced through the probed model")


def _answers_from(reference, tokenizer, path: Path, prompts: list, limits: list, progress: bool):
    """Greedy answers of a --reference model (loaded whole), checked to share the probed model's vocabulary."""
    ref = check_model_dir(reference, "reference model")
    _check_vocabulary(ref, path)
    net, ref_tok, _config, _s = runner.load_model(ref)
    _check_tokenizer(ref, ref_tok, tokenizer, path)
    answers = runner.batch_answers(net, ref_tok, prompts, limits, progress, "reference answers")
    del net
    return answers, ref


def _answers_from_log(log, tokenizer, path: Path, suite, cases: list, max_tokens: int | None,
                      suite_max_tokens: int) -> tuple[list, Path]:
    """The greedy answers a `qtools validate` log kept (its cases' answer_tokens), read instead of
    generated: the log must be of this suite, at the same generation limit, of a model with this
    model's tokenizer (the model it names is checked, so it must still be there)."""
    from ..io.atomic import read_json_or_none
    from .validate import suite_sha256

    log = Path(log)
    d = read_json_or_none(log)
    if not isinstance(d, dict) or d.get("qtools_log") != 1 or not isinstance(d.get("cases"), list):
        raise QtoolsError(f"--reference {log}: neither a model directory nor a qtools validate log")
    if d.get("suite_sha256") != suite_sha256(suite):
        raise QtoolsError(f"--reference {log} is a validate log of another suite than {suite} (or of a qtools that "
                          "did not record which): validate on this suite, or give the model")
    if d.get("max_tokens") != (max_tokens or suite_max_tokens):
        raise QtoolsError(f"--reference {log} generated at most {d.get('max_tokens')} tokens an answer, this probe "
                          f"{max_tokens or suite_max_tokens}: give the same --max-tokens")
    ref = check_model_dir(d.get("model_path") or "", f"the model {log} validated")
    _check_vocabulary(ref, path)
    _check_tokenizer(ref, load_tokenizer(ref), tokenizer, path)
    kept = {c.get("id"): c.get("answer_tokens") for c in d["cases"] if isinstance(c, dict)}
    answers = []
    for case in cases:
        ids = kept.get(case.id)
        if not isinstance(ids, list) or not ids or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
            raise QtoolsError(f"--reference {log} keeps no answer tokens for case {case.id} (a log written before "
                              "validate kept them): validate again, or give the model")
        answers.append(ids)
    return answers, log


def probe(model, suite, bits=(), group_size: int | None = None, min_accuracy: float = DEFAULT_MIN_ACCURACY,
          max_tokens: int | None = None, progress: bool = True, reference=None, compute_dtype=None,
          blas: str = "auto", base=None, adapter=None) -> dict:
    """Predict accuracy, critical errors and the verdict per bit-width of MODEL on SUITE; see module doc.

    reference: a model directory whose greedy answers are teacher-forced instead of the float
    model's own (e.g. the 8-bit model, loaded whole, where generating layer-major from a model
    larger than memory would read it once per token). compute_dtype: None computes a float model's
    activations in its weights' dtype, as the quantized model does (docs/probe.md); an mlx dtype
    (mx.float32) casts every weight to it after fake quantization.
    blas: "auto", "mlx" or "numpy": who multiplies a streamed model's Linear layers (StreamedModel).
    """
    import mlx.core as mx

    tic = time.perf_counter()
    fused = None
    if model is None:  # base + adapter fused on the fly, pass by pass: no fused model on disk
        from ..io.fused import FusedTensors

        if base is None or adapter is None:
            raise BadValue("without MODEL, give both --base and --adapter: the model is fused on the fly", "--base")
        fused = FusedTensors(base, adapter)
        path, config = fused.path, dict(fused.config)
    else:
        path = check_model_dir(model)
        config = read_config(path)
    quant = quantization_info(config)
    vocab = int(text_config(config).get("vocab_size") or 32768)
    bits_list, group_size = check_bits(list(bits or ()), group_size, quant, path)
    if max_tokens is not None and max_tokens < 1:
        raise BadValue("--max-tokens must be at least 1", "--max-tokens")
    if fused is not None:
        from ..io.weights import SafetensorsModel, check_finite

        check_model_finite(path, f"base model {path}", "its log-probs and margins would be NaN; fix it")
        with SafetensorsModel.from_file(fused.view.adapter / "adapters.safetensors") as ad:
            check_finite(ad, f"adapter {fused.view.adapter}", "fix the fine-tune that wrote it")
    else:
        check_model_finite(path, f"model {path}", "its log-probs and margins would be NaN; fix the model that wrote it")
    suite_obj = load_suite(suite)
    cases, skipped = decision_cases(suite_obj)
    probe_suite = dataclasses.replace(suite_obj, cases=cases)

    t_load = time.perf_counter()
    if quant["quantized"]:  # probed as it is: loaded whole (a quantized model is the small one)
        net, tokenizer, _config, _s = runner.load_model(path)
        precisions = [None]

        def score(seqs, net=net):
            for i, row in enumerate(runner.score_batches(net, seqs, progress, "model", vocab)):
                yield (0, i, *row)
    else:  # streamed: one layer in memory at a time, whatever the model's size
        from .stream import StreamedModel

        tokenizer = load_tokenizer(path)
        backend.cpu_backend_note(config)
        net_obj = StreamedModel(path, source=fused, group_size=group_size, blas=blas, compute_dtype=compute_dtype,
                                config=config if fused is not None else None)
        net = net_obj.net
        precisions = [None, *bits_list]

        def score(seqs):
            return net_obj.score(seqs, precisions, vocab, progress)
    load_s = time.perf_counter() - t_load
    fit = check_fit(tokenizer, suite_obj, cases, path)
    prompts = [list(build_prompt(tokenizer, c, probe_suite)) for c in cases]
    limits = [max_tokens or c.max_tokens or probe_suite.max_tokens for c in cases]
    t_gen = time.perf_counter()
    if reference is not None and Path(reference).is_file():  # a validate log: its answers, read
        answers, reference = _answers_from_log(reference, tokenizer, path, suite, cases, max_tokens,
                                               probe_suite.max_tokens)
    elif reference is not None:
        answers, reference = _answers_from(reference, tokenizer, path, prompts, limits, progress)
    else:
        answers = runner.batch_answers(net, tokenizer, prompts, limits, progress, "float answers")
    gen_s = time.perf_counter() - t_gen
    seqs = [(p + a, len(p) - 1) for p, a in zip(prompts, answers)]

    # One pass: the float model first (decision tokens, float records, the top-k for KL), then
    # each bit-width against it.
    t_pass = time.perf_counter()
    specs, ref_records, idx, lp = [None] * len(cases), [None] * len(cases), [None] * len(cases), [None] * len(cases)
    recs = {b: [None] * len(cases) for b in precisions[1:]}
    kls = {b: [None] * len(cases) for b in precisions[1:]}
    ref = None
    for k, i, logp, rows, top in score(seqs):
        case, answer = cases[i], answers[i]
        if k == 0:
            specs[i] = decision_spec(case, suite_obj, tokenizer, answer, rows, fit, path)
            ref_records[i] = read_decision(case, suite_obj, specs[i], rows, top, answer, fit)
            idx[i], lp[i] = topk_rows(logp, DEFAULT_TOP_K)
            continue
        if ref is None:
            topk_logp = np.concatenate(lp).astype(np.float32)
            ref = {"topk_idx": np.concatenate(idx), "topk_logp": topk_logp, "tail_logp": tail_logp(topk_logp)}
            offsets = np.concatenate([[0], np.cumsum([len(x) for x in idx])])
        b = precisions[k]
        recs[b][i] = read_decision(case, suite_obj, specs[i], rows, top, answer, fit)
        kls[b][i] = kl_same_top(logp, ref, int(offsets[i]))
    score_s = time.perf_counter() - t_pass

    by_bits, records_by_bits = {}, {}
    reference_key = "model" if quant["quantized"] else str(quant["bits"])
    by_bits_ref = _precision_summary(ref_records, probe_suite, min_accuracy, None, None, None)
    if quant["quantized"]:
        by_bits[str(bits_list[0])] = by_bits_ref
        records_by_bits[str(bits_list[0])] = ref_records
    for b in precisions[1:]:
        by_bits[str(b)] = _precision_summary(recs[b], probe_suite, min_accuracy, ref_records,
                                             np.concatenate([x[0] for x in kls[b]]),
                                             np.concatenate([x[1] for x in kls[b]]))
        records_by_bits[str(b)] = recs[b]
    net = None  # the model's memory goes before the report is built
    mx.clear_cache()

    predicted = smallest_surviving(bits_list, lambda b: by_bits[str(b)]["verdict"] == "pass")
    case_rows = []
    for i, (case, spec) in enumerate(zip(cases, specs)):
        row = {"id": case.id, "category": case.category, "expected": case.expected, "decision_pos": spec["pos"],
               "float": {k: ref_records[i][k] for k in ("got", "correct", "margin")}}
        row["by_bits"] = {k: {f: v[i][f] for f in ("got", "correct", "critical", "margin")}
                          for k, v in records_by_bits.items()}
        case_rows.append(row)
    return {
        "qtools_probe": 1,
        "model": path.resolve().name + (" + adapter (fused on the fly)" if fused is not None else ""),
        "model_path": str(path.resolve()),
        **({"adapter_path": str(fused.view.adapter.resolve())} if fused is not None else {}),
        "suite": suite_obj.name,
        "suite_path": str(Path(suite).resolve()),
        "quantized": quant["quantized"],
        "mixed": quant.get("mixed", False),
        "group_size": group_size,
        "bits": bits_list,
        "reference": {"precision": reference_key, **by_bits_ref},
        "by_bits": by_bits,
        "predicted_min_bits": predicted,
        "criteria": {"min_accuracy": min_accuracy, "max_critical": 0},
        "probed_cases": len(cases),
        "skipped_cases": skipped,
        "cases": case_rows,
        "method": ("greedy answers teacher-forced; " +
                   ("the model as it is" if quant["quantized"] else
                    f"each bit-width fake-quantized layer by layer (mx.dequantize(mx.quantize(w)), group size "
                    f"{group_size}, in the weights' dtype, the model's own quant_predicate honoured)") +
                   "; decision token: tool-call marker vs best other token, or the labels' first tokens; "
                   f"KL over the reference's top-{DEFAULT_TOP_K} tokens plus a tail bucket"),
        "rule": {"provisional": True, "evidence": probe_evidence()},
        "answers": (("the greedy answers kept in the validate log " if Path(reference).is_file()
                     else "the reference model's greedy answers: ") + str(Path(reference).resolve())) if reference
                   else "the model's own greedy answers (mlx-lm's BatchGenerator, all cases in one batch)",
        "execution": ("loaded whole" if quant["quantized"] else
                      f"streamed layer by layer from the memory-mapped files, every precision in one pass "
                      f"({len(precisions)} precisions), activations in "
                      f"{str(net_obj.compute_dtype or 'the weights dtype').replace('mlx.core.', '')}"),
        "seconds": {"load": load_s, "generate": gen_s, "score": score_s, "total": time.perf_counter() - tic},
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "versions": versions(),
    }


def format_probe(report: dict) -> str:
    from tabulate import tabulate

    def row(name, s):
        kl = s.get("kl")
        return [name, f"{s['correct']}/{s['total']}", f"{s['accuracy']:.1%}", s["critical_errors"],
                f"{s['format_compliance']:.0%}", s.get("flips", "-"), f"{s['margin']['min']:.2f}",
                f"{s['margin']['median']:.2f}", "-" if kl is None else f"{kl['mean']:.4g}",
                "-" if kl is None else f"{kl['same_top_rate']:.1%}", s["verdict"].upper()]

    rows = []
    if not report["quantized"]:
        rows.append(row(f"float{report['reference']['precision']}", report["reference"]))
    for b in report["bits"]:
        rows.append(row(f"{b}-bit" + (" (mixed)" if report["mixed"] else ""), report["by_bits"][str(b)]))
    head = ["model", "predicted", "accuracy", "critical", "format", "flips", "min margin", "median margin",
            "mean KL", "same top", "verdict"]
    out = [f"Model: {report['model']}   suite {report['suite']}   {report['probed_cases']} cases probed"
           + (f", {len(report['skipped_cases'])} without a decision token skipped" if report["skipped_cases"] else ""),
           tabulate(rows, headers=head, tablefmt="github")]
    for b in report["bits"]:
        crit = report["by_bits"][str(b)]["critical_cases"]
        if crit:
            out.append(f"{b}-bit predicted critical errors: {', '.join(crit)}")
    s = report["seconds"]
    n = len(report["bits"]) + (0 if report["quantized"] else 1)
    out.append(f"generate {s['generate']:.1f} s once, score {n} precision{'s' if n > 1 else ''} in one pass "
               f"{s['score']:.1f} s; total {s['total']:.1f} s")
    pm = report["predicted_min_bits"]
    out.append("Predicted minimum bit-width: " + (str(pm) if pm is not None else
               "none of the probed bit-widths passes")
               + " (PROVISIONAL: " + report["rule"]["evidence"] + "; confirm with make validate)")
    return "\n".join(out)
