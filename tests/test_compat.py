"""Each reach into another library's private parts (qtools/compat.py) still works with the
installed releases: a release that breaks one fails here, not in a user's command."""

import click
import pytest
from click.testing import CliRunner

from qtools import compat
from qtools.commands.options import ValuesOption


def test_click_parser_option_is_the_option_whose_process_takes_values():
    @click.command()
    @click.option("--bits", "-b", multiple=True, type=int)
    def cmd(bits):
        pass

    ctx = click.Context(cmd)
    parser = cmd.make_parser(ctx)
    for name in ("--bits", "-b"):
        opt = compat.click_parser_option(parser, name)
        assert callable(opt.process)


def test_values_option_takes_the_numbers_after_it():
    @click.command()
    @click.option("--bits", cls=ValuesOption, multiple=True, type=int)
    @click.argument("rest", nargs=-1)
    def cmd(bits, rest):
        click.echo(f"{list(bits)} {list(rest)}")

    r = CliRunner().invoke(cmd, ["--bits", "4", "5", "6", "x"])
    assert r.exit_code == 0 and r.output.strip() == "[4, 5, 6] ['x']"


def test_mlx_lm_model_classes_builds_a_model_from_a_config():
    model_cls, args_cls = compat.mlx_lm_model_classes({"model_type": "qwen3_moe"})
    assert model_cls.__module__ == "mlx_lm.models.qwen3_moe"
    assert args_cls.__name__ == "ModelArgs"


def test_mlx_lm_sources_are_where_the_text_reads_look():
    assert compat.mlx_lm_root() is not None
    src = compat.mlx_lm_model_source("qwen3_moe")
    assert src is not None and "quant_predicate" in src  # keeps the router at 8 bits
    assert compat.mlx_lm_model_source("no_such_model") is None
    assert compat.mlx_lm_remaps("mistral")  # MODEL_REMAPPING: mistral -> llama
    assert not compat.mlx_lm_remaps("no_such_model")


def test_mlx_lm_training_ui_writes_no_colour_codes_into_a_file(tmp_path):
    """mlx-lm's trainer UI forces truecolor; into a file or pipe it must be plain text."""
    import contextlib

    from mlx_lm.cli_ui import TrainUI

    out = tmp_path / "train.log"
    with open(out, "w") as f, contextlib.redirect_stdout(f), compat.mlx_lm_plain_console(f):
        with TrainUI(4) as ui:
            for _ in range(4):
                ui.advance()
    text = out.read_text()
    assert "iter" in text and "\x1b[" not in text


def test_numpy_blas_threads_sets_and_restores_openblas_threads():
    import sys

    blas = compat._openblas()
    if blas is None:  # numpy without OpenBLAS (Accelerate on a Mac): the context does nothing
        assert not sys.platform.startswith("linux"), "numpy's wheels on Linux bundle OpenBLAS"
        with compat.numpy_blas_threads(1):
            pass
        return
    _set, get = blas
    before = get()
    with compat.numpy_blas_threads(1):
        assert get() == 1
    assert get() == before


def test_a_worker_among_several_runs_no_more_blas_threads_than_its_share(monkeypatch):
    """QTOOLS_BLAS_THREADS (calibrate JOBS=2 sets it for each worker) caps what a product asks for."""
    blas = compat._openblas()
    if blas is None:
        return  # no OpenBLAS to cap (the test above checks that this is not Linux)
    _set, get = blas
    monkeypatch.setenv(compat.BLAS_THREADS_ENV, "1")
    with compat.numpy_blas_threads(2):
        assert get() == 1
    monkeypatch.setenv(compat.BLAS_THREADS_ENV, "2")
    with compat.numpy_blas_threads(2):
        assert get() == 2


def test_mlx_blas_is_reference_where_mlx_sums_in_order_without_fma():
    """Where it says so, MLX's float32 matmul is the reference sgemm's in-order sum: numpy adding
    the rank's outer products one by one from zero gives the same bits."""
    import mlx.core as mx
    import numpy as np

    from qtools.compat import mlx_blas_is_reference

    if not mlx_blas_is_reference():
        pytest.skip("MLX's matmul here is not the reference BLAS")
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((64, 16), np.float32), rng.standard_normal((16, 96), np.float32)
    c = np.zeros((64, 96), np.float32)
    for k in range(16):
        c += np.multiply.outer(x[:, k], y[k])
    assert np.array_equal(np.array(mx.array(x) @ mx.array(y)), c)
