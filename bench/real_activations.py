"""Approximate variants judged three ways on the reference models: error on random inputs, error on the model's
own captured q/k/v, and the model's held-out loss change when every attention call uses the variant.

    python bench/real_activations.py            # both models at 2048, about 10 minutes on 2 CPU cores
    python bench/real_activations.py --models lm --json out.json

Latency is beside each, against sdpa measured in the same run (before and after: the mean of the two).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from attn_tune.activations import save_activations
from attn_tune.measurement.inputs import make_inputs, reference_output, relative_error
from attn_tune.measurement.measure import measure
from attn_tune.registry import get_variant
from attn_tune.runtime.capture import capture_activations
from attn_tune.tuned_config import Entry, TunedConfig, device_info
from attn_tune.tuner.validator import Validator

FACTORIES = {"lm": "attn_tune.models:pretrained_lm", "encoder": "attn_tune.models:pretrained_encoder"}
POINTS = {
    "local": [{"local_window": w} for w in (32, 64, 128, 256, 512, 1024)],
    "blocksparse": [{"block": 64, "window_blocks": 1, "global_blocks": 1, "random_blocks": 1},
                    {"block": 64, "window_blocks": 3, "global_blocks": 1, "random_blocks": 0},
                    {"block": 128, "window_blocks": 1, "global_blocks": 1, "random_blocks": 0},
                    {"block": 128, "window_blocks": 3, "global_blocks": 2, "random_blocks": 3}],
    "flex-blocksparse": [{"block": 128, "window_blocks": 1, "global_blocks": 1, "random_blocks": 0}],
    "linformer": [{"rank": r} for r in (64, 256, 512)],
}
TIMING = {"warmup": 1, "min_repeats": 5, "min_time_s": 0.3}


def random_error(variant, problem, params) -> float:
    inputs = make_inputs(problem, 0)
    with torch.no_grad():
        out = variant.fn(inputs.q, inputs.k, inputs.v, **inputs.call_kwargs(problem), **params)
    return relative_error(out, reference_output(problem, 0))


def one_model(key: str, samples: int, folder: Path) -> list[dict]:
    from attn_tune.runtime.capture import load_factory

    factory = load_factory(FACTORIES[key])
    problems, kept = capture_activations(factory, samples)
    path = folder / f"{key}.safetensors"
    save_activations(path, kept, source=FACTORIES[key])
    validator = Validator(factory, FACTORIES[key])
    rows = []
    for problem in problems:
        sdpa = get_variant("sdpa")
        before = measure(sdpa, problem, **TIMING).latency_ms
        cells = []
        for name, points in POINTS.items():
            variant = get_variant(name)
            if variant.supports(problem):
                continue
            for params in points:
                m = measure(variant, problem, params, activations=str(path), **TIMING)
                entry = Entry(problem, {"variant": name, "params": params}, m.to_dict(), max_error=1e9)
                check = validator.validate(TunedConfig([entry], device_info(problem.device)))
                cells.append({"variant": name, "params": params, "random_error": random_error(variant, problem, params),
                              "captured_error": m.rel_error, "loss_change": check.loss_change,
                              "latency_ms": m.latency_ms})
                print(f"{key} {problem.describe()} {name} {params}: random {cells[-1]['random_error']:.3f} "
                      f"captured {m.rel_error:.3f} loss {check.loss_change:+.3%} {m.latency_ms:.2f} ms", flush=True)
        after = measure(sdpa, problem, **TIMING).latency_ms
        base = (before + after) / 2
        for cell in cells:
            cell["vs_sdpa"] = cell["latency_ms"] / base
        rows.append({"model": FACTORIES[key], "problem": problem.describe(), "samples": samples,
                     "loss_exact": validator.loss_exact, "sdpa_ms": [before, after], "cells": cells})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="lm,encoder")
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(min(torch.get_num_threads(), 2))
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for key in args.models.split(","):
            rows += one_model(key, args.samples, Path(folder))
    print()
    for row in rows:
        print(f"{row['model']}  {row['problem']}  loss {row['loss_exact']:.4f} nats/char, sdpa "
              f"{row['sdpa_ms'][0]:.2f}/{row['sdpa_ms'][1]:.2f} ms")
        print("| variant | knobs | error, random q/k/v | error, captured (worst of "
              f"{row['samples']}) | held-out loss change | latency vs sdpa |")
        print("|---|---|---|---|---|---|")
        for c in row["cells"]:
            knobs = ", ".join(f"{k}={v}" for k, v in c["params"].items())
            print(f"| {c['variant']} | {knobs} | {c['random_error']:.3f} | {c['captured_error']:.3f} | "
                  f"{c['loss_change']:+.2%} | {c['vs_sdpa']:.2f}x |")
        print()
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
