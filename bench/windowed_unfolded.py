"""Sliding windows as batched SDPA calls (unfolded) against the loop of block calls, and what it does to the bundled LM.

    .venv/bin/python bench/windowed_unfolded.py [--rounds 15] [--grid]

Per call: the bundled character LM's attention problem (b1 h4 q2048 d32 float32 CPU, causal), with what a user
would run instead (`sdpa`, full causal attention) and `window-chunked` / `local` at windows 128 and 256, each as
the loop of block calls and unfolded, at every block size; then local 256 at two wider shapes (h8 d64, and GQA
with 2 key heads). Medians over rounds; within a round every call runs once, in a shuffled order (a call's time
depends on what ran just before it). "scores" is the share of full causal attention's query-key scores the call
computes (the idea's speed limit). Whole model: `attn_tune.models.pretrained_lm()`'s forward (4 layers at q2048)
with no config (sdpa) and with a config choosing `local` 256 looped or unfolded (its best block each), and the
loss change each gives on the held-out batch. `--grid`: window-chunked looped against unfolded (best block each)
over self-attention shapes from q256 to q4096, heads 4-16, head_dim 32-128, windows 64-1024.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable

import torch

import attn_tune
from timing import interleaved, median_ms
from attn_tune import Problem
from attn_tune.models.pretrained import loss_of, pretrained_lm
from attn_tune.tuned_config import Entry, TunedConfig, device_info

BLOCKS = (32, 64, 128, 256)


def per_call(rounds: int) -> dict[str, float]:
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 4, 2048, 32, generator=g) for _ in range(3))
    sdpa = torch._C._nn.scaled_dot_product_attention
    fns: dict[str, Callable[[], object]] = {"sdpa": lambda: sdpa(q, k, v, is_causal=True)}
    chunked, local = attn_tune.get_variant("window-chunked").fn, attn_tune.get_variant("local").fn
    for window in (128, 256):
        for block in BLOCKS:
            for unfolded in (False, True):
                how = "unfolded" if unfolded else "loop"
                fns[f"window-chunked w{window} {how} b{block}"] = (
                    lambda w=window, b=block, u=unfolded: chunked(q, k, v, is_causal=True, window=w, attn_mask=None,
                                                                  scale=None, block=b, unfolded=u))
                fns[f"local {window} {how} b{block}"] = (
                    lambda w=window, b=block, u=unfolded: local(q, k, v, is_causal=True, window=None, attn_mask=None,
                                                                scale=None, local_window=w, block=b, unfolded=u))
    with torch.no_grad():
        return median_ms(interleaved(fns, rounds))


def wider_shapes(rounds: int) -> dict[str, float]:
    """local 256 at h8 d64 (where unfolding used to lose to the loop) and with grouped-query heads."""
    g = torch.Generator().manual_seed(1)
    sdpa = torch._C._nn.scaled_dot_product_attention
    local = attn_tune.get_variant("local").fn
    fns: dict[str, Callable[[], object]] = {}
    for heads, kv_heads in ((8, 8), (8, 2)):
        q = torch.randn(1, heads, 2048, 64, generator=g)
        k, v = (torch.randn(1, kv_heads, 2048, 64, generator=g) for _ in range(2))
        shape = f"h{heads} kv{kv_heads} d64"
        fns[f"{shape}: sdpa"] = lambda q=q, k=k, v=v: sdpa(q, k, v, is_causal=True, enable_gqa=k.shape[1] != q.shape[1])
        for block in BLOCKS:
            for unfolded in (False, True):
                fns[f"{shape}: local 256 {'unfolded' if unfolded else 'loop'} b{block}"] = (
                    lambda q=q, k=k, v=v, b=block, u=unfolded: local(q, k, v, is_causal=True, window=None,
                                                                     attn_mask=None, scale=None, local_window=256,
                                                                     block=b, unfolded=u))
    with torch.no_grad():
        return median_ms(interleaved(fns, rounds))


def score_share(window: int, block: int, unfolded: bool, length: int = 2048) -> float:
    """Query-key scores a causal windowed call computes, as a share of full causal attention's length^2 / 2."""
    if unfolded:
        from attn_tune.families.windowed import _Unfolded

        computed = length * _Unfolded.of(length, block, window, True).width
    else:  # the loop: each block against its queries' keys, at most block + window - 1
        computed = sum(b * min(start + b, block + window - 1) for start in range(0, length, block)
                       for b in [min(block, length - start)])
    return computed / (length * (length + 1) / 2)


def _config(params: dict | None) -> TunedConfig | None:
    if params is None:
        return None
    problem = Problem(batch=1, heads=4, q_len=2048, head_dim=32, causal=True)
    entry = Entry(problem=problem, choice={"variant": "local", "params": params}, max_error=1.0,
                  measured={"latency_ms": 1.0, "peak_bytes": 0, "rel_error": 0.1})
    return TunedConfig(entries=[entry], device=device_info("cpu"))


