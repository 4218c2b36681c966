"""Fixtures several test modules share."""

import pytest

from qtools.demo.model import make_tiny_adapter, make_tiny_model


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny float16 Qwen3 (made once per module; a module may define its own `base`)."""
    return make_tiny_model(tmp_path_factory.mktemp("base") / "base")


@pytest.fixture(scope="module")
def adapter(base, tmp_path_factory):
    """A LoRA adapter for `base`."""
    return make_tiny_adapter(base, tmp_path_factory.mktemp("adapter") / "ad")
