"""Wall time of one study split between 1, 2 and 3 workers on one storage, and the twin trials they leave.

    python bench/distributed_workers.py --storage postgresql://user@127.0.0.1/db   # PGPASSWORD in the environment
    python bench/distributed_workers.py                                            # an SQLite file in a temp folder

The trials use the logged stand-in measurement of the tests (`tests/distributed_fakes.py`: a fixed sleep per
trial), so the figures show how the storage splits the work, not kernel timings; run from the repository root.
Two ways to start: `--workers N` (one process queues the points, then N workers take them) and N independent
`tune` processes started at once (each queues the points: twins appear and are failed, never measured).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import optuna

from attn_tune import Problem, get_variant
from attn_tune.registry.space import quiet_optuna
from attn_tune.tuner.storage import open_storage, redact
from attn_tune.tuner.tune import tune
from attn_tune.tuner.workers import STORAGE_ENV
from attn_tune.tuner.job import TuneJob

sys.path.insert(0, os.getcwd())
from tests.distributed_fakes import LOG_ENV, SECONDS_ENV, logged_measure  # noqa: E402

PROBLEM = Problem(batch=1, heads=2, q_len=4096, head_dim=16)  # 9 points: sdpa, dense, chunked x 7
POOL = ["sdpa", "dense", "chunked"]


def _clear(url: str) -> None:
    storage = open_storage(url)
    for name in optuna.get_all_study_names(storage):
        optuna.delete_study(study_name=name, storage=storage)


def _trials(url: str) -> tuple[int, int, int]:
    storage = open_storage(url)
    (name,) = optuna.get_all_study_names(storage)
    trials = optuna.load_study(study_name=name, storage=storage).trials
    done = sum(t.state.name in ("COMPLETE", "PRUNED") for t in trials)
    return done, sum(t.state.name == "FAIL" for t in trials), len(trials)


def _independent(url: str, count: int, env: dict[str, str]) -> None:
    job = {"problems": [PROBLEM.to_dict()], "variants": POOL, "trials": 20, "seed": 0,
           "measure": "tests.distributed_fakes:logged_measure", "measure_kwargs": {}, "objective": "latency",
           "max_error": None, "memory_budget": None}
    procs = []
    for index in range(count):
        p = subprocess.Popen([sys.executable, "-m", "attn_tune.tuner.workers"], stdin=subprocess.PIPE, text=True,
                             env={**env, STORAGE_ENV: url})
        p.stdin.write(json.dumps({**job, "index": index}))
        p.stdin.close()
        procs.append(p)
    for p in procs:
        p.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--storage", default=None)
    parser.add_argument("--seconds", type=float, default=1.0, help="stand-in measurement time per trial")
    args = parser.parse_args()
    tmp = tempfile.mkdtemp()
    url = args.storage or f"sqlite:///{tmp}/bench.db"
    env = {**os.environ, LOG_ENV: f"{tmp}/measure.log", SECONDS_ENV: str(args.seconds)}
    os.environ.update(env)
    print(f"storage {redact(url)}; 9 trials of {args.seconds:g} s each (stand-in measurement)\n")
    print("| start | workers | wall s | finished trials | twin / surplus trials (FAIL, not measured) | measurements |")
    print("|---|---|---|---|---|---|")
    for mode in ("--workers N", "independent"):
        for count in (1, 2, 3):
            _clear(url)
            open(env[LOG_ENV], "w").close()
            start = time.perf_counter()
            if mode == "--workers N":
                with quiet_optuna():
                    job = TuneJob().updated(trials=20, storage=url, variants=[get_variant(n) for n in POOL], seed=0,
                                            workers=count, finalists=1, rounds=1)
                    tune([PROBLEM], job, measure_fn=logged_measure)
            else:
                _independent(url, count, env)
            wall = time.perf_counter() - start
            done, failed, _ = _trials(url)
            with open(env[LOG_ENV]) as f:
                measured = sum('"done"' in line for line in f)
            print(f"| {mode} | {count} | {wall:.1f} | {done} | {failed} | {measured} |", flush=True)


if __name__ == "__main__":
    main()
