"""The plugin manager: built-in families and entry-point plugins, loaded lazily, failures recorded not raised."""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import threading
from dataclasses import dataclass, field

import pluggy

from attn_tune.errors import one_line
from attn_tune.registry import hookspecs

__all__ = ["pm", "BUILTIN_PLUGINS", "ENTRY_POINT_GROUP", "PluginRecord", "load_plugins", "plugin_records"]

ENTRY_POINT_GROUP = "attn_tune"
DISABLE_ENV = "ATTN_TUNE_DISABLE_PLUGINS"

BUILTIN_PLUGINS: tuple[str, ...] = (
    "attn_tune.families.dense",
    "attn_tune.families.sdpa",
    "attn_tune.families.chunked",
    "attn_tune.families.xformers_mea",
    "attn_tune.families.flash_attn",
    "attn_tune.families.windowed",
    "attn_tune.families.flex",
    "attn_tune.families.blocksparse",
    "attn_tune.families.xformers_blocksparse",
    "attn_tune.families.linformer",
    "attn_tune.families.sdpa_unpadded",
)

pm = pluggy.PluginManager("attn_tune")
pm.add_hookspecs(hookspecs)


@dataclass
class PluginRecord:
    """Where a plugin came from and what went wrong with it, for `attn-tune plugins`."""

    name: str
    module: str
    package: str | None = None
    version: str | None = None
    builtin: bool = False
    error: str | None = None
    disabled: bool = False
    variants: list[str] = field(default_factory=list)


_records: dict[str, PluginRecord] = {}
_loaded = False
_lock = threading.Lock()


def _disabled_names() -> set[str]:
    raw = os.environ.get(DISABLE_ENV, "")
    return {part.strip() for part in raw.split(",") if part.strip()}


def _register(module: object, record: PluginRecord) -> None:
    """Register one plugin module; a misspelled hook name unregisters it and records why."""
    try:
        pm.register(module, name=record.name)
        pm.check_pending()
    except Exception as exc:  # pluggy raises ValueError / PluginValidationError
        if pm.is_registered(module):
            pm.unregister(module)
        record.error = one_line(exc)


def own_version() -> str:
    """attn-tune's installed version, from its distribution metadata (the package root is not imported for it)."""
    try:
        return importlib.metadata.version("attn-tune")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def load_plugins() -> None:
    """Register built-in plugins, then entry-point plugins; safe to call often (it runs once)."""
    global _loaded
    if _loaded:
        return
    with _lock:
        if _loaded:
            return
        version = own_version()
        for module_name in BUILTIN_PLUGINS:
            record = PluginRecord(
                name=module_name, module=module_name, package="attn-tune", version=version, builtin=True
            )
            _records[record.name] = record
            _register(importlib.import_module(module_name), record)
        disabled = _disabled_names()
        for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            dist = getattr(ep, "dist", None)
            record = PluginRecord(
                name=ep.name,
                module=ep.value,
                package=dist.metadata["Name"] if dist is not None else None,
                version=dist.version if dist is not None else None,
            )
            if ep.name in _records:
                record.error = f"plugin name {ep.name!r} is already taken by {_records[ep.name].module}"
                _records[f"{ep.name} ({ep.value})"] = record
                continue
            _records[ep.name] = record
            if "all" in disabled or ep.name in disabled:
                record.disabled = True
                continue
            try:
                module = ep.load()
            except BaseException as exc:  # a broken plugin must not stop the others (SystemExit included)
                if isinstance(exc, KeyboardInterrupt):
                    raise
                record.error = f"import failed: {one_line(exc)}"
                continue
            _register(module, record)
        _loaded = True


def plugin_records() -> list[PluginRecord]:
    """Every plugin seen, loaded or not, including ones registered directly on `pm` (tests, notebooks)."""
    load_plugins()
    records = list(_records.values())
    known = {r.name for r in records}
    for name, plugin in pm.list_name_plugin():
        if name not in known and plugin is not None:
            records.append(PluginRecord(name=name, module=getattr(plugin, "__name__", repr(plugin))))
    return records
