"""The autotuner: the tuning job, one Optuna study per problem, the head-to-head, the guard, storage, workers,
export and plots. Measurement lives in `attn_tune.measurement`."""

from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:
    """`from attn_tune.tuner import measure`, as plugin authors have called it, still works (loaded when asked)."""
    if name == "measure":
        from attn_tune.measurement import measure

        return measure
    raise AttributeError(f"module 'attn_tune.tuner' has no attribute {name!r}")
