"""Fine-tune retention from logits: how much of the fine-tune's effect a quantized model keeps.

On each scored token, KL(fused || model) is measured between the float fused
model (the reference) and a quantized model, and between the reference and the
base (the distance the fine-tune itself moved the outputs):

    logit_retention = 1 - mean KL(fused || quantized) / mean KL(fused || base)

1 means the quantized model predicts like the fine-tune, 0 as far off as the
base. Scored tokens: for a suite, each case's prompt with its chat template,
followed by the reference's own greedy answer (EOS included); only the answer's
positions are scored, so the tokens where the fine-tuned behaviour shows are
measured, not the user's text. For a text file, every position of each
paragraph (no template).

Forward passes only, one model in memory at a time. The reference runs once:
its top-k log-probs and the log of the remaining (tail) mass are cached to an
.npz. KL is computed over those top-k tokens plus the tail lumped into one
bucket, a lower bound on the full-vocabulary KL (exact when k = vocabulary).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np

from .. import BadValue, QtoolsError, __version__
from ..format import progress as progress_bar
from ..io.atomic import write_atomic
from ..io.modeldir import check_model_dir, quantization_info, read_config, text_config
from ..io.weights import check_model_finite, fingerprint
from .runner import log_probs

CACHE_VERSION = 1
DEFAULT_TOP_K = 32
TEXT_MAX_TOKENS = 512
_TINY = 1e-30


# ---------------------------------------------------------------- inputs

def _vocab_size(path: Path) -> int | None:
    v = text_config(read_config(path)).get("vocab_size")
    return int(v) if v else None


def _file_hash(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def _load(path: Path):
    from .runner import load_model

    net, tokenizer, _config, _secs = load_model(path)
    return net, tokenizer


def _free(net):
    import mlx.core as mx

    del net
    mx.clear_cache()


def build_sequences(net, tokenizer, suite=None, text=None, max_tokens=None, progress=True):
    """[(tokens, first scored position)]: position i's logits predict token i+1."""
    seqs = []
    if text is not None:
        try:
            body = Path(text).read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise QtoolsError(f"cannot read --text {text}: {exc}") from None
        for para in (p.strip() for p in body.split("\n\n")):
            ids = list(tokenizer.encode(para))[:TEXT_MAX_TOKENS] if para else []
            if len(ids) >= 2:
                seqs.append((ids, 0))
        if not seqs:
            raise QtoolsError(f"--text {text} has no paragraph of at least 2 tokens")
        return seqs
    from ..io.suite import Suite, load_suite
    from .runner import greedy_tokens
    from .scoring import build_prompt

    suite_obj = suite if isinstance(suite, Suite) else load_suite(suite)  # a path or a loaded suite
    cases = suite_obj.cases
    cases = progress_bar(cases, "reference answers", enabled=progress)
    for case in cases:
        prompt = list(build_prompt(tokenizer, case, suite_obj))
        limit = max_tokens or case.max_tokens or suite_obj.max_tokens
        seqs.append((prompt + greedy_tokens(net, tokenizer, prompt, limit), len(prompt) - 1))
    return seqs


def tail_logp(logp_topk: np.ndarray) -> np.ndarray:
    """log of the probability mass outside the top-k (one bucket)."""
    mass = 1.0 - np.exp(logp_topk.astype(np.float64)).sum(axis=-1)
    return np.log(np.maximum(mass, _TINY)).astype(np.float32)


# ---------------------------------------------------------------- reference cache

def topk_rows(logp, top_k: int) -> tuple[np.ndarray, np.ndarray]:
    """The top-k token ids and log-probs of each row of an (n, vocab) mlx array."""
    import mlx.core as mx

    top = mx.argsort(-logp, axis=-1)[:, :min(top_k, logp.shape[-1])]
    return np.array(top).astype(np.int32), np.array(mx.take_along_axis(logp, top, axis=-1))


