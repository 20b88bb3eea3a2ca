"""The autotuner's foundation: seeded inputs, the float64 reference, and honest measurement."""

from attn_tune.tuner.inputs import Inputs, make_inputs, reference_output, relative_error
from attn_tune.tuner.measure import Measurement, make_step, measure
from attn_tune.tuner.memory import peak_bytes

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
