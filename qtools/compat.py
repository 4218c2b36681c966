"""Where qtools reaches into another library's private parts: each reach is here, once.

click has no public way to extend how an option takes its values, mlx-lm none to
build a model class from a config without loading weights, reading mlx-lm's
model files as text saves importing it (1.7 s with transformers), and MLX says
nothing about which BLAS its CPU backend links. Each function
says what it relies on; tests/test_compat.py fails on a release that breaks one.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from pathlib import Path


def click_parser_option(parser, name: str):
    """The parser's option object for `--name` / `-n` (click's private _long_opt/_short_opt maps):
    its `process(value, state)` is what ValuesOption wraps to take `--bits 4 5 6`."""
    return parser._long_opt.get(name) or parser._short_opt.get(name)


def mlx_lm_model_classes(config: dict):
    """(Model class, ModelArgs class) mlx-lm builds for a config.json (mlx_lm.utils._get_classes),
    without reading weights."""
    from mlx_lm.utils import _get_classes

    return _get_classes(config)


def mlx_blas_is_reference() -> bool:
    """Whether MLX runs matmuls on the CPU through a reference BLAS: its Linux wheels (mlx[cpu])
    link netlib's libblas (about 2 GFLOP/s on this project's 2 cores; numpy's OpenBLAS about 90),
    whose sgemm sums the inner dimension in order without fused multiply-add (io.fused's native
    fuse reproduces it; tests/test_fuse_kernel.py checks it bit for bit)."""
    import sys

    import mlx.core as mx

    return sys.platform.startswith("linux") and mx.default_device() == mx.cpu


def mlx_lm_root() -> Path | None:
    """mlx-lm's package directory, found without importing it."""
    spec = importlib.util.find_spec("mlx_lm")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def mlx_lm_model_source(model_type: str) -> str | None:
    """The text of mlx-lm's models/<model_type>.py, or None when it has no such file."""
    root = mlx_lm_root()
    path = root / "models" / f"{model_type}.py" if root else None
    return path.read_text() if path is not None and path.is_file() else None


def mlx_lm_remaps(model_type: str) -> bool:
    """Whether mlx-lm's utils.py names `model_type` (its MODEL_REMAPPING: mistral -> llama),
    read as text."""
    root = mlx_lm_root()
    utils = root / "utils.py" if root else None
    return utils is not None and utils.is_file() and f'"{model_type}"' in utils.read_text()


def mlx_lm_plain_console(stream) -> contextlib.AbstractContextManager:
    """While active, mlx-lm's trainer UI (mlx_lm.cli_ui.make_console, which forces truecolor)
    writes no ANSI colour codes when `stream` is not a terminal: a log file or a pipe stays
    plain text. On a terminal, nothing changes."""
    if stream.isatty():
        return contextlib.nullcontext()
    from unittest import mock

    from mlx_lm import cli_ui
    from rich.console import Console

    def plain():
        return Console(color_system=None, highlight=False, force_terminal=False, width=120)

    return mock.patch.object(cli_ui, "make_console", plain)


_OPENBLAS: list = []


def _openblas():
    """(set, get) of the OpenBLAS numpy loaded (its scipy-openblas build prefixes and suffixes the
    names), found in the process's mapped libraries as threadpoolctl finds it; None if there is none."""
    if not _OPENBLAS:
        import ctypes

        import numpy  # noqa: F401  (loads its BLAS)

        found = None
        try:
            with open("/proc/self/maps") as f:
                libs = sorted({line.split()[-1] for line in f if "openblas" in line.lower() and "/" in line})
        except OSError:
            libs = []
        for path in libs:
            lib = ctypes.CDLL(path)
            for pre, suf in (("scipy_openblas", "64_"), ("scipy_openblas", ""), ("openblas", "64_"), ("openblas", "")):
                set_, get = getattr(lib, f"{pre}_set_num_threads{suf}", None), getattr(lib, f"{pre}_get_num_threads{suf}", None)
                if set_ is not None and get is not None:
                    found = (set_, get)
                    break
            if found:
                break
        _OPENBLAS.append(found)
    return _OPENBLAS[0]


# The most BLAS threads numpy_blas_threads lets one process run: set for each of several workers
# sharing the machine (calibrate JOBS=2), whose BLAS threads would otherwise wait on each other.
BLAS_THREADS_ENV = "QTOOLS_BLAS_THREADS"


@contextlib.contextmanager
def numpy_blas_threads(n: int):
    """numpy's OpenBLAS runs `n` threads while active (no-op where numpy has another BLAS or on a
    platform without /proc). On a loaded 2-core machine a product with few rows ran 10x faster on
    one thread than on two, which wait for each other; one with many rows ran 2x faster on two."""
    blas = _openblas()
    if blas is None:
        yield
        return
    cap = os.environ.get(BLAS_THREADS_ENV, "")
    if cap.isdigit() and int(cap) > 0:  # a worker among several on the machine: its share of the cores
        n = min(n, int(cap))
    set_, get = blas
    old = get()
    if old == n:
        yield
        return
    set_(n)
    try:
        yield
    finally:
        set_(old)
