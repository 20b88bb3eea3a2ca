"""Shadow checks: a sampled fraction of approximate calls recomputed exactly, in service, to keep the config honest.

A config's error for an approximate choice was measured on the inputs it was tuned on (random or captured). Inputs
drift in service; `shadow(rate)` (or `ATTN_TUNE_SHADOW=RATE`) recomputes that fraction of the calls that run an
approximate variant with PyTorch's SDPA (in float32, float64 for float64 inputs), keeps per-entry counts and the
worst relative error seen, and warns once per entry when a live error exceeds the recorded error by more than
`factor`. `stats()` reports them.

Exact routes are never touched, and with the rate at 0 (the default) no route is wrapped: the check costs nothing
when off. Routes are rebuilt when the rate changes. Calls traced by `torch.compile` are not shadowed.
"""

from __future__ import annotations

import os
import random
import threading
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor

from attn_tune.errors import AttnTuneError
from attn_tune.families.masks import fold_for_sdpa
from attn_tune.families.torch_sdpa import sdpa as torch_sdpa
from attn_tune.problem import Problem

__all__ = ["shadow", "stats", "rate", "wrap", "on_change", "ENV_VAR", "DEFAULT_FACTOR"]

ENV_VAR = "ATTN_TUNE_SHADOW"
DEFAULT_FACTOR = 2.0

_UNSET = -1.0
_state: dict[str, Any] = {"rate": _UNSET, "factor": DEFAULT_FACTOR}
_rng = random.Random(0)
_lock = threading.Lock()
_listeners: list[Callable[[], None]] = []


@dataclass
class EntryStats:
    """What the shadow checks saw of one config entry's approximate choice."""

    entry: str
    variant: str
    params: dict[str, Any]
    recorded_error: float | None  # the error the config recorded for the choice
    calls: int = 0  # calls that ran the choice while shadowing was on
    checked: int = 0  # of those, recomputed exactly
    worst_error: float = 0.0
    warned: bool = False

    def to_dict(self) -> dict[str, Any]:
        return dict(vars(self))


_stats: dict[tuple, EntryStats] = {}


def on_change(listener: Callable[[], None]) -> None:
    """Call `listener` when the rate changes (the dispatcher rebuilds its routes, wrapped or not)."""
    _listeners.append(listener)


def _set(value: float, factor: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise AttnTuneError(f"shadow rate must be a number from 0 to 1, got {value!r}")
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or factor < 1.0:
        raise AttnTuneError(f"shadow factor must be a number of at least 1, got {factor!r}")
    _apply(float(value), float(factor))


def _apply(value: float, factor: float) -> None:
    _state["rate"], _state["factor"] = value, factor
    for listener in _listeners:
        listener()


def rate() -> float:
    """The fraction of approximate calls recomputed exactly; the first call reads ATTN_TUNE_SHADOW (0 if unset)."""
    if _state["rate"] == _UNSET:
        text = os.environ.get(ENV_VAR, "").strip()
        try:
            value = float(text) if text else 0.0
        except ValueError:
            raise AttnTuneError(f"{ENV_VAR}={text!r}: not a number; give a rate from 0 to 1, e.g. 0.01") from None
        try:
            _set(value, _state["factor"])
        except AttnTuneError as exc:
            raise AttnTuneError(f"{ENV_VAR}: {exc}") from None
    return _state["rate"]


class shadow:  # noqa: N801 - used like a function, as use_config
    """Recompute a fraction `rate` of approximate calls exactly; warn once per entry whose live error exceeds the
    error its config recorded by more than `factor`. A function (from now on) or a `with` block (restored on exit);
    `shadow(0)` turns it off. Counts and worst errors accumulate until `stats(reset=True)`.

    Raises:
        AttnTuneError: a rate outside 0..1 or a factor below 1 (one line).
    """

    def __init__(self, rate: float, factor: float = DEFAULT_FACTOR) -> None:
        self._previous = (_state["rate"], _state["factor"])
        _set(rate, factor)

    def __enter__(self) -> shadow:
        return self

    def __exit__(self, *exc: object) -> None:
        _apply(*self._previous)


def stats(reset: bool = False) -> dict[str, Any]:
    """The shadow checks so far: the rate, the factor, and per entry the calls, the calls checked, the worst live
    error, the recorded error and whether it warned. `reset=True` clears the counts after reading them."""
    with _lock:
        entries = [s.to_dict() for s in _stats.values()]
        if reset:
            _stats.clear()
    return {"rate": rate(), "factor": _state["factor"], "entries": entries}


def wrap(fn: Callable[..., Tensor], variant: str, params: dict[str, Any], entry: Problem | None,
         recorded_error: float | None) -> Callable[..., Tensor]:
    """`fn` (an approximate variant's bound fn), counting its calls and recomputing a sampled fraction exactly."""
    key = (entry, variant, tuple(sorted(params.items())))
    with _lock:
        record = _stats.setdefault(key, EntryStats(entry.describe() if entry else "(no entry)", variant, dict(params),
                                                   recorded_error))

    def shadowed(q: Tensor, k: Tensor, v: Tensor, *, is_causal: bool, window: int | None, attn_mask: Tensor | None,
                 scale: float | None) -> Tensor:
        out = fn(q, k, v, is_causal=is_causal, window=window, attn_mask=attn_mask, scale=scale)
        record.calls += 1
        if _rng.random() < _state["rate"]:
            error = _live_error(out, q, k, v, is_causal, window, attn_mask, scale)
            record.checked += 1
            record.worst_error = max(record.worst_error, error)
            _maybe_warn(record, error)
        return out

    return shadowed


def _live_error(out: Tensor, q: Tensor, k: Tensor, v: Tensor, causal: bool, window: int | None,
                mask: Tensor | None, scale: float | None) -> float:
    """||out - exact|| / ||exact||, the exact attention computed by PyTorch's SDPA on the same inputs, in float32
    (float64 inputs: float64). float32's rounding (~1e-6) is far below any error worth a warning, and it keeps
    SDPA's fused kernels: a float64 reference cost 8 approximate calls per check here (docs/benchmarks.md), and
    on CUDA it would materialise every score."""
    precision = torch.float64 if q.dtype == torch.float64 else torch.float32
    with torch.no_grad():
        mask, causal = fold_for_sdpa(q.shape[-2], k.shape[-2], is_causal=causal, window=window, attn_mask=mask,
                                     device=q.device)
        if mask is not None and mask.is_floating_point():
            mask = mask.to(precision)
        exact = torch_sdpa(q.to(precision), k.to(precision), v.to(precision), attn_mask=mask, is_causal=causal,
                           scale=scale, enable_gqa=q.dim() == 4 and q.shape[1] != k.shape[1])
        norm = float(torch.linalg.vector_norm(exact, dtype=torch.float64))
        return float(torch.linalg.vector_norm(out.to(precision) - exact, dtype=torch.float64)) / norm if norm else 0.0


def _maybe_warn(record: EntryStats, error: float) -> None:
    limit = (record.recorded_error or 0.0) * _state["factor"]
    if record.warned or error <= limit:
        return
    record.warned = True
    recorded = f"{record.recorded_error:.2e}" if record.recorded_error is not None else "no error"
    warnings.warn(f"attn-tune shadow: {record.variant} {record.params} for {record.entry}: a live call's error "
                  f"{error:.2e} exceeds {_state['factor']:g}x the {recorded} the config recorded; the inputs differ "
                  "from those it was tuned on: re-tune on captured activations (docs/runtime.md, Shadow checks)",
                  RuntimeWarning, stacklevel=5)
