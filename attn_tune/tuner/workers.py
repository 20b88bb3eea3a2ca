"""Worker processes sharing one study per problem through an RDB storage (`attn-tune tune --workers N`).

Each worker is `python -m attn_tune.tuner.workers`, given its job as JSON on stdin and the storage URL in the
environment (never on its command line, where `ps` would show a password). Workers on other machines are simply
more `attn-tune tune --storage URL` processes: the study name (problem, device, variants, objective) is the same
for the same device kind, so they share its trials; other device kinds get studies of their own.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import time
from typing import Any, Callable, Sequence

from attn_tune.errors import AttnTuneError
from attn_tune.problem import Problem
from attn_tune.registry import get_variant
from attn_tune.registry.space import quiet_optuna
from attn_tune.registry.variant import Variant
from attn_tune.tuned_config import device_info
from attn_tune.tuner.storage import open_storage, redact
from attn_tune.tuner.study import inputs_key, prepare_study, run_trials
from attn_tune.tuner.trial import finished_trials

__all__ = ["run_workers", "work", "STORAGE_ENV"]

STORAGE_ENV = "ATTN_TUNE_STORAGE_URL"


def _function_path(fn: Callable[..., Any]) -> str:
    path = f"{fn.__module__}:{fn.__qualname__}"
    if "<" in path:
        raise AttnTuneError(f"a worker cannot import the measure function {path}; give a module-level one")
    return path


def _load_function(path: str) -> Callable[..., Any]:
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


def run_workers(
    count: int, storage_url: str, problems: Sequence[Problem], *, pool: Sequence[Variant], trials: int,
    seed: int | None, measure_fn: Callable[..., Any], measure_kwargs: dict[str, Any], studies: Sequence[Any],
    on_trial: Callable[[Problem, int, int], None] | None, objective: str, max_error: float | None,
    memory_budget: int | None,
) -> list[int]:
    """Start `count` workers on the prepared studies, report progress from the storage, return their exit codes.

    A worker killed on the way is not waited for: its running trial is retried by the others (or by the caller).
    """
    job = {
        "problems": [p.to_dict() for p in problems], "variants": [v.name for v in pool], "trials": trials,
        "seed": seed, "measure": _function_path(measure_fn), "measure_kwargs": measure_kwargs,
        "objective": objective, "max_error": max_error, "memory_budget": memory_budget,
    }
    import torch

    gpus = torch.cuda.device_count() if all(p.device == "cuda" for p in problems) else 0
    procs = []
    for index in range(count):
        env = {**os.environ, STORAGE_ENV: storage_url}
        if gpus > 1:
            env["CUDA_VISIBLE_DEVICES"] = str(index % gpus)  # each worker measures on its own GPU
        proc = subprocess.Popen([sys.executable, "-m", "attn_tune.tuner.workers"], stdin=subprocess.PIPE,
                                stdout=subprocess.DEVNULL, env=env, text=True)
        proc.stdin.write(json.dumps({**job, "index": index}))
        proc.stdin.close()
        procs.append(proc)
    try:
        while any(p.poll() is None for p in procs):
            _report(studies, on_trial)
            time.sleep(0.5)
    except BaseException:
        for p in procs:
            p.terminate()
        raise
    return [p.returncode for p in procs]


def _report(studies: Sequence[Any], on_trial: Callable[[Problem, int, int], None] | None) -> None:
    """Progress of the first study not yet done, read from the storage."""
    if on_trial is None:
        return

    for prepared in studies:
        done = finished_trials(prepared.study)
        if done < prepared.budget:
            on_trial(prepared.problem, done, prepared.budget)
            return


def work(job: dict[str, Any], storage_url: str) -> None:
    """One worker: for each problem, load (or create) its study and run trials until the study has its budget."""

    problems = [Problem.from_dict(p) for p in job["problems"]]
    pool = [get_variant(name) for name in job["variants"]]
    seed = None if job["seed"] is None else job["seed"] + 1 + job["index"]  # TPE: each worker samples its own way
    measure_fn = _load_function(job["measure"])
    limits = {k: job[k] for k in ("objective", "max_error", "memory_budget")}
    with quiet_optuna():
        storage = open_storage(storage_url)
        for problem in problems:
            prepared = prepare_study(problem, pool=pool, trials=job["trials"], max_error=job["max_error"],
                                     objective=job["objective"], storage=storage, seed=seed,
                                     device=device_info(problem.device),
                                     inputs_key=inputs_key(job["measure_kwargs"]))
            if not isinstance(prepared, str):
                run_trials(prepared, measure_fn=measure_fn, measure_kwargs=job["measure_kwargs"], **limits)


def main() -> None:
    """`python -m attn_tune.tuner.workers`: the job on stdin, the storage URL in ATTN_TUNE_STORAGE_URL."""

    try:
        work(json.load(sys.stdin), os.environ[STORAGE_ENV])
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as exc:  # one redacted line; never a traceback that could carry the URL
        print(f"attn-tune worker: {type(exc).__name__}: {redact(' '.join(str(exc).split()))[:300]}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
