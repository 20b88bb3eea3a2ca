"""`attention`: SDPA's meaning, computed by the variant the config in use chose for the call's problem.

An explicit `attn_mask` is read for its structure (`attn_tune.mask_structure`, once per mask tensor) while a config
or an observer is in use: a causal, band or key-padding mask becomes the problem's causal / window / key_padding,
so the variant tuned for that structure serves it; the default policy still runs SDPA with the mask as given.

A call's route (variant, params, and how it was found) is resolved once per call signature and span of lengths
(`runtime.route_cache`), so a decode step costs a dict lookup and a bounds check over calling the variant
directly, and under `torch.compile` the choice is made while tracing, guarded only on the span's bounds
(`runtime.compiled`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

from torch import Tensor

from attn_tune.errors import UnsupportedProblem
from attn_tune.families.masks import is_key_mask
from attn_tune.families.torch_sdpa import sdpa as torch_sdpa
from attn_tune.mask_structure import MaskStructure, read_mask
from attn_tune.problem import Inputs, Problem
from attn_tune.registry.variant import DEFAULT_VARIANT
from attn_tune.runtime import active
from attn_tune.runtime.call_problem import call_problem
from attn_tune.runtime.choice import choose
from attn_tune.runtime.compiled import trace_in_place_of
from attn_tune.runtime.route import Decision, Route, sdpa_as_is
from attn_tune.runtime.route_cache import eager_route

__all__ = ["attention", "explain", "decide", "Decision", "reads_masks"]

@dataclass(frozen=True)
class Call:
    """One `attention` call as it ran (4-D layout), shown to observers: capture keeps samples, validate errors."""

    problem: Problem
    decision: Decision
    inputs: Inputs
    out: Tensor


_observers: list[Callable[[Call], None]] = []  # added by attn_tune.runtime.capture (record, samples) and validate


def decide(problem: Problem) -> Decision:
    """What `attention` would run for `problem` under the config in use, and why (`attn-tune show --why`)."""
    return choose(problem)[0].decision


def attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    *,
    scale: float | None = None,
    enable_gqa: bool = False,
    window: int | None = None,
) -> Tensor:
    """`torch.nn.functional.scaled_dot_product_attention`, computed by the tuned variant for this call.

    Every argument means what it means in SDPA, positional or keyword as there; `window=w` adds a sliding window
    (|i - j| < w; with causal 0 <= i - j < w). The variant comes from the config in use (`use_config`): the
    entry for this exact problem, else the nearest tuned lengths and batch, else SDPA. A chosen variant that cannot
    serve the call is replaced by an exact one that can. `dropout_p > 0` runs SDPA itself (no variant drops out).

    Raises:
        InvalidProblem: shapes, dtypes or devices that do not make an attention problem (one line).
    """
    if dropout_p:
        return sdpa_as_is(query, key, value, is_causal=is_causal, window=window, attn_mask=attn_mask, scale=scale,
                          dropout_p=dropout_p, enable_gqa=enable_gqa)
    if attn_mask is None:  # a decode step's path: no mask helper at all
        route = eager_route(query, key, value, None, is_causal, window, enable_gqa)
    else:
        structure, padding = _masking(query, key, attn_mask, is_causal, window, False)
        out = None if structure is None else _structured(structure, query, key, value, attn_mask, scale, enable_gqa)
        if out is not None:
            return out
        route = eager_route(query, key, value, attn_mask, is_causal, window, enable_gqa, padding)
    if route.as_sdpa:
        out = torch_sdpa(query, key, value, attn_mask=attn_mask, is_causal=is_causal, scale=scale,
                         enable_gqa=enable_gqa)
    else:
        out = _run(route, query, key, value, attn_mask, is_causal, window, scale)
    if _observers and route.decision.problem is not None:
        _notify_observers(route.decision, query, key, value, attn_mask, scale, out, is_causal, window)
    return out


READ_FROM_QUERIES = 2  # calls with fewer queries (decode steps) keep their mask: reading costs more than it saves


def reads_masks() -> bool:
    """Whether `attention` reads masks now: a config or an observer is in use."""
    return bool(_observers) or active.active_index()[0] is not None


def _masking(q: Tensor, k: Tensor, attn_mask: Tensor | None, is_causal: bool, window: int | None,
             always: bool) -> tuple[MaskStructure | None, bool]:
    """(the mask's structure if it was read, whether the mask is key padding as given). A bool (batch, 1, 1,
    kv_len) mask is key padding by its shape; another mask with no flags beside it is read when a config or an
    observer is in use (or `always`: explain), the call has SDPA's layout and at least `READ_FROM_QUERIES` queries,
    and a float mask has q's dtype (SDPA rejects others: it keeps that)."""
    if attn_mask is None or q.dim() not in (3, 4) or k.dim() != q.dim():
        return None, False
    if q.dim() == 4 and is_key_mask(attn_mask):
        return None, True
    if is_causal or window is not None or not (always or reads_masks()) or q.shape[-2] < READ_FROM_QUERIES:
        return None, False
    if attn_mask.is_floating_point() and attn_mask.dtype != q.dtype:
        return None, False
    return read_mask(attn_mask, q.shape[0], q.shape[1] if q.dim() == 4 else None, q.shape[-2], k.shape[-2]), False


