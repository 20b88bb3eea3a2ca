"""Named tuning jobs with their problems: `attn-tune tune --preset quick`."""

from __future__ import annotations

from dataclasses import dataclass

from attn_tune.problem import Problem
from attn_tune.tuner.job import CAPTURED_SAMPLES, Effort, Guard, Search, TuneJob

__all__ = ["Preset", "PRESETS"]


@dataclass(frozen=True)
class Preset:
    """A tuning job and its problems; for a job guarded by a model, the real calls captured of each of its problems
    (`samples`)."""

    description: str
    job: TuneJob
    problems: tuple[Problem, ...] = ()
    samples: int = CAPTURED_SAMPLES


PRESETS: dict[str, Preset] = {
    "quick": Preset(
        description="the reference LM's own attention at 2048, errors on its captured activations, a 1% loss "
                    "budget and a 0.5-point next-character accuracy budget checked end to end on all 20 held-out "
                    "batches (each interval's upper end decides), and a sliding-window problem: about a minute "
                    "on 2 CPU cores",
        job=TuneJob(
            search=Search(max_error=0.35, variants=("sdpa", "sdpa-math", "chunked", "local", "window-chunked",
                                                   "window-flex")),
            effort=Effort(trials=20, rounds=3, trial_measure={"warmup": 1, "min_repeats": 3, "min_time_s": 0.05},
                          final_measure={"warmup": 1, "min_repeats": 5, "min_time_s": 0.1}),
            guard=Guard(factory="attn_tune.models:pretrained_lm", batches=20, max_loss_change=0.01,
                        max_metric_drop=0.005),
        ),
        problems=(Problem(batch=1, heads=4, q_len=2048, head_dim=32, causal=True, window=256),),
        samples=4,
    ),
}
