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


def _dequantized_f32(m):
    """A quantized module's weight as the float32 values it stores."""
    return mx.dequantize(m["weight"], m["scales"], m.get("biases"), group_size=m.group_size, bits=m.bits,
                         mode=m.mode).astype(mx.float32)


@pytest.mark.parametrize("mode,group,bits", [("affine", 64, 4), ("affine", 32, 3), ("mxfp4", 32, 4)])
def test_quantized_layers_compute_in_float32_on_the_cpu(mode, group, bits):
    """MLX's CPU quantized matmul with float16 activations is 20-50x slower than in float32: after
    cpu_float32_quantized every quantized layer (linear, tied head, MoE experts) computes x times the
    stored values in float32 and rounds once to x's dtype; the stored arrays are untouched."""
    import mlx.nn as nn
    from mlx.utils import tree_flatten
    from mlx_lm.models.switch_layers import SwitchLinear

    mx.random.seed(1)
    lin = nn.Linear(256, 96, bias=True)
    emb = nn.Embedding(50, 256)
    sw = SwitchLinear(256, 64, num_experts=4, bias=False)
    net = nn.Sequential(lin, emb, sw)
    net.set_dtype(mx.float16)
    nn.quantize(net, group_size=group, bits=bits, mode=mode)
    net.layers[2] = sw.to_quantized(group, bits, mode=mode)
    before = {k: np.array(v) for k, v in tree_flatten(net.parameters())}
    assert backend.cpu_float32_quantized(net) == 3
    after = {k: np.array(v) for k, v in tree_flatten(net.parameters())}
    assert before.keys() == after.keys() and all(np.array_equal(before[k], after[k]) for k in before)

    x = mx.random.normal((5, 256)).astype(mx.float16)
    ql, qe, qs = net.layers
    want = (x.astype(mx.float32) @ _dequantized_f32(ql).T + ql["bias"].astype(mx.float32)).astype(mx.float16)
    got = ql(x)
    assert got.dtype == mx.float16
    np.testing.assert_allclose(np.array(got, np.float32), np.array(want, np.float32), rtol=2e-3, atol=2e-3)
    want = (x.astype(mx.float32) @ _dequantized_f32(qe).T).astype(mx.float16)
    np.testing.assert_allclose(np.array(qe.as_linear(x), np.float32), np.array(want, np.float32), rtol=2e-3, atol=2e-3)
    idx = mx.array([[0, 3], [1, 2], [3, 3], [2, 0], [1, 1]], dtype=mx.uint32)
    xs = mx.expand_dims(x, (-2, -3))
    got = qs(xs, idx)
    w = _dequantized_f32(qs)
    want = mx.gather_mm(xs.astype(mx.float32), w.swapaxes(-1, -2), rhs_indices=idx).astype(mx.float16)
    assert got.dtype == mx.float16 and got.shape == want.shape
    np.testing.assert_allclose(np.array(got, np.float32), np.array(want, np.float32), rtol=2e-3, atol=2e-3)


def test_runner_runs_a_quantized_model_in_float32(base, tmp_path):
    """runner.load_model (validate, the probe's reference, retention, calibrate) prepares every
    quantized layer of a quantized model for the CPU."""
    import mlx.nn as nn
    from click.testing import CliRunner

    from qtools.cli import cli
    from qtools.pipeline import runner

    path = tmp_path / "q4"
    r = CliRunner().invoke(cli, ["quantize", str(base), "--bits", "4", "--output", str(path)])
    assert r.exit_code == 0, r.output
    net, _tok, _config, _s = runner.load_model(path)
    kinds = {type(m).__name__ for _, m in net.named_modules() if isinstance(m, (nn.QuantizedLinear,
                                                                              nn.QuantizedEmbedding))}
    assert kinds and all(k.startswith("Float32") for k in kinds), kinds


