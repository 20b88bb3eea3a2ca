"""What dynamo runs while it traces `attention` (as constants, on static values only): a call signature's line of
spans cut into groups that run one variant with one set of params, and each group's choice.

The spans are the eager cache's (`route_cache`), so compiled and eager calls choose alike; a group's end is the
only guard a graph puts on the varying length, so dynamo compiles once where the choice changes, not per length.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor

from attn_tune.errors import InvalidProblem
from attn_tune.problem import Problem
from attn_tune.registry import variants
from attn_tune.runtime import active, shadowing
from attn_tune.runtime.call_problem import signature_problem
from attn_tune.runtime.lookup import MAX_LEN
from attn_tune.runtime.route import AS_IS
from attn_tune.runtime.route_cache import Line, as_is_line, new_line, resolve

__all__ = ["Choice", "fns", "line_at_trace", "needs_length", "route_at_trace"]

Choice = tuple[str, tuple[tuple[str, Any], ...]]  # (variant name, params as pairs)


@dataclass
class _TracedLine:
    """A line as compiled graphs see it: runs of spans whose routes run one variant with one set of params are
    one group (the own-entry length inside a run changes nothing a graph calls), each guarded by its end."""

    line: Line
    problem: Problem | None  # the line's problem at some length (None: the line runs as is)
    ends: list[int]
    choices: list[Choice | None]  # None: the route depends on the exact length


_traced_lines: dict[tuple, _TracedLine] = {}
fns: dict[str, Callable[..., Tensor]] = {}  # every variant's fn by name, filled before a graph reads it
active.on_change(_traced_lines.clear)
shadowing.on_change(_traced_lines.clear)


def _trace_line(batch: int, heads: int, kv_heads: int, fixed_q_len: int, head_dim: int, dtype: torch.dtype,
                device: torch.device, has_mask: bool, causal: bool, window: int | None, enable_gqa: bool,
                training: bool, four_d: bool) -> _TracedLine:
    diagonal = fixed_q_len == 0
    q_len = 1 if diagonal else fixed_q_len
    kv_len = 1 if diagonal else fixed_q_len + 1  # a point of the line where the window leaves every query a key
    problem = signature_problem(batch, heads, kv_heads, q_len, kv_len, head_dim, dtype, device, has_mask, causal,
                                window, enable_gqa, training)
    if isinstance(problem, str):
        return _TracedLine(as_is_line(problem, enable_gqa, diagonal), None, [MAX_LEN], [(AS_IS, ())])
    line = new_line(problem, diagonal)
    ends: list[int] = []
    choices: list[Choice | None] = []
    for span in line.spans:
        with contextlib.suppress(InvalidProblem):  # a window too wide for the span's first length: decided later
            resolve(span, line, _at_length(problem, diagonal, span.lo), True)
        decided = span.route.decision if span.route is not None else None
        choice = None if decided is None else (decided.variant, tuple(decided.params.items()))
        if choice is not None and choices and choices[-1] == choice:
            ends[-1] = span.hi
        else:
            ends.append(span.hi)
            choices.append(choice)
    return _TracedLine(line, problem, ends, choices)


def _at_length(problem: Problem, diagonal: bool, n: int) -> Problem:
    if diagonal:
        return dataclasses.replace(problem, q_len=n)
    return dataclasses.replace(problem, kv_len=None if n == problem.q_len else n)


def line_at_trace(signature: tuple) -> tuple[int, ...]:
    """Run by dynamo while it traces, on static values only (never the varying length): the ends of the line's
    groups of spans (reading the config in use first, when ATTN_TUNE_CONFIG names it)."""
    if signature not in _traced_lines:
        _traced_lines[signature] = _trace_line(*signature)
    return tuple(_traced_lines[signature].ends)


def needs_length(signature: tuple, group: int) -> bool:
    """Whether the route of `group` depends on the exact length (a supports() read it, or the window needs it):
    then dynamo specialises on the length, as that variant needs."""
    return _traced_lines[signature].choices[group] is None


def route_at_trace(signature: tuple, group: int, n: int, epoch: int) -> Choice:
    """(variant name, params as pairs) for `group` of a traced line, at length n when `needs_length` (else 0).
    Names and params, not functions: dynamo can guard on a function it reads from `fns`, not on one handed back
    here. `epoch` changes with the config in use: passing it makes each graph guard on it (a new config
    recompiles)."""
    traced = _traced_lines[signature]
    choice = traced.choices[group]
    if choice is None:
        span = traced.line.span(n)
        route = span.route or span.by_length.get(n)
        if route is None:
            assert traced.problem is not None  # an as-is line has its choice
            route = resolve(span, traced.line, _at_length(traced.problem, traced.line.diagonal, n), True)
        choice = (route.decision.variant, tuple(route.decision.params.items()))
    if choice[0] != AS_IS and choice[0] not in fns:
        fns.update({variant.name: variant.fn for variant in variants()})
    return choice
