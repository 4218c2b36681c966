"""One way to run a model: load it, prepare it for the backend, answer greedily, score teacher-forced.

validate, retention, probe and calibrate all run models through here, so what one of
them needs from the backend every one gets: on MLX's CPU backend a float MoE's expert
matmuls (GatherMM) run in float32 only (backend.prepare_for_cpu), which a model loaded
elsewhere lacked ("[GatherMM::eval] Currently only supports float32"). A model is either
loaded whole (load_model) or streamed layer by layer from its files (stream.StreamedModel);
both are mlx-lm modules, and the functions below take either.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from ..format import progress as progress_bar
from ..io import modeldir
from . import backend
from .fakequant import fake_quantize, quant_plan, quantizable_modules, quantized_value

__all__ = ["load_model", "prepare", "generate_one", "greedy_tokens", "batch_texts", "batch_answers", "log_softmax",
           "log_probs", "score_batches", "fake_quantize", "quant_plan", "quantizable_modules", "quantized_value"]


def prepare(net, model_dir) -> None:
    """Make a loaded model runnable on the backend it runs on (one stderr line on what the CPU
    backend costs; float MoE experts in float32 there)."""
    backend.prepare_for_cpu(net, model_dir)


def load_model(path: Path):
    """The model loaded whole and prepared for the backend: (model, tokenizer, config, seconds)."""
    net, tokenizer, config, secs = modeldir.load_model(path)
    prepare(net, path)
    return net, tokenizer, config, secs


# ---------------------------------------------------------------- greedy answers

def generate_one(net, tokenizer, prompt, max_tokens: int) -> tuple[str, int, float, list]:
    """Greedy generation of one prompt (mlx-lm's stream_generate); (text, generated tokens, seconds,
    the answer's token ids, end-of-sequence included when generated)."""
    from mlx_lm import stream_generate
    from mlx_lm.sample_utils import make_sampler

    sampler = make_sampler(temp=0.0)
    tic = time.perf_counter()
    text, tokens, ids = "", 0, []
    for resp in stream_generate(net, tokenizer, prompt, max_tokens=max_tokens, sampler=sampler):
        text += resp.text
        tokens = resp.generation_tokens
        ids.append(int(resp.token))
    return text, tokens, time.perf_counter() - tic, ids


def greedy_tokens(net, tokenizer, prompt, max_tokens: int) -> list:
    """The greedy answer's token ids (end-of-sequence included when generated): generate_one's."""
    return generate_one(net, tokenizer, prompt, max_tokens)[3]


def batch_texts(net, tokenizer, prompts: list, max_tokens: list) -> tuple[list, list, list]:
    """Greedy answers of many prompts in batches, as mlx-lm's batch_generate gives them (its
    BatchGenerator at its own batch sizes, left-padded, one KV cache per layer): (texts, generated
    token counts, token ids with the end-of-sequence that stopped them), in prompt order."""
    ids = batch_answers(net, tokenizer, prompts, max_tokens, all_at_once=False)
    stops = set(tokenizer.eos_token_ids)
    kept = [x[:-1] if x and x[-1] in stops else x for x in ids]  # batch_generate leaves the stop out
    return [tokenizer.decode(x) for x in kept], [len(x) for x in kept], ids


def batch_answers(net, tokenizer, prompts: list, max_tokens: list, progress: bool = False,
                  desc: str = "answers", all_at_once: bool = True) -> list:
    """Greedy answers' token ids (end-of-sequence included, as stream_generate gives it) of every
    prompt (mlx-lm's BatchGenerator, left-padded, one KV cache per layer): all in one batch, so a
    streamed model reads its weights once per generated token, not once per prompt; or, with
    all_at_once False, at BatchGenerator's own batch sizes (a model held whole)."""
    from mlx_lm.generate import BatchGenerator

    n = len(prompts)
    sizes = {"prefill_batch_size": n, "completion_batch_size": n} if all_at_once else {}
    gen = BatchGenerator(net, stop_tokens=[[t] for t in tokenizer.eos_token_ids], **sizes)
    bar = progress_bar(None, desc, enabled=progress, total=max(max_tokens))
    try:
        uids = gen.insert([list(p) for p in prompts], list(max_tokens))
        out = {u: [] for u in uids}
        while responses := gen.next_generated():
            for r in responses:
                out[r.uid].append(int(r.token))
            if bar is not None:
                bar.update(1)
    finally:
        gen.close()
        if bar is not None:
            bar.close()
    return [out[u] for u in uids]


# ---------------------------------------------------------------- teacher-forced scoring

def log_softmax(logits):
    """Log-probabilities in float32 over the last axis."""
    import mlx.core as mx

    logits = logits.astype(mx.float32)
    return logits - mx.logsumexp(logits, axis=-1, keepdims=True)


def log_probs(net, tokens):
    """(length, vocab) float32 log-probs of one token sequence, position i predicting token i+1."""
    import mlx.core as mx

    return log_softmax(net(mx.array(tokens)[None])[0])


# Tokens per batched forward pass: bounds the (batch, length, vocab) float32 log-probs held at once.
BATCH_TOKENS = 4096


def batches(seqs, vocab_hint: int, budget_tokens: int | None = None):
    """Consecutive runs of sequences whose padded size stays within the token budget."""
    budget = max(1, (budget_tokens or BATCH_TOKENS) * 32768 // max(vocab_hint, 32768))
    batch, longest = [], 0
    for seq in seqs:
        n = len(seq[0])
        if batch and max(longest, n) * (len(batch) + 1) > budget:
            yield batch
            batch, longest = [], 0
        batch.append(seq)
        longest = max(longest, n)
    if batch:
        yield batch


def score_batches(net, seqs, progress: bool = False, desc: str = "score", vocab_hint: int = 32768):
    """Per sequence (tokens, first scored position): (its scored rows' log-probs as an mlx array,
    the same as numpy, their top token).

    Sequences go through the model in right-padded batches: attention is causal, so the
    padding after a sequence cannot change its logits, and one call serves many cases.
    """
    import mlx.core as mx

    bar = progress_bar(None, desc, enabled=progress, total=len(seqs))  # None when disabled
    for batch in batches(seqs, vocab_hint):
        width = max(len(t) for t, _ in batch)
        ids = mx.array([t + [0] * (width - len(t)) for t, _ in batch])
        logp = log_softmax(net(ids))
        mx.eval(logp)
        for b, (tokens, start) in enumerate(batch):
            rows = logp[b, start:len(tokens) - 1]
            yield rows, np.array(rows), np.array(mx.argmax(rows, axis=-1))
        if bar is not None:
            bar.update(len(batch))
    if bar is not None:
        bar.close()
