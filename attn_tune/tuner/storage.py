"""Optuna storage from a URL: opened with a heartbeat and stale-trial retry, password never shown, failure in one line."""

from __future__ import annotations

import copy
import datetime
import importlib.util
import os
import re
import warnings
from pathlib import Path
from typing import Any

import optuna

from attn_tune.errors import AttnTuneError

__all__ = [
    "StorageError", "open_storage", "redact", "default_storage_url", "heartbeat_settings", "HEARTBEAT_ENV",
    "mark_started", "fail_dead_trials",
]

_PASSWORD = re.compile(r"(://[^:/@?#]*):[^/?#]*@")  # greedy: up to the last @ of the authority
_QUERY_PASSWORD = re.compile(r"([?&]password=)[^&#]*", re.IGNORECASE)
HEARTBEAT_ENV = "ATTN_TUNE_HEARTBEAT"  # seconds between a running trial's heartbeats; stale after 3 of them


class StorageError(AttnTuneError):
    """A storage URL that cannot be opened or reached."""


def redact(text: str) -> str:
    """`text` with every URL password replaced by ***: postgresql://user:***@host/db (also ?password=...)."""
    return _QUERY_PASSWORD.sub(r"\1***", _PASSWORD.sub(r"\1:***@", text))


def default_storage_url(out: str | Path) -> str:
    """An SQLite file beside the output (tuned.json -> tuned.optuna.db), so an interrupted run resumes."""
    path = Path(out)
    return f"sqlite:///{path.with_name(path.stem + '.optuna.db').resolve()}"


def heartbeat_settings() -> tuple[int, int]:
    """(interval, grace) in seconds: 10 and 30, or `ATTN_TUNE_HEARTBEAT` seconds and three times that.

    Short enough that rerunning a `kill -9`-ed tune waits at most half a minute for its orphaned trial; a beat is
    one small UPDATE per running trial, sent from a thread, so long measurements keep beating.
    """
    raw = os.environ.get(HEARTBEAT_ENV, "10")
    try:
        interval = int(raw)
    except ValueError:
        raise StorageError(f"{HEARTBEAT_ENV} must be a whole number of seconds, got {raw!r}") from None
    if interval < 1:
        raise StorageError(f"{HEARTBEAT_ENV} must be at least 1 second, got {interval}")
    return interval, 3 * interval


def _driver_url(url: str) -> str:
    """`postgresql://` means psycopg2 to SQLAlchemy; with only psycopg (3) installed, say so explicitly."""
    if url.startswith("postgresql://") and importlib.util.find_spec("psycopg2") is None \
            and importlib.util.find_spec("psycopg") is not None:
        return "postgresql+psycopg://" + url[len("postgresql://"):]
    return url


class _RetryStale(optuna.storages.RetryHeartbeatStaleTrialCallback):
    """Optuna's retry of a trial whose worker stopped beating, which also records why the trial failed."""

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        study.set_user_attr(f"failure:{trial.number}", {
            "variant": trial.params.get("variant"),
            "params": {k: v for k, v in trial.params.items() if k != "variant"},
            "reason": "its worker stopped sending heartbeats (killed or cut off); the trial was queued again",
        })
        super().__call__(study, trial)


_STARTED = "started_by_trial"  # set as the objective starts, inside Optuna's heartbeat; its value is the trial number


def mark_started(trial: optuna.Trial) -> None:
    """Record that this trial's objective began, so its heartbeat was running (Optuna starts it before)."""
    trial.set_user_attr(_STARTED, trial.number)


def fail_dead_trials(study: optuna.Study) -> None:
    """Fail, and queue again, the trials whose worker died: Optuna's stale heartbeats, and the trials killed between
    being created and their first heartbeat, which Optuna never counts as stale (no heartbeat row at all), so that
    every other worker would wait for them forever. Such a trial never reached its objective (`mark_started`) and
    is older than the grace period; a live worker goes from one to the other in milliseconds."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
    storage = study._storage  # Optuna's own fail_stale_trials reads it the same way
    if getattr(storage, "get_heartbeat_interval", lambda: None)() is None:
        return  # no heartbeat: an in-memory study has no other worker to die
    _, grace = heartbeat_settings()  # what open_storage gave the storage
    callback = storage.get_heartbeat_stale_trial_callback()
    now = datetime.datetime.now()
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        started = trial.user_attrs.get(_STARTED) == trial.number
        if started or trial.datetime_start is None or (now - trial.datetime_start).total_seconds() <= grace:
            continue
        try:
            if not storage.set_trial_state_values(trial._trial_id, state=optuna.trial.TrialState.FAIL):
                continue
        except optuna.exceptions.UpdateFinishedTrialError:
            continue  # another worker failed it first
        if callback is not None:
            callback(study, copy.deepcopy(storage.get_trial(trial._trial_id)))


def open_storage(url: str | None) -> optuna.storages.BaseStorage | None:
    """None for in-memory; otherwise an RDB storage whose running trials send a heartbeat: a trial whose worker
    died is marked failed once its heartbeat is stale and queued again (at most 3 times).

    Raises:
        StorageError: the URL is malformed, its driver is missing, or the server cannot be reached.
    """
    if url is None:
        return None
    interval, grace = heartbeat_settings()
    engine: dict[str, Any] = {}
    driver_url = _driver_url(url)
    if driver_url.startswith("postgresql"):
        engine["connect_args"] = {"connect_timeout": 10}
    elif driver_url.startswith("sqlite"):  # a tune and its heartbeat thread share the file: wait for its lock
        engine["connect_args"] = {"timeout": 60}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            storage = optuna.storages.RDBStorage(
                driver_url, engine_kwargs=engine, heartbeat_interval=interval, grace_period=grace,
                heartbeat_stale_trial_callback=_RetryStale(max_retry=3),
            )
        return storage
    except Exception as exc:  # sqlalchemy raises ArgumentError, OperationalError, ModuleNotFoundError, ...
        first = " ".join(str(exc).split("\n")[0].split())[:200]
        hint = ""
        if isinstance(exc, ModuleNotFoundError) and "psycopg" in str(exc):
            hint = " (install the extra: pip install 'attn-tune[postgres]')"
        raise StorageError(f"cannot open storage {redact(url)}: {type(exc).__name__}: {redact(first)}{hint}") from None
