"""Finding a call's entry in a tuned config: the exact problem, else the nearest tuned lengths and batch."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from attn_tune.problem import Problem
from attn_tune.staleness import Change, StaleReport
from attn_tune.tuned_config import Entry, TunedConfig

__all__ = ["Match", "ConfigIndex", "shape_class"]


def shape_class(problem: Problem) -> tuple[Any, ...]:
    """Every field but batch, q_len and kv_len (device by type): entries must agree on all of it to be used."""
    return (
        problem.heads, problem.n_kv_heads, problem.head_dim, problem.dtype, problem.device_type,
        problem.causal, problem.window, problem.mask, problem.training,
    )


def _sizes(problem: Problem) -> tuple[float, float, float]:
    return (math.log(problem.q_len), math.log(problem.n_kv_len), math.log(problem.batch))


@dataclass(frozen=True)
class Match:
    """The entry a call uses and how it was found: 'exact' or 'nearest' (lengths and batch, in log scale)."""

    entry: Entry
    rule: str
    note: str = ""


class ConfigIndex:
    """A config's entries grouped by shape class, for the device types and device names they were measured on.

    Where several entries (from a merged config) hold one problem for one device type, the entry measured on a
    device with this machine's name wins; else the first.
    """

    def __init__(self, config: TunedConfig, local_names: dict[str, str], report: StaleReport | None = None) -> None:
        self.device_types = sorted({(e.device or config.device).get("type", "?") for e in config.entries})
        self._classes: dict[tuple, dict[tuple[int, int, int], Entry]] = {}
        report = report or StaleReport({}, set(), None)
        self._changes = {id(config.entries[i]): found for i, found in report.changed.items()}
        self._retired = {id(config.entries[i]) for i in report.retired}
        for entry in config.entries:
            device = entry.device or config.device
            device_type = device.get("type")
            if device_type != entry.problem.device_type:
                continue  # an entry is only used on the device type it was measured on
            bucket = self._classes.setdefault(shape_class(entry.problem), {})
            size = (entry.problem.batch, entry.problem.q_len, entry.problem.n_kv_len)
            held = bucket.get(size)
            if held is None or (device.get("name") == local_names.get(device_type) != (held.device or config.device).get("name")):
                bucket[size] = entry

    def changes(self, entry: Entry) -> list[Change]:
        """What changed since `entry` was measured ([] if nothing): the entry is stale."""
        return self._changes.get(id(entry), [])

    def retired(self, entry: Entry) -> bool:
        """A stale approximate entry whose variant's package changed version: not to be used."""
        return id(entry) in self._retired

    def find(self, problem: Problem) -> Match | None:
        """The exact entry, else the nearest one in its shape class; a masked call may use its unmasked twin."""
        match = self._find(problem)
        if match is None and problem.mask:
            match = self._find(dataclasses.replace(problem, mask=False))
            if match is not None:
                match = Match(match.entry, match.rule, "tuned without an explicit mask")
        return match

    def _find(self, problem: Problem) -> Match | None:
        bucket = self._classes.get(shape_class(problem))
        if not bucket:
            return None
        exact = bucket.get((problem.batch, problem.q_len, problem.n_kv_len))
        if exact is not None:
            return Match(exact, "own-entry")
        want = _sizes(problem)
        entry = min(bucket.values(), key=lambda e: (math.dist(_sizes(e.problem), want), -e.problem.q_len, -e.problem.batch))
        return Match(entry, "nearest-entry")
