"""Per-call overhead of `attn_tune.attention` over calling the chosen variant's fn directly (target: < 10 us on CPU).

    python bench/runtime_overhead.py            # prints a markdown table; exit 1 if any overhead is >= 10 us

Tiny shapes, so the kernel costs little and the dispatch shows. The two calls alternate in rounds of N calls
each (A B A B ...), and the overhead is the median over rounds of (A - B) / N, so drifts on a shared machine
cancel rather than land on one side.
"""

from __future__ import annotations

import statistics
import sys
import time

import torch

import attn_tune
from attn_tune import Problem
from attn_tune.tuned_config import Entry, TunedConfig, device_info

TARGET_US = 10.0
ROUNDS, CALLS = 31, 2000


def _config(problem: Problem, variant: str, params: dict) -> TunedConfig:
    entry = Entry(problem=problem, choice={"variant": variant, "params": params},
                  measured={"latency_ms": 0.0, "peak_bytes": 0, "rel_error": 0.0})
    return TunedConfig(entries=[entry], device=device_info("cpu"))


def _per_call_us(fn) -> float:
    start = time.perf_counter()
    for _ in range(CALLS):
        fn()
    return (time.perf_counter() - start) / CALLS * 1e6


def _overhead(through, direct) -> tuple[float, float, float]:
    through(), direct()
    diffs, directs = [], []
    for _ in range(ROUNDS):
        a, b = _per_call_us(through), _per_call_us(direct)
        diffs.append(a - b)
        directs.append(b)
    return statistics.median(directs), statistics.median(diffs), max(diffs)


def main() -> int:
    torch.set_num_threads(1)
    q = torch.randn(1, 2, 16, 8)
    kv = torch.randn(1, 1, 16, 8)
    mask = torch.rand(16, 16) > 0.2
    mask[:, 0] = True
    tuned_at = Problem(batch=1, heads=2, kv_heads=1, q_len=32, head_dim=8, causal=True)
    cases = [
        ("no config: sdpa", None, "sdpa", {}, dict(is_causal=True)),
        ("no config: sdpa + window", None, "sdpa", {}, dict(is_causal=True, window=4)),
        ("no config: sdpa + mask", None, "sdpa", {}, dict(attn_mask=mask)),
        ("config, nearest entry: chunked", _config(tuned_at, "chunked", {"chunk": 8}), "chunked", {"chunk": 8},
         dict(is_causal=True)),
        ("config, exact entry: dense", _config(Problem(batch=1, heads=2, kv_heads=1, q_len=16, head_dim=8),
                                              "dense", {}), "dense", {}, {}),
    ]
    print(f"torch {torch.__version__}, {device_info('cpu')['name']}, 1 thread; q (1, 2, 16, 8), k/v (1, 1, 16, 8); "
          f"{ROUNDS} rounds x {CALLS} calls\n")
    print("| call | variant fn direct (us) | overhead of attention() (us, median) | worst round (us) |")
    print("|---|---|---|---|")
    worst = 0.0
    for label, cfg, name, params, kwargs in cases:
        with attn_tune.use_config(cfg):
            decision = attn_tune.explain(q, kv, kv, enable_gqa=True, **kwargs)
            assert decision.variant == name, (label, decision)
            fn = attn_tune.get_variant(name).fn
            full = dict(is_causal=False, window=None, attn_mask=None, scale=None) | kwargs | params

            def through(kwargs=kwargs):
                return attn_tune.attention(q, kv, kv, enable_gqa=True, **kwargs)

            def direct(full=full):
                return fn(q, kv, kv, **full)

            base, over, high = _overhead(through, direct)
        worst = max(worst, over)
        print(f"| {label} | {base:.1f} | {over:.2f} | {high:.2f} |")
    verdict = "within" if worst < TARGET_US else "ABOVE"
    print(f"\nlargest median overhead {worst:.2f} us: {verdict} the {TARGET_US:g} us target")
    return 0 if worst < TARGET_US else 1


if __name__ == "__main__":
    sys.exit(main())
