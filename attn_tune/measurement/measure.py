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

from attn_tune.errors import UnsupportedProblem, one_line
from attn_tune.measurement.inputs import (
    Gradients,
    captured_samples,
    grad_output,
    make_inputs,
    reference_gradients,
    reference_output,
    relative_error,
    sample_grad_out,
    sample_gradients,
    sample_reference,
)
from attn_tune.measurement.memory import peak_bytes
from attn_tune.problem import Inputs, Problem, check_device
from attn_tune.registry.catalog import availability
from attn_tune.registry.variant import Variant

__all__ = ["Measurement", "measure", "make_step", "synchronize"]


@dataclass(frozen=True)
class Measurement:
    """What one variant costs on one problem; `rel_error` is against the problem's float64 exact attention.

    `first_call_ms` is the first (cold) call alone: one-time set-up such as compiling a kernel or building a block
    mask shows there, kept apart from the per-call `latency_ms`. For a training problem `rel_error` is the worst of
    the output's, dq's, dk's and dv's, and `error_of` names which ("out", "dq", "dk", "dv"); None when forward only.
    """

    latency_ms: float
    latency_iqr_ms: float
    peak_bytes: int
    rel_error: float
    repeats: int
    first_call_ms: float = 0.0
    output_digest: str | None = None  # SHA-1 of the first call's output bytes: equal digests, one kernel
    error_of: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """Every field, JSON-serialisable; `error_of` only when set, so a forward-only problem's stored figures
        keep the keys they always had."""
        data = dataclasses.asdict(self)
        if data["error_of"] is None:
            del data["error_of"]
        return data


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
    grad_out = grad_output(problem, seed)

    def forward_backward() -> None:
        # autograd.grad, not .backward(): no .grad from an earlier call is freed inside this one, which the CPU
        # profiler would count (and complain about) as a block allocated before it started.
        torch.autograd.grad(variant.fn(q, k, v, **kwargs), (q, k, v), grad_out)

    return forward_backward


def _sample_errors(variant: Variant, problem: Problem, params: dict[str, Any], path: str | os.PathLike, index: int,
                   sample: Inputs) -> dict[str, float]:
    """The error of each part on captured sample `index`: the output's, and for training dq's, dk's and dv's for
    the gradient the model gave that call (`sample_grad_out`)."""
    leaves = [t.detach().requires_grad_(problem.training) for t in (sample.q, sample.k, sample.v)]
    with torch.set_grad_enabled(problem.training):
        out = variant.fn(*leaves, **sample.call_kwargs(problem), **params)
    errors = {"out": relative_error(out, sample_reference(path, problem, index))}
    if problem.training:
        errors.update(_gradient_errors(variant, out, leaves, sample_grad_out(sample, problem, index),
                                       sample_gradients(path, problem, index)))
    return errors


def _gradient_errors(variant: Variant, out: torch.Tensor, leaves: list[torch.Tensor], grad_out: torch.Tensor,
                     reference: Gradients) -> dict[str, float]:
    """dq's, dk's and dv's relative errors against float64's; a variant without a backward is UnsupportedProblem."""
    if not out.requires_grad:
        raise UnsupportedProblem(f"{variant.name}: its output does not require grad, so it has no backward for a "
                                 "training problem")
    try:
        grads = torch.autograd.grad(out, leaves, grad_out, allow_unused=True)
    except (UnsupportedProblem, torch.OutOfMemoryError):
        raise
    except Exception as exc:  # noqa: BLE001 - a variant whose backward fails cannot serve training
        raise UnsupportedProblem(f"{variant.name}: its backward raised {one_line(exc)}") from None
    return {f"d{name}": _part_error(got, want) for name, got, want in zip("qkv", grads, reference[1:])}


def _part_error(got: torch.Tensor | None, want: torch.Tensor) -> float:
    """`relative_error`, where a gradient autograd left out counts as zeros, and against a zero reference (a captured
    call whose output got a zero gradient) an exactly zero gradient is exact and any other one infinitely wrong."""
    got = torch.zeros_like(want) if got is None else got
    if not bool(want.any()):
        return 0.0 if bool(torch.isfinite(got).all()) and not bool(got.any()) else float("inf")
    return relative_error(got, want)


def _worst(errors: dict[str, float]) -> tuple[float, str]:
    """The largest error and its part (the first listed on a tie)."""
    part = max(errors, key=errors.__getitem__)
    return errors[part], part


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA), so that a timer around a call reads what the call ran."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _latencies_ms(
    step: Callable[[], None], device: torch.device, min_repeats: int, max_repeats: int, min_time_s: float
) -> list[float]:
    times: list[float] = []
    started = time.perf_counter()
    while len(times) < min_repeats or (len(times) < max_repeats and time.perf_counter() - started < min_time_s):
        synchronize(device)
        t0 = time.perf_counter()
        step()
        synchronize(device)
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
    A `training` problem's first call keeps its graph, and `rel_error` is the worst of the output's and the
    gradients' (dq, dk, dv for a seeded grad_out, or on captured calls the one each call got), `error_of` says which.

    Order: error (one call against the float64 reference, timed alone as `first_call_ms`), `warmup` untimed calls (so one-time set-up such as
    library handles is live before memory is read), peak memory of one call, then timed calls until both
    `min_repeats` and `min_time_s` are reached (at most `max_repeats`). CUDA work is synchronised around each call.
    A first call longer than `first_call_limit_s` ends the measurement there (TimeoutError): a time-limited tune
    reports such a problem instead of hanging on it.

    Raises:
        UnsupportedProblem: the variant is unavailable here or does not support the problem (for training: its
            output does not require grad, or its backward raises).
        UnavailableDevice: the problem's device is not on this machine.
    """
    reason = availability(variant) or variant.supports(problem)
    if reason is not None:
        raise UnsupportedProblem(f"{variant.name}: {reason}")
    check_device(problem.device)
    params = dict(params or {})
    device = torch.device(problem.device)

    inputs = make_inputs(problem, seed)
    synchronize(device)
    started = time.perf_counter()
    with torch.set_grad_enabled(problem.training):
        out = variant.fn(inputs.q, inputs.k, inputs.v, **inputs.call_kwargs(problem), **params)
    synchronize(device)
    first_call_ms = (time.perf_counter() - started) * 1e3
    if first_call_limit_s is not None and first_call_ms > first_call_limit_s * 1e3:
        raise TimeoutError(f"the first call alone took {first_call_ms / 1e3:.1f} s, past the "
                           f"{first_call_limit_s:.1f} s this problem had left")
    if out.shape != inputs.q.shape[:-1] + (inputs.v.shape[-1],) or out.dtype != inputs.q.dtype:
        raise UnsupportedProblem(f"{variant.name} returned {tuple(out.shape)} {out.dtype}, not q's shape and dtype")
    samples = captured_samples(activations, problem) if activations is not None else []
    if samples:  # the worst call's parts
        errors = max((_sample_errors(variant, problem, params, activations, i, s) for i, s in enumerate(samples)),
                     key=lambda each: _worst(each)[0])
    else:
        errors = {"out": relative_error(out, reference_output(problem, seed))}
        if problem.training:
            errors.update(_gradient_errors(variant, out, [inputs.q, inputs.k, inputs.v], grad_output(problem, seed),
                                           reference_gradients(problem, seed)))
    rel_error, error_of = _worst(errors)
    digest = hashlib.sha1(out.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()
    del out

    step = make_step(variant, problem, inputs, params, seed)
    for _ in range(warmup):
        step()
    synchronize(device)
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
        error_of=error_of if problem.training else None,
    )
