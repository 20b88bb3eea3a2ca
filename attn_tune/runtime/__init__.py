"""The runtime: `attention` runs each call with the variant a tuned config chose for its problem."""

from attn_tune.runtime.active import use_config
from attn_tune.runtime.capture import record
from attn_tune.runtime.dispatch import Decision, attention, explain

__all__ = ["Decision", "attention", "explain", "record", "use_config"]
