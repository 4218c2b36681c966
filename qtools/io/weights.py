"""Zero-copy, memory-mapped access to safetensors model directories.

A tensor is handed out as a read-only numpy view into the mapped file (16-bit
types as raw uint16, since numpy has no bfloat16): nothing is read until the
kernel touches it, and `release()` drops the pages afterwards, so a model
larger than RAM can be analysed one tensor at a time.
"""

from __future__ import annotations

import json
import mmap
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import QtoolsError

# safetensors dtype -> (numpy storage dtype, element size)
_STORAGE = {
    "F32": (np.float32, 4),
    "F16": (np.uint16, 2),
    "BF16": (np.uint16, 2),
    "F64": (np.float64, 8),
    "I64": (np.int64, 8),
    "I32": (np.int32, 4),
    "U32": (np.uint32, 4),
    "I16": (np.int16, 2),
    "I8": (np.int8, 1),
    "U8": (np.uint8, 1),
    "BOOL": (np.bool_, 1),
}
FLOAT_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}
# safetensors dtype code -> MLX dtype name: the one table between the file format and mx.array.
MX_DTYPE_NAMES = {"F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64", "I64": "int64",
                  "I32": "int32", "I16": "int16", "I8": "int8", "U64": "uint64", "U32": "uint32", "U16": "uint16",
                  "U8": "uint8", "BOOL": "bool_"}
_CODE_OF_NAME = {name.rstrip("_"): code for code, name in MX_DTYPE_NAMES.items()}


def mx_dtype(code: str):
    """The MLX dtype of a safetensors dtype code ("BF16" -> mx.bfloat16)."""
    import mlx.core as mx

    return getattr(mx, MX_DTYPE_NAMES[code])


def dtype_code(dtype) -> str | None:
    """The safetensors code of an MLX dtype (mx.bfloat16 -> "BF16"); None if safetensors has none."""
    return _CODE_OF_NAME.get(str(dtype).rsplit(".", 1)[-1])
# A float is NaN or Inf exactly when all its exponent bits are set: (unsigned view, exponent mask).
_EXPONENT = {"F16": (np.uint16, 0x7C00), "BF16": (np.uint16, 0x7F80), "F32": (np.uint32, 0x7F800000),
             "F64": (np.uint64, 0x7FF0000000000000)}
_MAX_HEADER = 100 * 1024 * 1024
# Hugging Face MoE checkpoints store one tensor per expert; mlx-lm's sanitize() stacks them into
# switch_mlp (qwen2/3_moe, olmoe, deepseek: same leaf names; mixtral: w1/w2/w3).
_HUB_EXPERT = re.compile(r"^(?P<pre>.+)\.experts\.(?P<e>\d+)\.(?P<leaf>[A-Za-z0-9_]+)\.(?P<part>weight|scales|biases)$")
_HUB_EXPERT_LEAF = {"w1": "gate_proj", "w2": "down_proj", "w3": "up_proj"}


def expert_stacks(infos: dict) -> dict[str, list]:
    """{stacked mlx-lm name: [TensorInfo of expert 0, 1, ...]} for the un-stacked experts of a
    Hub checkpoint: expert E of the Hub file is slice E of mlx-lm's switch_mlp tensor."""
    groups: dict = {}
    for name, info in infos.items():
        m = _HUB_EXPERT.match(name)
        if m:
            leaf = _HUB_EXPERT_LEAF.get(m["leaf"], m["leaf"])
            groups.setdefault(f"{m['pre']}.switch_mlp.{leaf}.{m['part']}", {})[int(m["e"])] = info
    out = {}
    for stacked, by_e in groups.items():
        missing = sorted(set(range(max(by_e) + 1)) - set(by_e))
        if missing:
            raise QtoolsError(f"{by_e[min(by_e)].file.parent}: expert {missing[0]} of {stacked!r} is missing")
        parts = [by_e[e] for e in range(len(by_e))]
        if len({(p.dtype, p.shape) for p in parts}) != 1:
            raise QtoolsError(f"{parts[0].file.parent}: the experts of {stacked!r} differ in dtype or shape")
        out[stacked] = parts
    return out


