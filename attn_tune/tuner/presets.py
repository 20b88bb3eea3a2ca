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


PRESETS: dict[str, Preset] = {
    "quick": Preset(
        description="8 CPU float32 problems (q_len 256 to 2048, causal and not), light measurement: about a minute",
        problems=tuple(
            Problem(batch=1, heads=8, q_len=n, head_dim=64, causal=causal)
            for causal in (False, True)
            for n in (256, 512, 1024, 2048)
        ),
        trials=12,
        measure_kwargs={"warmup": 1, "min_repeats": 3, "min_time_s": 0.05},
        final_kwargs={"warmup": 1, "min_repeats": 5, "min_time_s": 0.1},
        rounds=2,
    ),
}
