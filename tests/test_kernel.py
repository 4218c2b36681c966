"""The native kernel agrees with MLX bit for bit, and its statistics with a numpy reference."""

import mlx.core as mx
import numpy as np
import pytest

from qtools import _ext

DTYPES = {"float16": mx.float16, "bfloat16": mx.bfloat16, "float32": mx.float32}
BITS = (2, 3, 4, 5, 6, 8)


def raw(w):
    """The stored bits of an mx array as the kernel reads them from safetensors."""
    return np.array(w) if w.dtype == mx.float32 else np.array(w.view(mx.uint16))


def f32(w):
    return np.array(w.astype(mx.float32))


def unpack_codes(q, bits, rows):
    """MLX packs codes little-endian, bit after bit, across bytes."""
    b = np.unpackbits(np.array(q).view(np.uint8).reshape(rows, -1), axis=1, bitorder="little")
    b = b.reshape(rows, -1, bits).astype(np.int64)
    return (b << np.arange(bits)).sum(-1).astype(np.uint8)


def edge_case_matrix(rng, cols=256):
    rows = []
    rows.append(np.full(cols, 0.5))  # constant groups
    rows.append(np.zeros(cols))  # all zero
    r = rng.uniform(-1, 0.1, cols)
    r[::7] = -5.0
    rows.append(r)  # dominated by a negative value
    r = rng.uniform(-0.1, 1, cols)
    r[::5] = 7.0
    rows.append(r)  # dominated by a positive value
    rows.append(np.clip(rng.standard_normal(cols) * 2e4, -6e4, 6e4))  # huge range (near float16 max)
    rows.append(rng.standard_normal(cols) * 1e-6)  # tiny range (float16 subnormals)
    rows.append(rng.standard_normal(cols) * 1e-9)  # below eps-sized steps
    rows.append(np.linspace(-1, 1, cols))  # exact ties on the grid
    rows.append(np.where(np.arange(cols) % 2, 1.0, -1.0))  # two values
    r = rng.standard_normal(cols)
    r[3] = 0.0
    rows.append(r + 1000.0)  # large offset, small spread
    return np.stack(rows).astype(np.float32)


def random_matrices(rng):
    for scale in (1e-3, 0.02, 1.0):
        yield (rng.standard_normal((24, 256)) * scale).astype(np.float32)
    yield edge_case_matrix(rng)


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("bits", BITS)
def test_quantize_matches_mlx_bit_for_bit(dtype, group_size, bits):
    rng = np.random.default_rng(bits * 1000 + group_size)
    for x in random_matrices(rng):
        w = mx.array(x).astype(DTYPES[dtype])
        q, s, b = mx.quantize(w, group_size=group_size, bits=bits)
        d = mx.dequantize(q, s, b, group_size=group_size, bits=bits)
        codes, scales, biases, deq = _ext.quantize_dequantize(raw(w), dtype, bits, group_size)
        np.testing.assert_array_equal(codes, unpack_codes(q, bits, x.shape[0]))
        np.testing.assert_array_equal(scales, f32(s))
        np.testing.assert_array_equal(biases, f32(b))
        np.testing.assert_array_equal(deq, f32(d))


def mlx_deq(w, bits, group_size):
    q, s, b = mx.quantize(w, group_size=group_size, bits=bits)
    return f32(mx.dequantize(q, s, b, group_size=group_size, bits=bits)), unpack_codes(q, bits, w.shape[0]), f32(s)


def reference_stats(w1, w0, bits, group_size, u=None, v=None):
    """Every statistic of the kernel, computed with MLX's own quantize/dequantize."""
    a, b0 = f32(w1), f32(w0)
    d = a - b0
    y1, c1, s1 = mlx_deq(w1, bits, group_size)
    y0, c0, _ = mlx_deq(w0, bits, group_size)
    e1 = y1 - a
    dq = y1 - y0
    ref = {
        "sse": float((e1.astype(np.float64) ** 2).sum()),
        "max_abs": float(np.abs(e1).max()),
        "dot": float((dq.astype(np.float64) * d).sum()),
        "dq2": float((dq.astype(np.float64) ** 2).sum()),
        "err2": float(((dq - d).astype(np.float64) ** 2).sum()),
        "changed": int((c1 != c0).sum()),
        "sign_agree": int((dq * d > 0).sum()),
        "steps": np.abs(s1).reshape(-1),
        "d2": float((d.astype(np.float64) ** 2).sum()),
    }
    if u is not None:
        m = u.T.astype(np.float64) @ (dq - d).astype(np.float64) @ v.astype(np.float64)
        md = u.T.astype(np.float64) @ d.astype(np.float64) @ v.astype(np.float64)
        ref["sub_noise"] = float((m**2).sum())
        ref["sub_d2"] = float((md**2).sum())
    return ref


