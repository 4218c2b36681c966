"""mlx-lm's model directory, written one tensor at a time.

mlx_lm.utils.save holds every tensor of a 5 GB shard in memory before it writes
it. Here the shard layout, file names, index and config are mlx-lm's
(`make_shards`, `save_model`, `save_config`), but each safetensors header is
written first, from the tensors' shapes and dtypes, and each tensor's bytes are
asked for (`produce(name)`) and written as they come: peak memory is one tensor.
The tensors' data follow the header's (sorted) order, which any safetensors
reader accepts; MLX itself writes them in hash order.
"""

from __future__ import annotations

import glob
import json
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from .. import QtoolsError


def _codes() -> dict:
    import mlx.core as mx

    return {mx.bool_: "BOOL", mx.uint8: "U8", mx.uint16: "U16", mx.uint32: "U32", mx.uint64: "U64",
            mx.int8: "I8", mx.int16: "I16", mx.int32: "I32", mx.int64: "I64", mx.float16: "F16",
            mx.bfloat16: "BF16", mx.float32: "F32"}


@dataclass(frozen=True)
class Spec:
    """One output tensor, known before it is computed."""
    name: str
    shape: tuple
    dtype: object  # mx.Dtype

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= int(s)
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.size


def max_shard_bytes() -> int:
    """mlx-lm's shard limit (mlx_lm.utils.MAX_FILE_SIZE_GB, 5 GiB)."""
    from mlx_lm.utils import MAX_FILE_SIZE_GB

    return int(MAX_FILE_SIZE_GB) << 30


def shard_plan(specs: list[Spec], limit: int) -> list[list[Spec]]:
    """mlx_lm.utils.make_shards: in parameter order, a new shard when the next tensor would pass the limit."""
    shards: list[list[Spec]] = []
    size = 0
    for s in specs:
        if not shards or size + s.nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(s)
        size += s.nbytes
    return shards


def _raw(arr):
    """The C-order bytes of an evaluated mx.array (bfloat16 through a uint16 view: numpy has no bfloat16)."""
    import mlx.core as mx
    import numpy as np

    if arr.dtype == mx.bfloat16:
        arr = arr.view(mx.uint16)
    return np.ascontiguousarray(np.asarray(arr)).data


def write_safetensors(path: Path, specs: list[Spec], produce: Callable, metadata: dict | None = None) -> None:
    """A safetensors file of `specs`, each tensor's value asked of `produce(name)` when its turn comes."""
    codes = _codes()
    order = sorted(specs, key=lambda s: s.name)
    header: dict = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for s in order:
        if s.dtype not in codes:
            raise QtoolsError(f"tensor {s.name!r}: dtype {s.dtype} cannot be stored in safetensors")
        header[s.name] = {"dtype": codes[s.dtype], "shape": [int(d) for d in s.shape],
                          "data_offsets": [offset, offset + s.nbytes]}
        offset += s.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the format's alignment of the data that follows
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for s in order:
            value = produce(s.name)
            if tuple(value.shape) != tuple(s.shape) or value.dtype != s.dtype:
                raise QtoolsError(f"tensor {s.name!r} came out {value.dtype} {tuple(value.shape)}, "
                                  f"planned {s.dtype} {tuple(s.shape)}")
            f.write(_raw(value))
            del value


def write_weights(dst: Path, specs: list[Spec], produce: Callable, total_parameters: int,
                  limit: int | None = None) -> dict:
    """mlx_lm.utils.save_model's files, streamed: model.safetensors or model-0000k-of-0000n.safetensors
    (metadata {"format": "mlx"}) and model.safetensors.index.json. Returns the weight map."""
    shards = shard_plan(specs, max_shard_bytes() if limit is None else limit)
    fmt = "model-{:05d}-of-{:05d}.safetensors" if len(shards) > 1 else "model.safetensors"
    weight_map = {}
    for i, shard in enumerate(shards):
        name = fmt.format(i + 1, len(shards))
        write_safetensors(dst / name, shard, produce, {"format": "mlx"})
        weight_map.update({s.name: name for s in shard})
    index = {"metadata": {"total_size": sum(s.nbytes for s in specs), "total_parameters": total_parameters},
             "weight_map": {k: weight_map[k] for k in sorted(weight_map)}}
    with open(dst / "model.safetensors.index.json", "w") as f:
        json.dump(index, f, indent=4)
    return weight_map


def write_model_files(dst: Path, src: Path, config: dict, tokenizer, keep_vision_config: bool = False) -> None:
    """The rest of mlx_lm.utils.save: config.json (save_config), the tokenizer, the source's *.py
    and generation_config.json, the model card."""
    from mlx_lm.utils import create_model_card, save_config

    save_config(config, config_path=dst / "config.json", keep_vision_config=keep_vision_config)
    tokenizer.save_pretrained(dst)
    for p in ["*.py", "generation_config.json"]:
        for file in glob.glob(str(Path(src) / p)):
            shutil.copy(file, dst)
    create_model_card(dst, None)


def total_parameters(specs: Iterable[Spec], quantized_bits: dict) -> int:
    """mlx_lm.utils.get_total_parameters from the written tensors: a quantized module's packed
    weight counts 32 / bits parameters per uint32, its scales and biases none; the rest as stored."""
    n = 0
    for s in specs:
        module, _, leaf = s.name.rpartition(".")
        if module in quantized_bits:
            if leaf == "weight":
                n += s.numel * 32 // quantized_bits[module]
            elif leaf not in ("scales", "biases"):
                n += s.numel
        else:
            n += s.numel
    return n


def bits_per_weight(specs: list[Spec], quantized_bits: dict, extra_bytes: int = 0) -> float:
    """mlx_lm.utils.compute_bits_per_weight from the written tensors (plus a shipped adapter's bytes,
    which mlx-lm counts when it loads the adapter with the model)."""
    params = total_parameters(specs, quantized_bits)
    return (sum(s.nbytes for s in specs) + extra_bytes) * 8 / params if params else 0.0
