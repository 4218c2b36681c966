"""The `qtools` command line: a thin click layer over the library modules.

Each subcommand lives in qtools/commands/<name>.py and is imported only when
used, so `qtools --help` stays fast.
"""

import errno
import importlib
import sys

import click

from . import EXIT_ERROR, EXIT_VERDICT_FAILED, BadValue, QtoolsError, VerdictFailed, __version__

COMMANDS = {
    "delta-survival": "qtools.commands.survival:delta_survival_cmd",
    "quant-error": "qtools.commands.survival:quant_error_cmd",
    "fuse": "qtools.commands.fuse:fuse_cmd",
    "quantize": "qtools.commands.quantize:quantize_cmd",
    "validate": "qtools.commands.validate:validate_cmd",
    "compare": "qtools.commands.compare:compare_cmd",
    "retention": "qtools.commands.retention:retention_cmd",
    "probe": "qtools.commands.probe:probe_cmd",
    "demo-models": "qtools.commands.demo:demo_models_cmd",
    "calibrate": "qtools.commands.calibrate:calibrate_cmd",
}


class LazyGroup(click.Group):
    def list_commands(self, ctx):
        return list(COMMANDS)

    def get_command(self, ctx, name):
        return self._load(name)

    def invoke(self, ctx):
        # Library errors caused by the user's input become `Error: ...` + exit 1, a value out of
        # range a usage error (exit 2); a failed verdict, already reported by the command, exits 3.
        # SIGTERM interrupts as Ctrl-C does, so every cleanup runs for it too.
        from .io.atomic import sigterm_interrupts

        try:
            with sigterm_interrupts():
                _import_extensions()
                return super().invoke(ctx)
        except BadValue as exc:
            from .commands.options import usage_error

            raise usage_error(exc, ctx) from None
        except QtoolsError as exc:
            raise _error(str(exc)) from None
        except KeyboardInterrupt:
            raise _error("interrupted") from None
        except VerdictFailed:
            ctx.exit(EXIT_VERDICT_FAILED)

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        """click's standalone main, but an interrupt outside a command (click parsing its arguments,
        or exiting after it) is the same `Error: interrupted` as one inside, not click's "Aborted!"."""
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        try:
            rv = super().main(args, prog_name, complete_var, False, **extra)
        except click.exceptions.Abort:
            _error("interrupted").show()
            sys.exit(EXIT_ERROR)
        except click.ClickException as exc:
            exc.show()
            sys.exit(exc.exit_code)
        except OSError as exc:
            if exc.errno != errno.EPIPE:
                raise
            sys.exit(1)  # stdout closed early (`qtools ... | head`): as click's standalone main
        sys.exit(rv if isinstance(rv, int) else 0)  # ctx.exit(code) returns its code here

    @staticmethod
    def _load(name):
        target = COMMANDS.get(name)
        if target is None:
            return None
        module_name, attr = target.split(":")
        return getattr(importlib.import_module(module_name), attr)


def _import_extensions() -> None:
    """Import the compiled extensions every model command uses (mlx.core, qtools._ext: 40 ms) with
    Ctrl-C and SIGTERM deferred. An interrupt raised inside a nanobind module's initialisation
    aborts the process ("Critical nanobind error", SIGABRT, a core dump) instead of unwinding;
    deferred, it acts right after, as `Error: interrupted`. One that is not installed is left to
    the command that needs it, as before."""
    import contextlib

    from .io.atomic import signals_deferred

    with signals_deferred():
        for name in ("mlx.core", "qtools._ext"):
            with contextlib.suppress(ImportError):
                importlib.import_module(name)


def _error(message):
    exc = click.ClickException(message)
    exc.exit_code = EXIT_ERROR
    return exc


EXIT_HELP = ("Exit status: 0 success (a verdict passed), 3 a verdict failed (qtools validate), "
             "1 an error (bad input: nothing was judged), 2 a usage error.")


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]}, epilog=EXIT_HELP)
@click.version_option(__version__, prog_name="qtools")
def cli():
    """Predict and prove which MLX quantization bit-width keeps a LoRA fine-tune alive."""


def main(argv=None):
    cli.main(args=argv, prog_name="qtools")


if __name__ == "__main__":
    main()
