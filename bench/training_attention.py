"""Forward + backward (a `training` problem, as the tuner measures it) of each family against sdpa, CPU float32.

    .venv/bin/python bench/training_attention.py [--rounds 7] [--repeats 3] [--shapes lm,4096] [--json] [--settle 24]
    .venv/bin/python bench/training_attention.py --model      # the bundled LM's whole training step
    .venv/bin/python bench/training_attention.py --pieces     # the windowed backward's call size

Two shapes, causal: the bundled LM's attention call (`lm`: b1 h4 q2048 d32) and a long one (`4096`: b1 h8 q4096
d64). At each, what a user does today, `sdpa` with is_causal over the whole sequence, is the baseline of every
causal row: `sdpa-math`, `chunked` (chunk 256), `local` 256 (approximate: a 256-key window stands in for full
causal attention; default block 32, and block 64), `blocksparse` (approximate, default pattern), and on the window
problem (causal, window 256) `window-chunked` (exact; block 32 and 64), `window-flex`, and `sdpa` given the window
as a mask (what a user does with the window pattern itself). `linformer` is non-causal only: its row is against
`sdpa` on the same non-causal problem. Each step is `measure.make_step`: `torch.autograd.grad` of the output for a
seeded grad_out, for q, k and v. In each round every step (forward + backward, and forward alone under no_grad)
runs `--repeats` times back to back, its time the median of those (as `measure()` times a call), the steps in a
shuffled order; a row's ratio is its time over its baseline's in the same round: the median over rounds and the
95% interval of `headtohead.ratio_interval` (Student's t on the log ratios). `--repeats 1` (each call once, after
some other call) reads the windowed rows ~10% slower against sdpa at q2048. Peak memory (above what
was live before the step) and the error (the worst of out, dq, dk, dv against float64 autograd, `error of` says
which) come from one `measure()` call per row.

`--model`: the bundled LM's training step (forward at q2048, its loss, backward to every parameter) with no config
(sdpa) and with configs choosing `local` 256 at blocks 32 and 64 and `local` 128 at block 64 (what the one-command
training tune chose, docs/training.md), interleaved: the step's speed-up over sdpa's.
`--pieces`: `local` 256's forward + backward against sdpa with the windowed backward's SDPA calls cut to hold
1, 2, 4 or 8 MiB of key-slice gradient each, or uncut (`windowed._BACKWARD_CALL_BYTES`); and SDPA's CPU kernel
alone on the same blocks, ready-made and contiguous (its forward and backward ops, no autograd, no folding): the
floor of this way of computing the band.

Before timing, one `--settle` MiB buffer is freed (0: none): glibc's malloc then serves buffers up to that size
from its heap (its mmap threshold follows the largest block freed, up to 32 MiB), as in a training process that
has freed activations that large. Without it the windowed backward's per-call buffers of a few MiB can get fresh
pages on every call: `local` 256 at block 32 measured 0.45x to 0.7x sdpa's from one process to the next.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from dataclasses import dataclass, field, replace
from typing import Any, Callable

import torch

import attn_tune
from attn_tune import Problem
from attn_tune.measurement import make_inputs, make_step, measure
from attn_tune.tuned_config import Entry, TunedConfig, device_info
from attn_tune.tuner.headtohead import ratio_interval
from timing import interleaved

SHAPES = {"lm": dict(batch=1, heads=4, q_len=2048, head_dim=32), "4096": dict(batch=1, heads=8, q_len=4096,
                                                                           head_dim=64)}
WINDOW = 256
BASE = "sdpa (causal, whole sequence)"


@dataclass
class Row:
    name: str
    variant: str
    problem: Problem
    params: dict[str, Any]
    baseline: str  # the row this one's ratios are to
    fb_ms: list[float] = field(default_factory=list)
    fw_ms: list[float] = field(default_factory=list)
    peak_bytes: int | None = None
    error: float | None = None
    error_of: str | None = None
    unsupported: str | None = None


def rows_for(shape: str) -> list[Row]:
    causal = Problem(**SHAPES[shape], causal=True, training=True)
    window, full = replace(causal, window=WINDOW), replace(causal, causal=False)
    local = {"local_window": WINDOW}
    return [  # grouped by problem: measure()'s float64 references are kept for the last two problems
        Row("sdpa (causal, whole sequence)", "sdpa", causal, {}, BASE),
        Row("sdpa-math", "sdpa-math", causal, {}, BASE),
        Row("chunked (chunk 256)", "chunked", causal, {}, BASE),
        Row("local 256 (block 32, default)", "local", causal, local, BASE),
        Row("local 256, block 64", "local", causal, {**local, "block": 64}, BASE),
        Row("blocksparse (default pattern)", "blocksparse", causal, {}, BASE),
        Row("sdpa, window 256 as a mask", "sdpa", window, {}, BASE),
        Row("window-chunked w256 (block 32, default)", "window-chunked", window, {}, BASE),
        Row("window-chunked w256, block 64", "window-chunked", window, {"block": 64}, BASE),
        Row("window-flex w256", "window-flex", window, {}, BASE),
        Row("sdpa (not causal)", "sdpa", full, {}, "sdpa (not causal)"),
        Row("linformer (not causal)", "linformer", full, {}, "sdpa (not causal)"),
    ]


def _steps(row: Row) -> tuple[Callable[[], None], Callable[[], None]]:
    """(forward + backward, forward alone) of the row, each on its problem's seeded inputs."""
    variant = attn_tune.get_variant(row.variant)
    inference = replace(row.problem, training=False)
    return (make_step(variant, row.problem, make_inputs(row.problem), row.params),
            make_step(variant, inference, make_inputs(inference), row.params))


