"""Option types every command shares: values MLX supports, numbers in range, and `--bits 4 5 6`
as users type it.

A value out of range is a usage error wherever it is found (exit 2, `Error: Invalid value for
'--bits': ...`, as click reports its own): by an option's type here, or by a check that needs other
options or the model (gptq's bits, a rank above the tensors' size), which raises qtools.BadValue;
`usage_error` turns that into click's usage error, in the one place the CLI catches it (cli.py).
"""

import math

import click

from .. import BadValue
from ..compat import click_parser_option


class Supported(click.ParamType):
    """A value MLX supports (a bit-width, a group size); anything else is a usage error."""

    name = "integer"

    def __init__(self, what: str, supported: tuple, by: str):
        self.what, self.supported, self.by = what, supported, by

    def convert(self, value, param, ctx):
        v = int(value) if str(value).isdigit() else None
        if v not in self.supported:
            self.fail(f"unsupported {self.what} {value}: {self.by} supports "
                      + ", ".join(map(str, self.supported)), param, ctx)
        return v


class Number(click.FloatRange):
    """A finite float within a range (click's FloatRange lets nan and inf through, and nan passes
    every comparison a criterion makes)."""

    def convert(self, value, param, ctx):
        v = super().convert(value, param, ctx)
        if not math.isfinite(v):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return v


class SamplesCount(click.ParamType):
    """A positive count, or -1 for all."""

    name = "integer"

    def convert(self, value, param, ctx):
        try:
            v = int(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not an integer", param, ctx)
        if v == 0 or v < -1:
            self.fail(f"{v} is not a count: give at least 1, or -1 for all", param, ctx)
        return v


def usage_error(exc: BadValue, group_ctx: click.Context) -> click.BadParameter:
    """click's usage error (exit 2) for a value found out of range after parsing, with the
    subcommand's usage line as click prints it for a value its own types refuse."""
    ctx = group_ctx
    name = group_ctx.invoked_subcommand
    cmd = group_ctx.command.get_command(group_ctx, name) if name else None
    if cmd is not None:
        ctx = click.Context(cmd, info_name=name, parent=group_ctx)
    return click.BadParameter(str(exc), ctx=ctx, param_hint=f"'{exc.option}'" if exc.option else None)


class ValuesOption(click.Option):
    """A repeatable option that also takes the numbers after it: `--bits 4 5 6` as users type
    it, the same as `--bits 4 --bits 5 --bits 6`."""

    def add_to_parser(self, parser, ctx):
        super().add_to_parser(parser, ctx)
        # click options take a fixed number of values: after the first, take every number that follows
        for name in self.opts:
            opt = click_parser_option(parser, name)
            take = opt.process

            def process(value, state, take=take):
                take(value, state)
                while state.rargs and state.rargs[0].isdigit():
                    take(state.rargs.pop(0), state)

            opt.process = process
