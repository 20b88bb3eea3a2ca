"""Routes: what a call runs (variant, params, the exact fallback) and why, found once per span of lengths.

A call's route depends on its signature (every size but one varying length n, dtypes, devices, masking flags,
autograd) and on n only through spans: along n the nearest-entry rule is piecewise constant
(`ConfigIndex.spans`), and a variant's `supports()` that never reads n answers alike for every n (each answer
is checked for that, by watching which fields it reads). The varying length is kv_len with q_len fixed (decoding:
one query against a growing cache), or q_len = kv_len (self-attention at any length). So a decode loop finds its
route with a dict lookup and a bounds check, and under `torch.compile` the span's bounds are the only guards the
lookup puts on n (`compiled_attention`): one recompile where the choice changes, none per length.
"""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
import functools
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor

from attn_tune.errors import InvalidProblem, UnsupportedProblem
from attn_tune.families.masks import fold_for_sdpa
from attn_tune.families.sdpa import PYTORCH_DISPATCH_FN
from attn_tune.families.torch_sdpa import sdpa as torch_sdpa
from attn_tune.problem import DTYPES, Problem
from attn_tune.registry import availability, get_variant, variants
from attn_tune.registry.variant import DEFAULT_VARIANT, Variant
from attn_tune.runtime import active, shadowing
from attn_tune.runtime.lookup import MAX_LEN, Match

__all__ = ["Decision", "Route", "eager_route", "compiled_attention", "choose", "sdpa_as_is", "call_problem"]

_AS_IS = "sdpa (as is)"  # the "variant" of calls no Problem describes


@dataclass
class Decision:
    """What a call runs and why. `rule`: own-entry (the entry tuned for this very problem) | nearest-entry |
    default | fallback | sdpa-as-is; never "exact", which would read as exact attention whatever the entry chose."""

    problem: Problem | None
    variant: str
    params: dict[str, Any]
    rule: str
    reason: str
    entry: Problem | None = None
    config: str | None = None
    max_error: float = 0.0

    def __str__(self) -> str:
        lines = [f"problem:  {self.problem.describe() if self.problem else '(not an attn-tune problem)'}"]
        lines.append(f"config:   {self.config or 'none'}")
        if self.entry is not None:
            lines.append(f"entry:    {self.entry.describe()}")
        params = f" {self.params}" if self.params else ""
        lines.append(f"variant:  {self.variant}{params}  [{self.rule}]")
        if self.max_error:
            lines.append(f"error:    approximate, tuned within max_error {self.max_error:g}")
        lines.append(f"why:      {self.reason}")
        return "\n".join(lines)


@dataclass
class Route:
    """A resolved call: the function to run (a variant's fn signature, params bound), and the exact fallback
    should it refuse. `decision` names the problem it was resolved for; a route serves its whole span alike."""

    decision: Decision
    fn: Callable[..., Tensor]
    fallback: Variant | None = None
    heads_axis: bool = True  # False: 3-D calls, given a heads axis of 1 around the variant
    as_sdpa: bool = False  # the choice is PyTorch's SDPA on the call as it came: `attention` calls SDPA itself

    def refused(self, exc: UnsupportedProblem) -> None:
        """The variant refused a call (raised UnsupportedProblem): from now on the exact fallback runs this route,
        said once; re-raises when there is none."""
        if self.fallback is None:
            raise exc
        why = f"{self.decision.variant} refused the call: {exc}"
        warnings.warn(f"attn-tune: {why}; using {self.fallback.name} from now on for calls like this one",
                      RuntimeWarning, stacklevel=4)  # the line that called attention (via _run)
        self.decision.variant, self.decision.params, self.decision.rule = self.fallback.name, {}, "fallback"
        self.decision.reason = why
        self.fn, self.fallback, self.as_sdpa = _bound(self.fallback.fn, {}, self.heads_axis), None, False