def kl_same_top(logp, ref: dict, pos: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-token KL(reference || model) and same-top-token flags for one sequence's scored
    rows `logp` (an (n, vocab) mlx array), whose reference rows start at `pos`."""
    import mlx.core as mx

    n = logp.shape[0]
    idx = ref["topk_idx"][pos:pos + n]
    q = np.array(mx.take_along_axis(logp, mx.array(idx), axis=-1))
    kl = kl_topk(ref["topk_logp"][pos:pos + n], ref["tail_logp"][pos:pos + n], q, tail_logp(q))
    return kl, np.array(mx.argmax(logp, axis=-1)) == idx[:, 0]


def reference_topk(reference: Path, seqs, top_k: int, progress=True, net=None):
    """Top-k log-probs of the reference at every scored position."""
    idx, lp, vocab = [], [], 0
    it = progress_bar(seqs, f"reference {reference.name}", enabled=progress)
    for tokens, start in it:
        logp = log_probs(net, tokens)[start:len(tokens) - 1]
        vocab = logp.shape[-1]
        i, v = topk_rows(logp, top_k)
        idx.append(i)
        lp.append(v)
    topk_idx = np.concatenate(idx)
    topk_logp = np.concatenate(lp).astype(np.float32)
    return topk_idx, topk_logp, tail_logp(topk_logp), vocab


def _pack(seqs):
    lengths = np.array([len(t) for t, _ in seqs], dtype=np.int64)
    starts = np.array([s for _, s in seqs], dtype=np.int64)
    flat = np.array([tok for t, _ in seqs for tok in t], dtype=np.int64)
    return flat, lengths, starts


def _unpack(flat, lengths, starts):
    out, pos = [], 0
    for n, s in zip(lengths.tolist(), starts.tolist()):
        out.append((flat[pos:pos + n].tolist(), s))
        pos += n
    return out


def load_or_build_reference(reference: Path, source: dict, top_k: int, cache: Path | None,
                            suite=None, text=None, max_tokens=None, progress=True) -> dict:
    """The reference's sequences and top-k, from `cache` when it matches, else computed (and cached)."""
    meta = {"version": CACHE_VERSION, "reference": str(reference.resolve()),
            "fingerprint": fingerprint(reference), "source": source, "top_k": top_k,
            "max_tokens": max_tokens}
    if cache is not None and cache.is_file():
        try:
            with np.load(cache) as z:
                cached_meta = json.loads(str(z["meta"]))
                if cached_meta == meta:
                    seqs = _unpack(z["tokens"], z["lengths"], z["starts"])
                    return {"seqs": seqs, "topk_idx": z["topk_idx"], "topk_logp": z["topk_logp"],
                            "tail_logp": z["tail_logp"], "vocab": int(z["vocab"]), "cached": True}
        except (OSError, ValueError, KeyError):
            pass
        print(f"retention: {cache} is stale or unreadable; recomputing the reference", file=sys.stderr)
    net, tokenizer = _load(reference)
    seqs = build_sequences(net, tokenizer, suite=suite, text=text, max_tokens=max_tokens, progress=progress)
    topk_idx, topk_logp, tail, vocab = reference_topk(reference, seqs, top_k, progress, net=net)
    _free(net)
    if cache is not None:
        flat, lengths, starts = _pack(seqs)
        arrays = dict(meta=np.array(json.dumps(meta)), tokens=flat, lengths=lengths, starts=starts,
                      topk_idx=topk_idx, topk_logp=topk_logp, tail_logp=tail, vocab=np.array(vocab))
        write_atomic(cache, lambda f: np.savez(f, **arrays))
    return {"seqs": seqs, "topk_idx": topk_idx, "topk_logp": topk_logp, "tail_logp": tail,
            "vocab": vocab, "cached": False}


# ---------------------------------------------------------------- scoring

def kl_topk(ref_logp: np.ndarray, ref_tail: np.ndarray, q_logp: np.ndarray, q_tail: np.ndarray) -> np.ndarray:
    """Per-token KL(p || q) over the top-k buckets plus one tail bucket (natural log)."""
    p = np.exp(ref_logp.astype(np.float64))
    kl = (p * (ref_logp.astype(np.float64) - q_logp.astype(np.float64))).sum(axis=-1)
    pt = np.exp(ref_tail.astype(np.float64))
    kl += np.where(pt > _TINY, pt * (ref_tail.astype(np.float64) - q_tail.astype(np.float64)), 0.0)
    return np.maximum(kl, 0.0)  # float rounding can leave tiny negatives


def score_model(path: Path, ref: dict, progress=True) -> dict:
    """Per-token KL from the reference and same-top-token flags for one model."""
    net, _tok = _load(path)
    kls, same = [], []
    pos = 0
    it = progress_bar(ref["seqs"], f"score {path.name}", enabled=progress)
    for tokens, start in it:
        logp = log_probs(net, tokens)
        if logp.shape[-1] != ref["vocab"]:
            _free(net)
            raise QtoolsError(f"{path} has a vocabulary of {logp.shape[-1]} tokens but the reference has "
                              f"{ref['vocab']}: not the same model family")
        logp = logp[start:len(tokens) - 1]
        kl, st = kl_same_top(logp, ref, pos)
        kls.append(kl)
        same.append(st)
        pos += logp.shape[0]
    _free(net)
    return {"kl": np.concatenate(kls), "same_top": np.concatenate(same)}


def kl_stats(kl: np.ndarray, same_top: np.ndarray) -> dict:
    p50, p90, p99 = np.percentile(kl, [50, 90, 99]) if kl.size else (0.0, 0.0, 0.0)
    return {"mean": float(kl.mean()) if kl.size else 0.0, "p50": float(p50), "p90": float(p90),
            "p99": float(p99), "max": float(kl.max()) if kl.size else 0.0,
            "same_top_rate": float(same_top.mean()) if same_top.size else 0.0}


def retention_value(kl_model: float, kl_base: float) -> float | None:
    return None if kl_base <= 0 else 1.0 - kl_model / kl_base


# ---------------------------------------------------------------- entry point

def retention(
    reference: str | Path,
    base: str | Path,
    quantized,
    suite: str | Path | None = None,
    text: str | Path | None = None,
    top_k: int = DEFAULT_TOP_K,
    cache: str | Path | None = None,
    max_tokens: int | None = None,
    progress: bool = True,
) -> dict:
    """Score each QUANTIZED model (and the base) against the float REFERENCE; see module doc."""
    if suite is not None and text is not None:
        raise BadValue("give --suite or --text, not both", "--text")
    if suite is None and text is None:
        raise QtoolsError("give --suite or --text")
    if top_k < 1:
        raise BadValue("--top-k must be at least 1", "--top-k")
    if max_tokens is not None and max_tokens < 1:
        raise BadValue("--max-tokens must be at least 1", "--max-tokens")
    if not quantized:
        raise QtoolsError("give at least one quantized model to score")
    reference = check_model_dir(reference, "reference model")
    ref_quant = quantization_info(read_config(reference), reference / "config.json")
    if ref_quant["quantized"]:  # KL from a quantized reference measures nothing the fine-tune did
        raise QtoolsError(f"reference model {reference} is quantized ({ref_quant['bits']}-bit): the reference is "
                          "the float fine-tune (qtools fuse's output), the models scored against it are quantized")
    base = check_model_dir(base, "base model")
    models = [check_model_dir(q, "model") for q in quantized]
    for what, m in [("reference model", reference), ("base model", base), *[("model", m) for m in models]]:
        check_model_finite(m, f"{what} {m}", "its KL would be NaN; fix the model that wrote it")
    src_path = Path(suite if suite is not None else text)
    if not src_path.is_file():
        raise QtoolsError(f"{'suite' if suite is not None else '--text'} {src_path} does not exist")
    ref_vocab = _vocab_size(reference)
    for m in [base, *models]:
        v = _vocab_size(m)
        if ref_vocab and v and v != ref_vocab:
            raise QtoolsError(f"{m} has a vocabulary of {v} tokens but the reference {reference} has "
                              f"{ref_vocab}: not the same model family")
    source = {"kind": "suite" if suite is not None else "text", "path": str(src_path.resolve()),
              "sha256": _file_hash(src_path)}
    tic = time.perf_counter()
    ref = load_or_build_reference(reference, source, top_k, Path(cache) if cache else None,
                                  suite=suite, text=text, max_tokens=max_tokens, progress=progress)
    base_scores = score_model(base, ref, progress)
    base_stats = kl_stats(base_scores["kl"], base_scores["same_top"])
    results = []
    for m in models:
        s = score_model(m, ref, progress)
        stats = kl_stats(s["kl"], s["same_top"])
        results.append({
            "qtools_retention": 1,
            "model": m.resolve().name,
            "model_path": str(m.resolve()),
            "reference": str(reference.resolve()),
            "base": str(base.resolve()),
            "suite": _suite_name(suite) if suite is not None else None,
            "source": source,
            "logit_retention": retention_value(stats["mean"], base_stats["mean"]),
            "kl": stats,
            "base_kl": base_stats,
            "tokens": int(s["kl"].size),
            "sequences": len(ref["seqs"]),
            "top_k": top_k,
            "method": _method(source["kind"], top_k),
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "versions": {"qtools": __version__},
        })
    return {"reference": str(reference), "base": base_stats, "models": results,
            "tokens": int(base_scores["kl"].size), "sequences": len(ref["seqs"]),
            "reference_cached": ref["cached"], "top_k": top_k, "method": _method(source["kind"], top_k),
            "seconds": time.perf_counter() - tic}


def _suite_name(suite) -> str:
    from ..io.suite import load_suite

    return load_suite(suite).name


def _method(kind: str, top_k: int) -> str:
    scored = ("suite prompts (chat template) + the reference's greedy answer; answer tokens scored"
              if kind == "suite" else "text paragraphs; every token scored")
    return (f"{scored}; KL(reference || model) over the reference's top-{top_k} tokens plus one tail "
            "bucket (a lower bound on the full KL); logit_retention = 1 - KL(model) / KL(base)")


def format_retention(result: dict) -> str:
    from tabulate import tabulate

    def row(name, ret, s):
        return [name, "-" if ret is None else f"{ret:.3f}", f"{s['mean']:.4g}", f"{s['p50']:.3g}",
                f"{s['p90']:.3g}", f"{s['p99']:.3g}", f"{s['max']:.3g}", f"{s['same_top_rate']:.1%}"]

    rows = [row(m["model"], m["logit_retention"], m["kl"]) for m in result["models"]]
    rows.append(row(Path(result["models"][0]["base"]).name + " (base)", 0.0, result["base"]))
    table = tabulate(rows, headers=["model", "logit_retention", "mean KL", "p50", "p90", "p99", "max", "same top"],
                     tablefmt="github")
    note = (f"{result['tokens']} tokens from {result['sequences']} sequences"
            f"{' (reference from cache)' if result['reference_cached'] else ''}; {result['method']}")
    out = [table, "", note]
    if result["base"]["mean"] <= 0:
        out.append("logit_retention undefined: the base predicts exactly like the reference (no fine-tune to retain)")
    return "\n".join(out)