@dataclass
class TensorInfo:
    name: str
    dtype: str  # safetensors code: F16, BF16, F32, ...
    shape: tuple
    file: Path
    start: int  # absolute byte offset in the file
    nbytes: int

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def is_float(self) -> bool:
        return self.dtype in FLOAT_DTYPES


def fingerprint(model_dir) -> str:
    """Changes when a model directory's weights or config change: the name, size and a hash
    of the first and last MiB of every .safetensors and .json file (cheap for large models;
    any retraining or re-quantization changes it, a mere copy or touch does not)."""
    import hashlib

    h = hashlib.sha256()
    files = sorted(Path(model_dir).iterdir())
    if (Path(model_dir) / "adapters").is_dir():  # an adapter shipped with the model is part of it
        files += sorted((Path(model_dir) / "adapters").iterdir())
    for f in files:
        if not (f.is_file() and f.suffix in (".safetensors", ".json")):
            continue
        size = f.stat().st_size
        name = f.name if f.parent == Path(model_dir) else f"adapters/{f.name}"
        h.update(f"{name}:{size};".encode())
        with open(f, "rb") as fh:
            h.update(fh.read(1 << 20))
            if size > 1 << 20:
                fh.seek(max(1 << 20, size - (1 << 20)))
                h.update(fh.read(1 << 20))
    return h.hexdigest()[:16]


