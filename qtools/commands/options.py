"""Option types every command shares: values MLX supports, and `--bits 4 5 6` as users type it."""

import click

from ..compat import click_parser_option


class Supported(click.ParamType):
    """A value MLX supports (a bit-width, a group size); anything else is one `Error:` line."""

    name = "integer"

    def __init__(self, what: str, supported: tuple, by: str):
        self.what, self.supported, self.by = what, supported, by

    def convert(self, value, param, ctx):
        v = int(value) if str(value).isdigit() else None
        if v not in self.supported:
            raise click.ClickException(f"unsupported {self.what} {value}: {self.by} supports "
                                       + ", ".join(map(str, self.supported)))
        return v


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