def run_shape(shape: str, rounds: int, repeats: int) -> list[Row]:
    rows = rows_for(shape)
    steps: dict[str, Callable[[], None]] = {}
    for row in rows:
        variant = attn_tune.get_variant(row.variant)
        reason = attn_tune.availability(variant) or variant.supports(row.problem)
        try:
            if reason:
                raise attn_tune.UnsupportedProblem(reason)
            m = measure(variant, row.problem, row.params, warmup=1, min_repeats=1, max_repeats=1, min_time_s=0)
        except attn_tune.UnsupportedProblem as exc:
            row.unsupported = str(exc).removeprefix(f"{row.variant}: ")
            continue
        row.peak_bytes, row.error, row.error_of = m.peak_bytes, m.rel_error, m.error_of
        steps[row.name + " fb"], steps[row.name + " fw"] = _steps(row)
    times = interleaved(steps, rounds, repeats)
    for row in rows:
        if row.unsupported is None:
            row.fb_ms, row.fw_ms = times[row.name + " fb"], times[row.name + " fw"]
    return rows


def _ratio(row: Row, base: Row, part: str) -> dict[str, float]:
    ratios = [a / b for a, b in zip(getattr(row, part), getattr(base, part))]
    interval = ratio_interval(ratios)
    return {"median": statistics.median(ratios), "low": interval.low, "high": interval.high}


def summary(rows: list[Row]) -> list[dict[str, Any]]:
    by_name = {row.name: row for row in rows}
    out = []
    for row in rows:
        entry: dict[str, Any] = {"row": row.name, "variant": row.variant, "params": row.params,
                                 "problem": row.problem.describe(), "baseline": row.baseline}
        if row.unsupported is not None:
            out.append({**entry, "unsupported": row.unsupported})
            continue
        base = by_name[row.baseline]
        out.append({**entry, "fb_ms": statistics.median(row.fb_ms), "fw_ms": statistics.median(row.fw_ms),
                    "fb_ratio": _ratio(row, base, "fb_ms"), "fw_ratio": _ratio(row, base, "fw_ms"),
                    "peak_mb": row.peak_bytes / 2**20, "peak_ratio": row.peak_bytes / max(base.peak_bytes, 1),
                    "error": row.error, "error_of": row.error_of, "rounds": len(row.fb_ms)})
    return out


