"""The pluggy markers and the one hook every plugin, built-in or third-party, implements."""

from __future__ import annotations

import pluggy

__all__ = ["hookspec", "hookimpl", "attn_tune_variants"]

hookspec = pluggy.HookspecMarker("attn_tune")
hookimpl = pluggy.HookimplMarker("attn_tune")


@hookspec
def attn_tune_variants() -> list:  # list[attn_tune.Variant]
    """Return the attention variants this plugin contributes."""
