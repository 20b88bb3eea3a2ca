"""Peak memory of one call above what was live before it: CUDA allocator statistics, or the CPU profiler's events."""

from __future__ import annotations

import contextlib
import gc
import os
import sys
import warnings
from typing import Callable, Iterator

import torch

__all__ = ["peak_bytes"]


@contextlib.contextmanager
def _profiler_quiet() -> Iterator[None]:
    """Silence profiler start/stop: it prints 'USDT: ... profiler_start/stop' to fd 2 from C++, and some torch
    versions warn about event cycles from Python. Only start and stop are wrapped, never the measured call."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def _cuda_peak(run: Callable[[], None], device: torch.device) -> int:
    torch.cuda.synchronize(device)
    baseline = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    run()
    torch.cuda.synchronize(device)
    return max(0, torch.cuda.max_memory_allocated(device) - baseline)


def _cpu_peak(run: Callable[[], None]) -> int:
    """Largest running sum of the profiler's signed allocation sizes, in time order (torch has no CPU allocator stats)."""
    from torch.profiler import ProfilerActivity, profile

    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    with _profiler_quiet():
        prof.__enter__()
    try:
        run()
    finally:
        with _profiler_quiet():
            prof.__exit__(None, None, None)
    events = [
        e for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU
    ]
    events.sort(key=lambda e: e.start_ns())
    peak = live = 0
    for event in events:
        live += event.nbytes()
        peak = max(peak, live)
    return peak


def peak_bytes(run: Callable[[], None], device: torch.device | str) -> int:
    """Bytes allocated by `run()` at its peak, above what was allocated before it started."""
    device = torch.device(device)
    gc.collect()
    if device.type == "cuda":
        return _cuda_peak(run, device)
    return _cpu_peak(run)
