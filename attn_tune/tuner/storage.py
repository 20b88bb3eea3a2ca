"""Optuna storage from a URL: opened with a heartbeat, password never shown, failure reported in one line."""

from __future__ import annotations

import re
from pathlib import Path

import optuna

from attn_tune.errors import AttnTuneError

__all__ = ["StorageError", "open_storage", "redact", "default_storage_url"]

_PASSWORD = re.compile(r"(://[^:/@]*):[^@]*@")


class StorageError(AttnTuneError):
    """A storage URL that cannot be opened or reached."""


def redact(url: str) -> str:
    """The URL with any password replaced by ***: postgresql://user:***@host/db."""
    return _PASSWORD.sub(r"\1:***@", url)


def default_storage_url(out: str | Path) -> str:
    """An SQLite file beside the output (tuned.json -> tuned.optuna.db), so an interrupted run resumes."""
    path = Path(out)
    return f"sqlite:///{path.with_name(path.stem + '.optuna.db').resolve()}"


def open_storage(url: str | None) -> optuna.storages.BaseStorage | None:
    """None for in-memory; otherwise an RDB storage whose trials send a heartbeat, so a killed worker's
    running trial can later be recognised as stale.

    Raises:
        StorageError: the URL is malformed, its driver is missing, or the server cannot be reached.
    """
    if url is None:
        return None
    try:
        return optuna.storages.RDBStorage(url, heartbeat_interval=60, grace_period=180)
    except Exception as exc:  # sqlalchemy raises ArgumentError, OperationalError, ModuleNotFoundError, ...
        first = " ".join(str(exc).split("\n")[0].split())[:200]
        raise StorageError(f"cannot open storage {redact(url)}: {type(exc).__name__}: {redact(first)}") from None
