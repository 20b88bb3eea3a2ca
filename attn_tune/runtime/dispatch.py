"""`attention`: SDPA's meaning, computed by the variant the config in use chose for the call's problem.

A call's route (variant, params, and how it was found) is resolved once per call signature (shapes, dtypes,
device, masking flags, autograd) and cached, so a call costs a dict lookup over calling the variant directly.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor

from attn_tune.errors import InvalidProblem, UnsupportedProblem
from attn_tune.families.masks import fold_for_sdpa
from attn_tune.families.torch_sdpa import sdpa as torch_sdpa
from attn_tune.problem import DTYPES, Inputs, Problem
from attn_tune.registry import availability, get_variant, variants
from attn_tune.registry.variant import DEFAULT_VARIANT, Variant
from attn_tune.runtime import active
from attn_tune.runtime.lookup import Match

__all__ = ["attention", "explain", "decide", "Decision"]


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
class _Route:
    """A resolved call: the function to run, its params, and the exact fallback should it refuse."""

    decision: Decision
    fn: Any
    params: dict[str, Any] = field(default_factory=dict)
    fallback: Variant | None = None
    heads_axis: bool = True  # False: 3-D inputs (batch, len, dim), given a heads axis of 1 for the variant

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, causal: bool, window: int | None,
                 scale: float | None) -> Tensor:
        if not self.heads_axis:
            q, k, v = q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1)
            if mask is not None and mask.dim() == 3:
                mask = mask.unsqueeze(1)
        try:
            out = self.fn(q, k, v, is_causal=causal, window=window, attn_mask=mask, scale=scale, **self.params)
        except UnsupportedProblem as exc:
            if self.fallback is None:
                raise
            self._fall_back(f"{self.decision.variant} refused the call: {exc}")
            out = self.fn(q, k, v, is_causal=causal, window=window, attn_mask=mask, scale=scale)
        return out if self.heads_axis else out.squeeze(1)

    def _fall_back(self, why: str) -> None:
        warnings.warn(f"attn-tune: {why}; using {self.fallback.name} from now on for this shape", RuntimeWarning,
                      stacklevel=4)
        self.decision.variant, self.decision.params, self.decision.rule = self.fallback.name, {}, "fallback"
        self.decision.reason = why
        self.fn, self.params, self.fallback = self.fallback.fn, {}, None


_routes: dict[tuple, _Route] = {}


@dataclass(frozen=True)
class Call:
    """One `attention` call as it ran (4-D layout), shown to observers: capture keeps samples, validate errors."""

    problem: Problem
    decision: Decision
    inputs: Inputs
    out: Tensor


_observers: list[Callable[[Call], None]] = []  # added by attn_tune.runtime.capture (record, samples) and validate
active.on_change(_routes.clear)


def _sdpa_as_is(q: Tensor, k: Tensor, v: Tensor, *, is_causal: bool, window: int | None, attn_mask: Tensor | None,
                scale: float | None, dropout_p: float = 0.0, enable_gqa: bool = False) -> Tensor:
    """PyTorch's SDPA itself, a window folded into the mask: for calls no Problem describes, and for dropout."""
    attn_mask, is_causal = fold_for_sdpa(q.shape[-2], k.shape[-2], is_causal=is_causal, window=window,
                                         attn_mask=attn_mask, device=q.device)
    return torch_sdpa(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                      enable_gqa=enable_gqa)


