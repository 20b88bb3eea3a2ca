"""Configs built by hand for the runtime tests: entries that choose a given variant for given problems."""

from __future__ import annotations

import contextlib
from typing import Any, Iterable, Iterator

from attn_tune.problem import Problem
from attn_tune.registry import hookimpl, plugins
from attn_tune.registry.variant import Variant
from attn_tune.tuned_config import Entry, TunedConfig, device_info


def entry(problem: Problem, variant: str, params: dict[str, Any] | None = None, max_error: float = 0.0,
          device: dict[str, Any] | None = None) -> Entry:
    measured = {"latency_ms": 1.0, "latency_iqr_ms": 0.0, "peak_bytes": 0, "rel_error": 0.0}
    return Entry(problem=problem, choice={"variant": variant, "params": dict(params or {})}, measured=measured,
                 max_error=max_error, device=device)


def config(entries: Iterable[Entry], device: dict[str, Any] | None = None) -> TunedConfig:
    return TunedConfig(entries=list(entries), device=device or device_info("cpu"), attn_tune="0.1.0", torch="test")


@contextlib.contextmanager
def registered(*variants: Variant, name: str = "test-plugin") -> Iterator[None]:
    """`variants` registered as one plugin for the block (as a third-party package would add them), then removed."""

    class Plugin:
        @hookimpl
        def attn_tune_variants(self) -> list[Variant]:
            return list(variants)

    plugins.load_plugins()
    plugins.pm.register(Plugin(), name=name)
    try:
        yield
    finally:
        plugins.pm.unregister(name=name)
