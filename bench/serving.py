"""Serving at SDPA's cost: the dispatch's price per call, compiled decode loops, and Hugging Face generate.

    .venv/bin/python bench/serving.py [--skip-generate] [--json out.json]

Three measurements, each against what a user would run instead, in the same process:

1. Per call, CPU float32, 1 thread: a tiny call (b1 h2 q16 d8 causal) and the decode pattern (b1 h8 d64, one query
   against kv_len 400..599, a new length every call), with no config and with a config whose entry (kv 2048)
   keeps sdpa. Against raw SDPA (torch._C._nn.scaled_dot_product_attention) and against a bare Python wrapper
   that only forwards its arguments (the floor for any Python-level dispatch, transformers' own "sdpa" included).
   Calls alternate A/B per length, so drift cancels; the figure is the median difference.
2. torch.compile (backend "eager": dynamo only) of a decode step over 40 kv lengths: frames compiled, graph
   breaks, outputs against eager, for raw SDPA and attn_tune.attention with no config, a config keeping sdpa,
   and a config whose choice changes at a length inside the loop.
3. `generate` (greedy, 64 new tokens after a 128-token prompt, batch 1), Llama-style (4 layers, hidden 512, 8
   query / 2 key-value heads of 64) and Mistral-style (the same with a sliding window of 64), "sdpa" against
   "attn_tune" with a config tuned for the model's prefill and decode problems; eager with transformers' dynamic
   cache, and `torch.compile(model.forward, fullgraph=True)` with a static cache. Tokens must be identical.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Any, Callable

import torch
import torch._dynamo

import attn_tune
from attn_tune import Problem
from attn_tune.tuned_config import Entry, TunedConfig, device_info
from attn_tune.tuner.job import TuneJob
from decode_overhead import over_raw  # bench/ is on the path when this script runs

raw_sdpa = torch._C._nn.scaled_dot_product_attention


def _config(*entries: tuple[Problem, str, dict]) -> TunedConfig:
    return TunedConfig(entries=[Entry(problem=p, choice={"variant": v, "params": params},
                                      measured={"latency_ms": 1.0, "peak_bytes": 0, "rel_error": 0.0})
                                for p, v, params in entries], device=device_info("cpu"))


def bare_wrapper(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, *, scale=None, enable_gqa=False):
    """What any Python-level dispatch costs at the least: forward SDPA's arguments to SDPA."""
    return raw_sdpa(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                    enable_gqa=enable_gqa)


def per_call() -> list[dict[str, Any]]:
    torch.set_num_threads(1)
    q = torch.randn(1, 2, 16, 8)
    qd, cache = torch.randn(1, 8, 1, 64), torch.randn(1, 8, 600, 64)
    decode = [(qd, cache[:, :, :n], cache[:, :, :n]) for n in range(400, 600)]
    tiny = [(q, q, q)] * 200
    keeps_sdpa = _config((Problem(batch=1, heads=8, q_len=1, kv_len=2048, head_dim=64), "sdpa", {}),
                         (Problem(batch=1, heads=2, q_len=32, head_dim=8, causal=True), "sdpa", {}))
    rows = []
    with torch.no_grad():
        for label, config in (("no config", None), ("config keeps sdpa (entries elsewhere)", keeps_sdpa)):
            with attn_tune.use_config(config):
                for pattern, calls, kwargs in (("tiny call", tiny, {"is_causal": True}), ("decode", decode, {})):
                    raw_us = statistics.median(_time_each(calls, raw_sdpa, kwargs))
                    over = over_raw(raw_sdpa, calls, {"bare wrapper": bare_wrapper,
                                                      "attn_tune.attention": attn_tune.attention},
                                    20 if pattern == "decode" else 40, kwargs)
                    rows.append({"pattern": pattern, "config": label, "raw_us": raw_us, **over})
                    print(f"  {pattern}, {label}: raw {raw_us:.1f} us; bare wrapper +{over['bare wrapper']:.2f} us, "
                          f"attention +{over['attn_tune.attention']:.2f} us", flush=True)
    torch.set_num_threads(torch.get_num_threads())
    return rows


def _time_each(calls: list[tuple], fn: Callable, kwargs: dict) -> list[float]:
    out = []
    for args in calls:
        t0 = time.perf_counter_ns()
        fn(*args, **kwargs)
        out.append((time.perf_counter_ns() - t0) / 1000)
    return out