def _fmt(r: dict[str, float]) -> str:
    return f"{r['median']:.2f}x [{r['low']:.2f}-{r['high']:.2f}]"


def print_table(shape: str, entries: list[dict[str, Any]]) -> None:
    dims = SHAPES[shape]
    print(f"\nb{dims['batch']} h{dims['heads']} q{dims['q_len']} d{dims['head_dim']}, causal unless said; "
          f"ratios to the baseline in the same rounds, median [95% interval]")
    print("| row | fwd+bwd ms | fwd+bwd over baseline | forward ms | forward over baseline | peak MB (fwd+bwd) | "
          "error (worst part) |\n|---|---|---|---|---|---|---|")
    for e in entries:
        if "unsupported" in e:
            print(f"| {e['row']} | - | unsupported: {e['unsupported']} | | | | |")
            continue
        base = "" if e["baseline"] == BASE else f" (over {e['baseline']})"
        print(f"| {e['row']} | {e['fb_ms']:.1f} | {_fmt(e['fb_ratio'])}{base} | {e['fw_ms']:.2f} | "
              f"{_fmt(e['fw_ratio'])} | {e['peak_mb']:.1f} ({e['peak_ratio']:.2f}x) | "
              f"{e['error']:.2g} ({e['error_of']}) |")


def pieces(shape: str, rounds: int) -> list[dict[str, Any]]:
    """local 256's forward + backward with the windowed backward's calls cut to several sizes, against sdpa."""
    from attn_tune.families import windowed

    problem = Problem(**SHAPES[shape], causal=True, training=True)
    sdpa, local = attn_tune.get_variant("sdpa"), attn_tune.get_variant("local")
    inputs = make_inputs(problem)
    steps = {"sdpa": make_step(sdpa, problem, inputs, {})}
    sizes = {"1 MiB": 2**20, "2 MiB": 2**21, "4 MiB": 2**22, "8 MiB": 2**23, "uncut": 2**62}
    kept = windowed._BACKWARD_CALL_BYTES
    for block in (32, 64):
        step = make_step(local, problem, inputs, {"local_window": WINDOW, "block": block})
        for label, size in sizes.items():
            def cut(step: Callable[[], None] = step, size: int = size) -> None:
                windowed._BACKWARD_CALL_BYTES = size
                try:
                    step()
                finally:
                    windowed._BACKWARD_CALL_BYTES = kept
            steps[f"block {block}, calls of {label}"] = cut
    steps.update(_kernel_alone(problem))
    times = interleaved(steps, rounds, 3)
    out = []
    for name, ts in times.items():
        ratios = [a / b for a, b in zip(ts, times["sdpa"])]
        interval = ratio_interval(ratios)
        out.append({"shape": shape, "row": name, "ms": statistics.median(ts), "median": statistics.median(ratios),
                    "low": interval.low, "high": interval.high})
    return out


def settle_malloc(mib: int) -> None:
    """Free one `mib` MiB buffer, as a training process frees its activations (see the module's docstring)."""
    if mib > 0:
        torch.empty(mib * 2**18).fill_(0)


def _config(params: dict[str, Any] | None) -> TunedConfig | None:
    if params is None:
        return None
    problem = Problem(**SHAPES["lm"], causal=True, training=True)
    entry = Entry(problem=problem, choice={"variant": "local", "params": params}, max_error=1.0,
                  measured={"latency_ms": 1.0, "peak_bytes": 0, "rel_error": 0.1})
    return TunedConfig(entries=[entry], device=device_info("cpu"))


