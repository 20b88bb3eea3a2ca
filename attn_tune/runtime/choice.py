"""The choice policy: the one place that turns (a problem, the entry the lookup found for it) into a `Route`.

The entry's variant runs when it serves the call here; else an exact variant that does (the default policy's,
SDPA, when it can): an approximate choice is kept only at the very problem it was measured at, and never once
its error is no longer known.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from attn_tune.errors import UnsupportedProblem
from attn_tune.families.sdpa import PYTORCH_DISPATCH_FN
from attn_tune.problem import Problem
from attn_tune.registry import availability, get_variant, variants
from attn_tune.registry.variant import DEFAULT_VARIANT, Variant
from attn_tune.runtime import active, shadowing
from attn_tune.runtime.lookup import Match
from attn_tune.runtime.route import Decision, Route, bound

__all__ = ["choose"]


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
        return Route(decision, bound(fallback.fn, {}, heads_axis), None, heads_axis, _as_sdpa(fallback, problem)), \
            _fields_read(watched)

    if index is None:
        return default("default", "no tuned config in use: the default policy")
    if index.device_types and problem.device_type not in index.device_types:
        return default("default", active.warn_other_device(index, label, problem.device_type))
    if match == "find":
        match = index.find(problem)
    if match is None:
        return default("default", _no_entry_why(index, problem))
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
    decision = Decision(problem, variant.name, params, match.rule, how, entry.problem, label,
                        0.0 if variant.exact else entry.max_error)
    route = Route(decision, bound(variant.fn, params, heads_axis), fallback, heads_axis,
                  not params and _as_sdpa(variant, problem))
    if not variant.exact and shadowing.rate() > 0:
        route.fn = shadowing.wrap(route.fn, variant.name, params, entry.problem, entry.measured.get("rel_error"))
    return route, _fields_read(watched)


def _no_entry_why(index: Any, problem: Problem) -> str:
    """Why no entry serves the call; where the config has entries for it in the other mode (training: forward +
    backward, or inference), that is the difference named, as it is the one a user misses."""
    if index.find(dataclasses.replace(problem, training=not problem.training)) is not None:
        have, runs = ("training", "inference") if not problem.training else ("inference", "training (with gradients)")
        return f"the config's entries for this call's shape were tuned for {have}; this call runs {runs}"
    return "no entry in the config has this call's heads, head_dim, dtype, device type and masking"


def _as_sdpa(variant: Variant, problem: Problem) -> bool:
    """Whether running `variant` on the problem's calls is calling PyTorch's SDPA with the call's own arguments:
    the built-in `sdpa` (PyTorch's dispatch) when no window needs folding into a mask. `attention` then skips the
    variant's wrapper, which a decode step would feel."""
    return variant.name == DEFAULT_VARIANT and variant.fn is PYTORCH_DISPATCH_FN and problem.window is None and \
        not (problem.mask and problem.causal)
