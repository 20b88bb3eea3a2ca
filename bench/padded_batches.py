"""Padded batches: a dense padding mask into SDPA (what a user runs today) against trimming each row to its real keys.

    .venv/bin/python bench/padded_batches.py [--rounds 7] [--lengths 1024,2048] [--window 256] [--threads N] [--quick]

Batch of 4 rows padded 0%, 25%, 50% and 10% (b4 h8 d64 float32 on this CPU, forward, no grad), three settings:
  causal, left-padded (a generation batch): SDPA with the (b, 1, L, L) bool mask causal & padding, against
      `sdpa-unpadded` (SDPA's is_causal on each row's real tokens);
  non-causal, right-padded (an encoder batch): SDPA with the (b, 1, 1, L) key mask, against `sdpa-unpadded`;
  causal, left-padded, sliding window: SDPA with the (b, 1, L, L) window & padding mask, against `sdpa-unpadded`
      (the window folded per row) and `window-chunked` (each row's real tokens through its unfolded path).
Each round runs every call once, in a shuffled order; the table gives medians over rounds, each call's ratio to the
dense-mask SDPA call (< 1 is faster), and its relative error against that call. `--quick`: L 512, 3 rounds.
On a CPU shared with other work, `--threads 1` keeps the ratios steadier: calls made of many small SDPA calls
(window-chunked) slow down far more than one big call when a thread of theirs waits for a busy core.
"""

from __future__ import annotations

import argparse
from typing import Callable

import torch
from torch import Tensor

import attn_tune
from timing import interleaved, median_ms
from attn_tune.families.masks import visible_keys
from attn_tune.families.torch_sdpa import sdpa

PADDED = (0.0, 0.25, 0.5, 0.1)  # share of each row's keys that are padding


def _padding(length: int, left: bool) -> Tensor:
    """(4, 1, 1, length) bool, True = a real key, rows padded as `PADDED` says, on the left or on the right."""
    pad = torch.ones(len(PADDED), 1, 1, length, dtype=torch.bool)
    for row, share in enumerate(PADDED):
        n = int(share * length)
        if n:
            pad[row, ..., :n] = False if left else True
            if not left:
                pad[row, ..., length - n:] = False
    return pad


def setting(length: int, causal: bool, window: int | None, rounds: int) -> list[tuple[str, float, float, float]]:
    """(call, ms, ratio to the dense-mask SDPA call, relative error against it) for one padded batch."""
    g = torch.Generator().manual_seed(length)
    q, k, v = (torch.randn(len(PADDED), 8, length, 64, generator=g) for _ in range(3))
    pad = _padding(length, left=causal)
    dense = pad
    if causal or window is not None:
        dense = pad & visible_keys(length, length, causal=causal, window=window, device="cpu")
    call = dict(is_causal=causal, window=window, attn_mask=pad, scale=None)
    fns: dict[str, Callable[[], Tensor]] = {"sdpa + dense mask": lambda: sdpa(q, k, v, attn_mask=dense)}
    fns["sdpa-unpadded"] = lambda: attn_tune.get_variant("sdpa-unpadded").fn(q, k, v, **call)
    if window is not None:
        fns["window-chunked"] = lambda: attn_tune.get_variant("window-chunked").fn(q, k, v, **call)
    with torch.no_grad():
        base = fns["sdpa + dense mask"]().double()
        errors = {name: ((fn().double() - base).norm() / base.norm()).item() for name, fn in fns.items()}
        ms = median_ms(interleaved(fns, rounds))
    first = ms["sdpa + dense mask"]
    return [(name, ms[name], ms[name] / first, errors[name]) for name in fns]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7, help="timed rounds (median over them)")
    parser.add_argument("--lengths", default="1024,2048", help="sequence lengths, comma-separated")
    parser.add_argument("--window", type=int, default=256, help="sliding window of the windowed setting")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    parser.add_argument("--quick", action="store_true", help="length 512, 3 rounds: a smoke run")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    lengths = [512] if args.quick else [int(x) for x in args.lengths.split(",")]
    rounds = 3 if args.quick else args.rounds
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; b4 h8 d64 float32, rows padded "
          f"{', '.join(f'{p:.0%}' for p in PADDED)}; median of {rounds} interleaved rounds")
    print("| setting | L | call | ms | vs dense mask | rel. error |\n|---|---|---|---|---|---|")
    settings = (("causal, left-padded", True, None), ("non-causal, right-padded", False, None),
                (f"causal, left-padded, window {args.window}", True, args.window))
    for length in lengths:
        for label, causal, window in settings:
            for name, ms, ratio, err in setting(length, causal, window, rounds):
                print(f"| {label} | {length} | {name} | {ms:.1f} | {ratio:.2f}x | {err:.1e} |", flush=True)


if __name__ == "__main__":
    main()
