"""Write a model's weights in mlx-lm's layout, one tensor at a time.

mlx-lm's `save_model` holds the whole model (or a 5 GB shard) in memory and
writes it with `mx.save_safetensors`. Here the shards, file names and
model.safetensors.index.json are the same as mlx-lm makes them (its
`make_shards` plan over the tensors in save order), but each file's header is
written first, from the names, dtypes and shapes alone, and each tensor's bytes
are appended as soon as it is computed (in a background thread, while the next
one is computed): memory is about two tensors, not a shard.
The header is MLX's (keys sorted, metadata {"format": "mlx"}), padded to 8 bytes;
the data follow in the header's order.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable
from pathlib import Path

from .. import QtoolsError


def max_shard_bytes() -> int:
    """mlx-lm's shard size limit (MAX_FILE_SIZE_GB)."""
    from mlx_lm.utils import MAX_FILE_SIZE_GB

    return MAX_FILE_SIZE_GB << 30


def plan_shards(sizes: list[tuple[str, int]], max_bytes: int) -> list[list[str]]:
    """Tensor names per shard, as mlx-lm's make_shards splits them: in order, a new shard when the
    next tensor would pass the limit (a tensor larger than the limit gets a shard of its own)."""
    shards: list[list[str]] = []
    size = 0
    for name, nbytes in sizes:
        if not shards or size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def shard_file_names(count: int) -> list[str]:
    if count == 1:
        return ["model.safetensors"]
    return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


class SafetensorsWriter:
    """One safetensors file written in the order of `specs` [(name, dtype code, shape, nbytes)]."""

    def __init__(self, path: Path, specs: list[tuple[str, str, tuple, int]], metadata: dict | None = None):
        self.path = Path(path)
        header: dict = {"__metadata__": dict(metadata)} if metadata else {}
        self._order, offset = [], 0
        for name, code, shape, nbytes in specs:
            header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            self._order.append((name, nbytes))
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":"), sort_keys=True, ensure_ascii=False).encode()
        raw += b" " * (-len(raw) % 8)
        self._next = 0
        self._f = open(self.path, "wb")
        self._f.write(struct.pack("<Q", len(raw)))
        self._f.write(raw)

    def write(self, name: str, data) -> None:
        """Append the next tensor's bytes (any C-contiguous buffer)."""
        want, nbytes = self._order[self._next]
        got = memoryview(data).nbytes
        if name != want or got != nbytes:
            raise QtoolsError(f"{self.path}: expected tensor {want!r} ({nbytes} bytes), got {name!r} ({got} bytes)")
        self._f.write(data)
        self._next += 1

    def close(self) -> None:
        self._f.close()


def plan_files(infos: list, max_bytes: int | None = None) -> list[tuple[str, list]]:
    """[(file name, [TensorInfo])] for tensors given in mlx-lm's save order: mlx-lm's shards and
    file names, each file's tensors in name order (its header's order, as readers list them)."""
    by_name = {i.name: i for i in infos}
    plan = plan_shards([(i.name, i.nbytes) for i in infos], max_shard_bytes() if max_bytes is None else max_bytes)
    return [(fname, [by_name[n] for n in sorted(names)]) for fname, names in zip(shard_file_names(len(plan)), plan)]


def write_sharded(out_dir: str | Path, files: list[tuple[str, list]], tensors: Iterable,
                  total_parameters: int) -> dict:
    """Write `tensors` [(name, C-contiguous buffer)] into `files` (plan_files), in that order, and
    mlx-lm's model.safetensors.index.json; each file is written as its tensors arrive. Returns the index.

    A tensor is written by a background thread while the iterator computes the next one: the time
    is about the larger of computing and writing, for one more output tensor in memory."""
    from concurrent.futures import ThreadPoolExecutor, wait

    out_dir = Path(out_dir)
    infos = [i for _, f in files for i in f]
    index = {"metadata": {"total_size": sum(i.nbytes for i in infos), "total_parameters": total_parameters},
             "weight_map": {}}
    it = iter(tensors)
    with ThreadPoolExecutor(1, thread_name_prefix="qtools-write") as pool:
        for fname, group in files:
            writer = SafetensorsWriter(out_dir / fname, [(i.name, i.dtype, i.shape, i.nbytes) for i in group],
                                       metadata={"format": "mlx"})
            pending = None
            try:
                for info in group:
                    name, data = next(it, (None, None))  # computed while `pending` is written
                    if pending is not None:
                        pending.result()  # a failed write raises here
                        pending = None
                    if name is None:
                        raise QtoolsError(f"{out_dir / fname}: tensor {info.name!r} was never written")
                    pending = pool.submit(writer.write, name, data)
                    del data  # the write holds it until it is done
                if pending is not None:
                    pending.result()
                    pending = None
            finally:
                if pending is not None:  # failing: let the write end before the file is closed and removed
                    wait([pending])
                writer.close()
            index["weight_map"].update({i.name: fname for i in group})
    index["weight_map"] = {k: index["weight_map"][k] for k in sorted(index["weight_map"])}
    with open(out_dir / "model.safetensors.index.json", "w") as f:
        json.dump(index, f, indent=4)
    return index
