"""The catalog: every variant the registered plugins contribute, by name, and whether each can run here."""

from __future__ import annotations

import difflib
import importlib
import logging
import warnings
from dataclasses import dataclass, field

from attn_tune.errors import UnknownVariant, one_line
from attn_tune.registry.plugins import load_plugins, pm
from attn_tune.registry.variant import Variant, malformed_reason

__all__ = ["Catalog", "catalog", "variants", "get_variant", "availability"]


@dataclass(frozen=True)
class Catalog:
    """Variants by name (registration order), the plugin each came from, and per-plugin collection errors."""

    by_name: dict[str, Variant] = field(default_factory=dict)
    origin: dict[str, str] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)


_cache: tuple[list[tuple[str, object]], Catalog] | None = None


def _collect() -> Catalog:
    impls = {id(impl.plugin): impl for impl in pm.hook.attn_tune_variants.get_hookimpls()}
    result = Catalog()
    for plugin_name, plugin in pm.list_name_plugin():
        impl = impls.get(id(plugin))
        if impl is None:
            continue
        try:
            contributed = list(impl.function())
        except Exception as exc:  # a plugin's hook that raises is reported, the others still load
            result.errors[plugin_name] = f"attn_tune_variants() raised {one_line(exc)}"
            continue
        problems = [reason for reason in map(malformed_reason, contributed) if reason]
        if problems:
            result.errors[plugin_name] = f"malformed variant: {problems[0]}"
            continue
        names = [v.name for v in contributed]
        clashes = [n for n in names if n in result.by_name]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if clashes:
            other = result.origin[clashes[0]]
            result.errors[plugin_name] = (
                f"variant name {clashes[0]!r} is registered by both plugin {other!r} and plugin {plugin_name!r}"
            )
        elif duplicates:
            result.errors[plugin_name] = f"variant name {duplicates[0]!r} is returned twice by plugin {plugin_name!r}"
        else:
            for variant in contributed:
                result.by_name[variant.name] = variant
                result.origin[variant.name] = plugin_name
    return result


def catalog() -> Catalog:
    """The current catalog; rebuilt only when the set of registered plugins changes."""
    global _cache
    load_plugins()
    # The key holds the plugin objects themselves (compared by identity): an id() of a plugin that was
    # unregistered and collected could be reused by the next one.
    key = list(pm.list_name_plugin())
    if (
        _cache is None
        or len(_cache[0]) != len(key)
        or any(n1 != n2 or p1 is not p2 for (n1, p1), (n2, p2) in zip(_cache[0], key))
    ):
        _cache = (key, _collect())
    return _cache[1]


def variants() -> list[Variant]:
    """Every registered variant, available here or not, in registration order."""
    return list(catalog().by_name.values())


def get_variant(name: str) -> Variant:
    """The variant called `name`.

    Raises:
        UnknownVariant: no such name; the message lists the close ones.
    """
    by_name = catalog().by_name
    try:
        return by_name[name]
    except KeyError:
        close = difflib.get_close_matches(name, list(by_name), n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else f"; known: {', '.join(by_name)}"
        raise UnknownVariant(f"unknown variant {name!r}{hint}") from None


_availability: dict[Variant, str | None] = {}  # keyed by value: equal variants are equally available


def _import_quietly(module: str) -> None:
    """Import `module` with its package's log warnings and Python warnings kept off the user's terminal."""
    logger = logging.getLogger(module.split(".")[0])
    saved = (logger.handlers[:], logger.propagate)
    logger.handlers, logger.propagate = [logging.NullHandler()], False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            importlib.import_module(module)
    finally:
        logger.handlers, logger.propagate = saved


def availability(variant: Variant) -> str | None:
    """None if `variant` can run on this install, else the reason (the real import or kernel-load error).

    Probed once per variant and cached; heavy optional imports happen only here, never at `import attn_tune`.
    """
    try:
        return _availability[variant]
    except KeyError:
        _availability[variant] = reason = _probe(variant)
        return reason
    except TypeError:  # a field that cannot be hashed: probe every time
        return _probe(variant)


def _probe(variant: Variant) -> str | None:
    for module in variant.requires:
        try:
            _import_quietly(module)
        except Exception as exc:  # ImportError, and OSError/RuntimeError from binary extensions
            return f"cannot import {module}: {one_line(exc)}"
    if variant.probe is not None:
        try:
            return variant.probe()
        except Exception as exc:
            return f"probe failed: {one_line(exc)}"
    return None
