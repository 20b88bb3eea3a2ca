"""The approximate families and exact windows against what a user would do instead: latency, peak memory, error.

    python bench/approximate_families.py                      # CPU float32, q_len 1024..16384, writes the PNG
    python bench/approximate_families.py --lengths 1024,2048 --plot /tmp/families.png

Every variant runs at its default knobs, beside the plain-PyTorch way to compute the same function, measured in
the same run (`x instead`, `peak x instead`):
- `local` (window 256 standing in for full attention): `ref-local-mask`, SDPA with that window as a boolean mask;
- the block-sparse variants: `ref-pattern-mask`, SDPA with the default BigBird pattern as a dense boolean mask;
- `linformer`: `ref-linformer-head`, linformer-pytorch's own `LinearAttentionHead` over the same seeded projections
  (the reference implementation of the idea; `linformer` itself is those projections, then fused SDPA);
- the exact windows (`--window`, causal by default: the Mistral-style problem): `sdpa` on that problem, which
  passes the window to SDPA as a boolean mask, as Hugging Face's sdpa path does for sliding-window models.
Full-attention rows also give `x sdpa` against exact full attention, and their error against it. `first ms` is
the first call alone: compiling and building masks, paid once per shape. Ratios are taken inside one run, so
machine-wide noise mostly cancels.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

import attn_tune
from attn_tune import Problem, Variant
from attn_tune.families.blocksparse import DEFAULT_PATTERN
from attn_tune.families.linformer import linformer_projections
from attn_tune.measurement.bench import BenchResult, bench
from attn_tune.registry.variant import DEFAULT_VARIANT
from attn_tune.tuned_config import device_info, write_atomically

FULL = ["sdpa", "local", "blocksparse", "flex-blocksparse", "xformers-blocksparse", "linformer"]
WINDOWED = ["sdpa", "window-chunked", "window-flex"]
LOCAL_WINDOW = 256  # local's default
INSTEAD = {"local": "ref-local-mask", "blocksparse": "ref-pattern-mask", "flex-blocksparse": "ref-pattern-mask",
           "xformers-blocksparse": "ref-pattern-mask", "linformer": "ref-linformer-head"}


@functools.lru_cache(maxsize=2)
def _pattern_mask(q_len: int, kv_len: int, device: torch.device) -> torch.Tensor:
    return DEFAULT_PATTERN.mask(q_len, kv_len, causal=False).to(device)


def _ref_local_mask(q, k, v, *, is_causal=False, window=None, attn_mask=None, scale=None):
    return attn_tune.get_variant("sdpa").fn(q, k, v, is_causal=is_causal, window=LOCAL_WINDOW, scale=scale)


def _ref_pattern_mask(q, k, v, *, is_causal=False, window=None, attn_mask=None, scale=None):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=_pattern_mask(q.shape[-2], k.shape[-2], q.device),
                                          scale=scale)


def _ref_linformer_head(q, k, v, *, is_causal=False, window=None, attn_mask=None, scale=None, rank=128):
    from linformer_pytorch.linformer_pytorch import LinearAttentionHead

    e, f = linformer_projections(k.shape[-2], rank, q.dtype, q.device)
    head = LinearAttentionHead(1.0, 0.0, e, f, None)  # dim 1 and q pre-scaled: the default scale, unrounded
    out = head((q / q.shape[-1] ** 0.5).flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1))
    return out.unflatten(0, q.shape[:2])


REFERENCES = [
    Variant("ref-local-mask", "reference", _ref_local_mask, exact=False,
            description=f"SDPA with window {LOCAL_WINDOW} as a boolean mask"),
    Variant("ref-pattern-mask", "reference", _ref_pattern_mask, exact=False,
            description="SDPA with the default block pattern as a dense boolean mask"),
    Variant("ref-linformer-head", "reference", _ref_linformer_head, exact=False,
            description="linformer-pytorch's own LinearAttentionHead over the same seeded projections"),
]


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",")]


def _plot(results: list[BenchResult], out: Path) -> None:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (lat_ax, mem_ax) = plt.subplots(1, 2, figsize=(12, 4.8))
    lines = list(dict.fromkeys((r.variant.name, r.problem.window) for r in results))  # sdpa runs on both problems
    for name, window in lines:
        cells = sorted((r for r in results if r.variant.name == name and r.problem.window == window and r.measured),
                       key=lambda r: r.problem.q_len)
        if not cells:
            continue
        label = name if window is None else f"{name} (window {window})"
        if name == DEFAULT_VARIANT and window is not None:
            label = f"{DEFAULT_VARIANT}, window {window} as a mask"
        style = {"linewidth": 2.5, "color": "black"} if name == DEFAULT_VARIANT else {}
        if name.startswith("ref-") or (name == DEFAULT_VARIANT and window is not None):
            style = {"linestyle": "--", "color": "black" if name == DEFAULT_VARIANT else None, "alpha": 0.7}
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
    fig.suptitle(f"families vs what a user would do instead (dashed): b{problem.batch} h{problem.heads} "
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
    parser.add_argument("--window", type=int, default=512, help="the exact windowed variants' window")
    parser.add_argument("--no-causal-window", dest="causal_window", action="store_false",
                        help="measure the window problem without the causal cut")
    parser.add_argument("--min-time", type=float, default=0.3, help="seconds of timed calls per cell")
    parser.add_argument("--plot", type=Path, default=Path("docs/approximate_families.png"))
    args = parser.parse_args()

    full_variants = [attn_tune.get_variant(n) for n in FULL] + REFERENCES
    window_variants = [attn_tune.get_variant(n) for n in WINDOWED]
    total = len(args.lengths) * (len(full_variants) + len(window_variants))
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
        windowed = dataclasses.replace(full, window=args.window, causal=args.causal_window)
        row += bench([windowed], window_variants, on_result=progress, **kwargs)
        base = next(r.measured for r in row if r.variant.name == DEFAULT_VARIANT)
        for r in row:
            if r.measured is not None:
                r.vs_baseline = r.measured.latency_ms / base.latency_ms
        results += row
    print(file=sys.stderr)

    print(f"torch {torch.__version__}, attn-tune {attn_tune.__version__}, {device_info(args.device)['name']}, "
          f"{torch.get_num_threads()} CPU threads; batch {args.batch}, heads {args.heads}, head_dim {args.head_dim}, "
          f"{args.dtype}, non-causal\n")
    print(f"| q_len | variant | problem | latency ms | x {DEFAULT_VARIANT} | x instead | peak MiB | peak x {DEFAULT_VARIANT} | "
          f"peak x instead | rel error | first ms |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")

    def cell(problem: Problem, name: str):
        return next((c.measured for c in results if c.problem == problem and c.variant.name == name), None)

    for r in results:
        problem = "full" if r.problem.window is None else f"window {r.problem.window}" + (
            ", causal" if r.problem.causal else "")
        if r.measured is None:
            print(f"| {r.problem.q_len} | {r.variant.name} | {problem} | {r.status}: {r.reason} | | | | | | | |")
            continue
        m = r.measured
        base = next(b.measured for b in results if b.problem.q_len == r.problem.q_len and b.variant.name == DEFAULT_VARIANT
                    and b.problem.window is None)
        windowed = r.problem.window is not None
        instead = cell(r.problem, DEFAULT_VARIANT if windowed else INSTEAD.get(r.variant.name, ""))
        if windowed and r.variant.name == DEFAULT_VARIANT:
            instead = None  # it is the "instead"
        x_time = f"{m.latency_ms / instead.latency_ms:.2f}" if instead else ""
        x_peak = f"{m.peak_bytes / instead.peak_bytes:.2f}" if instead and instead.peak_bytes else ""
        print(f"| {r.problem.q_len} | {r.variant.name} | {problem} | {m.latency_ms:.1f} | "
              f"{m.latency_ms / base.latency_ms:.2f} | {x_time} | {m.peak_bytes / 2**20:.1f} | "
              f"{m.peak_bytes / base.peak_bytes:.2f} | {x_peak} | {m.rel_error:.1e} | {m.first_call_ms:.0f} |")
    _plot(results, args.plot)
    print(f"\nplot: {args.plot}", file=sys.stderr)


if __name__ == "__main__":
    main()