@pytest.mark.parametrize("case", ["tokens", "sorted", "down"])
def test_numpy_experts_compute_what_gather_mm_computes(case, monkeypatch):
    """MoE experts by numpy's BLAS, an expert at a time: MLX's float32 gather_mm rounded to float16,
    up to the float32 sum's order, in each of the shapes mlx-lm's SwitchGLU calls them with."""
    import mlx.nn as nn
    from mlx_lm.models.switch_layers import SwitchLinear

    mx.random.seed(2)
    sw = SwitchLinear(128, 96, num_experts=6, bias=False)
    sw.set_dtype(mx.float16)
    net = nn.Sequential(sw)
    assert backend.numpy_blas_linears(net) == 1
    monkeypatch.setattr(backend, "NUMPY_MIN_WEIGHT", 1)
    monkeypatch.setattr(backend, "NUMPY_MIN_MACS", 1)
    if case == "tokens":  # (B, L, 1, 1, K) against (B, L, top-k)
        x = mx.random.normal((2, 5, 1, 1, 128)).astype(mx.float16)
        idx = mx.random.randint(0, 6, (2, 5, 3)).astype(mx.uint32)
    elif case == "sorted":  # SwitchGLU's sorted rows: (M, 1, 1, K) against (M,)
        x = mx.random.normal((12, 1, 1, 128)).astype(mx.float16)
        idx = mx.sort(mx.random.randint(0, 6, (12,)).astype(mx.uint32))
    else:  # down_proj: (B, L, top-k, 1, K) against (B, L, top-k)
        x = mx.random.normal((2, 4, 3, 1, 128)).astype(mx.float16)
        idx = mx.random.randint(0, 6, (2, 4, 3)).astype(mx.uint32)
    want = mx.gather_mm(x.astype(mx.float32), sw["weight"].astype(mx.float32).swapaxes(-1, -2),
                        rhs_indices=idx).astype(mx.float16)
    got = sw(x, idx, sorted_indices=case == "sorted")
    assert got.dtype == mx.float16 and got.shape == want.shape
    a, b = np.array(want.astype(mx.float32)), np.array(got.astype(mx.float32))
    assert np.all(np.abs(a - b) <= np.spacing(np.abs(a).astype(np.float16)).astype(np.float32) + 1e-4)
    assert (a == b).mean() > 0.95


def test_validates_answers_keep_their_token_ids_as_batch_generate_and_stream_generate_give_them(base):
    """batch_texts gives batch_generate's texts and counts, with the ids that end in the stop token
    where one stopped them; generate_one's are stream_generate's, its stop token included."""
    from mlx_lm import batch_generate

    from qtools.io.suite import load_suite
    from qtools.pipeline import runner
    from qtools.pipeline.scoring import build_prompt

    net, tok, _config, _s = runner.load_model(base)
    suite = load_suite("suites/demo.jsonl")
    prompts = [build_prompt(tok, c, suite) for c in suite.cases[:6]]
    limits = [3, 8, 8, 16, 16, 16]
    texts, counts, ids = runner.batch_texts(net, tok, prompts, limits)
    ref = batch_generate(net, tok, prompts, max_tokens=limits, return_token_ids=True)
    assert texts == list(ref.texts) and counts == [len(x) for x in ref.token_ids]
    stops = set(tok.eos_token_ids)
    for got, want, limit in zip(ids, ref.token_ids, limits):
        assert got[:len(want)] == list(want) and len(got) - len(want) in (0, 1)
        assert len(got) == len(want) or (got[-1] in stops and len(got) <= limit)
    from mlx_lm import stream_generate
    from mlx_lm.sample_utils import make_sampler

    text, n, _secs, one = runner.generate_one(net, tok, prompts[3], limits[3])
    streamed = list(stream_generate(net, tok, prompts[3], max_tokens=limits[3], sampler=make_sampler(temp=0.0)))
    assert one == [int(r.token) for r in streamed] and text == "".join(r.text for r in streamed) and len(one) >= n