def lowrank(rng, rows, cols, rank, size):
    bt = (rng.standard_normal((rows, rank)) * size).astype(np.float32)
    at = rng.standard_normal((rank, cols)).astype(np.float32) / np.sqrt(cols)
    return bt, at


def orth(bt, at):
    """Orthonormal bases: u (rows x r) of the delta's columns, v (cols x r) of its rows."""
    u, _ = np.linalg.qr(bt.astype(np.float64))
    v, _ = np.linalg.qr(at.T.astype(np.float64))
    return np.ascontiguousarray(u, np.float32), np.ascontiguousarray(v, np.float32)


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("threads", [1, 2])
def test_delta_statistics_match_reference_base_mode(dtype, threads):
    rng = np.random.default_rng(7)
    rows, cols, g = 96, 256, 64
    base = (rng.standard_normal((rows, cols)) * 0.02).astype(np.float32)
    bt, at = lowrank(rng, rows, cols, 8, 0.002)
    w0 = mx.array(base).astype(DTYPES[dtype])
    w1 = (w0.astype(mx.float32) + mx.array(bt @ at)).astype(DTYPES[dtype])
    u, v = orth(bt, at)
    r = _ext.analyze(raw(w1), dtype, list(BITS), g, w0=raw(w0), w0_dtype=dtype, u=u, v=v, threads=threads,
                     per_group=True)
    for i, bits in enumerate(BITS):
        ref = reference_stats(w1, w0, bits, g, u, v)
        for key in ("sse", "dot", "dq2", "err2", "sub_noise"):
            np.testing.assert_allclose(r[key][i], ref[key], rtol=2e-4, err_msg=f"{key} at {bits} bits")
        assert r["max_abs"][i] == pytest.approx(ref["max_abs"], rel=0, abs=0)
        assert r["changed"][i] == ref["changed"]
        assert r["sign_agree"][i] == ref["sign_agree"]
        np.testing.assert_array_equal(r["steps"][i], ref["steps"])
    np.testing.assert_allclose(r["d2"], ref["d2"], rtol=1e-5)
    np.testing.assert_allclose(r["sub_d2"], ref["sub_d2"], rtol=1e-4)
    assert r["nonfinite"] == 0


