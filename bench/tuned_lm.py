"""The issue-14 target: tune the reference LM at 2048 on its captured activations under a 1% loss budget, then
check end to end: which variant serves its calls, how much faster than sdpa per call and for the whole forward,
and the held-out loss change.

    python bench/tuned_lm.py                  # about 3 minutes on 2 CPU cores
    python bench/tuned_lm.py --max-loss-change 0.002 --max-error 0.35

Per call and per forward, sdpa and the tuned config are timed in the same run, interleaved (A B A B ...).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

import attn_tune
from attn_tune.activations import save_activations
from attn_tune.measurement.inputs import make_inputs
from attn_tune.registry import get_variant
from attn_tune.runtime.capture import capture_activations, load_factory
from attn_tune.tuner.tune import tune
from attn_tune.tuner.job import TuneJob
from attn_tune.tuner.validator import Validator

FACTORY = "attn_tune.models:pretrained_lm"
POOL = ("sdpa", "sdpa-math", "chunked", "local", "blocksparse")


def interleaved_ms(first, second, rounds: int = 15) -> tuple[float, float]:
    """Median ms of each callable, alternated so that drift hits both alike."""
    a, b = [], []
    first(), second()
    for _ in range(rounds):
        for fn, out in ((first, a), (second, b)):
            t0 = time.perf_counter()
            fn()
            out.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(a), statistics.median(b)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-loss-change", type=float, default=0.01)
    parser.add_argument("--max-error", type=float, default=0.35)
    parser.add_argument("--trials", type=int, default=30)
    args = parser.parse_args()
    torch.set_num_threads(min(torch.get_num_threads(), 2))
    factory = load_factory(FACTORY)
    with tempfile.TemporaryDirectory() as folder:
        acts = Path(folder) / "acts.safetensors"
        problems, kept = capture_activations(factory, 4)
        save_activations(acts, kept, source=FACTORY)
        validator = Validator(factory, FACTORY)
        job = TuneJob().updated(trials=args.trials, max_error=args.max_error, seed=0, activations=str(acts),
                                variants=[get_variant(n) for n in POOL], factory=FACTORY,
                                max_loss_change=args.max_loss_change,
                                trial_measure={"warmup": 1, "min_repeats": 3, "min_time_s": 0.05})
        config = tune(problems, job)
    validation = validator.validate(config)
    for d in config.validation["dropped"]:
        print(f"over budget with {d['variant']} {d['params']} for {d['problem']} (loss change "
              f"{d['loss_change_before']:+.2%}): now {d['now']}")
    for entry in config.entries:
        problem, choice = entry.problem, entry.choice
        variant = get_variant(choice["variant"])
        inputs = make_inputs(problem)
        kwargs = inputs.call_kwargs(problem)
        sdpa = get_variant("sdpa")
        with torch.no_grad():
            base, tuned = interleaved_ms(lambda: sdpa.fn(inputs.q, inputs.k, inputs.v, **kwargs),
                                         lambda: variant.fn(inputs.q, inputs.k, inputs.v, **kwargs, **choice["params"]))
        ratio = (entry.head_to_head or {}).get("ratios", [])
        h2h = next((f"{r['ratio']:.2f}x [{r['low']:.2f}-{r['high']:.2f}]" for r in ratio
                    if r["variant"] == choice["variant"] and r["params"] == choice["params"]), "kept")
        print(f"{problem.describe()}: {choice['variant']} {choice['params']}, error {entry.measured['rel_error']:.3f} "
              f"on {entry.error_inputs}; per call sdpa {base:.2f} ms, tuned {tuned:.2f} ms: {base / tuned:.2f}x faster "
              f"(tune's head-to-head: {h2h} of sdpa's time)")
    model, args_ = validator.built.model, validator.built.args

    def forward(config_or_none):
        def run() -> None:
            with attn_tune.use_config(config_or_none), torch.no_grad():
                model(*args_)
        return run

    exact_ms, tuned_ms = interleaved_ms(forward(None), forward(config), rounds=7)
    print(f"whole forward (batch 1 x 2048): exact {exact_ms:.1f} ms, tuned {tuned_ms:.1f} ms: "
          f"{exact_ms / tuned_ms:.2f}x")
    print(f"held-out loss: exact {validation.loss_exact:.4f}, tuned {validation.loss_tuned:.4f}, change "
          f"{validation.loss_change:+.2%} (budget {args.max_loss_change:+.2%}); output rel error "
          f"{validation.output_error:.3f}")
    served = sorted({(c.variant, tuple(c.params.items())) for c in validation.calls})
    print(f"calls served by: {served}")


if __name__ == "__main__":
    main()