def _read_header(path: Path) -> dict[str, TensorInfo]:
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise QtoolsError(f"{path}: not a safetensors file (truncated header)")
            (n,) = struct.unpack("<Q", head)
            if n <= 0 or n > _MAX_HEADER or 8 + n > size:
                raise QtoolsError(f"{path}: corrupt safetensors header (length {n}, file {size} bytes)")
            raw = f.read(n)
    except OSError as exc:
        raise QtoolsError(f"{path}: cannot read ({exc.strerror or exc})") from None
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise QtoolsError(f"{path}: corrupt safetensors header (not valid JSON)") from None
    if not isinstance(header, dict):
        raise QtoolsError(f"{path}: corrupt safetensors header")
    data_start = 8 + n
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = meta["dtype"]
            shape = tuple(int(s) for s in meta["shape"])
            begin, end = (int(x) for x in meta["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise QtoolsError(f"{path}: corrupt safetensors header entry for tensor {name!r}") from None
        if dtype not in _STORAGE:
            raise QtoolsError(f"{path}: tensor {name!r} has unsupported dtype {dtype}")
        numel = int(np.prod(shape)) if shape else 1
        if end - begin != numel * _STORAGE[dtype][1] or begin < 0 or data_start + end > size:
            raise QtoolsError(
                f"{path}: tensor {name!r} lies outside the file or does not match its shape "
                "(truncated or corrupt safetensors file)"
            )
        out[name] = TensorInfo(name, dtype, shape, path, data_start + begin, end - begin)
    return out


class TensorIndex:
    """names(), `name in` and info() over self.tensors ({name: TensorInfo}): what a tensor reader
    (SafetensorsModel, io.fused.FusedView) answers before reading anything."""

    tensors: dict

    def names(self) -> list[str]:
        return list(self.tensors)

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise QtoolsError(self._no_tensor(name)) from None

    def _no_tensor(self, name: str) -> str:
        raise NotImplementedError


class SafetensorsModel(TensorIndex):
    """All tensors of a model directory (single file or sharded with an index)."""

    def __init__(self, path: str | os.PathLike, stack_experts: bool = False):
        """stack_experts: present a Hub checkpoint's per-expert tensors under mlx-lm's stacked
        switch_mlp names, assembled from their memory maps one stacked tensor at a time."""
        self.path = Path(path)
        if not self.path.exists():
            raise QtoolsError(f"{self.path}: no such directory")
        if not self.path.is_dir():
            raise QtoolsError(f"{self.path}: not a directory")
        files = self._weight_files()
        self.tensors: dict[str, TensorInfo] = {}
        for f in files:
            for name, info in _read_header(f).items():
                self.tensors[name] = info
        self._maps: dict[Path, mmap.mmap] = {}
        self._stacks: dict[str, list[TensorInfo]] = {}
        if stack_experts:
            self._stacks = expert_stacks(self.tensors)
            for stacked, parts in self._stacks.items():
                for p in parts:
                    del self.tensors[p.name]
                p0 = parts[0]
                self.tensors[stacked] = TensorInfo(stacked, p0.dtype, (len(parts), *p0.shape), p0.file, -1,
                                                   p0.nbytes * len(parts))
        from .modeldir import read_config

        self.config = read_config(self.path, required=False)

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "SafetensorsModel":
        """One bare .safetensors file (e.g. adapters.safetensors)."""
        self = cls.__new__(cls)
        self.path = Path(path).parent
        if not Path(path).exists():
            raise QtoolsError(f"{path}: no such file")
        self.tensors = _read_header(Path(path))
        self._maps = {}
        self._stacks = {}
        self.config = {}
        return self

    def _weight_files(self) -> list[Path]:
        index = self.path / "model.safetensors.index.json"
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise QtoolsError(f"{index}: corrupt index (no weight_map)") from None
            files = sorted({self.path / f for f in weight_map.values()})
            missing = [str(f) for f in files if not f.exists()]
            if missing:
                raise QtoolsError(f"{index}: shard {missing[0]} is missing")
            return files
        files = sorted(self.path.glob("*.safetensors"))
        if not files:
            raise QtoolsError(f"{self.path}: no .safetensors weights found")
        return files

    @property
    def quantization(self) -> dict | None:
        return self.config.get("quantization") or self.config.get("quantization_config")

    def _no_tensor(self, name: str) -> str:
        return f"{self.path}: no tensor named {name!r}"

    def is_stack(self, name: str) -> bool:
        """Whether `name` is a stacked expert tensor (stack_experts), assembled by raw() from its experts."""
        return name in self._stacks

    def raw_parts(self, name: str):
        """A stacked expert tensor's experts in order, each a read-only view of its memory map (no
        copy), its pages dropped when the next is asked for."""
        for p in self._stacks[name]:
            yield self._view(p)
            self._drop(p)

    def raw(self, name: str) -> np.ndarray:
        """Read-only view of the tensor's stored bytes (16-bit floats as uint16); a stacked
        expert tensor is a copy assembled slice by slice (the slices' pages dropped as it goes)."""
        if name in self._stacks:
            parts = self._stacks[name]
            out = np.empty(self.info(name).shape, dtype=_STORAGE[parts[0].dtype][0])
            for e, p in enumerate(parts):
                out[e] = self._view(p)
                self._drop(p)
            return out
        return self._view(self.info(name))

    def _view(self, info: TensorInfo) -> np.ndarray:
        mm = self._maps.get(info.file)
        if mm is None:
            with open(info.file, "rb") as f:
                mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            self._maps[info.file] = mm
        storage, _ = _STORAGE[info.dtype]
        arr = np.frombuffer(mm, dtype=storage, count=info.numel, offset=info.start)
        return arr.reshape(info.shape)

    def release(self, name: str, upto: int | None = None) -> None:
        """Tell the kernel the tensor's pages may be dropped (keeps RSS near one tensor); with
        `upto`, those of its first `upto` bytes only (a tensor read in parts)."""
        for info in self._stacks.get(name) or [self.info(name)]:
            self._drop(info, upto)

    def _drop(self, info: TensorInfo, upto: int | None = None) -> None:
        mm = self._maps.get(info.file)
        if mm is None or not hasattr(mmap, "MADV_DONTNEED"):
            return
        page = mmap.PAGESIZE
        start = (info.start // page) * page
        length = info.start + (info.nbytes if upto is None else min(upto, info.nbytes)) - start
        try:
            mm.madvise(mmap.MADV_DONTNEED, start, length)
        except (OSError, ValueError):
            pass

    def to_float32(self, name: str) -> np.ndarray:
        """A float32 copy of a (small) tensor, e.g. adapter factors."""
        info = self.info(name)
        raw = self.raw(name)
        if info.dtype == "F32":
            return np.array(raw, dtype=np.float32)
        if info.dtype == "F16":
            return raw.view(np.float16).astype(np.float32)
        if info.dtype == "BF16":
            return (raw.astype(np.uint32) << 16).view(np.float32)
        raise QtoolsError(f"{info.file}: tensor {name!r} is {info.dtype}, not a float tensor")

    def close(self) -> None:
        for mm in self._maps.values():
            try:
                mm.close()
            except BufferError:
                pass  # a view is still alive; the map closes when it is collected
        self._maps.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def count_nonfinite(st: "SafetensorsModel", name: str, chunk: int = 1 << 24) -> int:
    """NaN/Inf values of one stored tensor, read from the memory map in chunks (no float copy)."""
    try:
        return count_nonfinite_raw(st.raw(name), st.info(name).dtype, chunk)
    finally:
        st.release(name)


def count_nonfinite_raw(raw: np.ndarray, dtype: str, chunk: int = 1 << 24) -> int:
    """NaN/Inf values in a tensor's stored bits (`raw` as SafetensorsModel.raw gives it, `dtype`
    its safetensors code), counted in chunks from the exponent bits: no float copy."""
    if dtype not in _EXPONENT:
        return 0
    utype, mask = _EXPONENT[dtype]
    flat = raw.reshape(-1).view(utype)
    mask = utype(mask)
    buf = np.empty(min(chunk, flat.size), utype)
    hit = np.empty(buf.size, np.bool_)
    n = 0
    for i in range(0, flat.size, chunk):
        part = flat[i:i + chunk]
        b, h = buf[:part.size], hit[:part.size]
        np.bitwise_and(part, mask, out=b)
        np.equal(b, mask, out=h)
        n += int(np.count_nonzero(h))
    return n


def check_finite(st: "SafetensorsModel", what: str, hint: str | None = None, chunk: int = 1 << 24) -> None:
    """Raise a QtoolsError naming the first float tensor with NaN/Inf values; one tensor at a time."""
    for name, info in st.tensors.items():
        n = count_nonfinite(st, name, chunk)
        if n:
            raise QtoolsError(f"{what}: tensor {name!r} ({info.file.name}) has {n} NaN or Inf value(s) of "
                              f"{info.numel}" + (f": {hint}" if hint else ""))


def check_model_finite(path, what: str, hint: str | None = None) -> None:
    """check_finite over a whole model directory: every command that runs a model's numbers
    refuses a NaN/Inf weight the same way (quantize, fuse, probe, retention)."""
    with SafetensorsModel(path) as st:
        check_finite(st, what, hint)


class MappedTensors:
    """A model directory's tensors as a tensor source, the interface every streamed reader takes
    (the streamed quantize and probe; io.fused.FusedTensors serves base + adapter the same way):
    names(), info(name) -> TensorInfo, get(name) -> the stored tensor as an evaluated mx.array
    (read now, its pages dropped: the source holds nothing), close()."""

    def __init__(self, path):
        self.st = SafetensorsModel(path)
        self.path = Path(path)

    def names(self) -> list:
        return self.st.names()

    def info(self, name: str):
        return self.st.info(name)

    def get(self, name: str):
        import mlx.core as mx

        info = self.st.info(name)
        arr = mx.array(self.st.raw(name))
        if info.dtype in ("F16", "BF16"):  # stored as uint16: numpy has no bfloat16
            arr = arr.view(mx_dtype(info.dtype))
        mx.eval(arr)
        self.st.release(name)
        return arr

    def close(self) -> None:
        self.st.close()
