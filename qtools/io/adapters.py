"""Read an mlx-lm adapter directory as low-rank factors per model weight.

For each adapted module the delta mlx-lm fuses is written as B @ A with
B = (rows x rank) and A = (experts*rank x cols), so the kernel can rebuild
any row of the delta without materialising it:

    Linear      delta = scale * lora_b^T @ lora_a^T           (out x in)
    Embedding   delta = scale * lora_a @ lora_b               (vocab x dims)
    SwitchLinear delta[e] = scale * lora_b[e] @ lora_a[e]     (experts x out x in)
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import QtoolsError
from .weights import SafetensorsModel


@dataclass
class LowRankDelta:
    weight_name: str
    bt: np.ndarray  # (rows x rank) float32, scale folded in
    at: np.ndarray  # (experts*rank x cols) float32
    experts: int
    rank: int

    def subspace(self) -> tuple[np.ndarray, np.ndarray]:
        """Orthonormal bases of the delta's output space u (rows x rank) and input
        space v (cols x rank), stacked per expert."""
        rows = self.bt.shape[0] // self.experts
        cols = self.at.shape[1]
        r = self.rank
        u = np.empty_like(self.bt)
        v = np.empty((self.experts * cols, r), np.float32)
        for e in range(self.experts):
            u[e * rows : (e + 1) * rows] = orthonormal_columns(self.bt[e * rows : (e + 1) * rows])
            v[e * cols : (e + 1) * cols] = orthonormal_columns(self.at[e * r : (e + 1) * r].T)
        return u, v


class LazyDeltas(Mapping):
    """Weight name -> LowRankDelta, read from the adapter file on access (Adapter.deltas)."""

    def __init__(self, adapter: "Adapter", plan: dict):
        self._adapter, self._plan = adapter, plan

    def __getitem__(self, name: str) -> LowRankDelta:
        module, leaves, shape = self._plan[name]
        return self._adapter._read(module, name, leaves, shape)

    def __iter__(self):
        return iter(self._plan)

    def __len__(self):
        return len(self._plan)


def orthonormal_columns(x: np.ndarray) -> np.ndarray:
    """An orthonormal basis of x's column space (tall x: n x r, float32 out), padded
    with zero columns where x is rank-deficient (an untrained lora_b is all zeros).

    Through the r x r Gram matrix (float64) and its eigendecomposition, in the
    native module: n*r^2 work, where a QR of the tall matrix costs far more in
    LAPACK, and numpy's matmul would wake a threaded BLAS whose workers spin for
    about 0.1 s after every call, on the cores the kernel is about to use.
    """
    from .. import _ext

    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError("orthonormal_columns takes a 2-D array")
    if not x.flags.c_contiguous and x.T.flags.c_contiguous:
        return _ext.orthonormal_columns(x.T, transposed=True)  # e.g. lora_a^T: no copy
    return _ext.orthonormal_columns(np.ascontiguousarray(x))


FINE_TUNE_TYPES = ("lora", "dora", "full")


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _integer(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


# What mlx-lm's load_adapters and qtools read of an adapter_config.json: field -> (check, what it must be).
CONFIG_FIELDS = {
    "fine_tune_type": (lambda v: v in FINE_TUNE_TYPES, "one of " + ", ".join(FINE_TUNE_TYPES)),
    "num_layers": (_integer, "an integer (the number of adapted layers, from the last)"),
    "lora_parameters": (lambda v: isinstance(v, dict), "an object {rank, scale, dropout, keys}"),
    "model": (lambda v: isinstance(v, str), "a string (the base model)"),
}
LORA_FIELDS = {
    "rank": (lambda v: _integer(v) and v >= 1, "an integer >= 1"),
    "scale": (_number, "a finite number"),
    "dropout": (lambda v: _number(v) and 0 <= v <= 1, "a number between 0 and 1"),
    "keys": (lambda v: v is None or (isinstance(v, list) and all(isinstance(k, str) and k for k in v)),
             "a list of module names"),
}


def _shown(v) -> str:
    s = json.dumps(v)
    return s if len(s) <= 40 else s[:37] + "..."


def read_adapter_config(path: str | Path, complete: bool = True) -> dict:
    """An adapter_config.json, read and checked in the one place every reader goes through: JSON
    text, each field mlx-lm reads of its type (fine_tune_type, num_layers, lora_parameters' rank,
    scale, dropout, keys), and, when `complete`, the fields a LoRA/DoRA adapter needs. Any flaw is
    one QtoolsError naming the file and the field."""
    path = Path(path)
    try:
        cfg = json.loads(path.read_bytes().decode("utf-8"))
    except OSError as exc:
        raise QtoolsError(f"cannot read {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise QtoolsError(f"{path} is not text (not UTF-8): an adapter_config.json is a JSON object") from None
    except json.JSONDecodeError as exc:
        raise QtoolsError(f"{path} is not valid JSON: {exc.msg}") from None
    if not isinstance(cfg, dict):
        raise QtoolsError(f"{path} is not a JSON object")
    params = cfg.get("lora_parameters")
    fields = [(k, cfg, k, spec) for k, spec in CONFIG_FIELDS.items()]
    if isinstance(params, dict):
        fields += [(f"lora_parameters.{k}", params, k, spec) for k, spec in LORA_FIELDS.items()]
    for name, obj, key, (check, want) in fields:
        if key in obj and not check(obj[key]):
            raise QtoolsError(f"{path}: {name!r} is {_shown(obj[key])}, not {want}")
    if complete and cfg.get("fine_tune_type", "lora") != "full":
        # what a LoRA/DoRA adapter must have: mlx-lm's load_adapters reads them (a full fine-tune has no factors)
        missing = [k for k in ("num_layers", "lora_parameters") if k not in cfg] or \
            [f"lora_parameters.{k}" for k in ("rank", "scale") if k not in params]
        if missing:
            raise QtoolsError(f"{path}: {missing[0]!r} is missing (an mlx-lm LoRA/DoRA adapter has it)")
    return cfg


def check_adapter_dir(adapter: str | Path) -> tuple[Path, dict]:
    """An mlx-lm adapter directory and its config (read_adapter_config), or a clear error."""
    path = Path(adapter)
    if not os.path.isdir(path):  # os.path: a name too long for the file system does not exist either
        raise QtoolsError(f"adapter {path} does not exist (a directory with adapter_config.json)")
    cfg_file = path / "adapter_config.json"
    if not cfg_file.is_file():
        raise QtoolsError(f"adapter {path} has no adapter_config.json")
    if not (path / "adapters.safetensors").is_file():
        raise QtoolsError(f"adapter {path} has no adapters.safetensors")
    return path, read_adapter_config(cfg_file)


class Adapter:
    """An mlx-lm adapter directory (adapter_config.json + adapters.safetensors)."""

    def __init__(self, path: str | Path):
        self.path, self.config = check_adapter_dir(path)
        weights = self.path / "adapters.safetensors"
        self.fine_tune_type = self.config.get("fine_tune_type", "lora")
        if self.fine_tune_type == "full":
            raise QtoolsError(
                f"{self.path}: a full fine-tune has no low-rank delta; use --base with the original model"
            )
        params = self.config["lora_parameters"]  # checked: rank and scale are there, of their types
        self.scale = float(params["scale"])
        self.rank = params.get("rank")
        self.base_model = self.config.get("model")
        self._st = SafetensorsModel.from_file(weights)
        modules = {}
        for name in self._st.names():
            module, _, leaf = name.rpartition(".")
            if leaf in ("lora_a", "lora_b", "m"):
                modules.setdefault(module, {})[leaf] = name
        for module, leaves in modules.items():
            if "lora_a" not in leaves or "lora_b" not in leaves:
                raise QtoolsError(f"{weights}: module {module} lacks lora_a or lora_b")
        if not modules:
            raise QtoolsError(f"{weights}: no lora_a/lora_b tensors")
        self.modules = modules

    @property
    def is_dora(self) -> bool:
        return self.fine_tune_type == "dora" or any("m" in v for v in self.modules.values())

    def weight_name(self, module: str, model_names) -> str:
        """The model tensor a module adapts (exact name, else a unique suffix match)."""
        name = module + ".weight"
        if name in model_names:
            return name
        hits = [n for n in model_names if n.endswith("." + name) or name.endswith("." + n)]
        if len(hits) == 1:
            return hits[0]
        raise QtoolsError(f"adapter module {module!r} is not in the model (no tensor {name!r})")

    def deltas(self, model: SafetensorsModel, lazy: bool = False):
        """Map model weight name -> low-rank delta, checking every shape against the model first.
        lazy: each delta's factors are read when it is asked for, their pages dropped after, so an
        adapter of any size costs one module's factors in memory (a rank-16 adapter on a 30 GB
        model is 350 MB of float32)."""
        plan = {}
        names = model.names()
        for module, leaves in self.modules.items():
            wname = self.weight_name(module, names)
            shape = model.info(wname).shape
            # zero-stride stand-ins: the shapes are checked without reading the factors
            a, b = (np.broadcast_to(np.float32(0), self._st.info(leaves[k]).shape) for k in ("lora_a", "lora_b"))
            self._factor(module, wname, shape, a, b)
            plan[wname] = (module, leaves, shape)
        out = LazyDeltas(self, plan)
        return out if lazy else dict(out.items())

    def _read(self, module, wname, leaves, shape) -> LowRankDelta:
        a = self._st.to_float32(leaves["lora_a"])
        b = self._st.to_float32(leaves["lora_b"])
        for k in ("lora_a", "lora_b"):
            self._st.release(leaves[k])
        return self._factor(module, wname, shape, a, b)

    def _factor(self, module, wname, shape, a, b) -> LowRankDelta:
        s = self.scale
        where = f"adapter module {module!r} (rank from lora_a {a.shape}, lora_b {b.shape})"
        if len(shape) == 3:  # SwitchLinear: a (E, r, in), b (E, out, r)
            experts, rows, cols = shape
            if a.ndim != 3 or b.ndim != 3 or a.shape[0] != experts or b.shape[0] != experts:
                raise QtoolsError(f"{where} does not match {wname} {list(shape)}")
            r = a.shape[1]
            if a.shape[2] != cols or b.shape[1] != rows or b.shape[2] != r:
                raise QtoolsError(f"{where} does not match {wname} {list(shape)}")
            bt = (s * b).reshape(experts * rows, r)
            at = a.reshape(experts * r, cols)
            self._check_rank(module, r)
            return LowRankDelta(wname, np.ascontiguousarray(bt, np.float32), np.ascontiguousarray(at, np.float32), experts, r)
        if len(shape) != 2 or a.ndim != 2 or b.ndim != 2:
            raise QtoolsError(f"{where} does not match {wname} {list(shape)}")
        rows, cols = shape
        if a.shape[1] == b.shape[0] and a.shape[0] == cols and b.shape[1] == rows:
            # Linear: a (in, r), b (r, out)
            r = a.shape[1]
            bt, at = s * b.T, a.T
        elif "embed" in module and a.shape[0] == rows and b.shape[1] == cols and a.shape[1] == b.shape[0]:
            # Embedding: a (vocab, r), b (r, dims)
            r = a.shape[1]
            bt, at = s * a, b
        else:
            raise QtoolsError(f"{where} does not match {wname} {list(shape)}")
        self._check_rank(module, r)
        return LowRankDelta(wname, np.ascontiguousarray(bt, np.float32), np.ascontiguousarray(at, np.float32), 1, r)

    def _check_rank(self, module, r):
        if self.rank is not None and self.rank != r:
            raise QtoolsError(
                f"adapter module {module!r} has rank {r} but adapter_config.json says rank {self.rank}"
            )

    def close(self):
        self._st.close()

