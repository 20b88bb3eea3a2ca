"""The `attn-tune` click group: every command module registers on it; errors are one line, exit 2."""

from __future__ import annotations

import sys
from typing import Any, Callable, TypeVar

import click

from attn_tune.errors import AttnTuneError, one_line

T = TypeVar("T")

__all__ = ["cli", "users_code"]


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
            sys.exit(2)
        if not standalone_mode:
            return rv
        sys.exit(rv if isinstance(rv, int) else 0)


@click.group(cls=_OneLineErrors, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="attn-tune")
def cli() -> None:
    """Find the fastest attention for each shape on this machine, by measuring it."""


def users_code(spec: str, run: Callable[[], T]) -> T:
    """Run the user's factory or model (MODULE:FACTORY): its own failure is one line, not a traceback."""
    try:
        return run()
    except AttnTuneError:
        raise
    except Exception as exc:  # noqa: BLE001 - the user's model failed
        raise click.ClickException(f"{spec} raised {one_line(exc)}") from None
