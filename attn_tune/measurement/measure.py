"""`measure(variant, problem, params)`: latency (median, IQR), peak memory and error of one variant on one problem."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

from attn_tune.errors import UnsupportedProblem
from attn_tune.measurement.inputs import (
    captured_samples,
    make_inputs,
    reference_output,
    relative_error,
    sample_reference,
)
from attn_tune.measurement.memory import peak_bytes
from attn_tune.problem import Inputs, Problem, check_device
from attn_tune.registry.catalog import availability
from attn_tune.registry.variant import Variant

__all__ = ["Measurement", "measure", "make_step"]


@dataclass(frozen=True)
class Measurement:
    """What one variant costs on one problem; `rel_error` is against the problem's float64 exact attention.

    `first_call_ms` is the first (cold) call alone: one-time set-up such as compiling a kernel or building a block
    mask shows there, kept apart from the per-call `latency_ms`.
    """

    latency_ms: float
    latency_iqr_ms: float
    peak_bytes: int
    rel_error: float
    repeats: int
    first_call_ms: float = 0.0
    output_digest: str | None = None  # SHA-1 of the first call's output bytes: equal digests, one kernel


    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def make_step(
    variant: Variant, problem: Problem, inputs: Inputs, params: dict[str, Any], seed: int = 0
) -> Callable[[], None]:
    """A no-argument callable running the variant once: forward only, or forward + backward when `training`."""
    kwargs = {**inputs.call_kwargs(problem), **params}
    q, k, v = inputs.q, inputs.k, inputs.v
    if not problem.training:

        def forward() -> None:
            with torch.no_grad():
                variant.fn(q, k, v, **kwargs)

        return forward
    grad_out = torch.randn(q.shape[:-1] + (v.shape[-1],), generator=torch.Generator().manual_seed(seed + 1))
    grad_out = grad_out.to(device=q.device, dtype=q.dtype)

    def forward_backward() -> None:
        # autograd.grad, not .backward(): no .grad from an earlier call is freed inside this one, which the CPU
        # profiler would count (and complain about) as a block allocated before it started.
        torch.autograd.grad(variant.fn(q, k, v, **kwargs), (q, k, v), grad_out)

    return forward_backward


def _sample_error(variant: Variant, problem: Problem, params: dict[str, Any], path: str | os.PathLike, index: int,
                  sample: Inputs) -> float:
    with torch.no_grad():
        out = variant.fn(sample.q, sample.k, sample.v, **sample.call_kwargs(problem), **params)
    return relative_error(out, sample_reference(path, problem, index))


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _latencies_ms(
    step: Callable[[], None], device: torch.device, min_repeats: int, max_repeats: int, min_time_s: float
) -> list[float]:
    times: list[float] = []
    started = time.perf_counter()
    while len(times) < min_repeats or (len(times) < max_repeats and time.perf_counter() - started < min_time_s):
        _synchronize(device)
        t0 = time.perf_counter()
        step()
        _synchronize(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def measure(
    variant: Variant,
    problem: Problem,
    params: dict[str, Any] | None = None,
    *,
    seed: int = 0,
    warmup: int = 2,
    min_repeats: int = 5,
    max_repeats: int = 100,
    min_time_s: float = 0.2,
    first_call_limit_s: float | None = None,
    activations: str | os.PathLike | None = None,
) -> Measurement:
    """Measure `variant` with `params` on seeded random inputs for `problem`.

    With `activations` (a file from `attn-tune capture --activations`) holding calls of this problem, `rel_error`
    is the worst over those real calls instead (latency, memory and the digest stay on the random inputs).

    Order: error (one call against the float64 reference, timed alone as `first_call_ms`), `warmup` untimed calls (so one-time set-up such as
    library handles is live before memory is read), peak memory of one call, then timed calls until both
    `min_repeats` and `min_time_s` are reached (at most `max_repeats`). CUDA work is synchronised around each call.
    A first call longer than `first_call_limit_s` ends the measurement there (TimeoutError): a time-limited tune
    reports such a problem instead of hanging on it.

    Raises:
        UnsupportedProblem: the variant is unavailable here or does not support the problem.
        UnavailableDevice: the problem's device is not on this machine.
    """
    reason = availability(variant) or variant.supports(problem)
    if reason is not None:
        raise UnsupportedProblem(f"{variant.name}: {reason}")
    check_device(problem.device)
    params = dict(params or {})
    device = torch.device(problem.device)

    inputs = make_inputs(problem, seed)
    _synchronize(device)
    started = time.perf_counter()
    with torch.no_grad():
        out = variant.fn(inputs.q, inputs.k, inputs.v, **inputs.call_kwargs(problem), **params)
    _synchronize(device)
    first_call_ms = (time.perf_counter() - started) * 1e3
    if first_call_limit_s is not None and first_call_ms > first_call_limit_s * 1e3:
        raise TimeoutError(f"the first call alone took {first_call_ms / 1e3:.1f} s, past the "
                           f"{first_call_limit_s:.1f} s this problem had left")
    if out.shape != inputs.q.shape[:-1] + (inputs.v.shape[-1],) or out.dtype != inputs.q.dtype:
        raise UnsupportedProblem(f"{variant.name} returned {tuple(out.shape)} {out.dtype}, not q's shape and dtype")
    rel_error = relative_error(out, reference_output(problem, seed))
    samples = captured_samples(activations, problem) if activations is not None else []
    if samples:
        rel_error = max(_sample_error(variant, problem, params, activations, i, s) for i, s in enumerate(samples))
    digest = hashlib.sha1(out.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()
    del out

    step = make_step(variant, problem, inputs, params, seed)
    for _ in range(warmup):
        step()
    _synchronize(device)
    peak = peak_bytes(step, device)
    times = _latencies_ms(step, device, min_repeats, max_repeats, min_time_s)
    quartiles = statistics.quantiles(times, n=4) if len(times) > 1 else [times[0]] * 3
    return Measurement(
        latency_ms=statistics.median(times),
        latency_iqr_ms=quartiles[2] - quartiles[0],
        peak_bytes=peak,
        rel_error=rel_error,
        repeats=len(times),
        first_call_ms=first_call_ms,
        output_digest=digest,
    )
