"""Calibration data for the data-driven quantizers (AWQ, GPTQ, DWQ, dynamic).

DATA is a file the user names, never a download: a JSONL file in one of
mlx-lm's fine-tuning formats ({"text"}, {"messages"[, "tools"]},
{"prompt", "completion"}) or a plain .txt file. The records are tokenized
the way `mlx_lm lora` tokenizes them (its own dataset classes), so a
fine-tune is calibrated on the token sequences it was trained on.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .. import QtoolsError
from .chat import messages_problem, tools_problem

FORMATS = "JSONL with {\"text\"}, {\"messages\"} or {\"prompt\", \"completion\"} records, or a .txt file"


def _record_kind(rec) -> str | None:
    """The mlx-lm format a record is in, by its keys (its values are checked by _record_problem)."""
    if not isinstance(rec, dict):
        return None
    if "prompt" in rec and "completion" in rec:
        return "completions"
    if "messages" in rec:
        return "chat"
    if "text" in rec:
        return "text"
    return None


def _record_problem(rec: dict, kind: str) -> str | None:
    """What a record holds that mlx-lm's dataset would not tokenize as meant (a number where the
    text belongs is no text at all), or None."""
    keys = {"completions": ("prompt", "completion"), "text": ("text",)}.get(kind, ())
    for key in keys:
        if not isinstance(rec[key], str):
            return f"{key!r} is {json.dumps(rec[key])[:40]}, not a string"
    if kind == "text" and not rec["text"].strip():
        return "'text' is empty"
    if kind == "chat":
        return messages_problem(rec["messages"]) or (
            tools_problem(rec["tools"]) if rec.get("tools") is not None else None)
    return None


def read_records(path: str | Path) -> list[dict]:
    """The records of a DATA file, checked: one clear error for a missing, empty,
    binary or malformed file, or records of mixed or unknown formats."""
    path = Path(path)
    if not os.path.exists(path):  # os.path: a name too long for the file system does not exist either
        raise QtoolsError(f"DATA {path} does not exist")
    if not os.path.isfile(path):
        raise QtoolsError(f"DATA {path} is not a file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise QtoolsError(f"DATA {path} is not text (not UTF-8): give {FORMATS}") from None
    except OSError as exc:
        raise QtoolsError(f"cannot read DATA {path}: {exc.strerror or exc}") from None
    if "\x00" in text:
        raise QtoolsError(f"DATA {path} is not text (it holds NUL bytes): give {FORMATS}")
    if not text.strip():
        raise QtoolsError(f"DATA {path} is empty")
    if path.suffix.lower() != ".jsonl":
        if path.suffix.lower() not in (".txt", ".text", ".md", ""):
            raise QtoolsError(f"DATA {path}: unknown file type {path.suffix!r}: give {FORMATS}")
        return [{"text": text}]
    records, kinds = [], set()
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            raise QtoolsError(f"DATA {path} line {n} is not JSON ({exc.msg}): give {FORMATS}") from None
        kind = _record_kind(rec)
        if kind is None:
            raise QtoolsError(f"DATA {path} line {n} is not an mlx-lm record: give {FORMATS}")
        problem = _record_problem(rec, kind)
        if problem:
            raise QtoolsError(f"DATA {path} line {n}: {problem}")
        kinds.add(kind)
        records.append(rec)
    if len(kinds) > 1:
        raise QtoolsError(f"DATA {path} mixes record formats ({', '.join(sorted(kinds))}): use one")
    return records


def tokenize(records: list[dict], tokenizer) -> list[tuple[list[int], int]]:
    """(tokens, prompt offset) per record, through mlx-lm's own dataset classes."""
    import types

    from mlx_lm.tuner.datasets import create_dataset

    if len(records) == 1 and set(records[0]) == {"text"}:
        # One long text (a .txt file): split at blank lines so sequences stay short.
        parts = [p for p in records[0]["text"].split("\n\n") if p.strip()]
        records = [{"text": p} for p in parts] or records
    try:
        dataset = create_dataset(records, tokenizer, types.SimpleNamespace(mask_prompt=False))
        seqs = [dataset.process(dataset[i]) for i in range(len(dataset))]
    except Exception as exc:  # a chat template that rejects a record, a tokenizer error
        raise QtoolsError(f"cannot tokenize the calibration data: {exc}") from None
    return [(list(t), int(off)) for t, off in seqs if len(t) > 1]


def token_blocks(seqs: list[tuple[list[int], int]], sequence_length: int, num_samples: int = -1, seed: int = 0):
    """Concatenate the sequences and cut them into (n, sequence_length) blocks, as
    mlx_lm.quant.utils.load_data does with its downloaded text; random order."""
    import mlx.core as mx
    import numpy as np

    flat = [t for toks, _ in seqs for t in toks]
    if len(flat) < sequence_length:
        sequence_length = len(flat)  # a small file: one block of all of it
    if sequence_length < 8:
        raise QtoolsError(f"the calibration data holds only {len(flat)} tokens: give more text")
    n = len(flat) // sequence_length
    blocks = np.asarray(flat[: n * sequence_length], np.int32).reshape(n, sequence_length)
    order = np.random.default_rng(seed).permutation(n)
    if num_samples > 0:
        order = order[:num_samples]
    return mx.array(blocks[order])
