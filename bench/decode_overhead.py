"""A decode step's price: `attn_tune.attention` over raw SDPA per call, and `import attn_tune.runtime`'s time.

    .venv/bin/python bench/decode_overhead.py                                  # this tree only
    .venv/bin/python bench/decode_overhead.py --baseline-tree /tmp/attn-before # and another checkout, interleaved

Per call, CPU float32, 1 thread, no_grad: the decode pattern (b1 h8 d64, one query against kv_len 400..599, a new
length every call) and a tiny call (b1 h2 q16 d8 causal), with no config and with a config whose entries sit at
other lengths (kv 2048 keeps sdpa: every length is a nearest-entry lookup). Raw SDPA
(torch._C._nn.scaled_dot_product_attention) and the candidate alternate on every call; a run's figure is the
median of those differences. A bare Python wrapper that only forwards SDPA's arguments is the floor for any
Python-level dispatch.

Each run is a fresh subprocess with PYTHONPATH at one tree; with --baseline-tree the two trees alternate run by
run (A B B A A B ...), so drift on a shared machine lands on both. The table gives, per tree, the median over
runs and the range (lowest..highest run). Import time: `import attn_tune.runtime` after `import torch`, in fresh
processes alternating the same way, and whether it loaded torch._dynamo.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent.parent
IMPORT_PROBE = (
    "import sys, time; import torch; t = time.perf_counter(); import attn_tune.runtime; "
    "d = time.perf_counter() - t; import json; "
    "print(json.dumps({'import_s': d, 'dynamo': 'torch._dynamo' in sys.modules, 'file': attn_tune.__file__}))"
)


def over_raw(raw: Callable, calls: list[tuple], fns: dict[str, Callable], reps: int,
              kwargs: dict[str, Any]) -> dict[str, float]:
    """Median microseconds each fn takes over raw SDPA on the same call, raw and fn alternating per call."""
    clock = time.perf_counter_ns
    diffs: dict[str, list[int]] = {name: [] for name in fns}
    for _ in range(reps):
        for args in calls:
            for name, fn in fns.items():
                t0 = clock()
                raw(*args, **kwargs)
                t1 = clock()
                fn(*args, **kwargs)
                t2 = clock()
                diffs[name].append((t2 - t1) - (t1 - t0))
    return {name: statistics.median(d) / 1000 for name, d in diffs.items()}


def worker() -> dict[str, Any]:
    """One run in this process: {case: microseconds over raw SDPA}, and the raw call's own median."""
    import torch

    import attn_tune
    from attn_tune import Problem
    from attn_tune.tuned_config import Entry, TunedConfig, device_info

    raw = torch._C._nn.scaled_dot_product_attention

    def bare_wrapper(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, *, scale=None,
                     enable_gqa=False):
        return raw(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                   enable_gqa=enable_gqa)

    torch.set_num_threads(1)
    torch.manual_seed(0)
    qd, cache = torch.randn(1, 8, 1, 64), torch.randn(1, 8, 600, 64)
    decode = [(qd, cache[:, :, :n], cache[:, :, :n]) for n in range(400, 600)]
    q = torch.randn(1, 2, 16, 8)
    tiny = [(q, q, q)] * 200
    entries = [Entry(problem=p, choice={"variant": "sdpa", "params": {}},
                     measured={"latency_ms": 1.0, "peak_bytes": 0, "rel_error": 0.0})
               for p in (Problem(batch=1, heads=8, q_len=1, kv_len=2048, head_dim=64),
                         Problem(batch=1, heads=2, q_len=32, head_dim=8, causal=True))]
    keeps_sdpa = TunedConfig(entries=entries, device=device_info("cpu"))
    out: dict[str, Any] = {"file": attn_tune.__file__, "torch": torch.__version__}
    with torch.no_grad():
        for label, config in (("no config", None), ("config", keeps_sdpa)):
            with attn_tune.use_config(config):
                for pattern, calls, kwargs, reps in (("decode", decode, {}, 12), ("tiny", tiny, {"is_causal": True}, 25)):
                    over = over_raw(raw, calls, {"bare": bare_wrapper, "attention": attn_tune.attention}, reps,
                                     kwargs)
                    out[f"{pattern}, {label}: bare wrapper"] = over["bare"]
                    out[f"{pattern}, {label}: attention"] = over["attention"]
        for pattern, calls, kwargs in (("decode", decode, {}), ("tiny", tiny, {"is_causal": True})):
            times = []
            for args in calls * 5:
                t0 = time.perf_counter_ns()
                raw(*args, **kwargs)
                times.append(time.perf_counter_ns() - t0)
            out[f"{pattern}: raw SDPA itself"] = statistics.median(times) / 1000
    return out


