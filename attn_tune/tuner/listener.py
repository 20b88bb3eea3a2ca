"""`TuneListener`: what `tune` tells as it goes (progress bars, logs, tests), kept free of heavy imports."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from attn_tune.problem import Problem
    from attn_tune.tuned_config import Entry

__all__ = ["TuneListener"]


class TuneListener:
    """Override the methods you need; each does nothing."""

    def trial(self, problem: Problem, done: int, total: int) -> None:
        """`done` of `total` trials of `problem` have finished (0 as its trials begin)."""

    def step(self, what: str, done: int, total: int) -> None:
        """A long wait besides trials advanced: `what` names it (a problem's head-to-head, counted in rounds, at
        most `total`; the guard's model, counted in batches)."""

    def result(self, problem: Problem, entry: Entry | None, note: str) -> None:
        """`problem` got `entry` (None: no choice, `note` says why) after its trials and head-to-head."""

    def rechosen(self, record: dict[str, Any]) -> None:
        """Over a guard's budget, an approximate entry was chosen again or dropped (the config's
        `validation.dropped` record)."""