def model_step(rounds: int) -> list[dict[str, Any]]:
    """The bundled LM's training step with sdpa (no config) and with `local` 256 configs, interleaved."""
    from attn_tune.models.pretrained import loss_of, pretrained_lm

    model, (ids,), targets, _ = pretrained_lm(split="train")
    model.train()
    weights = [w for w in model.parameters() if w.requires_grad]
    configs = {"sdpa (no config)": None, "local 256, block 32": {"local_window": WINDOW},
               "local 256, block 64": {"local_window": WINDOW, "block": 64},
               "local 128, block 64": {"local_window": WINDOW // 2, "block": 64}}

    def step(config: Any) -> Callable[[], None]:
        def run() -> None:
            with attn_tune.use_config(config):
                torch.autograd.grad(loss_of(model(ids), targets), weights)
        return run

    times = interleaved({name: step(_config(params)) for name, params in configs.items()}, rounds)
    out = []
    for name, ts in times.items():
        speedups = [b / a for a, b in zip(ts, times["sdpa (no config)"])]
        interval = ratio_interval(speedups)
        out.append({"row": name, "ms": statistics.median(ts), "median": statistics.median(speedups),
                    "low": interval.low, "high": interval.high})
    return out


def _kernel_alone(problem: Problem) -> dict[str, Callable[[], None]]:
    """SDPA's CPU flash kernel, forward and backward ops, on contiguous unfolded blocks of `problem` (causal,
    window 256) with their additive masks; none where torch has no such op."""
    from attn_tune.families import windowed

    ops = torch.ops.aten
    if not hasattr(ops, "_scaled_dot_product_flash_attention_for_cpu_backward"):
        return {}
    g, steps = torch.Generator().manual_seed(0), {}
    for block in (32, 64, 128):
        shape = windowed._Unfolded.of(problem.q_len, block, WINDOW, True)
        mask = windowed._build_unfolded_masks(shape, False, torch.float32, torch.device("cpu"))[0][2]
        q = torch.randn(shape.blocks, problem.heads, block, problem.head_dim, generator=g)
        k, v = (torch.randn(shape.blocks, problem.heads, shape.width, problem.head_dim, generator=g) for _ in "kv")

        def both(q: torch.Tensor = q, k: torch.Tensor = k, v: torch.Tensor = v, mask: torch.Tensor = mask) -> None:
            out, lse = ops._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, attn_mask=mask)[:2]
            ops._scaled_dot_product_flash_attention_for_cpu_backward(out, q, k, v, out, lse, 0.0, False, attn_mask=mask)
        steps[f"SDPA's kernel alone, block {block}"] = both
    return steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--repeats", type=int, default=3, help="calls per step per round (its median)")
    parser.add_argument("--shapes", default="lm,4096", help="comma-separated: lm, 4096")
    parser.add_argument("--pieces", action="store_true", help="the windowed backward's call size instead")
    parser.add_argument("--model", action="store_true", help="the bundled LM's training step instead")
    parser.add_argument("--settle", type=int, default=24, metavar="MIB", help="free one buffer this large first")
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
    args = parser.parse_args()
    shapes = args.shapes.split(",")
    header = {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpu": device_info("cpu")["name"],
              "load_before": os.getloadavg()}
    settle_malloc(args.settle)
    if args.pieces:
        results: Any = [entry for shape in shapes for entry in pieces(shape, args.rounds)]
    elif args.model:
        results = model_step(args.rounds)
    else:
        results = {shape: summary(run_shape(shape, args.rounds, args.repeats)) for shape in shapes}
    header["load_after"] = os.getloadavg()
    if args.json:
        print(json.dumps({**header, "results": results}, indent=1, default=str))
        return
    print(f"torch {header['torch']}, {header['threads']} threads, {header['cpu']}; settled malloc {args.settle} MiB; "
          f"load average before {header['load_before'][0]:.2f}, after {header['load_after'][0]:.2f}")
    if args.pieces:
        print("| shape | local 256 | fwd+bwd ms | over sdpa, median [95% interval] |\n|---|---|---|---|")
        for e in results:
            print(f"| {e['shape']} | {e['row']} | {e['ms']:.1f} | {_fmt(e)} |")
        return
    if args.model:
        print("| pretrained_lm training step, q2048 | ms | speed-up over sdpa, median [95% interval] |\n|---|---|---|")
        for e in results:
            print(f"| {e['row']} | {e['ms']:.1f} | {_fmt(e)} |")
        return
    for shape, entries in results.items():
        print_table(shape, entries)


if __name__ == "__main__":
    main()