def _run(tree: Path, args: list[str]) -> dict[str, Any]:
    env = dict(os.environ, PYTHONPATH=str(tree), OMP_NUM_THREADS="1")
    env.pop("ATTN_TUNE_CONFIG", None)
    done = subprocess.run([sys.executable, *args], env=env, cwd=tree, capture_output=True, text=True, check=False)
    if done.returncode:
        raise SystemExit(f"run under {tree} failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if not Path(result["file"]).resolve().is_relative_to(tree.resolve()):
        raise SystemExit(f"PYTHONPATH={tree} imported attn_tune from {result['file']}")
    return result


def _orders(trees: dict[str, Path], runs: int) -> list[str]:
    """A B B A A B ...: each tree first as often as second."""
    names = list(trees)
    order: list[str] = []
    for i in range(runs):
        order += names if i % 2 == 0 else names[::-1]
    return order


def _table(results: dict[str, list[dict[str, Any]]], keys: list[str], unit: str, fmt: str) -> None:
    names = list(results)
    print("| case | " + " | ".join(f"{n}: median ({unit}) | {n}: range" for n in names) + " |")
    print("|---|" + "---|---|" * len(names))
    for key in keys:
        cells = []
        for name in names:
            values = [r[key] for r in results[name]]
            cells += [format(statistics.median(values), fmt),
                      f"{format(min(values), fmt)} .. {format(max(values), fmt)}"]
        print(f"| {key} | " + " | ".join(cells) + " |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline-tree", type=Path, help="another checkout to time beside this one")
    parser.add_argument("--runs", type=int, default=8, help="fresh processes per tree for the per-call figures")
    parser.add_argument("--import-runs", type=int, default=10, help="fresh processes per tree for import time")
    parser.add_argument("--json", type=Path, help="write every run's figures here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker()))
        return 0
    trees = {"before": args.baseline_tree, "after": HERE} if args.baseline_tree else {"this tree": HERE}
    calls: dict[str, list[dict[str, Any]]] = {name: [] for name in trees}
    imports: dict[str, list[dict[str, Any]]] = {name: [] for name in trees}
    for name in _orders(trees, args.import_runs):
        imports[name].append(_run(trees[name], ["-c", IMPORT_PROBE]))
    for name in _orders(trees, args.runs):
        calls[name].append(_run(trees[name], [str(Path(__file__).resolve()), "--worker"]))
        print(f"  {name}: decode {calls[name][-1]['decode, no config: attention']:+.2f} / "
              f"{calls[name][-1]['decode, config: attention']:+.2f} us over raw", file=sys.stderr, flush=True)
    first = next(iter(calls.values()))[0]
    print(f"torch {first['torch']}, {os.cpu_count()} CPUs; " + ", ".join(f"{n} = {t}" for n, t in trees.items()))
    print(f"{args.runs} runs per tree, alternating; per run the median of per-call differences (us over raw SDPA)\n")
    keys = [k for k in first if k not in ("file", "torch") and "raw SDPA itself" not in k]
    _table(calls, [k for k in first if "raw SDPA itself" in k] + keys, "us", ".2f")
    print(f"\n`import attn_tune.runtime` after `import torch`, {args.import_runs} fresh processes per tree\n")
    for run in (r for rs in imports.values() for r in rs):
        run["import_ms"] = run["import_s"] * 1000
    _table(imports, ["import_ms"], "ms", ".0f")
    for name, runs in imports.items():
        print(f"{name}: loads torch._dynamo: {sorted({r['dynamo'] for r in runs})}")
    if args.json:
        args.json.write_text(json.dumps({"trees": {n: str(t) for n, t in trees.items()}, "calls": calls,
                                         "imports": imports}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
