"""The `qtools` command line: a thin click layer over the library modules.

Each subcommand lives in qtools/commands/<name>.py and is imported only when
used, so `qtools --help` stays fast and one broken optional import cannot take
down the other commands.
"""

import importlib

import click

from . import QtoolsError, __version__

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
        return [name for name in COMMANDS if self._load(name) is not None]

    def get_command(self, ctx, name):
        return self._load(name)

    def invoke(self, ctx):
        # Library errors caused by the user's input become `Error: ...` + exit 1.
        try:
            return super().invoke(ctx)
        except QtoolsError as exc:
            raise click.ClickException(str(exc)) from None
        except KeyboardInterrupt:
            raise click.ClickException("interrupted") from None

    @staticmethod
    def _load(name):
        target = COMMANDS.get(name)
        if target is None:
            return None
        module_name, attr = target.split(":")
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            # Commands still being built are simply not listed.
            if exc.name == module_name:
                return None
            raise
        return getattr(module, attr)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="qtools")
def cli():
    """Predict and prove which MLX quantization bit-width keeps a LoRA fine-tune alive."""


def main(argv=None):
    cli.main(args=argv, prog_name="qtools")


if __name__ == "__main__":
    main()
