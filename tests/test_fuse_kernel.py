"""_ext.fuse_lora against MLX's own graph on the CPU (the reference BLAS), bit for bit: every
weight and output dtype, ranks 1/8/16, widths that are not a multiple of the vector, experts,
the embedding's form, values that round to ties, and NaN/Inf as MLX passes them through."""

import mlx.core as mx
import numpy as np
import pytest

from qtools import _ext
from qtools.compat import mlx_blas_is_reference as blas_is_reference

DTYPES = {"float16": mx.float16, "bfloat16": mx.bfloat16, "float32": mx.float32}

pytestmark = pytest.mark.skipif(not blas_is_reference(), reason="MLX's matmul is the reference BLAS only on Linux CPU")


def raw(x):
    return np.array(x) if x.dtype == mx.float32 else np.array(x.view(mx.uint16))


def bits(a):
    """The stored bits (NaN payloads and signs included)."""
    return a.view(np.uint32) if a.dtype == np.float32 else a


def kernel(w, sb, at, dtype, experts=1, threads=0):
    """The kernel's fused tensor (raw bits) for mx arrays w (rows x cols or E x rows x cols), sb, at."""
    cols = w.shape[-1]
    w2 = raw(w).reshape(-1, cols)
    out = np.empty(w2.shape, np.float32 if dtype == "float32" else np.uint16)
    mx.eval(sb, at)
    kernel.nonfinite = _ext.fuse_lora(w2, str(w.dtype).split(".")[-1], np.ascontiguousarray(np.array(sb)).reshape(w2.shape[0], -1),
                   np.ascontiguousarray(np.array(at)).reshape(-1, cols), out, dtype, experts=experts,
                   threads=threads)
    return out.reshape(w.shape)


def assert_same(got, ref):
    got, want = bits(got).ravel(), bits(raw(ref)).ravel()
    bad = np.flatnonzero(got != want)
    assert bad.size == 0, f"{bad.size} of {want.size} differ, first at {bad[0]}: {got[bad[0]]:#x} != {want[bad[0]]:#x}"


def linear_case(rng, out_, in_, r, wdtype, wscale=0.05):
    w = mx.array((rng.standard_normal((out_, in_)) * wscale).astype(np.float32)).astype(DTYPES[wdtype])
    a = mx.array((rng.standard_normal((in_, r)) * 0.02).astype(np.float32))
    b = mx.array((rng.standard_normal((r, out_)) * 0.02).astype(np.float32))
    return w, a, b


@pytest.mark.parametrize("wdtype", list(DTYPES))
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("r", [1, 8, 16])
@pytest.mark.parametrize("shape", [(64, 256), (37, 203), (5, 3)])
def test_linear_matches_mlx(wdtype, dtype, r, shape):
    rng = np.random.default_rng(r * 100 + shape[1])
    w, a, b = linear_case(rng, *shape, r, wdtype)
    scale = 20.0
    ref = (w.astype(mx.float32) + (scale * b.T) @ a.T).astype(DTYPES[dtype])  # fuse_module_f32's LoRALinear
    assert_same(kernel(w, scale * b.T, a.T, dtype), ref)


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_threads_and_large_tensor(dtype, threads):
    rng = np.random.default_rng(threads)
    w, a, b = linear_case(rng, 517, 1031, 16, "bfloat16")
    ref = (w.astype(mx.float32) + (2.0 * b.T) @ a.T).astype(DTYPES[dtype])
    assert_same(kernel(w, 2.0 * b.T, a.T, dtype, threads=threads), ref)


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("r", [1, 8])
def test_experts_match_mlx(dtype, r):
    rng = np.random.default_rng(r)
    e, out_, in_ = 5, 23, 77
    w = mx.array((rng.standard_normal((e, out_, in_)) * 0.05).astype(np.float32)).astype(mx.float16)
    a = mx.array((rng.standard_normal((r * e, in_)) * 0.02).astype(np.float32))
    b = mx.array((rng.standard_normal((e, out_, r)) * 0.02).astype(np.float32))
    ref = (w.astype(mx.float32) + (3.0 * b) @ a.reshape(e, -1, in_)).astype(DTYPES[dtype])  # LoRASwitchLinear
    assert_same(kernel(w, 3.0 * b, a, dtype, experts=e), ref)


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_embedding_matches_mlx(dtype):
    rng = np.random.default_rng(7)
    n, d, r = 301, 45, 8
    w = mx.array((rng.standard_normal((n, d)) * 0.05).astype(np.float32)).astype(mx.bfloat16)
    a = mx.array((rng.standard_normal((n, r)) * 0.02).astype(np.float32))
    b = mx.array((rng.standard_normal((r, d)) * 0.02).astype(np.float32))
    ref = (w.astype(mx.float32) + (4.0 * a) @ b).astype(DTYPES[dtype])  # LoRAEmbedding
    assert_same(kernel(w, 4.0 * a, b, dtype), ref)


