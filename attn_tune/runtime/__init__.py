"""The runtime: `attention` runs each call with the variant a tuned config chose for its problem."""

from attn_tune.runtime.active import use_config
from attn_tune.runtime.capture import record
from attn_tune.runtime.dispatch import Decision, attention, explain
from attn_tune.runtime.patch import patch_calls, patch_sdpa, unpatch_sdpa
from attn_tune.runtime.shadowing import shadow, stats

__all__ = ["Decision", "attention", "explain", "patch_calls", "patch_sdpa", "record", "shadow", "stats",
           "unpatch_sdpa", "use_config"]
