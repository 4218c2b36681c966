"""qtools: predict which MLX bit-width keeps a LoRA fine-tune alive, then prove it."""

__version__ = "0.1.0"

SUPPORTED_BITS = (2, 3, 4, 5, 6, 8)
SUPPORTED_GROUP_SIZES = (32, 64, 128)


# Exit statuses of every command. Errors keep 1, as click's ClickException, Python's uncaught
# exceptions and mlx-lm do, so a crash is never mistaken for a result; a failed verdict has its own.
EXIT_ERROR = 1  # bad input or any other error: nothing was judged, a script should stop
EXIT_USAGE = 2  # click's usage errors (unknown option, value out of range)
EXIT_VERDICT_FAILED = 3  # the run completed and its verdict failed: a result


class QtoolsError(Exception):
    """An error caused by the user's input; the CLI prints it as one `Error: ...` line (exit 1)."""


class BadValue(QtoolsError):
    """A value the user gave is out of range (an option's, or one that does not fit the other
    options or the model): a usage error, exit 2 at the command line."""

    def __init__(self, message: str, option: str | None = None):
        super().__init__(message)
        self.option = option


class VerdictFailed(Exception):
    """Raised by a command whose run completed with a failing verdict; the CLI exits 3."""


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


def script_exit(body) -> int:
    """The exit status of a `python -m qtools...` entry point running body(): its own (None: 0),
    or, for a QtoolsError, one `Error: ...` line on stderr and EXIT_ERROR."""
    import sys

    try:
        rc = body()
    except QtoolsError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    return rc or 0
