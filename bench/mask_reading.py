"""What reading an explicit attn_mask as a structure costs, next to the attention call it serves.

    .venv/bin/python bench/mask_reading.py            # N = 1024, 2048, 4096 (well under two minutes on 2 cores)
    .venv/bin/python bench/mask_reading.py --quick    # N = 1024, 2048, fewer repeats
    .venv/bin/python bench/mask_reading.py --device cuda

Cases: a boolean causal band (window 512) as a (1, 1, N, N) mask at each N; a left-padded causal batch as a
(2, 1, N, N) boolean mask (row 1's first N/4 keys padding); an additive float32 band (0 / -inf) at 2048.

Per case, in one process, alternating so that load from other processes lands on every column alike: `read_mask`
uncached (the cache cleared before each read), `read_mask` cached (a hit: the mean of 100 in a row), SDPA with the
mask itself (h8 d64 float32, random q/k/v, no_grad), and SDPA with `is_causal=True` and no mask (what a structured
call can cost; for the band also attn-tune's `window_chunked_attention` with the window read, when it runs).
Figures are medians; "read %" is the uncached read's share of one masked SDPA call. A model builds its mask once
per forward and every layer's call reuses the answer, so one read per call is the worst case.

On a machine shared with other processes, torch's intra-op threads wait for each other on every op, which costs a
read's many small ops far more than SDPA's few large ones: compare with --threads 1 there.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F

from attn_tune.families.masks import visible_keys
from attn_tune.mask_structure import clear_mask_cache, read_mask

HEADS, HEAD_DIM, WINDOW = 8, 64, 512
HITS = 100  # cached reads timed together


def band(n: int, device: str) -> torch.Tensor:
    """(1, 1, n, n) bool causal band of width WINDOW."""
    return visible_keys(n, n, causal=True, window=WINDOW, device=device)[None, None].clone()


def padded_causal(n: int, device: str) -> torch.Tensor:
    """(2, 1, n, n) bool causal mask of a batch whose row 1 is left-padded by n / 4."""
    pad = torch.ones(2, n, dtype=torch.bool, device=device)
    pad[1, : n // 4] = False
    return visible_keys(n, n, causal=True, window=None, device=device)[None, None] & pad[:, None, None, :]


def additive(mask: torch.Tensor) -> torch.Tensor:
    return torch.zeros(mask.shape, device=mask.device).masked_fill(~mask, float("-inf"))


def structured_window() -> Callable | None:
    """attn-tune's exact sliding-window kernel, if this tree's copy imports."""
    try:
        from attn_tune.families.windowed import window_chunked_attention
    except Exception:  # noqa: BLE001 - a reference column only
        return None
    return window_chunked_attention


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_case(name: str, mask: torch.Tensor, reps: int, reads_per_rep: int, device: str) -> dict:
    """Median seconds of each column, reads and calls interleaved."""
    batch, n = mask.shape[0], mask.shape[-1]
    gen = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(batch, HEADS, n, HEAD_DIM, generator=gen, device=device) for _ in range(3))
    answer = read_mask(mask, batch, HEADS, n, n)
    windowed = structured_window() if answer is not None and answer.window is not None else None
    calls: dict[str, Callable[[], object]] = {
        "sdpa_mask": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask),
        "sdpa_causal": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True),
    }
    if windowed is not None:
        calls["structured"] = lambda: windowed(q, k, v, is_causal=answer.causal, window=answer.window)
    times: dict[str, list[float]] = {key: [] for key in ("read", "hit", *calls)}

    def timed(key: str, fn: Callable[[], object]) -> None:
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times[key].append(time.perf_counter() - start)

    with torch.no_grad():
        for key, fn in list(calls.items()):  # warm-up; the reference kernel is another module's, which may change
            try:
                fn()
            except Exception:  # noqa: BLE001
                if key != "structured":
                    raise
                del calls[key], times[key]
        for _ in range(reps):
            for _ in range(reads_per_rep):
                clear_mask_cache()
                timed("read", lambda: read_mask(mask, batch, HEADS, n, n))
            timed("hit", lambda: [read_mask(mask, batch, HEADS, n, n) for _ in range(HITS)])
            for key, fn in calls.items():
                timed(key, fn)
    out = {key: statistics.median(values) for key, values in times.items()}
    out["hit"] /= HITS
    out.update(name=name, shape="x".join(map(str, mask.shape)), dtype=str(mask.dtype).replace("torch.", ""),
               answer="generic" if answer is None else answer.describe())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="N = 1024, 2048 and fewer repeats")
    parser.add_argument("--sizes", type=int, nargs="+", help="sequence lengths (default 1024 2048 4096)")
    parser.add_argument("--reps", type=int, help="SDPA calls per column (default 7, --quick 3)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = args.sizes or ([1024, 2048] if args.quick else [1024, 2048, 4096])
    reps = args.reps or (3 if args.quick else 7)
    reads = 3
    device = args.device

    cases: list[tuple[str, Callable[[], torch.Tensor]]] = []
    for n in sizes:
        cases.append((f"band w{WINDOW}", lambda n=n: band(n, device)))
        cases.append(("left-padded causal", lambda n=n: padded_causal(n, device)))
        if n == 2048:
            cases.append((f"additive band w{WINDOW}", lambda n=n: additive(band(n, device))))

    print(f"torch {torch.__version__}, {device}, {torch.get_num_threads()} threads; h{HEADS} d{HEAD_DIM} float32; "
          f"medians of {reps * reads} reads and {reps} calls")
    header = (f"{'case':<24}{'mask':<16}{'dtype':<9}{'read ms':>9}{'hit us':>8}{'sdpa+mask ms':>14}{'read %':>8}"
              f"{'is_causal ms':>14}{'structured ms':>15}  answer")
    print(header)
    print("-" * len(header))
    for name, make in cases:
        row = run_case(name, make(), reps, reads, device)
        structured = f"{row['structured'] * 1e3:>15.2f}" if "structured" in row else f"{'-':>15}"
        print(f"{row['name']:<24}{row['shape']:<16}{row['dtype']:<9}{row['read'] * 1e3:>9.3f}"
              f"{row['hit'] * 1e6:>8.1f}{row['sdpa_mask'] * 1e3:>14.2f}"
              f"{100 * row['read'] / row['sdpa_mask']:>7.2f}%{row['sdpa_causal'] * 1e3:>14.2f}{structured}"
              f"  {row['answer']}")


if __name__ == "__main__":
    main()
