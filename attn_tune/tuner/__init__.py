"""The autotuner: one Optuna study per problem, the head-to-head, selection, storage, workers, export and plots.

Measurement lives in `attn_tune.measurement`; its names are re-exported here because `from attn_tune.tuner import
measure` is how the README and plugin authors have called it.
"""

from attn_tune import measurement
from attn_tune.measurement import *  # noqa: F403 - the re-export this module promises

__all__ = list(measurement.__all__)