def order_stat_cases():
    """(name, float32 weights, group size): group counts odd and even, below and above the
    kernel's 2^15-group cut-over to histogram selection, with and without ties."""
    rng = np.random.default_rng(11)
    yield "one group", rng.standard_normal((1, 64)), 64
    yield "two groups", rng.standard_normal((1, 128)), 64
    yield "odd, small", rng.standard_normal((7, 96)), 32
    yield "even, small", rng.standard_normal((24, 256)) * 0.02, 64
    yield "edge cases", edge_case_matrix(rng), 32
    yield "odd, large", rng.standard_normal((1023, 1056)) * 0.02, 32
    yield "even, large", rng.standard_normal((1025, 1024)) * 0.02, 32
    w = rng.integers(-3, 4, (1031, 2048)) * 0.25  # few distinct values: heavy ties
    w[::3] *= 2.0
    yield "ties, large", w, 64
    w = rng.standard_normal((600, 4096)) * np.exp(rng.uniform(-12, 4, (600, 1)))  # wide range of steps
    yield "wide range, large", w, 64


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_order_statistics_equal_numpy(dtype):
    """step_median and group_rmse_p50/p99 are numpy's median and percentiles, exactly."""
    for name, x, g in order_stat_cases():
        w = mx.array(x.astype(np.float32)).astype(DTYPES[dtype])
        for threads in (1, 2):
            r = _ext.analyze(raw(w), dtype, list(BITS), g, threads=threads, per_group=True)
            for i, bits in enumerate(BITS):
                where = f"{name}, {bits} bits, {threads} threads"
                steps, sse = r["steps"][i], r["group_sse"][i]
                np.testing.assert_array_equal(r["step_median"][i], float(np.median(steps)), where)
                with np.errstate(invalid="ignore"):  # inf - inf where a group's error overflows
                    p50, p99 = np.percentile(np.sqrt(sse / g), [50, 99])
                # exact equality (NaN equal to NaN: numpy's lerp at an overflowed group error)
                np.testing.assert_array_equal(r["group_rmse_p50"][i], float(p50), where)
                np.testing.assert_array_equal(r["group_rmse_p99"][i], float(p99), where)
            if threads == 1:
                # per-group arrays only on request, and the same statistics without them
                lean = _ext.analyze(raw(w), dtype, list(BITS), g, threads=1)
                assert "steps" not in lean and "group_sse" not in lean
                for key in ("step_median", "group_rmse_p50", "group_rmse_p99"):
                    np.testing.assert_array_equal(lean[key], r[key])


def test_order_statistics_are_nan_with_nonfinite_values():
    x = np.ones((4, 64), np.float32)
    x[1, 5] = np.nan
    r = _ext.analyze(raw(mx.array(x).astype(mx.float16)), "float16", [4], 64)
    assert np.isnan(r["step_median"][0]) and np.isnan(r["group_rmse_p99"][0])


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_low_rank_mode_rebuilds_the_base_like_the_dense_delta(dtype):
    """W0 = round(W1 - B A) in the kernel equals the same computed densely."""
    rng = np.random.default_rng(3)
    rows, cols = 64, 128
    w1 = mx.array((rng.standard_normal((rows, cols)) * 0.05).astype(np.float32)).astype(DTYPES[dtype])
    bt, at = lowrank(rng, rows, cols, 4, 0.01)
    w0 = (w1.astype(mx.float32) - mx.array(bt @ at)).astype(DTYPES[dtype])
    dense = _ext.analyze(raw(w1), dtype, [3, 4], 64, w0=raw(w0), w0_dtype=dtype)
    low = _ext.analyze(raw(w1), dtype, [3, 4], 64, bt=bt, at=at)
    for key in ("changed", "sign_agree"):
        np.testing.assert_array_equal(low[key], dense[key])
    for key in ("sse", "dot", "dq2", "err2"):
        np.testing.assert_allclose(low[key], dense[key], rtol=1e-5)


def test_expert_tensors_are_quantized_along_the_last_axis():
    """A 3-D (experts x out x in) tensor is rows of its last axis, as mx.quantize treats it."""
    rng = np.random.default_rng(5)
    experts, out, cols, rank = 4, 32, 128, 2
    base = mx.array((rng.standard_normal((experts, out, cols)) * 0.02).astype(np.float32)).astype(mx.float16)
    bs = [lowrank(rng, out, cols, rank, 0.003) for _ in range(experts)]
    delta = np.stack([b @ a for b, a in bs])
    fused = (base.astype(mx.float32) + mx.array(delta)).astype(mx.float16)
    bt = np.concatenate([b for b, _ in bs])
    at = np.concatenate([a for _, a in bs])
    us, vs = zip(*(orth(b, a) for b, a in bs))
    u, v = np.concatenate(us), np.concatenate(vs)
    r = _ext.analyze(raw(fused).reshape(-1, cols), "float16", [4], 64, w0=raw(base).reshape(-1, cols),
                     w0_dtype="float16", experts=experts, u=u, v=v)
    ref = reference_stats(fused.reshape(-1, cols), base.reshape(-1, cols), 4, 64)
    np.testing.assert_allclose(r["sse"][0], ref["sse"], rtol=2e-4)
    np.testing.assert_allclose(r["dot"][0], ref["dot"], rtol=2e-4)
    # the subspace statistic is per expert: sum over experts of |U_e^T X_e V_e|^2
    d = (f32(fused) - f32(base)).astype(np.float64)
    sub_d2 = sum(float(((us[e].T @ d[e] @ vs[e]) ** 2).sum()) for e in range(experts))
    np.testing.assert_allclose(r["sub_d2"], sub_d2, rtol=1e-4)
    # the per-expert low-rank path rebuilds the same base
    low = _ext.analyze(raw(fused).reshape(-1, cols), "float16", [4], 64, bt=bt, at=at, experts=experts, u=u, v=v)
    np.testing.assert_allclose(low["dot"][0], r["dot"][0], rtol=1e-3)
    assert low["changed"][0] == r["changed"][0]
    # and the quantization itself matches mx.quantize on the 3-D tensor
    y, _, _ = mlx_deq(fused.reshape(-1, cols), 4, 64)
    q, s, b = mx.quantize(fused, group_size=64, bits=4)
    np.testing.assert_array_equal(f32(mx.dequantize(q, s, b, group_size=64, bits=4)).reshape(-1, cols), y)


