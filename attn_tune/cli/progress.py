"""Progress on stderr while a long step runs (trials, a head-to-head, a model's batches, a capture's calls): a bar
when the total is known, a running count when not. On a terminal only, so a pipe, a log or `--json` hears nothing."""

from __future__ import annotations

import sys
import time

import click

__all__ = ["Progress", "on_terminal"]


def on_terminal() -> bool:
    """Whether stderr is a terminal a bar can redraw on."""
    return sys.stderr.isatty()


class Progress:
    """`progress(label, done, total)` redraws one line, `label: 3/20 [######              ] 12 s` (or `label: 57`
    without a total); a new label starts a new line. `close()` (or leaving a `with` block) ends the line before
    results are printed."""

    WIDTH = 20

    def __init__(self, enabled: bool | None = None) -> None:
        self.enabled = on_terminal() if enabled is None else enabled
        self.label: str | None = None
        self.started = 0.0
        self.drawn = 0

    def __call__(self, label: str, done: int, total: int | None = None) -> None:
        if not self.enabled:
            return
        if label != self.label:
            self.close()
            self.label, self.started = label, time.monotonic()
        elapsed = f"{time.monotonic() - self.started:.0f} s"
        if total:
            filled = self.WIDTH * min(done, total) // total
            text = f"{label}: {done}/{total} [{'#' * filled}{' ' * (self.WIDTH - filled)}] {elapsed}"
        else:
            text = f"{label}: {done} {elapsed}"
        click.echo("\r" + text.ljust(self.drawn), nl=False, err=True)
        self.drawn = len(text)

    def close(self) -> None:
        if self.label is not None and self.enabled:
            click.echo("", err=True)
        self.label, self.drawn = None, 0

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
