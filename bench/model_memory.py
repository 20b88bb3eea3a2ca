"""Peak memory and time per forward (and forward+backward) of the reference models, for three attention set-ups.

    python bench/model_memory.py                        # encoder, batch 1,2,4 x q_len 512..4096, CPU float32
    python bench/model_memory.py --model lm --lengths 512,1024

Set-ups: `dense` (a config choosing eager matmul-softmax-matmul `dense` for every call), `sdpa` (no config: the
default policy) and `tuned` (a config from `attn_tune.tune` on the batch-1 problems the model asks for, forward
and training; batches 2 and 4 reach it through the nearest-entry lookup). Peak memory is what PyTorch allocated
during the call above what was live before (weights and inputs excluded): the CPU profiler's events, as in
`attn_tune.measurement.memory`. Time is the median of timed calls after one warm-up.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import tempfile
import time

import torch

import attn_tune
from attn_tune.measurement.memory import peak_bytes
from attn_tune.models import CausalLM, Encoder
from attn_tune.runtime import record
from attn_tune.tuned_config import Entry, TunedConfig, device_info
from attn_tune.tuner.job import TuneJob


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",")]


def _model(args) -> torch.nn.Module:
    torch.manual_seed(0)
    if args.model == "encoder":
        return Encoder(vocab_size=1000, dim=args.dim, depth=args.depth, heads=args.heads)
    return CausalLM(vocab_size=1000, dim=args.dim, depth=args.depth, heads=args.heads, kv_heads=args.heads // 2)


def _step(model: torch.nn.Module, ids: torch.Tensor, train: bool):
    def run() -> None:
        if train:
            model.zero_grad(set_to_none=True)
            model(ids).float().square().mean().backward()
        else:
            with torch.no_grad():
                model(ids)

    return run


def _problems(model, lengths, modes) -> list:
    """The problems the model asks for at batch 1, forward and training."""
    seen = []
    for n in lengths:
        for train in modes:
            with record() as got, torch.set_grad_enabled(train):
                _step(model, torch.randint(0, 1000, (1, n)), train)()
            seen += got
    return list(dict.fromkeys(seen))


def _dense_config(problems) -> TunedConfig:
    entries = [Entry(problem=p, choice={"variant": "dense", "params": {}}, measured={}) for p in problems]
    return TunedConfig(entries=entries, device=device_info("cpu"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["encoder", "lm"], default="encoder")
    parser.add_argument("--batches", type=_ints, default=[1, 2, 4])
    parser.add_argument("--lengths", type=_ints, default=[512, 1024, 2048, 4096])
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2, help="timed calls per cell, after one warm-up")
    parser.add_argument("--trials", type=int, default=6, help="tuning trials per problem for the tuned set-up")
    args = parser.parse_args()

    model = _model(args)
    modes = [False, True]
    problems = _problems(model, args.lengths, modes)
    print(f"tuning {len(problems)} batch-1 problems ...", file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp:
        exact = [v for v in attn_tune.variants() if v.exact and attn_tune.availability(v) is None]
        job = TuneJob().updated(trials=args.trials, variants=exact, storage=f"sqlite:///{tmp}/bench.db", seed=0,
                                trial_measure={"warmup": 1, "min_repeats": 3, "min_time_s": 0.05},
                                final_measure={"warmup": 1, "min_repeats": 3, "min_time_s": 0.1}, rounds=2)
        tuned = attn_tune.tune(problems, job)
    every_batch = [dataclasses.replace(p, batch=b) for p in problems for b in args.batches]
    setups = {"dense": _dense_config(every_batch), "sdpa": None, "tuned": tuned}

    rows = []
    total = len(setups) * len(modes) * len(args.lengths) * len(args.batches)
    for setup, cfg in setups.items():
        with attn_tune.use_config(cfg):
            for train in modes:
                for n in args.lengths:
                    for b in args.batches:
                        rows.append((setup, train, n, b, *_measure(model, b, n, train, args.repeats)))
                        print(f"\r[{len(rows)}/{total}] {setup} {'train' if train else 'forward'} q{n} b{b}   ",
                              end="", file=sys.stderr)
    print(file=sys.stderr)
    _report(args, rows, tuned)


def _measure(model, batch: int, length: int, train: bool, repeats: int) -> tuple[float, float, str]:
    ids = torch.randint(0, 1000, (batch, length), generator=torch.Generator().manual_seed(0))
    run = _step(model, ids, train)
    with torch.set_grad_enabled(train):
        q = torch.empty(batch, model.blocks[0].attn.num_heads, length, model.blocks[0].attn.head_dim)
        kv = torch.empty(batch, model.blocks[0].attn.num_kv_heads, length, model.blocks[0].attn.head_dim)
        attn = model.blocks[0].attn
        decision = attn_tune.explain(q.requires_grad_(train), kv, kv, is_causal=attn.causal,
                                     enable_gqa=attn.num_kv_heads != attn.num_heads)
    run()
    peak = peak_bytes(run, "cpu")
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return peak / 2**20, statistics.median(times) * 1e3, decision.variant


def _report(args, rows, tuned) -> None:
    print(f"torch {torch.__version__}, attn-tune {attn_tune.__version__}, {device_info('cpu')['name']}, "
          f"{torch.get_num_threads()} threads; {args.model}: dim {args.dim}, depth {args.depth}, heads {args.heads}, "
          f"float32; peak MiB above weights and inputs, median ms of {args.repeats} calls\n")
    print("tuned choices (batch 1): " + ", ".join(
        f"q{e.problem.q_len}{' train' if e.problem.training else ''}: {e.choice['variant']}"
        + (f" {e.choice['params']}" if e.choice["params"] else "") for e in tuned.entries) + "\n")
    batches = args.batches
    head = " | ".join(f"b{b} MiB | b{b} ms" for b in batches)
    print(f"| set-up | pass | q_len | {head} | variant used | MiB growth b{batches[0]}->b{batches[-1]} |")
    print("|---|---|---|" + "---|" * (2 * len(batches)) + "---|---|")
    by_key = {(s, t, n, b): (mib, ms, v) for s, t, n, b, mib, ms, v in rows}
    for setup in ("dense", "sdpa", "tuned"):
        for train in (False, True):
            for n in args.lengths:
                cells = [by_key[(setup, train, n, b)] for b in batches]
                used = sorted({c[2] for c in cells})
                growth = cells[-1][0] / cells[0][0] if cells[0][0] else float("nan")
                body = " | ".join(f"{mib:.0f} | {ms:.0f}" for mib, ms, _ in cells)
                print(f"| {setup} | {'fwd+bwd' if train else 'forward'} | {n} | {body} | {', '.join(used)} | "
                      f"{growth:.2f}x |")


if __name__ == "__main__":
    main()
