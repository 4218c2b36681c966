"""Fuse a LoRA/DoRA adapter into its base model, in float32, saved as float16.

Like `mlx_lm fuse --dequantize`, but every delta scale * B^T A^T is added in
float32: added in the base's dtype (bfloat16 keeps 8 mantissa bits), most of a
small fine-tune delta is rounded away before quantization ever sees it. A
quantized base is dequantized, never re-quantized at its own bits. The output
carries `qtools_provenance.json` so delta-survival can find base and adapter.

Streamed: each fused tensor is computed (qtools.io.fused.FusedView, the one home of
the fused values) and appended to its shard as soon as it is ready, so memory is
the tensors in flight, not the model; the files are the ones mlx-lm's save wrote.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import glob
import json
import shutil
import sys
import time
from pathlib import Path

from .. import BadValue, QtoolsError, versions
from ..format import progress as progress_bar
from ..io.adapters import check_adapter_dir
from ..io.atomic import atomic_output_dir, check_output, check_writable
from ..io.fused import DTYPES, FusedView, fuse_module_f32  # noqa: F401 (fuse_module_f32: its old home)
from ..io.modeldir import PROVENANCE, check_model_dir, dir_size, read_config, weights_bytes
from ..io.shards import write_sharded
from ..io.weights import SafetensorsModel, check_finite


def output_bytes_estimate(base: str | Path, dtype: str = "float16") -> int:
    """The fused model's size: every float tensor of the base in `dtype`, a quantized base's packed
    weights at their unpacked size (their scales and biases dropped), plus the other files."""
    base = Path(base)
    size = {"float16": 2, "bfloat16": 2, "float32": 4}[dtype]
    q = read_config(base).get("quantization") or {}
    total = dir_size(base) - weights_bytes(base)
    with SafetensorsModel(base) as st:
        packed = {n[: -len(".weight")] for n, i in st.tensors.items()
                  if n.endswith(".weight") and not i.is_float and f"{n[: -len('.weight')]}.scales" in st}
        for name, info in st.tensors.items():
            layer, leaf = name.rsplit(".", 1) if "." in name else ("", name)
            if layer in packed and leaf == "weight":
                own = q.get(layer) if isinstance(q.get(layer), dict) else {}
                total += info.numel * (32 // int(own.get("bits", q.get("bits", 4)))) * size
            elif layer in packed and leaf in ("scales", "biases"):
                continue  # dropped by the dequantization
            else:
                total += info.numel * size if info.is_float else info.nbytes
    return total


def fuse(
    base: str | Path,
    adapter: str | Path,
    out: str | Path,
    dtype: str = "float16",
    force: bool = False,
    max_shard_bytes: int | None = None,
) -> dict:
    """Fuse ADAPTER into BASE and write OUT atomically, one tensor at a time; return a report dict.
    max_shard_bytes: mlx-lm's shard size (5 GB) unless given."""
    if dtype not in DTYPES:
        raise BadValue(f"dtype {dtype!r} is not supported: use one of {', '.join(DTYPES)}", "--dtype")
    base_path = check_model_dir(base, "base model")
    adapter_path, _ = check_adapter_dir(adapter)
    check_output(out, [base_path, adapter_path], force)  # never into or over an input
    check_writable(out, output_bytes_estimate(base_path, dtype))
    # The adapter is small: checked whole, first. The base is checked as it is read: a fused tensor
    # that is not finite sends us to the inputs, so the error names a broken input, not an overflow.
    with SafetensorsModel.from_file(adapter_path / "adapters.safetensors") as st:
        check_finite(st, f"adapter {adapter_path}", _BROKEN_INPUT)

    tic = time.perf_counter()
    view = FusedView(base_path, adapter_path, dtype, shard_bytes=max_shard_bytes)
    tokenizer = _load_tokenizer(base_path, view.config)
    provenance = {
        **view.provenance(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "versions": versions(),
    }
    made = _missing_dirs(Path(out).parent)
    try:
        with atomic_output_dir(out, force) as tmp:
            write_sharded(tmp, view.files, _checked_tensors(view, base_path, dtype), view.total_parameters)
            # mlx-lm prints progress on stdout; keep stdout for our report / --json.
            with contextlib.redirect_stdout(sys.stderr):
                _save_model_files(tmp, base_path, view, tokenizer)
            (tmp / PROVENANCE).write_text(json.dumps(provenance, indent=2) + "\n")
    except BaseException:
        # A broken input is found while streaming, after the output's directory was made: leave none.
        for d in made:
            with contextlib.suppress(OSError):
                d.rmdir()
        raise
    finally:
        view.close()
    out = Path(out)
    return {
        "out": str(out),
        "base": provenance["base"],
        "adapter": provenance["adapter"],
        "fine_tune_type": provenance["fine_tune_type"],
        "fused_modules": len(view.fused_modules),
        "dequantized_base": view.base_quantization is not None,
        "dtype": dtype,
        "disk_bytes": dir_size(out),
        "seconds": time.perf_counter() - tic,
    }


def _missing_dirs(path: Path) -> list[Path]:
    """`path` and its ancestors that do not exist yet, deepest first."""
    out = []
    while not path.exists() and path != path.parent:
        out.append(path)
        path = path.parent
    return out


_BROKEN_INPUT = "the input is already broken, not an overflow of the fused weights; fix the model that wrote it"


def _checked_tensors(view: FusedView, base_path: Path, dtype: str):
    """(name, bytes) of every fused tensor in the view's order, each checked to be finite."""
    n = len(view.names())
    # the bar counts, it does not wrap items(): a wrapper would hold the last tensor while the next is computed
    ticks = iter(progress_bar(range(n), "fuse", enabled=n >= 8, unit="tensor"))
    for name, raw in view.raw_items():
        if view.count_nonfinite(name, raw):
            with SafetensorsModel(base_path) as st:  # the whole base, once, on this error path only
                check_finite(st, f"base model {base_path}", _BROKEN_INPUT)
            raise QtoolsError(f"fused weights overflow {dtype} in {name}; use --dtype float32 or bfloat16")
        yield name, raw
        del raw  # the writer holds the bytes; nothing here keeps them while the next is computed
        next(ticks, None)


def _load_tokenizer(base_path: Path, config: dict):
    from mlx_lm.utils import load_tokenizer

    try:
        return load_tokenizer(base_path, None, eos_token_ids=config.get("eos_token_id", None))
    except Exception as exc:
        raise QtoolsError(f"cannot load the tokenizer of base model {base_path}: {exc}") from None


def _save_model_files(dst: Path, base_path: Path, view: FusedView, tokenizer) -> None:
    """Everything mlx-lm's save() writes beside the weights: config.json, the tokenizer, the
    base's *.py and generation_config.json, a model card."""
    from mlx_lm.utils import create_model_card, save_config

    save_config(dict(view.config), config_path=dst / "config.json", keep_vision_config=view.keep_vision_config)
    tokenizer.save_pretrained(dst)
    for pattern in ["*.py", "generation_config.json"]:
        for file in glob.glob(str(base_path / pattern)):
            shutil.copy(file, dst)
    create_model_card(dst, None)
