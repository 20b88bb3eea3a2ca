"""The config in use: set by `use_config` (globally, or for a `with` block) or by `ATTN_TUNE_CONFIG`."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Callable

from attn_tune.runtime.lookup import ConfigIndex
from attn_tune.staleness import local_devices, stale_report
from attn_tune.tuned_config import ConfigError, TunedConfig, load_config

__all__ = ["use_config", "active_index", "on_change", "warn_other_device", "epoch", "ENV_VAR"]

ENV_VAR = "ATTN_TUNE_CONFIG"

_UNSET = object()
_state: dict[str, object] = {"index": _UNSET, "label": None}
_listeners: list[Callable[[], None]] = []
_warned: set[tuple[int, str]] = set()
_epoch = 0  # counts use_config changes; compiled graphs are guarded on it


def epoch() -> int:
    """A number that changes whenever `use_config` changes the config in use (compiled graphs guard on it)."""
    return _epoch


def on_change(listener: Callable[[], None]) -> None:
    """Call `listener` whenever the config in use changes (the dispatcher drops its cached routes)."""
    _listeners.append(listener)


def _set(config: TunedConfig | None, label: str | None) -> None:
    """Index `config` for lookups; if entries were measured under other versions or devices, warn once, naming it."""
    if config is None:
        _state["index"] = None
    else:
        local = local_devices()
        report = stale_report(config, label or "the config", local)
        if report.message:
            warnings.warn(report.message, RuntimeWarning, stacklevel=4)
        _state["index"] = ConfigIndex(config, {kind: d["name"] for kind, d in local.items()}, report)
    _state["label"] = label
    _notify()


def _notify() -> None:
    global _epoch
    _epoch += 1
    for listener in _listeners:
        listener()


def _load(source: str | os.PathLike | TunedConfig | None) -> tuple[TunedConfig | None, str | None]:
    if source is None or isinstance(source, TunedConfig):
        return source, None if source is None else "a TunedConfig object"
    if isinstance(source, (str, os.PathLike)):
        return load_config(source), str(source)
    raise TypeError(f"use_config takes a path, a TunedConfig or None, not {type(source).__name__}")


class use_config:  # noqa: N801 - used like a function, as torch.no_grad
    """Use a tuned config for every `attn_tune.attention` call: globally, or inside a `with` block only.

    `use_config("tuned.json")` applies from now on; `with use_config("tuned.json"): ...` restores the previous
    config on leaving; `use_config(None)` goes back to the default policy (SDPA).

    Raises:
        ConfigError: the file cannot be read, is not a config, or is a newer version (one line).
    """

    def __init__(self, source: str | os.PathLike | TunedConfig | None) -> None:
        self._previous = (_state["index"], _state["label"])
        config, label = _load(source)
        _set(config, label)

    def __enter__(self) -> use_config:
        return self

    def __exit__(self, *exc: object) -> None:
        _state["index"], _state["label"] = self._previous
        _notify()


def active_index() -> tuple[ConfigIndex | None, str | None]:
    """The index of the config in use and where it came from; the first call reads `ATTN_TUNE_CONFIG`."""
    if _state["index"] is _UNSET:
        path = os.environ.get(ENV_VAR)
        if path:
            try:
                _set(load_config(Path(path)), f"{ENV_VAR}={path}")
            except ConfigError as exc:
                raise ConfigError(f"{ENV_VAR}: {exc}") from None
        else:
            _set(None, None)
    return _state["index"], _state["label"]  # type: ignore[return-value]


def warn_other_device(index: ConfigIndex, label: str | None, device_type: str) -> str:
    """The reason a config measured on other device types is not used here; warned once per config and type."""
    reason = (
        f"the config ({label}) was tuned on {', '.join(index.device_types) or 'no device'}, "
        f"this call runs on {device_type}: using the default policy"
    )
    if (id(index), device_type) not in _warned:
        _warned.add((id(index), device_type))
        warnings.warn(f"attn-tune: {reason}", RuntimeWarning, stacklevel=4)
    return reason