def tie_values(rng, n):
    """float32 values exactly halfway between two float16 or two bfloat16 neighbours (both parities),
    float16 subnormal ties, values around float16's overflow threshold, and signed zeros."""
    mant = rng.integers(0, 1 << 10, n).astype(np.uint32)
    expo = rng.integers(100, 143, n).astype(np.uint32)
    half = (expo << 23) | (mant << 13) | 0x1000  # a float16 tie
    bf = (expo << 23) | ((mant & 0x7F) << 16) | 0x8000  # a bfloat16 tie
    sub = ((rng.integers(1, 1 << 10, n) * 2 + 1) * 2.0 ** -25).astype(np.float32).view(np.uint32)  # subnormal tie
    edge = np.array([65504, 65519.99, 65520, 65536, 1e-8, 2.0 ** -25, 2.0 ** -24, 0.0, -0.0], np.float32).view(np.uint32)
    v = np.concatenate([half, bf, sub, edge]).view(np.float32)
    sign = np.where(rng.random(v.size) < 0.5, -1, 1).astype(np.float32)
    return v * sign


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_ties_round_to_even_as_mlx(dtype):
    rng = np.random.default_rng(11)
    v = tie_values(rng, 300)
    cols = 61
    v = np.resize(v, (v.size // cols + 1) * cols).reshape(-1, cols)
    w = mx.array(v)
    # a zero delta (the tie is W itself) and one exact small delta (a power of two: still a tie or an exact neighbour)
    for s in (0.0, 2.0 ** -30):
        sb = mx.full((v.shape[0], 1), s)
        at = mx.ones((1, cols))
        ref = (w + sb @ at).astype(DTYPES[dtype])
        assert_same(kernel(w, sb, at, dtype), ref)


@pytest.mark.parametrize("wdtype", list(DTYPES))
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_nan_and_inf_pass_through_as_mlx(wdtype, dtype):
    rng = np.random.default_rng(3)
    out_, in_, r = 19, 45, 4
    w = (rng.standard_normal((out_, in_)) * 0.05).astype(np.float32)
    w[0, :5] = [np.nan, np.inf, -np.inf, -np.nan, 7e4]
    w[1, 3] = np.nan
    a = (rng.standard_normal((in_, r)) * 0.02).astype(np.float32)
    b = (rng.standard_normal((r, out_)) * 0.02).astype(np.float32)
    a[7, 0] = np.inf  # 0 * inf where b is 0: NaN in the delta
    b[0, 2:5] = 0.0
    a[9, 1] = -np.inf
    b[2, 6] = 1e30  # overflow in the delta
    a[11, 2] = 1e30
    w[2, 44] = np.inf  # in the columns past the last full vector
    b[3, 5] = np.inf  # a row of NaN/Inf: the kernel's padding lanes past column 44 must not count
    w, a, b = mx.array(w).astype(DTYPES[wdtype]), mx.array(a), mx.array(b)
    ref = (w.astype(mx.float32) + (5.0 * b.T) @ a.T).astype(DTYPES[dtype])
    assert_same(kernel(w, 5.0 * b.T, a.T, dtype), ref)
    assert kernel.nonfinite == int((~mx.isfinite(ref)).sum().item()) > 5  # counted as written


def test_float16_signalling_nan_in_the_base():
    bits = np.array([[0x7C01, 0xFC01, 0x7E00, 0x7D55, 0x3C00, 0x7C00]], np.uint16)
    w = mx.array(bits).view(mx.float16)
    sb, at = mx.zeros((1, 1)), mx.ones((1, 6))
    for dtype in DTYPES:
        assert_same(kernel(w, sb, at, dtype), (w.astype(mx.float32) + sb @ at).astype(DTYPES[dtype]))


def test_bad_shapes_are_errors():
    w = np.zeros((4, 8), np.uint16)
    out = np.empty((4, 8), np.uint16)
    sb, at = np.zeros((4, 2), np.float32), np.zeros((2, 8), np.float32)
    with pytest.raises(ValueError, match="at must be"):
        _ext.fuse_lora(w, "float16", sb, np.zeros((3, 8), np.float32), out, "float16")
    with pytest.raises(ValueError, match="shapes differ"):
        _ext.fuse_lora(w, "float16", sb, at, np.empty((4, 9), np.uint16), "float16")
    with pytest.raises(ValueError, match="element type"):
        _ext.fuse_lora(w, "float16", sb, at, np.empty((4, 8), np.float32), "float16")
    with pytest.raises(ValueError, match="divisible"):
        _ext.fuse_lora(w, "float16", sb, np.zeros((6, 8), np.float32), out, "float16", experts=3)


@pytest.mark.parametrize("wdtype", list(DTYPES))
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_rank_zero_is_mlx_astype(wdtype, dtype):
    """Rank 0: MLX's astype alone, -0, NaN (signalling float16 NaN included), Inf, subnormals and ties."""
    if wdtype == dtype:
        pytest.skip("an astype to its own dtype keeps the bits: FusedView maps such a tensor, no kernel")
    rng = np.random.default_rng(5)
    v = np.concatenate([tie_values(rng, 100), rng.standard_normal(77).astype(np.float32) * 1e-5,
                        np.array([np.nan, -np.nan, np.inf, -np.inf, -0.0, 1e30, -7e4], np.float32)])
    w = mx.array(v).astype(DTYPES[wdtype])
    if wdtype == "float16":
        w = mx.concatenate([w, mx.array(np.array([0x7C01, 0xFC01, 0x7D55], np.uint16)).view(mx.float16)])
    w = w.reshape(1, -1)
    none_sb, none_at = mx.zeros((1, 0)), mx.zeros((0, w.shape[1]))
    assert_same(kernel(w, none_sb, none_at, dtype), w.astype(DTYPES[dtype]))
