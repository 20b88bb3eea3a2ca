"""What a tuned entry was measured with, and what has changed since: the basis of stale-config warnings.

Policy (docs/staleness.md): an entry measured under another torch, attn-tune, plugin version or
device is *stale*. A stale exact choice is still used: it stays correct, only its speed is in doubt. A stale
approximate choice whose variant's package changed version is not used: its error is no longer known, so the
exact fallback runs. One warning per config names what changed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from attn_tune.registry.catalog import catalog
from attn_tune.registry.plugins import own_version, plugin_records
from attn_tune.tuned_config import Entry, TunedConfig, device_info

__all__ = ["Change", "measured_with", "local_devices", "changes", "is_retired", "StaleReport", "stale_report"]


@dataclass(frozen=True)
class Change:
    """One thing an entry's figures depended on that is different here: `what` went from `was` to `now`."""

    what: str
    was: str
    now: str

    def __str__(self) -> str:
        return f"{self.what} {self.was} -> {self.now}"


def _build() -> str:
    import torch

    return f"cuda {torch.version.cuda}" if torch.version.cuda else "cpu"


def measured_with(variant_name: str) -> dict[str, str]:
    """The versions a measurement of `variant_name` depends on here: torch and its build, attn-tune, and the
    package (and version) of the plugin that provides the variant ("attn-tune" for built-ins)."""
    import torch

    record = {"torch": torch.__version__, "build": _build(), "attn_tune": own_version()}
    origin = catalog().origin.get(variant_name)
    plugin = next((r for r in plugin_records() if r.name == origin), None)
    if plugin is not None:
        record["package"] = plugin.package or plugin.module
        record["package_version"] = plugin.version or "unknown"
    return record


def local_devices() -> dict[str, dict[str, Any]]:
    """`device_info` of this machine's CPU and (if any) current CUDA device, by device type."""
    import torch

    devices = {"cpu": device_info("cpu")}
    if torch.cuda.is_available():
        devices["cuda"] = device_info(f"cuda:{torch.cuda.current_device()}")
    return devices


def _device_label(device: dict[str, Any]) -> str:
    extra = f", {device['threads']} threads" if "threads" in device else f", sm {device['capability']}" if "capability" in device else ""
    return f"{device.get('name', '?')}{extra}"


def changes(entry: Entry, config_device: dict[str, Any], here: dict[str, dict[str, Any]]) -> list[Change]:
    """What differs between the entry's record and this machine; [] for entries that recorded nothing.

    `here` maps device type to `device_info` on this machine (`local_devices()`); an entry for a type this machine
    lacks is not compared (it is not used here either).
    """
    recorded = entry.measured_with or {}
    found: list[Change] = []
    if recorded:
        now = measured_with(entry.choice["variant"])
        for key, label in (("torch", "torch"), ("build", "torch build"), ("attn_tune", "attn-tune")):
            if key in recorded and recorded[key] != now[key]:
                found.append(Change(label, recorded[key], now[key]))
        package = recorded.get("package")
        if package not in (None, "attn-tune") and now.get("package") == package \
                and recorded.get("package_version") != now.get("package_version"):
            found.append(Change(package, str(recorded.get("package_version")), str(now.get("package_version"))))
    device = entry.device or config_device
    local = here.get(device.get("type", ""))
    if local is not None and _device_label(device) != _device_label(local):
        found.append(Change("device", _device_label(device), _device_label(local)))
    return found


def is_retired(entry: Entry, found: list[Change]) -> bool:
    """An approximate choice whose variant's package (attn-tune for built-ins) changed version: not used."""
    variant = catalog().by_name.get(entry.choice["variant"])
    if variant is None or variant.exact:
        return False
    package = (entry.measured_with or {}).get("package", "attn-tune")
    return any(c.what == package for c in found)


@dataclass
class StaleReport:
    """Per entry (by position) what changed, which entries are retired, and the one warning to give (or None)."""

    changed: dict[int, list[Change]]
    retired: set[int]
    message: str | None


def stale_report(config: TunedConfig, label: str, here: dict[str, dict[str, Any]]) -> StaleReport:
    """Compare every entry of `config` (read from `label`) with this machine (`here`: `local_devices()`), for one
    summary warning."""
    changed = {i: found for i, e in enumerate(config.entries) if (found := changes(e, config.device, here))}
    # A merged config holds other machines' entries beside this one's; those are not used here, so not stale.
    local = {e.problem for i, e in enumerate(config.entries) if not any(c.what == "device" for c in changed.get(i, []))}
    changed = {i: found for i, found in changed.items()
               if not (config.entries[i].problem in local and any(c.what == "device" for c in found))}
    retired = {i for i, found in changed.items() if is_retired(config.entries[i], found)}
    if not changed:
        return StaleReport(changed, retired, None)
    counts: dict[Change, int] = {}
    for found in changed.values():
        for change in found:
            counts[change] = counts.get(change, 0) + 1
    what = "; ".join(f"{c} ({n} {'entry' if n == 1 else 'entries'})" for c, n in counts.items())
    fate = f"{len(changed) - len(retired)} still used, marked stale"
    if retired:
        fate += f"; {len(retired)} approximate choice(s) not used (their error is no longer known): exact runs instead"
    path = "TUNED.json" if label.startswith("a TunedConfig") else label.split("=", 1)[-1]
    message = (f"attn-tune: {label}: {len(changed)} of {len(config.entries)} entries were measured under other "
               f"conditions: {what}. {fate}. Re-tune them: attn-tune tune --config {path} --stale-only --out {path}")
    return StaleReport(changed, retired, message)