def whole_model(rounds: int, loop_block: int, unfolded_block: int) -> dict[str, tuple[float, float]]:
    model, (ids,), targets, _ = pretrained_lm()
    configs = {"sdpa (no config)": None,
               f"local 256, loop b{loop_block}": {"local_window": 256, "block": loop_block},
               f"local 256, unfolded b{unfolded_block}": {"local_window": 256, "block": unfolded_block,
                                                          "unfolded": True}}
    losses, fns = {}, {}
    with torch.no_grad():
        for name, params in configs.items():
            with attn_tune.use_config(_config(params)):
                losses[name] = float(loss_of(model(ids), targets))

            def run(params=params) -> None:
                with attn_tune.use_config(_config(params)):
                    model(ids)

            fns[name] = run
        ms = median_ms(interleaved(fns, rounds))
    return {name: (ms[name], losses[name]) for name in configs}


def grid(rounds: int) -> None:
    chunked = attn_tune.get_variant("window-chunked").fn
    print("| b1 q_len heads d | window | loop, best block | unfolded, best block | unfolded faster |\n|---|---|---|---|---|")
    for length, heads, dim in ((256, 8, 64), (1024, 4, 32), (1024, 16, 64), (4096, 4, 32), (4096, 8, 128)):
        g = torch.Generator().manual_seed(length + heads)
        q, k, v = (torch.randn(1, heads, length, dim, generator=g) for _ in range(3))
        for window in (w for w in (64, 256, 1024) if w < length):
            fns = {(b, u): (lambda b=b, u=u: chunked(q, k, v, is_causal=True, window=window, attn_mask=None,
                                                     scale=None, block=b, unfolded=u))
                   for b in BLOCKS + (512,) if b < length for u in (False, True)}
            with torch.no_grad():
                ms = median_ms(interleaved(fns, rounds))
            loop, unfolded = (min((t, b) for (b, u), t in ms.items() if u == how) for how in (False, True))
            print(f"| q{length} h{heads} d{dim} | {window} | {loop[0]:.2f} ms (b{loop[1]}) | "
                  f"{unfolded[0]:.2f} ms (b{unfolded[1]}) | {loop[0] / unfolded[0]:.2f}x |")


def _best(ms: dict[str, float]) -> dict[str, tuple[str, float]]:
    best: dict[str, tuple[str, float]] = {}
    for name, value in ms.items():
        family = name.rsplit(" b", 1)[0]
        if " b" in name and (family not in best or value < best[family][1]):
            best[family] = (name, value)
    return best


def _row(name: str, value: float, base: float) -> str:
    window, how, block = name.split()[-3:]  # "... w256 unfolded b32" or "... 256 loop b128"
    share = score_share(int(window.removeprefix("w")), int(block.removeprefix("b")), how == "unfolded")
    return f"| {name} (best block) | {value:.2f} | {value / base:.2f}x ({base / value:.2f}x faster) | {share:.2f} |"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--grid", action="store_true", help="loop against unfolded over many shapes, and stop")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {device_info('cpu')['name']}, {torch.get_num_threads()} threads\n")
    if args.grid:
        grid(args.rounds)
        return 0
    ms = per_call(args.rounds)
    base = ms["sdpa"]
    print("| per call, b1 h4 q2048 d32 causal | ms | over sdpa | scores |\n|---|---|---|---|")
    print(f"| sdpa (full causal) | {base:.2f} | 1.00x | 1.00 |")
    best = _best(ms)
    for name, value in best.values():
        print(_row(name, value, base))
    wider = wider_shapes(args.rounds)
    print("\n| per call, b1 q2048 d64 causal | ms | over sdpa | scores |\n|---|---|---|---|")
    for shape in ("h8 kv8 d64", "h8 kv2 d64"):
        shape_base = wider[f"{shape}: sdpa"]
        print(f"| {shape}: sdpa (full causal) | {shape_base:.2f} | 1.00x | 1.00 |")
        for family, (name, value) in _best(wider).items():
            if family.startswith(shape):
                print(_row(name, value, shape_base))
    loop_block = int(best["local 256 loop"][0].rsplit(" b", 1)[1])
    unfolded_block = int(best["local 256 unfolded"][0].rsplit(" b", 1)[1])
    whole = whole_model(args.rounds, loop_block, unfolded_block)
    base_ms, base_loss = whole["sdpa (no config)"]
    print("\n| pretrained_lm forward, q2048 | ms | forward speed-up | loss | loss change |\n|---|---|---|---|---|")
    for name, (value, loss) in whole.items():
        print(f"| {name} | {value:.1f} | {base_ms / value:.2f}x | {loss:.4f} | {(loss - base_loss) / base_loss:+.2%} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
