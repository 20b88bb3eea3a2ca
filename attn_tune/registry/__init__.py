"""The registry: pluggy markers, the Variant type, plugin loading and the catalog of variants."""

from attn_tune.registry.catalog import Catalog, availability, catalog, get_variant, variants
from attn_tune.registry.hookspecs import hookimpl, hookspec
from attn_tune.registry.plugins import PluginRecord, load_plugins, plugin_records, pm
from attn_tune.registry.variant import DEFAULT_VARIANT, Variant, no_params, supports_all

__all__ = [
    "Catalog",
    "DEFAULT_VARIANT",
    "PluginRecord",
    "Variant",
    "availability",
    "catalog",
    "get_variant",
    "hookimpl",
    "hookspec",
    "load_plugins",
    "no_params",
    "plugin_records",
    "pm",
    "supports_all",
    "variants",
]
