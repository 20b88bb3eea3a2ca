"""attn-tune: a registry of attention variants, an autotuner that measures them, and a runtime that applies the choice."""

from __future__ import annotations

__version__ = "0.1.0"

from attn_tune.errors import (
    AttnTuneError,
    InvalidProblem,
    UnavailableDevice,
    UnknownVariant,
    UnsupportedProblem,
)
from attn_tune.problem import Problem
from attn_tune.registry import availability, get_variant, hookimpl, hookspec, variants
from attn_tune.registry.variant import Variant

__all__ = [
    "AttnTuneError",
    "InvalidProblem",
    "Problem",
    "UnavailableDevice",
    "UnknownVariant",
    "UnsupportedProblem",
    "Variant",
    "__version__",
    "availability",
    "get_variant",
    "hookimpl",
    "hookspec",
    "variants",
    "tune",
    "TunedConfig",
    "load_config",
    "attention",
    "explain",
    "use_config",
    "patch_sdpa",
    "unpatch_sdpa",
    "patch_calls",
    "shadow",
    "stats",
    "AutoAttention",
]

_LAZY = {
    "tune": "attn_tune.tuner.tune",
    "TunedConfig": "attn_tune.tuned_config",
    "load_config": "attn_tune.tuned_config",
    "attention": "attn_tune.runtime",
    "explain": "attn_tune.runtime",
    "use_config": "attn_tune.runtime",
    "patch_sdpa": "attn_tune.runtime",
    "unpatch_sdpa": "attn_tune.runtime",
    "patch_calls": "attn_tune.runtime",
    "shadow": "attn_tune.runtime",
    "stats": "attn_tune.runtime",
    "AutoAttention": "attn_tune.modules",
}


def __getattr__(name: str):
    """Load the tuner (optuna) and the runtime (torch) only when asked for, so `import attn_tune` stays light.

    The attribute is then bound in this module, so `attn_tune.attention(...)` costs no lookup after the first.
    """
    if name in _LAZY:
        import importlib

        value = globals()[name] = getattr(importlib.import_module(_LAZY[name]), name)
        return value
    raise AttributeError(f"module 'attn_tune' has no attribute {name!r}")
