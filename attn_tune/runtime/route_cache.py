"""Routes found once per span of lengths: eager calls find theirs with a dict lookup and a bounds check.

A call's route depends on its signature (every size but one varying length n, dtypes, devices, masking flags,
autograd) and on n only through spans: along n the nearest-entry rule is piecewise constant
(`ConfigIndex.spans`), and a variant's `supports()` that never reads n answers alike for every n (each answer
is checked for that, by watching which fields it reads). The varying length is kv_len with q_len fixed (decoding:
one query against a growing cache), or q_len = kv_len (self-attention at any length). The cache is a `Line` of
spans per signature, dropped whenever the config in use or the shadow rate changes.
"""

from __future__ import annotations

import bisect

import torch
from torch import Tensor

from attn_tune.problem import Problem
from attn_tune.runtime import active, shadowing
from attn_tune.runtime.call_problem import call_problem
from attn_tune.runtime.choice import choose
from attn_tune.runtime.lookup import MAX_LEN, Match
from attn_tune.runtime.route import Route, as_is

__all__ = ["Span", "Line", "eager_route", "new_line", "as_is_line", "resolve"]


class Span:
    """Lengths lo..hi of a line with one match; `route` once resolved, or per length (`by_length`) when a
    variant's supports() read the length."""

    __slots__ = ("lo", "hi", "match", "route", "by_length")

    def __init__(self, lo: int, hi: int, match: Match | None) -> None:
        self.lo, self.hi, self.match = lo, hi, match
        self.route: Route | None = None
        self.by_length: dict[int, Route] = {}


class Line:
    """The spans of one call signature along its varying length n (kv_len, or q_len = kv_len when `diagonal`)."""

    __slots__ = ("spans", "his", "last", "diagonal")

    def __init__(self, spans: list[tuple[int, int, Match | None]], diagonal: bool) -> None:
        self.spans = [Span(lo, hi, match) for lo, hi, match in spans]
        self.his = [hi for _, hi, _ in spans]
        self.last = self.spans[0]
        self.diagonal = diagonal

    def span(self, n: int) -> Span:
        last = self.last
        if last.lo <= n <= last.hi:
            return last
        self.last = self.spans[bisect.bisect_left(self.his, n)]
        return self.last


_lines: dict[tuple, Line] = {}
_odd: dict[tuple, Route] = {}  # calls of fewer than 3 dimensions (never a problem), per exact signature
_BY_LENGTH_KEPT = 4096  # routes kept per span for a supports() that reads the length: a long decode stays bounded
_grad_enabled = torch.is_grad_enabled


def _clear() -> None:
    _lines.clear()
    _odd.clear()


active.on_change(_clear)
shadowing.on_change(_clear)


def new_line(problem: Problem, diagonal: bool) -> Line:
    """The line through `problem` under the config in use, its spans not yet resolved."""
    index, _ = active.active_index()
    if index is None or (index.device_types and problem.device_type not in index.device_types):
        return Line([(1, MAX_LEN, None)], diagonal)
    return Line(index.spans(problem, diagonal), diagonal)


def as_is_line(reason: str, enable_gqa: bool, diagonal: bool) -> Line:
    """A line no Problem describes (`reason`): one span, run as is whatever the length."""
    line = Line([(1, MAX_LEN, None)], diagonal)
    line.spans[0].route = as_is(reason, enable_gqa)
    return line


def resolve(span: Span, line: Line, problem: Problem, heads_axis: bool) -> Route:
    """The span's route, resolved at `problem` (one of its lengths); kept for the span unless a supports() read
    the varying length, then for this length only."""
    route, read = choose(problem, span.match, heads_axis)
    varying = "q_len" if line.diagonal else "kv_len"
    if varying in read or "n_kv_len" in read:
        if len(span.by_length) >= _BY_LENGTH_KEPT:
            span.by_length.clear()
        span.by_length[problem.q_len if line.diagonal else problem.n_kv_len] = route
    else:
        span.route = route
    return route


def _odd_route(q: Tensor, k: Tensor, v: Tensor, has_mask: bool, causal: bool, window: int | None, enable_gqa: bool,
               training: bool) -> Route:
    key = (q.shape, k.shape, v.shape, q.dtype, k.dtype, v.dtype, q.device, k.device, v.device, has_mask, causal,
           window, enable_gqa, training)
    route = _odd.get(key)
    if route is None:
        problem = call_problem(q, k, v, has_mask, causal, window, enable_gqa, training)
        route = _odd[key] = (as_is(problem, enable_gqa) if isinstance(problem, str)
                             else choose(problem, heads_axis=q.dim() == 4)[0])
    return route


def eager_route(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, is_causal: bool, window: int | None,
                enable_gqa: bool, key_padding: bool = False) -> Route:
    """The route for a call outside torch.compile: a dict lookup by signature, then the span holding its length.

    Every tensor attribute read costs a decode step time, so the signature is what decides the route and no more:
    q's shape (on the diagonal its length dropped: a plain tuple, as slicing a torch.Size costs half a
    microsecond, with None so it never equals a shape), k's batch, heads and head_dim, whether v is shaped as k,
    q's dtype and device, the flags. The first call of a signature checks the rest (k and v share q's dtype and
    device); a later call that breaks that reaches the variant, and PyTorch rejects it with its own message.
    `key_padding`: `attn_mask` is the key padding read from the caller's mask (`attn_tune.mask_structure`).
    """
    training = _grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    qs, ks = q.shape, k.shape
    try:
        n = ks[-2]
        key = (qs if qs[-2] != n else (len(qs), qs[0], qs[-3], qs[-1], None), ks[0], ks[-3], ks[-1], v.shape == ks,
               q.dtype, q.device, attn_mask is not None, is_causal, window, enable_gqa, training, key_padding)
    except IndexError:  # fewer than 3 dimensions: never an attention problem
        return _odd_route(q, k, v, attn_mask is not None, is_causal, window, enable_gqa, training)
    line = _lines.get(key)
    if line is None:
        line = _new_line_for(key, q, k, v, attn_mask is not None, is_causal, window, enable_gqa, training,
                             qs[-2] == n, key_padding)
    span = line.last
    if not span.lo <= n <= span.hi:
        span = line.span(n)
    route = span.route or span.by_length.get(n)
    if route is None:
        problem = call_problem(q, k, v, attn_mask is not None, is_causal, window, enable_gqa, training, key_padding)
        assert not isinstance(problem, str)  # the line's first call would have said so
        route = resolve(span, line, problem, len(qs) == 4)  # a window too short for n raised InvalidProblem
    return route


def _new_line_for(key: tuple, q: Tensor, k: Tensor, v: Tensor, has_mask: bool, causal: bool, window: int | None,
                  enable_gqa: bool, training: bool, diagonal: bool, key_padding: bool) -> Line:
    """A signature's line, at its first call: checked in full (one-line errors), or run as is when no Problem
    describes it (then whatever its length)."""
    problem = call_problem(q, k, v, has_mask, causal, window, enable_gqa, training, key_padding)
    line = _lines[key] = (as_is_line(problem, enable_gqa, diagonal) if isinstance(problem, str)
                          else new_line(problem, diagonal))
    return line
