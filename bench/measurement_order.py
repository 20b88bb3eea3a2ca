"""Does a measurement depend on what ran before it? Latency, peak and error of two variants, measured A-then-B and
B-then-A over several rounds, in one run.

    python bench/measurement_order.py                    # dense vs chunked(chunk=64), b1 h4 q256 d32 causal, CPU

DESIGN asks that the same candidates measured in another order give the same figures within noise. Peak memory and
error must be identical (tests/test_measure.py asserts that); latency is reported here, as the median over rounds
of (time when measured first) / (time when measured second), with the spread across rounds.
"""

from __future__ import annotations

import argparse
import statistics

import attn_tune
from attn_tune import Problem
from attn_tune.measurement import measure


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--q-len", type=int, default=256)
    args = parser.parse_args()
    problem = Problem(batch=1, heads=4, q_len=args.q_len, head_dim=32, causal=True)
    cells = [(attn_tune.get_variant("dense"), {}), (attn_tune.get_variant("chunked"), {"chunk": 64})]
    kwargs = dict(warmup=2, min_repeats=7, max_repeats=15, min_time_s=0.05)
    ratios: dict[str, list[float]] = {v.name: [] for v, _ in cells}
    peaks: dict[str, set[int]] = {v.name: set() for v, _ in cells}
    for _ in range(args.rounds):
        first = {v.name: measure(v, problem, p, **kwargs) for v, p in cells}
        second = {v.name: measure(v, problem, p, **kwargs) for v, p in reversed(cells)}
        for name in ratios:
            ratios[name].append(first[name].latency_ms / second[name].latency_ms)
            peaks[name] |= {first[name].peak_bytes, second[name].peak_bytes}
    print(f"{problem.describe()}, {args.rounds} rounds, A-then-B vs B-then-A\n")
    print("| variant | median latency ratio | min | max | distinct peaks (bytes) |")
    print("|---|---|---|---|---|")
    for name, values in ratios.items():
        print(f"| {name} | {statistics.median(values):.3f} | {min(values):.3f} | {max(values):.3f} | "
              f"{sorted(peaks[name])} |")


if __name__ == "__main__":
    main()
