"""One tuning job, typed: what is searched, how hard, where it runs and what guards it; every default written here once.

`tune(problems, job)` runs it; the command line builds one from its options (its help shows these defaults), a
preset is one, and a re-tune reads one back from the config it brings up to date (each entry's `settings` is its
`Search`, the config's `validation` its `Guard`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Callable, Mapping

from attn_tune.errors import AttnTuneError
from attn_tune.registry.variant import Variant

__all__ = ["OBJECTIVES", "Search", "Effort", "Execution", "Guard", "TuneJob", "RETUNE_EFFORT", "CAPTURED_SAMPLES",
           "INTERVAL_BATCHES", "FINE_TUNE_STEPS", "default_text"]

OBJECTIVES = ("latency", "memory", "balanced")


@dataclass(frozen=True)
class Search:
    """What is searched: the objective, the limits a choice must keep, the variant pool and the error inputs."""

    objective: str = "latency"  # "latency", "memory", or "balanced" (the fastest point of the Pareto front)
    max_error: float | None = None  # approximate variants take part, chosen only within this measured error
    memory_budget: int | None = None  # bytes: a candidate whose measured peak exceeds it is never chosen
    variants: tuple[Variant | str, ...] | None = None  # the pool, variants or their names; None: every registered
    activations: str | None = None  # `capture --activations` file: errors are the worst over its real calls

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise AttnTuneError(f"unknown objective {self.objective!r}; choose one of {', '.join(OBJECTIVES)}")
        _positive("memory_budget", self.memory_budget)
        _positive("max_error", self.max_error, allow_zero=True)
        if self.variants is not None:
            if isinstance(self.variants, (str, Variant)) or not all(isinstance(v, (str, Variant)) for v in self.variants):
                raise AttnTuneError(f"variants is a list of variants or their names, got {self.variants!r}")
            object.__setattr__(self, "variants", tuple(self.variants))


@dataclass(frozen=True)
class Effort:
    """How hard to look: trials per problem, the head-to-head of the best few, time limits, measurement repeats."""

    trials: int = 20  # per problem; a space no larger than this is enumerated instead of sampled
    finalists: int = 3  # the best few re-measured against sdpa, interleaved
    rounds: int = 3  # head-to-head rounds at least ...
    max_rounds: int | None = None  # ... and at most (None: 3 x rounds), until each ratio's interval is decided
    timeout: float | None = None  # seconds for the whole run: no trial starts after it
    problem_timeout: float | None = None  # seconds for one problem, likewise
    trial_measure: Mapping[str, Any] = field(default_factory=dict)  # `measure` keywords in the trials
    final_measure: Mapping[str, Any] = field(default_factory=lambda: {"min_repeats": 10, "min_time_s": 0.3})

    def __post_init__(self) -> None:
        for name in ("trials", "finalists", "rounds", "max_rounds", "timeout", "problem_timeout"):
            _positive(name, getattr(self, name), allow_zero=name == "rounds")
        for name in ("trial_measure", "final_measure"):  # read-only, so a preset's job stays as written
            object.__setattr__(self, name, MappingProxyType(dict(getattr(self, name))))


@dataclass(frozen=True)
class Execution:
    """Where the trials run: the Optuna storage (an interrupted run resumes), worker processes, the sampler's seed."""

    storage: str | None = None  # an Optuna storage URL; None keeps the studies in memory
    workers: int = 1  # processes measuring trials at once, sharing each study through `storage`
    seed: int | None = None  # makes the sampler reproducible

    def __post_init__(self) -> None:
        _positive("workers", self.workers)
        if self.workers > 1 and self.storage is None:
            raise AttnTuneError("several workers share a study through a storage: give a server's URL (PostgreSQL)")
        if self.workers > 1 and self.storage.startswith("sqlite"):
            raise AttnTuneError("several workers need a server storage (--storage postgresql://...): SQLite has no "
                                "row locks, so one queued trial could go to two workers, and a killed worker stalls "
                                "the rest")


