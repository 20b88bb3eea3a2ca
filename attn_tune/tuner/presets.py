"""Named problem sets with measurement settings: `attn-tune tune --preset quick`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from attn_tune.problem import Problem

__all__ = ["Preset", "PRESETS"]


@dataclass(frozen=True)
class Preset:
    """Problems plus how hard to measure them."""

    description: str
    problems: tuple[Problem, ...]
    trials: int
    measure_kwargs: dict[str, Any] = field(default_factory=dict)
    final_kwargs: dict[str, Any] = field(default_factory=dict)
    rounds: int = 3
    factory: str | None = None  # a model whose problems are captured (with `samples` real calls each) and tuned
    samples: int = 4
    max_error: float | None = None  # the per-call search filter for approximate variants
    max_loss_change: float | None = None  # the end-to-end guard: the factory's model validated against it
    max_metric_drop: float | None = None  # and the factory's task metric may drop by at most this
    batches: int = 1  # held-out batches the guard validates on (the loss change's interval needs 2 or more)
    variants: tuple[str, ...] | None = None  # the pool (default: every registered variant)


PRESETS: dict[str, Preset] = {
    "quick": Preset(
        description="the reference LM's own attention at 2048, errors on its captured activations, a 1% loss "
                    "budget and a 0.5-point next-character accuracy budget checked end to end on all 20 held-out "
                    "batches (each interval's upper end decides), and a sliding-window problem: about a minute "
                    "on 2 CPU cores",
        factory="attn_tune.models:pretrained_lm",
        samples=4,
        max_error=0.35,
        max_loss_change=0.01,
        max_metric_drop=0.005,
        batches=20,
        problems=(Problem(batch=1, heads=4, q_len=2048, head_dim=32, causal=True, window=256),),
        variants=("sdpa", "sdpa-math", "chunked", "local", "window-chunked", "window-flex"),
        trials=20,
        measure_kwargs={"warmup": 1, "min_repeats": 3, "min_time_s": 0.05},
        final_kwargs={"warmup": 1, "min_repeats": 5, "min_time_s": 0.1},
        rounds=3,
    ),
}
