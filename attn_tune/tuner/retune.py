"""Re-tuning only what went stale (`attn-tune tune --config tuned.json --stale-only`), keeping the rest as it was."""

from __future__ import annotations

from typing import Any, Sequence

from attn_tune.problem import Problem
from attn_tune.staleness import changes, local_devices
from attn_tune.tuned_config import TunedConfig
from attn_tune.tuner.tune import tune

__all__ = ["stale_problems", "retune"]


def stale_problems(config: TunedConfig, wanted: Sequence[Problem] = ()) -> list[Problem]:
    """Problems of `config`'s entries measured under other versions or devices than here, then those of `wanted`
    that the config has no entry for."""
    here = local_devices()
    stale = [e.problem for e in config.entries if changes(e, config.device, here)]
    present = {e.problem for e in config.entries}
    return stale + [p for p in dict.fromkeys(wanted) if p not in present]


def retune(config: TunedConfig, problems: Sequence[Problem], **tune_kwargs: Any) -> TunedConfig:
    """Tune `problems` (each earlier choice measured first) and put their entries in `config`'s places; every
    other entry is kept as it was, byte for byte. A problem that finds no entry now keeps its old one."""
    earlier = {e.problem: e.choice for e in config.entries}
    fresh = tune(problems, queue_first=earlier, **tune_kwargs)
    new = {}
    for entry in fresh.entries:
        device = entry.device or fresh.device
        entry.device = None if device == config.device else device
        new[entry.problem] = entry
    entries = [new.pop(e.problem, e) for e in config.entries] + list(new.values())
    return TunedConfig(entries=entries, device=config.device, attn_tune=fresh.attn_tune, torch=fresh.torch)
