"""The `attn-tune` click group: every command module registers on it; errors are one line, exit 2 (1 when the
user's own model failed)."""

from __future__ import annotations

import sys
from typing import Any

import click

from attn_tune.errors import AttnTuneError, UsersCodeError

__all__ = ["cli"]


class _OneLineErrors(click.Group):
    """Usage errors and attn-tune errors print one line and exit 2; never a traceback."""

    def main(self, *args: Any, standalone_mode: bool = True, **kwargs: Any) -> Any:
        try:
            rv = super().main(*args, standalone_mode=False, **kwargs)
        except click.exceptions.Abort:
            click.echo("Aborted.", err=True)
            sys.exit(1)
        except click.ClickException as exc:
            click.echo(f"Error: {exc.format_message()}", err=True)
            sys.exit(exc.exit_code)
        except AttnTuneError as exc:
            click.echo(f"Error: {exc}", err=True)
            sys.exit(1 if isinstance(exc, UsersCodeError) else 2)  # the user's model failed: not a usage error
        if not standalone_mode:
            return rv
        sys.exit(rv if isinstance(rv, int) else 0)


@click.group(cls=_OneLineErrors, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="attn-tune")
def cli() -> None:
    """Find the fastest attention for each shape on this machine, by measuring it."""
