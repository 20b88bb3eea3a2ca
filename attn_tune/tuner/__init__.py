"""The autotuner: one Optuna study per problem, the head-to-head, selection, storage, workers, export and plots.

Measurement lives in `attn_tune.measurement`; its names are re-exported here because `from attn_tune.tuner import
measure` is how the README and plugin authors have called it.
"""

from attn_tune.measurement import (
    Inputs,
    Measurement,
    make_inputs,
    make_step,
    measure,
    peak_bytes,
    reference_output,
    relative_error,
)

__all__ = [
    "Inputs",
    "Measurement",
    "make_inputs",
    "make_step",
    "measure",
    "peak_bytes",
    "reference_output",
    "relative_error",
]
