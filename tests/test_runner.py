"""runner and the CPU backend's helpers: one way to run a model, numpy's BLAS where MLX's is slow."""

import mlx.core as mx
import numpy as np
import pytest

from qtools.pipeline import backend


@pytest.mark.parametrize("rows", [4, 128])
def test_numpy_matmul_computes_what_mlx_computes_in_float16(rows, monkeypatch):
    """The product by numpy's BLAS in float32, rounded once to float16: MLX's CPU float16 matmul up to
    the float32 sum's order (one float16 rounding apart, or the float32 sums' own error near zero);
    MLX's own path below the size limit."""
    mx.random.seed(0)
    x = mx.random.normal((rows, 1024)).astype(mx.float16)
    w = (0.05 * mx.random.normal((1536, 1024))).astype(mx.float16)
    want = x @ w.T
    monkeypatch.setattr(backend, "NUMPY_SLICE", 1 << 18)  # several slices of the weight
    got = backend._matmul_t(x, w)
    assert got.dtype == mx.float16 and got.shape == want.shape
    a, b = np.array(want.astype(mx.float32)), np.array(got.astype(mx.float32))
    assert np.all(np.abs(a - b) <= np.spacing(np.abs(a).astype(np.float16)).astype(np.float32) + 1e-4)
    assert (a == b).mean() > 0.99
    monkeypatch.setattr(backend, "NUMPY_MIN_WEIGHT", 1 << 30)  # MLX's own: bit-identical
    assert mx.array_equal(backend._matmul_t(x, w), want).item()


def test_numpy_blas_linears_keep_the_module_tree():
    import mlx.nn as nn

    net = nn.Sequential(nn.Embedding(10, 64), nn.Linear(64, 32))
    names = [n for n, _ in net.named_modules()]
    assert backend.numpy_blas_linears(net) == 2
    assert [n for n, _ in net.named_modules()] == names
    y = net.layers[1](mx.ones((2, 64), dtype=mx.float16))
    assert y.dtype == mx.float16 and y.shape == (2, 32)
