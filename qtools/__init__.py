"""qtools: predict which MLX bit-width keeps a LoRA fine-tune alive, then prove it."""

__version__ = "0.1.0"

SUPPORTED_BITS = (2, 3, 4, 5, 6, 8)
SUPPORTED_GROUP_SIZES = (32, 64, 128)


class QtoolsError(Exception):
    """An error caused by the user's input; the CLI prints it as one `Error: ...` line."""


def versions() -> dict:
    """qtools, mlx and mlx-lm versions, recorded in every model and log qtools writes."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"qtools": __version__}
    for pkg in ("mlx", "mlx-lm"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out