def _structured_route(s: MaskStructure, q: Tensor, k: Tensor, v: Tensor, enable_gqa: bool
                      ) -> tuple[Route, Tensor | None]:
    """The route of the call's structured problem, and the key padding its variant gets as its mask."""
    padding = s.padding_mask(q.shape[0])
    if padding is not None and q.dim() == 3:
        padding = padding[:, 0]
    return eager_route(q, k, v, padding, s.causal, s.window, enable_gqa, padding is not None), padding


def _structured(s: MaskStructure, q: Tensor, k: Tensor, v: Tensor, original: Tensor, scale: float | None,
                enable_gqa: bool) -> Tensor | None:
    """A call whose mask was read as `s`, routed as its structured problem; a chosen variant gets the flags and only
    the key padding as its mask. None when no entry serves the structure but one serves the generic mask (a config
    tuned before masks were read): the caller routes the call as a generic mask. Otherwise, with no entry (the
    default policy) or a built-in `sdpa` that would fold a window or padding into a dense mask again, SDPA gets the
    caller's own mask."""
    route, padding = _structured_route(s, q, k, v, enable_gqa)
    if _generic_instead(route, q, k, v, original, enable_gqa):
        return None
    if _unserved(route) or _would_refold(route):
        out = torch_sdpa(q, k, v, attn_mask=original, scale=scale, enable_gqa=enable_gqa)
    elif route.as_sdpa:
        out = torch_sdpa(q, k, v, attn_mask=padding, is_causal=s.causal, scale=scale, enable_gqa=enable_gqa)
    else:
        out = _run(route, q, k, v, padding, s.causal, s.window, scale)
    if _observers and route.decision.problem is not None:
        decision = dataclasses.replace(route.decision, mask_read=s.describe())
        _notify_observers(decision, q, k, v, padding, scale, out, s.causal, s.window)
    return out


def _unserved(route: Route) -> bool:
    """No entry serves the route's problem: the default policy (or no problem at all)."""
    return route.decision.problem is None or route.decision.rule == "default"


def _generic_instead(route: Route, q: Tensor, k: Tensor, v: Tensor, original: Tensor, enable_gqa: bool) -> bool:
    """No entry serves the structure, but one serves the call as a generic mask (tuned before masks were read)."""
    return _unserved(route) and not _unserved(eager_route(q, k, v, original, False, None, enable_gqa))


def _would_refold(route: Route) -> bool:
    """The built-in `sdpa` chosen where it would fold a window or padding back into a dense mask: the caller's
    mask is that mask already."""
    return route.decision.variant == DEFAULT_VARIANT and not route.decision.params and not route.as_sdpa


def _run(route: Route, q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, is_causal: bool,
         window: int | None, scale: float | None) -> Tensor:
    """The route's variant on the call; should it refuse, the route's exact fallback (from now on)."""
    try:
        return route.fn(q, k, v, is_causal=is_causal, window=window, attn_mask=attn_mask, scale=scale)
    except UnsupportedProblem as exc:
        route.refused(exc)
        return route.fn(q, k, v, is_causal=is_causal, window=window, attn_mask=attn_mask, scale=scale)


trace_in_place_of(attention)  # dynamo traces the choice made at trace time (when it loads; never loaded here)


def _notify_observers(decision: Decision, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float | None,
                      out: Tensor, is_causal: bool, window: int | None) -> None:
    decision = _for_call(decision, q, k, v, mask, is_causal=is_causal, window=window)
    if q.dim() == 3:  # the problem's layout has a heads axis
        q, k, v, out = q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1), out.unsqueeze(1)
        mask = mask.unsqueeze(1) if mask is not None and mask.dim() == 3 else mask
    call = Call(decision.problem, decision, Inputs(q, k, v, mask, scale), out)
    for observe in list(_observers):
        observe(call)


def explain(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    *,
    scale: float | None = None,
    enable_gqa: bool = False,
    window: int | None = None,
) -> Decision:
    """Which entry and variant `attention` would use for these arguments, and why; runs nothing."""
    if dropout_p:
        return Decision(None, "sdpa (as is)", {}, "sdpa-as-is", f"dropout_p={dropout_p}: no variant applies dropout")
    structure, padding = _masking(query, key, attn_mask, is_causal, window, True)
    if structure is not None:
        route, keys = _structured_route(structure, query, key, value, enable_gqa)
        if not _generic_instead(route, query, key, value, attn_mask, enable_gqa):
            decision = _for_call(route.decision, query, key, value, keys, is_causal=structure.causal,
                                 window=structure.window)
            return dataclasses.replace(decision, mask_read=structure.describe())
    decision = eager_route(query, key, value, attn_mask, is_causal, window, enable_gqa, padding).decision
    return _for_call(decision, query, key, value, attn_mask, is_causal=is_causal, window=window)


def _for_call(decision: Decision, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, *, is_causal: bool,
              window: int | None) -> Decision:
    """The route's decision (made at the first length of its span) with this call's own problem in it."""
    if decision.problem is None:
        return decision
    problem = call_problem(q, k, v, mask is not None, is_causal, window, True, decision.problem.training,
                           decision.problem.key_padding)
    return decision if problem == decision.problem else dataclasses.replace(decision, problem=problem)
