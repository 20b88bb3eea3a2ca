"""Latency and peak memory of each exact variant relative to `sdpa`, in one run, as a markdown table.

    python bench/exact_variants.py                                     # CPU float32, q_len 512..8192
    python bench/exact_variants.py --device cuda --dtype float16,bfloat16 --lengths 1024,4096,16384

Ratios are taken inside one run on the same problem, so machine-wide noise mostly cancels; the absolute
figures are the median of timed calls after warm-up (see attn_tune.measurement.measure).
"""

from __future__ import annotations

import argparse
import sys

import torch

import attn_tune
from attn_tune import Problem
from attn_tune.measurement.bench import bench
from attn_tune.registry.variant import DEFAULT_VARIANT
from attn_tune.tuned_config import device_info


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", help="comma-separated")
    parser.add_argument("--lengths", type=_ints, default=[512, 1024, 2048, 4096, 8192])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--min-time", type=float, default=0.5, help="seconds of timed calls per cell")
    args = parser.parse_args()

    exact = [v for v in attn_tune.variants() if v.exact]
    problems = [
        Problem(batch=args.batch, heads=args.heads, q_len=n, head_dim=args.head_dim, dtype=dtype,
                device=args.device, causal=causal)
        for dtype in args.dtype.split(",")
        for causal in (False, True)
        for n in args.lengths
    ]
    total = len(problems) * len(exact)
    done = 0

    def progress(result) -> None:
        nonlocal done
        done += 1
        print(f"\r[{done}/{total}] {result.problem.describe()} {result.variant.name:<16}", end="", file=sys.stderr)

    results = bench(problems, exact, on_result=progress, warmup=1, min_repeats=3, max_repeats=50,
                    min_time_s=args.min_time)
    print(file=sys.stderr)

    device_name = device_info(args.device)["name"]
    print(f"torch {torch.__version__}, attn-tune {attn_tune.__version__}, {device_name}, "
          f"{torch.get_num_threads()} CPU threads; batch {args.batch}, heads {args.heads}, head_dim {args.head_dim}\n")
    print(f"| dtype | causal | q_len | variant | latency ms | x {DEFAULT_VARIANT} | peak MiB | peak x {DEFAULT_VARIANT} | rel error |")
    print("|---|---|---|---|---|---|---|---|---|")
    by_problem: dict[Problem, list] = {}
    for r in results:
        by_problem.setdefault(r.problem, []).append(r)
    for problem, row in by_problem.items():
        base = next((r.measured for r in row if r.variant.name == DEFAULT_VARIANT and r.measured), None)
        for r in row:
            lead = f"| {problem.dtype} | {'yes' if problem.causal else 'no'} | {problem.q_len} | {r.variant.name} |"
            if r.measured is None:
                continue  # listed once per variant and reason, below
            m = r.measured
            peak_ratio = f"{m.peak_bytes / base.peak_bytes:.2f}" if base and base.peak_bytes else ""
            ratio = f"{r.vs_baseline:.2f}" if r.vs_baseline is not None else ""
            print(f"{lead} {m.latency_ms:.2f} | {ratio} | {m.peak_bytes / 2**20:.1f} | {peak_ratio} | {m.rel_error:.1e} |")
    not_run: dict[tuple[str, str, str], list[str]] = {}
    for r in results:
        if r.measured is None:
            not_run.setdefault((r.variant.name, r.status, r.reason or ""), []).append(r.problem.describe())
    if not_run:
        print()
    for (name, status, reason), where in not_run.items():
        print(f"- `{name}` {status} on {len(where)} of {len(by_problem)} problems: {reason}")


if __name__ == "__main__":
    main()