def _problem(q: Tensor, k: Tensor, v: Tensor, has_mask: bool, causal: bool, window: int | None, enable_gqa: bool,
             training: bool) -> Problem | str:
    """The call's Problem, or why no Problem describes it (then SDPA runs it as is)."""
    if q.dim() not in (3, 4) or k.dim() != q.dim() or v.dim() != q.dim():
        return "inputs are not 3-D or 4-D"
    if not q.dtype == k.dtype == v.dtype:
        raise InvalidProblem(f"q, k and v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not q.device == k.device == v.device:
        raise InvalidProblem(f"q, k and v must be on one device, got {q.device}, {k.device}, {v.device}")
    dtype = str(q.dtype).removeprefix("torch.")
    if dtype not in DTYPES:
        return f"dtype {dtype} is not tuned by attn-tune"
    if q.device.type not in ("cpu", "cuda"):
        return f"device {q.device} is not tuned by attn-tune"
    if v.shape[-1] != q.shape[-1] or k.shape[-1] != q.shape[-1]:
        return "key/value head_dim differs from the query's"
    if q.shape[0] != k.shape[0] or k.shape[:-1] != v.shape[:-1]:
        return "batch or key/value shapes differ (SDPA broadcasts them)"
    heads, kv_heads = (q.shape[1], k.shape[1]) if q.dim() == 4 else (1, 1)
    if heads != kv_heads and not enable_gqa:
        raise InvalidProblem(f"q has {heads} heads and k/v {kv_heads}: pass enable_gqa=True for grouped-query attention")
    return Problem(
        batch=q.shape[0], heads=heads, q_len=q.shape[-2], head_dim=q.shape[-1],
        kv_len=None if k.shape[-2] == q.shape[-2] else k.shape[-2], kv_heads=None if kv_heads == heads else kv_heads,
        dtype=dtype, device=str(q.device), causal=causal, window=window, mask=has_mask,
        training=training,
    )


def _exact_fallback(problem: Problem) -> Variant:
    """The default policy's variant if it serves the problem here, else the first exact variant that does."""
    default = get_variant(DEFAULT_VARIANT)
    if availability(default) is None and default.supports(problem) is None:
        return default  # the usual case, without walking the catalog (a new call shape pays this once)
    for variant in variants():
        if variant.exact and availability(variant) is None and variant.supports(problem) is None:
            return variant
    raise UnsupportedProblem(f"no exact variant serves {problem.describe()} here")


def _choose(problem: Problem) -> tuple[Variant, dict[str, Any], Decision, Variant | None]:
    """The variant, its params, the decision, and the exact variant to fall back on (None when it is the choice)."""
    index, label = active.active_index()
    fallback = _exact_fallback(problem)

    def default(rule: str, why: str, match: Match | None = None) -> tuple[Variant, dict[str, Any], Decision, None]:
        entry = match.entry.problem if match else None
        return fallback, {}, Decision(problem, fallback.name, {}, rule, why, entry, label), None

    if index is None:
        return default("default", "no tuned config in use: the default policy")
    if index.device_types and problem.device_type not in index.device_types:
        return default("default", active.warn_other_device(index, label, problem.device_type))
    match = index.find(problem)
    if match is None:
        return default("default", "no entry in the config has this call's heads, head_dim, dtype, device type and masking")
    choice, entry = match.entry.choice, match.entry
    how = "the entry tuned for this very problem" if match.rule == "own-entry" else "the nearest tuned lengths and batch"
    how += f" ({match.note})" if match.note else ""
    try:
        variant = get_variant(choice["variant"])
    except Exception as exc:  # noqa: BLE001 - a plugin that is not installed here
        return default("fallback", f"{how} chose {choice['variant']}, which is not here ({exc})", match)
    refusal = availability(variant) or variant.supports(problem)
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
    return variant, params, decision, fallback


def decide(problem: Problem) -> Decision:
    """What `attention` would run for `problem` under the config in use, and why (`attn-tune show --why`)."""
    return _choose(problem)[2]


def _resolve(q: Tensor, k: Tensor, v: Tensor, has_mask: bool, causal: bool, window: int | None, enable_gqa: bool,
             training: bool) -> _Route:
    problem = _problem(q, k, v, has_mask, causal, window, enable_gqa, training)
    if isinstance(problem, str):
        return _Route(Decision(None, "sdpa (as is)", {}, "sdpa-as-is", problem),
                      functools.partial(_sdpa_as_is, enable_gqa=enable_gqa))
    variant, params, decision, fallback = _choose(problem)
    return _Route(decision, variant.fn, params, fallback, heads_axis=q.dim() == 4)


def _route(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, is_causal: bool, window: int | None,
           enable_gqa: bool) -> _Route:
    training = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    key = (q.shape, k.shape, v.shape, q.dtype, k.dtype, v.dtype, q.device, k.device, v.device,
           attn_mask is not None, is_causal, window, enable_gqa, training)
    route = _routes.get(key)
    if route is None:
        route = _routes[key] = _resolve(q, k, v, attn_mask is not None, is_causal, window, enable_gqa, training)
    return route


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
        return _sdpa_as_is(query, key, value, is_causal=is_causal, window=window, attn_mask=attn_mask, scale=scale,
                           dropout_p=dropout_p, enable_gqa=enable_gqa)
    route = _route(query, key, value, attn_mask, is_causal, window, enable_gqa)
    out = route(query, key, value, attn_mask, is_causal, window, scale)
    if _observers and route.decision.problem is not None:
        _notify_observers(route.decision, query, key, value, attn_mask, scale, out)
    return out


def _notify_observers(decision: Decision, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float | None,
          out: Tensor) -> None:
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
    return _route(query, key, value, attn_mask, is_causal, window, enable_gqa).decision