def test_nonfinite_values_are_counted_not_averaged():
    x = np.ones((4, 64), np.float32)
    x[1, 5] = np.nan
    x[2, 7] = np.inf
    r = _ext.analyze(raw(mx.array(x).astype(mx.float16)), "float16", [4], 64)
    assert r["nonfinite"] == 2


@pytest.mark.parametrize("bits", [1, 7, 9])
def test_unsupported_bits_are_rejected(bits):
    with pytest.raises(ValueError, match=f"unsupported bits {bits}"):
        _ext.analyze(np.zeros((2, 64), np.float32), "float32", [bits], 64)


def test_unsupported_group_size_is_rejected():
    with pytest.raises(ValueError, match="unsupported group size 48"):
        _ext.analyze(np.zeros((2, 96), np.float32), "float32", [4], 48)


def test_dtype_mismatch_is_rejected():
    with pytest.raises(ValueError, match="does not match dtype"):
        _ext.analyze(np.zeros((2, 64), np.float32), "float16", [4], 64)


def test_a_non_contiguous_weight_is_refused_not_copied():
    w = np.zeros((8, 256), np.float32)[:, ::2]
    with pytest.raises(TypeError):
        _ext.analyze(w, "float32", [4], 64)


def numpy_orthonormal_columns(x):
    """The reference: Gram matrix, numpy's eigh, columns of eigenvalue <= 1e-10 of the largest zeroed."""
    x64 = x.astype(np.float64)
    lam, vecs = np.linalg.eigh(x64.T @ x64)
    keep = lam > max(lam.max(), 0.0) * 1e-10
    basis = np.zeros_like(x64)
    if keep.any():
        basis[:, keep] = x64 @ (vecs[:, keep] / np.sqrt(lam[keep]))
    return basis


@pytest.mark.parametrize("n,r", [(5632, 16), (2048, 8), (300, 128), (400, 160), (64, 4), (37, 3)])
def test_orthonormal_columns_span_the_factor_like_numpy(n, r):
    from qtools.io.adapters import orthonormal_columns

    rng = np.random.default_rng(n + r)
    x = (rng.standard_normal((n, r)) * 1e-3).astype(np.float32)
    x[:, 1] = 0.0  # rank-deficient: a zero column and a repeated direction
    x[:, 2] = x[:, 0] * 2.0
    ref = numpy_orthonormal_columns(x)
    for given in (x, np.ascontiguousarray(x.T).T):  # tall, and a transposed view (lora_a^T)
        b = orthonormal_columns(given)
        assert b.dtype == np.float32 and b.shape == (n, r)
        kept = np.abs(b).sum(0) > 0
        np.testing.assert_array_equal(kept, np.abs(ref).sum(0) > 0)  # same columns zeroed
        b64 = b.astype(np.float64)
        np.testing.assert_allclose(b64.T @ b64, np.diag(kept.astype(float)), atol=1e-6)
        np.testing.assert_allclose(b64 @ (b64.T @ ref), ref, atol=1e-6)  # the same subspace
    assert not orthonormal_columns(np.zeros((10, 4), np.float32)).any()
