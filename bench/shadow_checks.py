"""What shadow checks cost: an approximate call with shadowing off, at rate 0.01 and at rate 1, and an exact call.

    .venv/bin/python bench/shadow_checks.py [--rounds 15]

A config chooses `local` (local_window 256) for a causal b1 h8 q2048 d64 float32 CPU problem, as the bundled LM's
tune does, and keeps `sdpa` for a q1024 one. Each case runs `attn_tune.attention` 50 times per round; cases
alternate within each round (A B C ...). The figure is the mean time per call over all rounds (a sampled call is
rare, so a median would hide it), beside the median. What a user would run instead, without attn-tune watching, is
the same call with shadowing off: the first row. (The config records an error of 0.05 for `local`; on these random
inputs its error is far larger, so the shadow check warns once: that warning is silenced here.)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings

import torch

import attn_tune
from attn_tune import Problem
from attn_tune.tuned_config import Entry, TunedConfig, device_info

CALLS = 50


def _entry(problem: Problem, variant: str, params: dict, max_error: float = 0.0) -> Entry:
    return Entry(problem=problem, choice={"variant": variant, "params": params}, max_error=max_error,
                 measured={"latency_ms": 1.0, "peak_bytes": 0, "rel_error": 0.05})


def _per_call_ms(q: torch.Tensor) -> float:
    t0 = time.perf_counter()
    for _ in range(CALLS):
        attn_tune.attention(q, q, q, is_causal=True)
    return (time.perf_counter() - t0) / CALLS * 1e3


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    long, short = Problem(batch=1, heads=8, q_len=2048, head_dim=64, causal=True), \
        Problem(batch=1, heads=8, q_len=1024, head_dim=64, causal=True)
    config = TunedConfig(entries=[_entry(long, "local", {"local_window": 256}, max_error=1.0),
                                  _entry(short, "sdpa", {})], device=device_info("cpu"))
    q_long, q_short = torch.randn(1, 8, 2048, 64), torch.randn(1, 8, 1024, 64)
    cases = [("local, shadow off", q_long, 0.0), ("local, shadow 0.01", q_long, 0.01), ("local, shadow 1", q_long, 1.0),
             ("sdpa (exact), shadow off", q_short, 0.0), ("sdpa (exact), shadow 0.01", q_short, 0.01)]
    times: dict[str, list[float]] = {name: [] for name, _, _ in cases}
    warnings.filterwarnings("ignore", message="attn-tune shadow")
    with attn_tune.use_config(config), torch.no_grad():
        for _, q, rate in cases:  # warm-up
            with attn_tune.shadow(rate):
                _per_call_ms(q)
        for _ in range(args.rounds):
            for name, q, rate in cases:
                with attn_tune.shadow(rate):
                    times[name].append(_per_call_ms(q))
    print(f"torch {torch.__version__}, {device_info('cpu')['name']}, {torch.get_num_threads()} threads; "
          f"{args.rounds} rounds x {CALLS} calls\n")
    print("| case | ms per call, mean | over shadow off | median |")
    print("|---|---|---|---|")
    base = {"local": statistics.mean(times[cases[0][0]]), "sdpa": statistics.mean(times[cases[3][0]])}
    for name, _, _ in cases:
        ms = statistics.mean(times[name])
        print(f"| {name} | {ms:.3f} | {ms / base[name.split(' ')[0].split(',')[0]]:.3f}x | "
              f"{statistics.median(times[name]):.3f} |")
    checked = attn_tune.stats()["entries"]
    print(f"\nstats: {[(e['variant'], e['calls'], e['checked']) for e in checked]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