@dataclass(frozen=True)
class Guard:
    """The end-to-end guard: the model run with exact attention and with the config over held-out batches; within a
    budget, approximate choices are chosen again until the loss change (and the metric's drop) holds."""

    factory: str | Callable[..., Any] | None = None  # the model: MODULE:FACTORY or the factory itself (required)
    batches: int | None = None  # held-out batches; None: INTERVAL_BATCHES if the factory takes `batches`, else 1
    metric: str | Callable[[Any, Any], float] | None = None  # MODULE:FN or fn(outputs, targets); else the factory's
    max_loss_change: float | None = None  # relative: 0.01 is 1%; the loss change's interval must lie within it
    max_metric_drop: float | None = None  # the metric may drop by at most this (its interval's upper end)
    fine_tune_steps: int | None = None  # a training guard: a paired fine-tune of this many steps (exact vs config)
    learning_rate: float = 1e-4  # the fine-tune's AdamW learning rate, the same for both runs

    def __post_init__(self) -> None:
        if not (isinstance(self.factory, str) and self.factory) and not callable(self.factory):
            raise AttnTuneError("a guard runs a model, a loss or metric budget is checked on it: give its factory "
                                "(MODULE:FACTORY or the function)")
        _positive("batches", self.batches)
        _positive("fine_tune_steps", self.fine_tune_steps)
        _positive("learning_rate", self.learning_rate)
        for name in ("max_loss_change", "max_metric_drop"):
            _positive(name, getattr(self, name), allow_zero=True)

    @property
    def label(self) -> str:
        """How the model is named in messages and in the config's `validation.factory`."""
        return self.factory if isinstance(self.factory, str) else getattr(self.factory, "__name__", "factory")

    @property
    def budgeted(self) -> bool:
        return self.max_loss_change is not None or self.max_metric_drop is not None


_SECTIONS = {"search": Search, "effort": Effort, "execution": Execution, "guard": Guard}
_FIELD_SECTION = {f.name: section for section, cls in _SECTIONS.items() for f in dataclasses.fields(cls)}


@dataclass(frozen=True)
class TuneJob:
    """A whole tuning job: `tune(problems, job)`. Sections default to their own defaults; no guard: not validated."""

    search: Search = field(default_factory=Search)
    effort: Effort = field(default_factory=Effort)
    execution: Execution = field(default_factory=Execution)
    guard: Guard | None = None

    def __post_init__(self) -> None:
        for name, section in _SECTIONS.items():
            value = getattr(self, name)
            if not isinstance(value, section) and not (name == "guard" and value is None):
                raise AttnTuneError(f"a TuneJob's {name} is a {section.__name__}, got {type(value).__name__}")
        if self.execution.workers > 1 and (self.effort.timeout or self.effort.problem_timeout):
            raise AttnTuneError("time limits apply to one process; with --workers, bound the run by --trials")

    def updated(self, **changes: Any) -> TuneJob:
        """This job with some fields replaced, each named as in its section (`trials=5`, `max_error=0.3`,
        `factory="mymodels:factory"`); a guard field given to a job without a guard makes one."""
        unknown = sorted(set(changes) - set(_FIELD_SECTION))
        if unknown:
            raise AttnTuneError(f"a tuning job has no field {', '.join(map(repr, unknown))}; its fields: "
                                f"{', '.join(_FIELD_SECTION)}")
        sections: dict[str, Any] = {}
        for name, section in _SECTIONS.items():
            mine = {k: v for k, v in changes.items() if _FIELD_SECTION[k] == name}
            if mine:
                current = getattr(self, name)
                sections[name] = section(**mine) if current is None else dataclasses.replace(current, **mine)
        return dataclasses.replace(self, **sections)


def default_text(name: str, **others: Any) -> str:
    """A field's default for help texts, from the dataclass itself (so help and code cannot drift), with other
    defaults beside it: default_text("trials", quick=20) -> "[default: 20, quick: 20]"."""
    value = dataclasses.fields(_SECTIONS[_FIELD_SECTION[name]])
    default = next(f for f in value if f.name == name)
    shown = default.default_factory() if default.default is dataclasses.MISSING else default.default
    parts = [] if shown is None else [f"default: {shown}"]
    parts += [f"{key.replace('_', ' ')}: {val}" for key, val in others.items() if val is not None]
    return f"[{', '.join(parts)}]" if parts else ""


_WHOLE = {"trials", "finalists", "rounds", "max_rounds", "workers", "batches", "memory_budget", "fine_tune_steps"}


def _positive(name: str, value: float | None, allow_zero: bool = False) -> None:
    if value is None:
        return
    kinds = (int,) if name in _WHOLE else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds):
        kind = "a whole number" if name in _WHOLE else "a number"
        raise AttnTuneError(f"{name} must be {kind}{' of bytes' if name == 'memory_budget' else ''}, got {value!r}")
    if not (value >= 0 if allow_zero else value > 0):
        raise AttnTuneError(f"{name} must be {'0 or more' if allow_zero else 'positive'}, got {value}")


RETUNE_EFFORT = Effort(trials=5)  # a re-tune (`tune --stale-only`) measures the earlier choice first: fewer trials
# held-out batches a guard runs when none are asked and its factory takes `batches`: each figure then gets a 95%
# interval whose t factor (2.26 for 9 degrees of freedom) is within 16% of a large sample's (1.96), at 10 model runs
INTERVAL_BATCHES = 10
FINE_TUNE_STEPS = 20  # the training guard's fine-tune when a training tune names none: a step per training batch
CAPTURED_SAMPLES = 4  # real calls kept per problem when a job captures its model's activations (errors are the worst)
