"""Tuning jobs and listeners for tests: `job(trials=5, seed=0)` sets fields by name on the default job."""

from __future__ import annotations

from typing import Any, Callable

from attn_tune.tuner.job import TuneJob
from attn_tune.tuner.listener import TuneListener


def job(**fields: Any) -> TuneJob:
    """The default job with these fields (named as in their sections) replaced."""
    return TuneJob().updated(**fields)


class Heard(TuneListener):
    """A listener that hands each result (problem, entry, note) and re-choice record to the functions given."""

    def __init__(self, result: Callable[..., Any] | None = None, rechosen: Callable[[dict], Any] | None = None) -> None:
        self._result, self._rechosen = result, rechosen

    def result(self, problem: Any, entry: Any, note: str) -> None:
        if self._result is not None:
            self._result(problem, entry, note)

    def rechosen(self, record: dict[str, Any]) -> None:
        if self._rechosen is not None:
            self._rechosen(record)
