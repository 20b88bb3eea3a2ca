"""Finding a call's entry in a tuned config: the exact problem, else the nearest tuned lengths and batch."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from attn_tune.problem import Problem
from attn_tune.staleness import Change, StaleReport
from attn_tune.tuned_config import Entry, TunedConfig

__all__ = ["Match", "ConfigIndex", "shape_class", "MAX_LEN"]

MAX_LEN = 2**31 - 1  # the end of the last span along a line: no attention call is longer


_UNMASKED_NOTE = "tuned without an explicit mask"


def _unmasked_twin(problem: Problem) -> Problem:
    """The problem without its explicit mask (nor the key padding it carries): the entry a masked call may use."""
    return dataclasses.replace(problem, mask=False, key_padding=False)


def shape_class(problem: Problem) -> tuple[Any, ...]:
    """Every field but batch, q_len and kv_len (device by type): entries must agree on all of it to be used."""
    return (
        problem.heads, problem.n_kv_heads, problem.head_dim, problem.dtype, problem.device_type,
        problem.causal, problem.window, problem.mask, problem.training, problem.key_padding,
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
            match = self._find(_unmasked_twin(problem))
            if match is not None:
                match = Match(match.entry, match.rule, _UNMASKED_NOTE)
        return match

    def spans(self, problem: Problem, diagonal: bool) -> list[tuple[int, int, Match | None]]:
        """`find`'s answers along the line through `problem` where one length n varies: kv_len = n (q_len and
        batch fixed) or, `diagonal`, q_len = kv_len = n; as [(lo, hi, match)] covering n = 1..MAX_LEN in order.

        The nearest-entry rule is piecewise constant along a line: in log scale each entry's squared distance is
        a parabola in log n with the same leading term, so two entries swap order at one point at most. Walking
        up from n = 1, a span ends just before the first point where another entry overtakes the winner, or
        before the next length that has its own entry; integers next to a crossing are spans of their own, so
        rounding never decides one, and each span's ends are checked against the lookup itself.
        """
        key, note = shape_class(problem), ""
        if not self._classes.get(key) and problem.mask:
            key, note = shape_class(_unmasked_twin(problem)), _UNMASKED_NOTE
        bucket = self._classes.get(key)
        if not bucket:
            return [(1, MAX_LEN, None)]
        entries = list(bucket.values())
        fixed = None if diagonal else problem.q_len
        own = sorted({_own_length(e.problem, problem.batch, fixed) for e in entries} - {None})
        terms = {id(e): _parabola(e.problem, problem, diagonal) for e in entries}

        def at(n: int) -> Match:
            match = self._find_sizes(key, problem.batch, n if diagonal else problem.q_len, n)
            assert match is not None  # the class has entries
            return Match(match.entry, match.rule, note)

        result: list[tuple[int, int, Match | None]] = []
        n = 1
        while n <= MAX_LEN:
            match = at(n)
            hi = n if n in own else min([p - 1 for p in own if p > n] + [MAX_LEN])
            winner = terms[id(match.entry)]
            for other in terms.values():
                crossing = _overtakes(winner, other)
                if hi > n and crossing is not None and crossing >= math.log(n) - 1e-9:
                    hi = max(n, min(hi, math.floor(math.exp(crossing)) - 1))
            if hi > n and not _same(at(hi), match):
                hi = n  # rounding disagreed with the geometry: this length is decided alone
            if result and _same(result[-1][2], match):
                result[-1] = (result[-1][0], hi, match)
            else:
                result.append((n, hi, match))
            n = hi + 1
        return result

    def _find(self, problem: Problem) -> Match | None:
        return self._find_sizes(shape_class(problem), problem.batch, problem.q_len, problem.n_kv_len)

    def _find_sizes(self, key: tuple, batch: int, q_len: int, kv_len: int) -> Match | None:
        bucket = self._classes.get(key)
        if not bucket:
            return None
        exact = bucket.get((batch, q_len, kv_len))
        if exact is not None:
            return Match(exact, "own-entry")
        want = (math.log(q_len), math.log(kv_len), math.log(batch))
        entry = min(bucket.values(),
                    key=lambda e: (math.dist(_sizes(e.problem), want), -e.problem.q_len, -e.problem.batch))
        return Match(entry, "nearest-entry")


def _same(a: Match | None, b: Match | None) -> bool:
    """One entry (the object: staleness is kept per entry) found by one rule."""
    return a is b or (a is not None and b is not None and a.entry is b.entry and (a.rule, a.note) == (b.rule, b.note))


def _own_length(entry: Problem, batch: int, q_len: int | None) -> int | None:
    """The n at which the line (batch, q_len fixed, or diagonal when q_len is None) meets `entry` itself."""
    if entry.batch != batch:
        return None
    if q_len is None:
        return entry.q_len if entry.n_kv_len == entry.q_len else None
    return entry.n_kv_len if entry.q_len == q_len else None


def _parabola(entry: Problem, problem: Problem, diagonal: bool) -> tuple[float, float]:
    """(b, c) with the entry's squared log distance to the line's point n being a*x^2 + b*x + c, x = log n, where
    a is the same for every entry (1, or 2 on the diagonal) and drops out of every comparison."""
    eq, ekv, eb = _sizes(entry)
    rest = (math.log(problem.batch) - eb) ** 2
    if diagonal:
        return -2 * (eq + ekv), eq * eq + ekv * ekv + rest
    return -2 * ekv, ekv * ekv + (math.log(problem.q_len) - eq) ** 2 + rest


def _overtakes(winner: tuple[float, float], other: tuple[float, float]) -> float | None:
    """The x = log n from which `other` is no farther than `winner` (as n grows), or None if it never comes closer."""
    (bw, cw), (bo, co) = winner, other
    if bo >= bw:
        return None  # the other's distance grows at least as fast: it never catches up going up
    return (co - cw) / (bw - bo)
