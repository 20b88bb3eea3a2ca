"""Measurement, below the runtime, the tuner and the kit: seeded and captured inputs, the float64 reference, peak
memory, `measure` (latency, memory, error of one variant on one problem) and `bench` (many, with reasons)."""

from attn_tune.measurement.bench import BenchResult, bench
from attn_tune.measurement.inputs import exact_attention, make_inputs, reference_output, relative_error
from attn_tune.measurement.measure import Measurement, make_step, measure
from attn_tune.measurement.memory import peak_bytes
from attn_tune.problem import Inputs

__all__ = [
    "BenchResult",
    "Inputs",
    "Measurement",
    "bench",
    "exact_attention",
    "make_inputs",
    "make_step",
    "measure",
    "peak_bytes",
    "reference_output",
    "relative_error",
]
