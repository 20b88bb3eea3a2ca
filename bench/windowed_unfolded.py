"""Sliding windows as one SDPA call (unfolded) against the loop of block calls, and what it does to the bundled LM.

    .venv/bin/python bench/windowed_unfolded.py [--rounds 9]

Per call: the bundled character LM's attention problem (b1 h4 q2048 d32 float32 CPU, causal), with what a user
would run instead (`sdpa`, full causal attention) and `window-chunked` / `local` at windows 128 and 256, each as
the loop of block calls and unfolded, at every block size; median over rounds, calls alternating within a round.
Whole model: `attn_tune.models.pretrained_lm()`'s forward (4 layers at q2048) with no config (sdpa) and with a
config choosing `local` 256 looped or unfolded (its best block each), and the loss change each gives on the
held-out batch.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Callable

import torch

import attn_tune
from attn_tune import Problem
from attn_tune.models.pretrained import loss_of, pretrained_lm
from attn_tune.tuned_config import Entry, TunedConfig, device_info

BLOCKS = (32, 64, 128, 256)


def _interleaved(fns: dict[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) * 1e3 for name, ts in times.items()}


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
        return _interleaved(fns, rounds)


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
        ms = _interleaved(fns, rounds)
    return {name: (ms[name], losses[name]) for name in configs}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=9)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {device_info('cpu')['name']}, {torch.get_num_threads()} threads\n")
    ms = per_call(args.rounds)
    base = ms["sdpa"]
    print("| per call, b1 h4 q2048 d32 causal | ms | over sdpa |\n|---|---|---|")
    print(f"| sdpa (full causal) | {base:.2f} | 1.00x |")
    best: dict[str, tuple[str, float]] = {}
    for name, value in ms.items():
        if name == "sdpa":
            continue
        family = name.rsplit(" b", 1)[0]
        if family not in best or value < best[family][1]:
            best[family] = (name, value)
    for family, (name, value) in best.items():
        print(f"| {name} (best block) | {value:.2f} | {value / base:.2f}x ({base / value:.2f}x faster) |")
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
