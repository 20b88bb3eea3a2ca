"""The tuner against an exhaustive oracle on CPU problems, as a markdown table.

    python bench/tuner_vs_oracle.py            # 14 CPU float32 problems, about 15 minutes on 2 cores

For each problem: the oracle measures every available exact variant at every knob value of a small grid,
interleaved over rounds; the tuner searches with a budget of 40% of that count. Then the oracle's best, the
tuned choice and `sdpa` are measured once more head to head (5 interleaved rounds, each point once even when
two of them coincide), and their ratios reported.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import attn_tune
from attn_tune import Problem
from attn_tune.measurement.measure import measure
from attn_tune.tuner.space import eligible_variants, grid_points
from attn_tune.tuner.tune import tune
from attn_tune.tuner.job import TuneJob

SETTINGS = {"warmup": 1, "min_repeats": 3, "min_time_s": 0.0}
FINAL = {"warmup": 1, "min_repeats": 5, "min_time_s": 0.2}  # the closing comparison: longer, 5 rounds
SMALL_CHUNKS = (64, 256, 1024)


def _problems() -> list[Problem]:
    one = [Problem(batch=1, heads=8, q_len=n, head_dim=64, causal=c) for c in (False, True) for n in (128, 512, 2048, 8192)]
    four = [Problem(batch=4, heads=8, q_len=n, head_dim=64, causal=c) for c in (False, True) for n in (128, 512, 2048)]
    return one + four


def _points(problem: Problem) -> list[tuple[attn_tune.Variant, dict]]:
    """Every available exact variant; knobs thinned to a small grid (chunk 64, 256, 1024 where < q_len)."""
    pool, _ = eligible_variants(problem, [v for v in attn_tune.variants() if v.exact], approximate=False)
    by_name = {v.name: v for v in pool}
    points = []
    for raw in grid_points(problem, pool):
        name = raw.pop("variant")
        params = {k.split(":", 1)[1]: v for k, v in raw.items()}
        if "chunk" in params and params["chunk"] not in SMALL_CHUNKS and params["chunk"] != problem.q_len:
            continue
        points.append((by_name[name], params))
    return points


def _interleaved(points: list[tuple[attn_tune.Variant, dict]], problem: Problem, rounds: int,
                 settings: dict = SETTINGS) -> list[float]:
    """Median latency of each point over `rounds` interleaved rounds; a point listed twice is measured once."""
    keys = [json.dumps([v.name, p], sort_keys=True) for v, p in points]
    unique = dict(zip(keys, points))
    runs: dict[str, list[float]] = {k: [] for k in unique}
    for _ in range(rounds):
        for key, (variant, params) in unique.items():
            runs[key].append(measure(variant, problem, params, **settings).latency_ms)
    return [statistics.median(runs[k]) for k in keys]


def _label(variant: str, params: dict) -> str:
    return variant + ("(" + ",".join(f"{k}={v}" for k, v in params.items()) + ")" if params else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--budget", type=float, default=0.4, help="tuner trials as a fraction of the oracle's count")
    args = parser.parse_args()

    rows = []
    started = time.time()
    for i, problem in enumerate(_problems()):
        print(f"[{i + 1}/{len(_problems())}] {problem.describe()} ({time.time() - started:.0f} s)", file=sys.stderr)
        points = _points(problem)
        oracle = _interleaved(points, problem, args.rounds)
        best = min(range(len(points)), key=oracle.__getitem__)
        trials = max(1, int(args.budget * len(points)))
        job = TuneJob().updated(trials=trials, seed=0, trial_measure=SETTINGS, final_measure=SETTINGS, rounds=args.rounds)
        config = tune([problem], job)
        choice = config.entries[0].choice
        tuned = (attn_tune.get_variant(choice["variant"]), choice["params"])
        sdpa = (attn_tune.get_variant("sdpa"), {})
        final = _interleaved([points[best], tuned, sdpa], problem, rounds=5, settings=FINAL)
        rows.append({
            "problem": problem.describe(), "oracle": _label(points[best][0].name, points[best][1]),
            "tuned": _label(choice["variant"], choice["params"]), "tuned_vs_oracle": final[1] / final[0],
            "tuned_vs_sdpa": final[1] / final[2], "trials": config.entries[0].trials, "exhaustive": len(points),
            "latency_ms": final[1],
        })
    print(f"{len(rows)} problems in {time.time() - started:.0f} s; measure settings {json.dumps(SETTINGS)}, "
          f"{args.rounds} interleaved rounds\n")
    print("| problem | oracle best | tuned choice | tuned ms | tuned / oracle | tuned / sdpa | trials / exhaustive |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['problem']} | {r['oracle']} | {r['tuned']} | {r['latency_ms']:.2f} | {r['tuned_vs_oracle']:.3f} | "
              f"{r['tuned_vs_sdpa']:.3f} | {r['trials']} / {r['exhaustive']} |")
    worst = max(r["tuned_vs_oracle"] for r in rows)
    print(f"\nworst tuned / oracle: {worst:.3f}; within 5%: {sum(r['tuned_vs_oracle'] <= 1.05 for r in rows)} of {len(rows)}")


if __name__ == "__main__":
    main()
