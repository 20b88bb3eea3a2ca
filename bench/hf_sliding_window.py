"""A Mistral-style transformers model: attn_implementation "sdpa" against "attn_tune" with a config tuned for it.

    .venv/bin/python bench/hf_sliding_window.py [--lengths 2048,4096,8192] [--trials 12] [--json out.json]

The model (`attn_tune.integrations.transformers_examples.mistral_model`: 2 layers, hidden 256, 4 query / 2
key-value heads of 64, sliding window 512, random weights) is what a user would run with "sdpa", which gets the
window as a baked boolean mask. For each prompt length the script captures the model's attention problems
(forward, and forward+backward in train mode), tunes them with `attn_tune.tune` (exact variants only), and then
times, interleaved in one process, "sdpa" and "attn_tune" with that config: prefill forward, forward+backward,
and greedy decoding per token against cache length, with generate's own (sliding) cache and with a cache that
keeps every key. Logits are compared at every length.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

import torch

import attn_tune
from attn_tune.integrations.transformers_examples import mistral_model
from attn_tune.runtime import record
from attn_tune.tuned_config import merge_configs
from attn_tune.tuner.job import TuneJob
from timing import interleaved, median_ms

WINDOW = 512


def _tuned_config(model: torch.nn.Module, ids: torch.Tensor, trials: int) -> attn_tune.TunedConfig:
    """Capture the forward and training problems of `model` on `ids` and tune them (exact variants only)."""
    with record() as forward, torch.no_grad():
        model.eval()(input_ids=ids)
    with record() as training:
        model.train()(input_ids=ids, labels=ids).loss.backward()
    model.zero_grad(set_to_none=True)
    model.eval()
    problems = list(dict.fromkeys(forward + training))
    print(f"  tuning {', '.join(p.describe() for p in problems)}", flush=True)
    return attn_tune.tune(problems, TuneJob().updated(trials=trials, seed=0))


def _prefill(models: dict[str, torch.nn.Module], ids: torch.Tensor, rounds: int) -> dict[str, Any]:
    def forward(model):
        def run():
            with torch.no_grad():
                return model(input_ids=ids).logits
        return run

    def train_step(model):
        def run():
            model.train()
            model(input_ids=ids, labels=ids).loss.backward()
            model.zero_grad(set_to_none=True)
            model.eval()
        return run

    logits = {name: forward(m)() for name, m in models.items()}
    rel = float((logits["attn_tune"] - logits["sdpa"]).norm() / logits["sdpa"].norm())
    fwd = median_ms(interleaved({name: forward(m) for name, m in models.items()}, rounds, shuffle=False))
    bwd = median_ms(interleaved({name: train_step(m) for name, m in models.items()}, max(2, rounds // 2),
                                shuffle=False))
    return {"forward_ms": fwd, "train_ms": bwd, "logits_rel_diff": rel}


def _decode(models: dict[str, torch.nn.Module], cache_len: int, full_cache: bool, steps: int) -> dict[str, float]:
    """Milliseconds per generated token after a prompt of `cache_len` tokens (median over `steps` tokens)."""
    from transformers import DynamicCache

    ids = torch.randint(0, 1000, (1, cache_len), generator=torch.Generator().manual_seed(cache_len))
    per_token: dict[str, list[float]] = {name: [] for name in models}
    states = {}
    with torch.no_grad():
        for name, model in models.items():
            cache = DynamicCache() if full_cache else DynamicCache(config=model.config)
            out = model(input_ids=ids, past_key_values=cache, use_cache=True)
            states[name] = (out.past_key_values, out.logits[:, -1:].argmax(-1))
        for _ in range(steps):  # one token of each model in turn
            for name, model in models.items():
                cache, token = states[name]
                t0 = time.perf_counter()
                out = model(input_ids=token, past_key_values=cache, use_cache=True)
                per_token[name].append(time.perf_counter() - t0)
                states[name] = (out.past_key_values, out.logits[:, -1:].argmax(-1))
    return {name: statistics.median(ts[1:]) * 1e3 for name, ts in per_token.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="2048,4096,8192")
    parser.add_argument("--cache-lengths", default="256,512,1024,2048,4096,8192")
    parser.add_argument("--trials", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", dest="json_out", default=None)
    args = parser.parse_args()
    lengths = [int(x) for x in args.lengths.split(",")]
    cache_lengths = [int(x) for x in args.cache_lengths.split(",")]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; Mistral-style, window {WINDOW}, float32")

    models = {"sdpa": mistral_model(WINDOW, "sdpa"), "attn_tune": mistral_model(WINDOW, "attn_tune")}
    configs, prefill = [], {}
    for length in lengths:
        ids = torch.randint(0, 1000, (1, length), generator=torch.Generator().manual_seed(length))
        print(f"prefill {length}:", flush=True)
        configs.append(_tuned_config(models["attn_tune"], ids, args.trials))
        with attn_tune.use_config(configs[-1]):
            chosen = [f"{e.problem.describe()} -> {e.choice['variant']} {e.choice['params']}" for e in configs[-1].entries]
            prefill[length] = {**_prefill(models, ids, args.rounds), "chosen": chosen}
        r = prefill[length]
        print(f"  forward sdpa {r['forward_ms']['sdpa']:.0f} ms, attn_tune {r['forward_ms']['attn_tune']:.0f} ms "
              f"({r['forward_ms']['sdpa'] / r['forward_ms']['attn_tune']:.2f}x); forward+backward sdpa "
              f"{r['train_ms']['sdpa']:.0f} ms, attn_tune {r['train_ms']['attn_tune']:.0f} ms "
              f"({r['train_ms']['sdpa'] / r['train_ms']['attn_tune']:.2f}x); logits rel diff {r['logits_rel_diff']:.1e}",
              flush=True)
        for line in chosen:
            print(f"    {line}")

    decode: dict[str, dict[int, dict[str, float]]] = {"sliding cache": {}, "full cache": {}}
    with attn_tune.use_config(merge_configs(configs)):
        for kind in decode:
            for cache_len in cache_lengths:
                decode[kind][cache_len] = ms = _decode(models, cache_len, kind == "full cache", steps=24)
                print(f"decode, {kind}, {cache_len} cached: sdpa {ms['sdpa']:.2f} ms/token, "
                      f"attn_tune {ms['attn_tune']:.2f} ms/token", flush=True)
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({"prefill": prefill, "decode": decode}, f, indent=2)


if __name__ == "__main__":
    main()
