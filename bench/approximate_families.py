"""The approximate families against `sdpa` on full attention: latency, peak memory, error, and a plot.

    python bench/approximate_families.py                      # CPU float32, q_len 1024..16384, writes the PNG
    python bench/approximate_families.py --lengths 1024,2048 --plot /tmp/families.png

Every variant runs at its default knobs. `local`, the block-sparse variants and `linformer` stand in for full
(non-causal) attention, so their error is against it. The exact sliding-window variants compute the problem
with window `--window`; they are measured on that problem, and `local` at the same window (the same function)
gives that window's error against full attention. `first ms` is the first call alone: compiling and building
masks, paid once per shape. Ratios are taken inside one run, so machine-wide noise mostly cancels.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch

import attn_tune
from attn_tune import Problem
from attn_tune.tuner.bench import BASELINE, BenchResult, bench
from attn_tune.tuner.config import device_info, write_atomically

FULL = ["sdpa", "local", "blocksparse", "flex-blocksparse", "xformers-blocksparse", "linformer"]
WINDOWED = ["window-chunked", "window-flex"]


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",")]


def _plot(results: list[BenchResult], out: Path) -> None:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (lat_ax, mem_ax) = plt.subplots(1, 2, figsize=(12, 4.8))
    names = list(dict.fromkeys(r.variant.name for r in results))
    for name in names:
        cells = sorted((r for r in results if r.variant.name == name and r.measured), key=lambda r: r.problem.q_len)
        if not cells:
            continue
        label = name + (f" (window {cells[0].problem.window})" if cells[0].problem.window else "")
        style = {"linewidth": 2.5, "color": "black"} if name == BASELINE else {}
        lengths = [r.problem.q_len for r in cells]
        lat_ax.plot(lengths, [r.measured.latency_ms for r in cells], marker="o", label=label, **style)
        mem_ax.plot(lengths, [r.measured.peak_bytes / 2**20 for r in cells], marker="o", label=label, **style)
    for ax, ylabel in ((lat_ax, "latency per call (ms)"), (mem_ax, "peak memory above inputs (MiB)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("q_len = kv_len")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    mem_ax.legend(fontsize=8)
    problem = results[0].problem
    fig.suptitle(f"approximate families vs {BASELINE} on full attention: b{problem.batch} h{problem.heads} "
                 f"d{problem.head_dim} {problem.dtype} {problem.device}, torch {torch.__version__}")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    write_atomically(out, buffer.getvalue())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--lengths", type=_ints, default=[1024, 2048, 4096, 8192, 16384])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--window", type=int, default=256, help="the exact windowed variants' window (= local's default)")
    parser.add_argument("--min-time", type=float, default=0.3, help="seconds of timed calls per cell")
    parser.add_argument("--plot", type=Path, default=Path("docs/approximate_families.png"))
    args = parser.parse_args()

    full_variants = [attn_tune.get_variant(n) for n in FULL]
    window_variants = [attn_tune.get_variant(n) for n in WINDOWED]
    total = len(args.lengths) * (len(FULL) + len(WINDOWED))
    done = 0

    def progress(result: BenchResult) -> None:
        nonlocal done
        done += 1
        print(f"\r[{done}/{total}] q_len {result.problem.q_len} {result.variant.name:<22}", end="", file=sys.stderr)

    results: list[BenchResult] = []
    kwargs = dict(warmup=1, min_repeats=3, max_repeats=30, min_time_s=args.min_time)
    for n in args.lengths:
        full = Problem(batch=args.batch, heads=args.heads, q_len=n, head_dim=args.head_dim, dtype=args.dtype,
                       device=args.device)
        row = bench([full], full_variants, on_result=progress, **kwargs)
        row += bench([dataclasses.replace(full, window=args.window)], window_variants, on_result=progress, **kwargs)
        base = next(r.measured for r in row if r.variant.name == BASELINE)
        for r in row:
            if r.measured is not None:
                r.vs_baseline = r.measured.latency_ms / base.latency_ms
        results += row
    print(file=sys.stderr)

    print(f"torch {torch.__version__}, attn-tune {attn_tune.__version__}, {device_info(args.device)['name']}, "
          f"{torch.get_num_threads()} CPU threads; batch {args.batch}, heads {args.heads}, head_dim {args.head_dim}, "
          f"{args.dtype}, non-causal\n")
    print(f"| q_len | variant | problem | latency ms | x {BASELINE} | peak MiB | peak x {BASELINE} | rel error | first ms |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        problem = "full" if r.problem.window is None else f"window {r.problem.window}"
        if r.measured is None:
            print(f"| {r.problem.q_len} | {r.variant.name} | {problem} | {r.status}: {r.reason} | | | | | |")
            continue
        m = r.measured
        base = next(b.measured for b in results if b.problem.q_len == r.problem.q_len and b.variant.name == BASELINE)
        print(f"| {r.problem.q_len} | {r.variant.name} | {problem} | {m.latency_ms:.1f} | {r.vs_baseline:.2f} | "
              f"{m.peak_bytes / 2**20:.1f} | {m.peak_bytes / base.peak_bytes:.2f} | {m.rel_error:.1e} | "
              f"{m.first_call_ms:.0f} |")
    _plot(results, args.plot)
    print(f"\nplot: {args.plot}", file=sys.stderr)


if __name__ == "__main__":
    main()
