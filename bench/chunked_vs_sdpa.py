"""`chunked` against `sdpa`, call by call: interleaved pairs, so the machine's drift hits both alike.

    .venv/bin/python bench/chunked_vs_sdpa.py

`exact_variants.py` measures each variant in its own block of calls; on a shared 2-core machine two runs of one
kernel (`sdpa`, `sdpa-flash`) can read 0.7x to 1.7x of each other there. Here each pair is sdpa then chunked
(default chunk 256) on the same inputs, and the ratio's median, min and max over the pairs are printed.
"""

from __future__ import annotations

import statistics
import time

import torch

import attn_tune
from attn_tune import Problem
from attn_tune.measurement.inputs import make_inputs

CELLS = ((2048, True, 15), (4096, True, 9), (8192, False, 5), (8192, True, 5))  # q_len, causal, pairs


def main() -> None:
    sdpa, chunked = attn_tune.get_variant("sdpa"), attn_tune.get_variant("chunked")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; batch 1, heads 8, head_dim 64, float32")
    for q_len, causal, pairs in CELLS:
        problem = Problem(batch=1, heads=8, q_len=q_len, head_dim=64, causal=causal)
        inputs = make_inputs(problem, 0)
        kwargs = inputs.call_kwargs(problem)
        ratios = []
        with torch.no_grad():
            sdpa.fn(inputs.q, inputs.k, inputs.v, **kwargs)  # warm-up: masks and buffers live before timing
            chunked.fn(inputs.q, inputs.k, inputs.v, **kwargs)
            for _ in range(pairs):
                t0 = time.perf_counter()
                sdpa.fn(inputs.q, inputs.k, inputs.v, **kwargs)
                t1 = time.perf_counter()
                chunked.fn(inputs.q, inputs.k, inputs.v, **kwargs)
                ratios.append((time.perf_counter() - t1) / (t1 - t0))
        print(f"q_len {q_len} causal {causal}: chunked / sdpa median {statistics.median(ratios):.2f} "
              f"(min {min(ratios):.2f}, max {max(ratios):.2f}, {pairs} interleaved pairs)", flush=True)


if __name__ == "__main__":
    main()