def _bound(fn: Callable[..., Tensor], params: dict[str, Any], heads_axis: bool) -> Callable[..., Tensor]:
    """`fn` with its params bound and, for 3-D inputs (batch, len, dim), a heads axis of 1 around it."""
    if params:
        fn = functools.partial(fn, **params)
    return fn if heads_axis else functools.partial(_with_heads_axis, fn)


def _with_heads_axis(fn: Callable[..., Tensor], q: Tensor, k: Tensor, v: Tensor, *, attn_mask: Tensor | None,
                     **kwargs: Any) -> Tensor:
    if attn_mask is not None and attn_mask.dim() == 3:
        attn_mask = attn_mask.unsqueeze(1)
    return fn(q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1), attn_mask=attn_mask, **kwargs).squeeze(1)


def sdpa_as_is(q: Tensor, k: Tensor, v: Tensor, *, is_causal: bool, window: int | None, attn_mask: Tensor | None,
               scale: float | None, dropout_p: float = 0.0, enable_gqa: bool = False) -> Tensor:
    """PyTorch's SDPA itself, a window folded into the mask: for calls no Problem describes, and for dropout."""
    attn_mask, is_causal = fold_for_sdpa(q.shape[-2], k.shape[-2], is_causal=is_causal, window=window,
                                         attn_mask=attn_mask, device=q.device)
    return torch_sdpa(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                      enable_gqa=enable_gqa)