def compiled_decode() -> list[dict[str, Any]]:
    """Frames dynamo compiles for a decode step over 40 kv lengths (100..139)."""
    from torch._dynamo.testing import CompileCounter

    qd, cache = torch.randn(1, 8, 1, 64), torch.randn(1, 8, 200, 64)
    at = Problem(batch=1, heads=8, q_len=1, kv_len=100, head_dim=64)
    far = Problem(batch=1, heads=8, q_len=1, kv_len=160, head_dim=64)
    cases = [
        ("raw SDPA", raw_sdpa, None),
        ("attention, no config", attn_tune.attention, None),
        ("attention, config keeps sdpa", attn_tune.attention, _config((at, "sdpa", {}))),
        ("attention, choice changes at kv 127", attn_tune.attention,
         _config((at, "sdpa", {}), (far, "chunked", {"chunk": 1}))),
    ]
    rows = []
    for label, fn, config in cases:
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        counter = CompileCounter()
        with attn_tune.use_config(config), torch.no_grad():
            step = torch.compile(lambda q, k, v: fn(q, k, v) * 2, backend=counter)
            worst = 0.0
            for n in range(100, 140):
                k = cache[:, :, :n]
                worst = max(worst, (step(qd, k, k) - 2 * raw_sdpa(qd, k, k)).abs().max().item())
        breaks = sum(torch._dynamo.utils.counters["graph_break"].values())
        rows.append({"case": label, "frames": counter.frame_count, "graph_breaks": breaks, "max_abs_diff": worst})
        print(f"  {label}: {counter.frame_count} frames, {breaks} graph breaks, max |diff| {worst:.1e}", flush=True)
    return rows


def _llama(attn: str, window: int | None) -> Any:
    from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig

    common = dict(vocab_size=1000, hidden_size=512, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=8,
                  num_key_value_heads=2, max_position_embeddings=4096)
    config = MistralConfig(**common, sliding_window=window) if window else LlamaConfig(**common)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation=attn).eval()


def _tuned_for(model: Any, ids: torch.Tensor) -> TunedConfig:
    """The model's prefill problem and decode problems at two cache lengths, tuned (exact variants, 6 trials)."""
    from attn_tune.runtime import record

    with record() as seen, torch.no_grad():
        model.generate(ids, max_new_tokens=64, min_new_tokens=64, do_sample=False)
    problems = list(dict.fromkeys(seen))
    decode = [p for p in problems if p.q_len == 1]
    chosen = [p for p in problems if p.q_len > 1] + [decode[0], decode[len(decode) // 2], decode[-1]]
    return attn_tune.tune(chosen, TuneJob().updated(trials=6, seed=0))


def generate(rounds: int) -> list[dict[str, Any]]:
    import attn_tune.integrations.transformers  # noqa: F401  (registers "attn_tune")

    torch.set_num_threads(2)
    ids = torch.randint(0, 1000, (1, 128), generator=torch.Generator().manual_seed(1))
    rows = []
    for family, window in (("llama", None), ("mistral, window 64", 64)):
        config = _tuned_for(_llama("attn_tune", window), ids)
        chosen = sorted({e.choice["variant"] for e in config.entries})
        print(f"  {family}: tuned {len(config.entries)} problems, choices {', '.join(chosen)}", flush=True)
        for mode in ("eager", "compiled, static cache"):
            torch._dynamo.reset()
            models = {impl: _llama(impl, window) for impl in ("sdpa", "attn_tune")}
            kwargs: dict[str, Any] = {}
            if mode != "eager":
                kwargs["cache_implementation"] = "static"
                for model in models.values():
                    model.forward = torch.compile(model.forward, fullgraph=True)

            def run(model: Any) -> torch.Tensor:
                with torch.no_grad():
                    return model.generate(ids, max_new_tokens=64, min_new_tokens=64, do_sample=False, **kwargs)

            with attn_tune.use_config(config):
                tokens = {name: run(model) for name, model in models.items()}  # compiles, when compiled
                times: dict[str, list[float]] = {name: [] for name in models}
                for _ in range(rounds):
                    for name, model in models.items():
                        t0 = time.perf_counter()
                        run(model)
                        times[name].append(time.perf_counter() - t0)
            rate = {name: 64 / statistics.median(ts) for name, ts in times.items()}
            same = torch.equal(tokens["sdpa"], tokens["attn_tune"])
            rows.append({"model": family, "mode": mode, "sdpa_tok_s": rate["sdpa"],
                         "attn_tune_tok_s": rate["attn_tune"], "ratio": rate["attn_tune"] / rate["sdpa"],
                         "same_tokens": same})
            print(f"  {family}, {mode}: sdpa {rate['sdpa']:.1f} tok/s, attn_tune {rate['attn_tune']:.1f} tok/s "
                  f"({rate['attn_tune'] / rate['sdpa']:.3f}x), same tokens: {same}", flush=True)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-generate", action="store_true", help="only the per-call and compiled measurements")
    parser.add_argument("--rounds", type=int, default=7, help="timed generate runs per model (median)")
    parser.add_argument("--json", type=str, default=None, help="also write the results here")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {device_info('cpu')['name']}")
    print("per call (us over raw SDPA, median):", flush=True)
    results: dict[str, Any] = {"per_call": per_call()}
    print("torch.compile of a decode step, 40 kv lengths:", flush=True)
    results["compiled_decode"] = compiled_decode()
    if not args.skip_generate:
        print("generate, 64 new tokens after 128, batch 1:", flush=True)
        results["generate"] = generate(args.rounds)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
