"""mlx-lm's model directory, written one tensor at a time.

mlx_lm.utils.save holds every tensor of a 5 GB shard in memory before it writes
it. Here the weights go through qtools.io.shards (mlx-lm's shard plan, file
names and index; each header written first, each tensor's bytes as they come),
and the config, tokenizer and model card are mlx-lm's own (`save_config`,
`create_model_card`); this module adds what quantize needs on top: tensors
planned before they are computed (Spec), asked for by name, and the parameter
count and bits per weight mlx-lm would report.
"""

from __future__ import annotations

import glob
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, NamedTuple

from .. import QtoolsError
from .shards import plan_files, write_sharded
from .weights import dtype_code


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


def _raw(arr):
    """The C-order bytes of an evaluated mx.array (bfloat16 through a uint16 view: numpy has no bfloat16)."""
    import mlx.core as mx
    import numpy as np

    if arr.dtype == mx.bfloat16:
        arr = arr.view(mx.uint16)
    return np.ascontiguousarray(np.asarray(arr)).data


class _Planned(NamedTuple):
    name: str
    dtype: str  # safetensors code
    shape: tuple
    nbytes: int


def write_weights(dst: Path, specs: list[Spec], produce: Callable, total_parameters: int,
                  limit: int | None = None) -> dict:
    """mlx_lm.utils.save_model's files, streamed through shards.write_sharded: model.safetensors or
    model-0000k-of-0000n.safetensors (metadata {"format": "mlx"}) and model.safetensors.index.json,
    each tensor's value asked of `produce(name)` when its turn comes. Returns the weight map."""
    for s in specs:
        if dtype_code(s.dtype) is None:
            raise QtoolsError(f"tensor {s.name!r}: dtype {s.dtype} cannot be stored in safetensors")
    by_name = {s.name: s for s in specs}
    files = plan_files([_Planned(s.name, dtype_code(s.dtype), tuple(int(d) for d in s.shape), s.nbytes) for s in specs],
                       limit)

    def tensors():
        for _, group in files:
            for info in group:
                s, value = by_name[info.name], produce(info.name)
                if tuple(value.shape) != tuple(s.shape) or value.dtype != s.dtype:
                    raise QtoolsError(f"tensor {s.name!r} came out {value.dtype} {tuple(value.shape)}, "
                                      f"planned {s.dtype} {tuple(s.shape)}")
                yield info.name, _raw(value)
                del value

    return write_sharded(dst, files, tensors(), total_parameters)["weight_map"]


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