def call_problem(q: Tensor, k: Tensor, v: Tensor, has_mask: bool, causal: bool, window: int | None,
                 enable_gqa: bool, training: bool) -> Problem | str:
    """The call's Problem, or why no Problem describes it (then SDPA runs it as is)."""
    if q.dim() not in (3, 4) or k.dim() != q.dim() or v.dim() != q.dim():
        return "inputs are not 3-D or 4-D"
    if not q.dtype == k.dtype == v.dtype:
        raise InvalidProblem(f"q, k and v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not q.device == k.device == v.device:
        raise InvalidProblem(f"q, k and v must be on one device, got {q.device}, {k.device}, {v.device}")
    if v.shape[-1] != q.shape[-1] or k.shape[-1] != q.shape[-1]:
        return "key/value head_dim differs from the query's"
    if q.shape[0] != k.shape[0] or k.shape[:-1] != v.shape[:-1]:
        return "batch or key/value shapes differ (SDPA broadcasts them)"
    heads, kv_heads = (q.shape[1], k.shape[1]) if q.dim() == 4 else (1, 1)
    return signature_problem(q.shape[0], heads, kv_heads, q.shape[-2], k.shape[-2], q.shape[-1], q.dtype, q.device,
                             has_mask, causal, window, enable_gqa, training)


def signature_problem(batch: int, heads: int, kv_heads: int, q_len: int, kv_len: int, head_dim: int,
                      dtype: torch.dtype, device: torch.device, has_mask: bool, causal: bool, window: int | None,
                      enable_gqa: bool, training: bool) -> Problem | str:
    """The Problem of a call with these sizes and settings, or why none describes it."""
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPES:
        return f"dtype {name} is not tuned by attn-tune"
    if device.type not in ("cpu", "cuda"):
        return f"device {device} is not tuned by attn-tune"
    if heads != kv_heads and not enable_gqa:
        raise InvalidProblem(f"q has {heads} heads and k/v {kv_heads}: pass enable_gqa=True for grouped-query "
                             "attention")
    return Problem(
        batch=batch, heads=heads, q_len=q_len, head_dim=head_dim, kv_len=None if kv_len == q_len else kv_len,
        kv_heads=None if kv_heads == heads else kv_heads, dtype=name, device=str(device), causal=causal,
        window=window, mask=has_mask, training=training,
    )


# -- choosing: the one place that turns (problem, the entry the lookup found) into a decision --------------------

class _Watched(Problem):
    """A Problem that notes which fields are read: a `supports()` that never read the varying length answers the
    same for every length of the span (it is a function of what it read). Each has its own notes (threads)."""

    def __getattribute__(self, name: str) -> Any:
        object.__getattribute__(self, "__dict__").setdefault("_fields_read", set()).add(name)
        return super().__getattribute__(name)


def _watched(problem: Problem) -> _Watched:
    watched = _Watched(**{f.name: getattr(problem, f.name) for f in dataclasses.fields(Problem)})
    object.__getattribute__(watched, "__dict__")["_fields_read"] = set()  # what validation read does not count
    return watched


def _fields_read(watched: _Watched) -> set[str]:
    return set(object.__getattribute__(watched, "__dict__")["_fields_read"])


def _exact_fallback(problem: Problem) -> Variant:
    """The default policy's variant if it serves the problem here, else the first exact variant that does."""
    default = get_variant(DEFAULT_VARIANT)
    if availability(default) is None and default.supports(problem) is None:
        return default  # the usual case, without walking the catalog (a new call signature pays this once)
    for variant in variants():
        if variant.exact and availability(variant) is None and variant.supports(problem) is None:
            return variant
    raise UnsupportedProblem(f"no exact variant serves {problem.describe()} here")


def choose(problem: Problem, match: Match | None | str = "find", heads_axis: bool = True) -> tuple[Route, set[str]]:
    """The route for `problem` given the entry the lookup found for it (`"find"`: look it up now), and the
    problem's fields that the variants' `supports()` read to decide it. `heads_axis` False: the calls are 3-D."""
    index, label = active.active_index()
    watched = _watched(problem)
    fallback = _exact_fallback(watched)

    def default(rule: str, why: str, match: Match | None = None) -> tuple[Route, set[str]]:
        entry = match.entry.problem if match else None
        decision = Decision(problem, fallback.name, {}, rule, why, entry, label)
        return Route(decision, _bound(fallback.fn, {}, heads_axis), None, heads_axis, _as_sdpa(fallback, problem)), \
            _fields_read(watched)

    if index is None:
        return default("default", "no tuned config in use: the default policy")
    if index.device_types and problem.device_type not in index.device_types:
        return default("default", active.warn_other_device(index, label, problem.device_type))
    if match == "find":
        match = index.find(problem)
    if match is None:
        return default("default", "no entry in the config has this call's heads, head_dim, dtype, device type and "
                                  "masking")
    choice, entry = match.entry.choice, match.entry
    how = ("the entry tuned for this very problem" if match.rule == "own-entry"
           else "the nearest tuned lengths and batch")
    how += f" ({match.note})" if match.note else ""
    try:
        variant = get_variant(choice["variant"])
    except Exception as exc:  # noqa: BLE001 - a plugin that is not installed here
        return default("fallback", f"{how} chose {choice['variant']}, which is not here ({exc})", match)
    refusal = availability(variant) or variant.supports(watched)
    if refusal:
        return default("fallback", f"{how} chose {variant.name}, which cannot serve this call: {refusal}", match)
    if not variant.exact and (match.rule != "own-entry" or match.note):
        return default("fallback", f"{how} chose the approximate {variant.name}, whose error was measured only at "
                                   f"{entry.problem.describe()}", match)
    stale = "; ".join(str(c) for c in index.changes(entry))
    if index.retired(entry):
        return default("fallback", f"{how} chose the approximate {variant.name}, measured before {stale}: its error "
                                   "is no longer known", match)
    params = dict(choice.get("params", {}))
    how += f" (stale: {stale})" if stale else ""
    decision = Decision(problem, variant.name, params, match.rule, how, entry.problem, label, entry.max_error)
    route = Route(decision, _bound(variant.fn, params, heads_axis), fallback, heads_axis,
                  not params and _as_sdpa(variant, problem))
    if not variant.exact and shadowing.rate() > 0:
        route.fn = shadowing.wrap(route.fn, variant.name, params, entry.problem, entry.measured.get("rel_error"))
    return route, _fields_read(watched)


def _as_sdpa(variant: Variant, problem: Problem) -> bool:
    """Whether running `variant` on the problem's calls is calling PyTorch's SDPA with the call's own arguments:
    the built-in `sdpa` (PyTorch's dispatch) when no window needs folding into a mask. `attention` then skips the
    variant's wrapper, which a decode step would feel."""
    return variant.name == DEFAULT_VARIANT and variant.fn is PYTORCH_DISPATCH_FN and problem.window is None and \
        not (problem.mask and problem.causal)


# -- the cache: lines of calls alike but for one length, cut into spans ------------------------------------------

class _Span:
    """Lengths lo..hi of a line with one match; `route` once resolved, or per length (`by_length`) when a
    variant's supports() read the length."""

    __slots__ = ("lo", "hi", "match", "route", "by_length")

    def __init__(self, lo: int, hi: int, match: Match | None) -> None:
        self.lo, self.hi, self.match = lo, hi, match
        self.route: Route | None = None
        self.by_length: dict[int, Route] = {}


class _Line:
    """The spans of one call signature along its varying length n (kv_len, or q_len = kv_len when `diagonal`)."""

    __slots__ = ("spans", "his", "last", "diagonal")

    def __init__(self, spans: list[tuple[int, int, Match | None]], diagonal: bool) -> None:
        self.spans = [_Span(lo, hi, match) for lo, hi, match in spans]
        self.his = [hi for _, hi, _ in spans]
        self.last = self.spans[0]
        self.diagonal = diagonal

    def span(self, n: int) -> _Span:
        last = self.last
        if last.lo <= n <= last.hi:
            return last
        self.last = self.spans[bisect.bisect_left(self.his, n)]
        return self.last


_lines: dict[tuple, _Line] = {}
_odd: dict[tuple, Route] = {}  # calls of fewer than 3 dimensions (never a problem), per exact signature
_BY_LENGTH_KEPT = 4096  # routes kept per span for a supports() that reads the length: a long decode stays bounded
_grad_enabled = torch.is_grad_enabled


def _clear() -> None:
    _lines.clear()
    _odd.clear()
    _compiled_lines.clear()


active.on_change(_clear)
shadowing.on_change(_clear)


def _new_line(problem: Problem, diagonal: bool) -> _Line:
    index, _ = active.active_index()
    if index is None or (index.device_types and problem.device_type not in index.device_types):
        return _Line([(1, MAX_LEN, None)], diagonal)
    return _Line(index.spans(problem, diagonal), diagonal)


def _resolve(span: _Span, line: _Line, problem: Problem, heads_axis: bool) -> Route:
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


def _as_is(reason: str, enable_gqa: bool) -> Route:
    return Route(Decision(None, _AS_IS, {}, "sdpa-as-is", reason), functools.partial(sdpa_as_is, enable_gqa=enable_gqa))


def _odd_route(q: Tensor, k: Tensor, v: Tensor, has_mask: bool, causal: bool, window: int | None, enable_gqa: bool,
               training: bool) -> Route:
    key = (q.shape, k.shape, v.shape, q.dtype, k.dtype, v.dtype, q.device, k.device, v.device, has_mask, causal,
           window, enable_gqa, training)
    route = _odd.get(key)
    if route is None:
        problem = call_problem(q, k, v, has_mask, causal, window, enable_gqa, training)
        route = _odd[key] = (_as_is(problem, enable_gqa) if isinstance(problem, str)
                             else choose(problem, heads_axis=q.dim() == 4)[0])
    return route


def eager_route(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, is_causal: bool, window: int | None,
                enable_gqa: bool) -> Route:
    """The route for a call outside torch.compile: a dict lookup by signature, then the span holding its length.

    Every tensor attribute read costs a decode step time, so the signature is what decides the route and no more:
    q's shape (its length dropped on the diagonal), k's batch, heads and head_dim, whether v is shaped as k,
    q's dtype and device, the flags. The first call of a signature checks the rest (k and v share q's dtype and
    device); a later call that breaks that reaches the variant, and PyTorch rejects it with its own message.
    """
    training = _grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    qs, ks = q.shape, k.shape
    try:
        n = ks[-2]
        key = (qs if qs[-2] != n else qs[:-2] + qs[-1:], ks[0], ks[-3], ks[-1], v.shape == ks, q.dtype, q.device,
               attn_mask is not None, is_causal, window, enable_gqa, training)
    except IndexError:  # fewer than 3 dimensions: never an attention problem
        return _odd_route(q, k, v, attn_mask is not None, is_causal, window, enable_gqa, training)
    line = _lines.get(key)
    if line is None:
        line = _new_line_for(key, q, k, v, attn_mask is not None, is_causal, window, enable_gqa, training,
                             qs[-2] == n)
    span = line.last
    if not span.lo <= n <= span.hi:
        span = line.span(n)
    route = span.route or span.by_length.get(n)
    if route is None:
        problem = call_problem(q, k, v, attn_mask is not None, is_causal, window, enable_gqa, training)
        assert not isinstance(problem, str)  # the line's first call would have said so
        route = _resolve(span, line, problem, len(qs) == 4)  # a window too short for n raised InvalidProblem
    return route


def _new_line_for(key: tuple, q: Tensor, k: Tensor, v: Tensor, has_mask: bool, causal: bool, window: int | None,
                  enable_gqa: bool, training: bool, diagonal: bool) -> _Line:
    """A signature's line, at its first call: checked in full (one-line errors), or run as is when no Problem
    describes it (then whatever its length)."""
    problem = call_problem(q, k, v, has_mask, causal, window, enable_gqa, training)
    if isinstance(problem, str):
        line = _lines[key] = _Line([(1, MAX_LEN, None)], diagonal)
        line.spans[0].route = _as_is(problem, enable_gqa)
        return line
    line = _lines[key] = _new_line(problem, diagonal)
    return line


# -- under torch.compile: the same spans, consulted while dynamo traces ------------------------------------------

@dataclass
class _TracedLine:
    """A line as compiled graphs see it: runs of spans whose routes run one variant with one set of params are
    one group (the own-entry length inside a run changes nothing a graph calls), each guarded by its end."""

    line: _Line
    problem: Problem | None  # the line's problem at some length (None: the line runs as is)
    ends: list[int]
    choices: list[tuple[str, tuple[tuple[str, Any], ...]] | None]  # None: the route depends on the exact length


_compiled_lines: dict[tuple, _TracedLine] = {}
_fns: dict[str, Callable[..., Tensor]] = {}  # every variant's fn by name, filled before a graph reads it


def _trace_line(batch: int, heads: int, kv_heads: int, fixed_q_len: int, head_dim: int, dtype: torch.dtype,
                device: torch.device, has_mask: bool, causal: bool, window: int | None, enable_gqa: bool,
                training: bool, four_d: bool) -> _TracedLine:
    diagonal = fixed_q_len == 0
    q_len = 1 if diagonal else fixed_q_len
    kv_len = 1 if diagonal else fixed_q_len + 1  # a point of the line where the window leaves every query a key
    problem = signature_problem(batch, heads, kv_heads, q_len, kv_len, head_dim, dtype, device, has_mask, causal,
                                window, enable_gqa, training)
    if isinstance(problem, str):
        line = _Line([(1, MAX_LEN, None)], diagonal)
        line.spans[0].route = _as_is(problem, enable_gqa)
        return _TracedLine(line, None, [MAX_LEN], [(_AS_IS, ())])
    line = _new_line(problem, diagonal)
    ends: list[int] = []
    choices: list[tuple[str, tuple[tuple[str, Any], ...]] | None] = []
    for span in line.spans:
        with contextlib.suppress(InvalidProblem):  # a window too wide for the span's first length: decided later
            _resolve(span, line, _at_length(problem, diagonal, span.lo), True)
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


@torch._dynamo.assume_constant_result
def _line_at_trace(signature: tuple) -> tuple[int, ...]:
    """Run by dynamo while it traces, on static values only (never the varying length): the ends of the line's
    groups of spans (reading the config in use first, when ATTN_TUNE_CONFIG names it)."""
    if signature not in _compiled_lines:
        _compiled_lines[signature] = _trace_line(*signature)
    return tuple(_compiled_lines[signature].ends)


@torch._dynamo.assume_constant_result
def _needs_length(signature: tuple, group: int) -> bool:
    """Whether the route of `group` depends on the exact length (a supports() read it, or the window needs it):
    then dynamo specialises on the length, as that variant needs."""
    return _compiled_lines[signature].choices[group] is None


@torch._dynamo.assume_constant_result
def _route_at_trace(signature: tuple, group: int, n: int, epoch: int) -> tuple[str, tuple[tuple[str, Any], ...]]:
    """(variant name, params as pairs) for `group` of a traced line, at length n when `_needs_length` (else 0).
    Names and params, not functions: dynamo can guard on a function it reads from `_fns`, not on one handed back
    here. `epoch` changes with the config in use: passing it makes each graph guard on it (a new config
    recompiles)."""
    traced = _compiled_lines[signature]
    choice = traced.choices[group]
    if choice is None:
        span = traced.line.span(n)
        route = span.route or span.by_length.get(n)
        if route is None:
            assert traced.problem is not None  # an as-is line has its choice
            route = _resolve(span, traced.line, _at_length(traced.problem, traced.line.diagonal, n), True)
        choice = (route.decision.variant, tuple(route.decision.params.items()))
    if choice[0] != _AS_IS and choice[0] not in _fns:
        _fns.update({variant.name: variant.fn for variant in variants()})
    return choice


def compiled_attention(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, is_causal: bool,
                       window: int | None, scale: float | None, enable_gqa: bool) -> Tensor:
    """`attention` for a call dynamo is tracing: the chosen variant's fn, called directly in the graph.

    Every size but the varying length is made static (dynamo specialises on it, as on any Python value); the
    length is only compared with span ends, so those bounds are the graph's only guards on it and a new length
    within the span reuses the graph. Shapes SDPA would broadcast are not checked here: PyTorch's SDPA reports
    them. A variant that refuses the call while being traced is not replaced: the error surfaces.
    """
    four_d = q.dim() == 4
    if not four_d and q.dim() != 3:
        return sdpa_as_is(q, k, v, is_causal=is_causal, window=window, attn_mask=attn_mask, scale=scale,
                          enable_gqa=enable_gqa)
    training = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    q_len, n = q.shape[-2], k.shape[-2]
    heads, kv_heads = (int(q.shape[1]), int(k.shape[1])) if four_d else (1, 1)
    signature = (int(q.shape[0]), heads, kv_heads, 0 if q_len == n else int(q_len), int(q.shape[-1]), q.dtype,
                 q.device, attn_mask is not None, is_causal, window, enable_gqa, training, four_d)
    ends = _line_at_trace(signature)
    group = 0
    while n > ends[group]:
        group += 1
    name, params = _route_at_trace(signature, group, int(n) if _needs_length(signature, group) else 0,
                                   active.epoch())
    if name == _AS_IS:
        return sdpa_as_is(q, k, v, is_causal=is_causal, window=window, attn_mask=attn_mask, scale=scale,
                          enable_gqa=enable_gqa)
    if not four_d:
        q, k, v = q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1)
        attn_mask = attn_mask.unsqueeze(1) if attn_mask is not None and attn_mask.dim() == 3 else attn_mask
    out = _fns[name](q, k, v, is_causal=is_causal, window=window, attn_mask=attn_mask, scale=scale,
                    **dict(params))
    return out if four_d else out.squeeze(1)
