"""The tuned config (JSON, DESIGN section 5): build, validate, read, write atomically, merge."""

from __future__ import annotations

import datetime
import json
import os
import platform
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from attn_tune.errors import AttnTuneError, InvalidProblem
from attn_tune.problem import Problem
from attn_tune.registry.plugins import own_version
from attn_tune.registry.variant import DEFAULT_VARIANT

__all__ = ["FORMAT", "VERSION", "ConfigError", "Entry", "TunedConfig", "device_info", "load_config", "merge_configs",
           "choice_label"]

FORMAT = "attn-tune/config"
VERSION = 1


class ConfigError(AttnTuneError):
    """A file that is not a tuned config this attn-tune can read; the message says what is wrong, in one line."""


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine() or "cpu"


def device_info(device: str) -> dict[str, Any]:
    """What a measurement ran on: type, model name, and CPU threads or CUDA capability."""
    import torch

    if device.startswith("cuda"):
        index = torch.device(device).index or 0
        major, minor = torch.cuda.get_device_capability(index)
        return {"type": "cuda", "name": torch.cuda.get_device_name(index), "capability": f"{major}.{minor}"}
    return {"type": "cpu", "name": _cpu_name(), "threads": torch.get_num_threads()}


@dataclass
class Entry:
    """The choice for one problem, with its measured figures and the candidates it beat."""

    problem: Problem
    choice: dict[str, Any]
    measured: dict[str, Any]
    max_error: float = 0.0
    candidates: list[dict[str, Any]] = field(default_factory=list)
    trials: int = 0
    device: dict[str, Any] | None = None
    measured_with: dict[str, str] | None = None  # torch, build, attn_tune, package, package_version (staleness.py)
    tuning: dict[str, Any] | None = None  # wall_s, first_calls_s, and cut_short (why) when a timeout stopped it
    head_to_head: dict[str, Any] | None = None  # each finalist's latency ratio to sdpa, its interval, the decision
    error_inputs: str | None = None  # what rel_error was measured on: "captured: N calls" or "random"
    settings: dict[str, Any] | None = None  # what it was tuned with: objective, max_error, memory_budget, variants,
    # activations {path, digest}; a re-tune (--stale-only) runs with the same

    def to_dict(self) -> dict[str, Any]:
        data = {
            "problem": self.problem.to_dict(),
            "choice": self.choice,
            "measured": self.measured,
            "max_error": self.max_error,
            "candidates": self.candidates,
            "trials": self.trials,
        }
        for key in ("device", "measured_with", "tuning", "head_to_head", "error_inputs", "settings"):
            if getattr(self, key) is not None:
                data[key] = getattr(self, key)
        return data

    def baseline_latency_ms(self, name: str = DEFAULT_VARIANT) -> float | None:
        """The latency measured for variant `name` (default params) among the candidates, if any."""
        for c in self.candidates:
            if c.get("variant") == name and c.get("status") == "ok" and not c.get("params"):
                return c.get("latency_ms")
        return None


@dataclass
class TunedConfig:
    """A list of entries plus where and with what they were measured."""

    entries: list[Entry]
    device: dict[str, Any]
    created: str = field(default_factory=lambda: datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"))
    attn_tune: str = ""
    torch: str = ""
    validation: dict[str, Any] | None = None  # end to end (tune --validate): the model, its loss change, drops

    def to_dict(self) -> dict[str, Any]:
        data = {
            "format": FORMAT,
            "version": VERSION,
            "created": self.created,
            "attn_tune": self.attn_tune,
            "torch": self.torch,
            "device": self.device,
            "entries": [e.to_dict() for e in self.entries],
        }
        if self.validation is not None:
            data["validation"] = self.validation
        return data

    @classmethod
    def from_dict(cls, data: Any) -> TunedConfig:
        """Validate and build; anything foreign or malformed raises `ConfigError` with one line."""
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            found = data.get("format") if isinstance(data, dict) else type(data).__name__
            raise ConfigError(f"not an attn-tune config (format {found!r}, expected {FORMAT!r})")
        version = data.get("version")
        if not isinstance(version, int) or isinstance(version, bool):
            raise ConfigError(f"config version must be an integer, got {version!r}")
        if version > VERSION:
            raise ConfigError(f"config version {version} is newer than this attn-tune reads ({VERSION}); upgrade attn-tune")
        if not isinstance(data.get("entries"), list) or not isinstance(data.get("device"), dict):
            raise ConfigError("malformed config: 'entries' must be a list and 'device' an object")
        entries = []
        for i, raw in enumerate(data["entries"]):
            try:
                entries.append(_entry_from_dict(raw))
            except (InvalidProblem, KeyError, TypeError, ValueError) as exc:
                raise ConfigError(f"malformed config entry {i}: {exc}") from None
        try:
            validation = _optional_object(data, "validation")
        except TypeError as exc:
            raise ConfigError(f"malformed config: {exc}") from None
        return cls(entries=entries, device=data["device"], created=str(data.get("created", "")),
                   attn_tune=str(data.get("attn_tune", "")), torch=str(data.get("torch", "")), validation=validation)

    def save(self, path: str | os.PathLike) -> None:
        """Write atomically: a temporary file in the same folder, then a rename; never a half-written config."""
        write_atomically(path, json.dumps(self.to_dict(), indent=2) + "\n")


def _entry_from_dict(raw: Any) -> Entry:
    if not isinstance(raw, dict):
        raise TypeError("an entry must be an object")
    missing = [k for k in ("problem", "choice", "measured") if k not in raw]
    if missing:
        raise KeyError(f"lacks {', '.join(missing)}")
    choice = raw["choice"]
    if not isinstance(choice, dict) or not isinstance(choice.get("variant"), str):
        raise TypeError("choice must be an object with a 'variant' name")
    if not isinstance(choice.get("params", {}), dict) or not isinstance(raw["measured"], dict):
        raise TypeError("choice.params and measured must be objects")
    return Entry(
        problem=Problem.from_dict(raw["problem"]),
        choice={"variant": choice["variant"], "params": dict(choice.get("params", {}))},
        measured=raw["measured"],
        max_error=float(raw.get("max_error", 0.0)),
        candidates=list(raw.get("candidates", [])),
        trials=int(raw.get("trials", 0)),
        device=raw.get("device"),
        measured_with=_optional_object(raw, "measured_with"),
        tuning=_optional_object(raw, "tuning"),
        head_to_head=_optional_object(raw, "head_to_head"),
        error_inputs=_optional_string(raw, "error_inputs"),
        settings=_optional_object(raw, "settings"),
    )


def _optional_string(raw: dict[str, Any], key: str) -> str | None:
    value = raw.get(key)
    if value is not None and not isinstance(value, str):
        raise TypeError(f"{key} must be a string")
    return value


def _optional_object(raw: dict[str, Any], key: str) -> dict[str, Any] | None:
    value = raw.get(key)
    if value is not None and not isinstance(value, dict):
        raise TypeError(f"{key} must be an object")
    return value


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_atomically(path: str | os.PathLike, text: str | bytes) -> None:
    """Replace `path` with `text` in one rename; on any failure the old file (if any) is untouched."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent if str(path.parent) else ".")
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; a config is an ordinary file
        with os.fdopen(fd, "wb") as f:
            f.write(text.encode() if isinstance(text, str) else text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_config(path: str | os.PathLike) -> TunedConfig:
    """Read and validate a tuned config.

    Raises:
        ConfigError: unreadable, not JSON, another format, a newer version, or malformed.
    """
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path} is not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})") from None
    try:
        return TunedConfig.from_dict(data)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def merge_configs(configs: Sequence[TunedConfig], labels: Sequence[str] | None = None, prefer: str | None = "last",
                  on_conflict: Callable[[str], None] | None = None) -> TunedConfig:
    """One config holding every entry, each keeping the device it was measured on.

    Two entries for one problem on one device (type and name) that choose the same are one entry (the later
    config's figures); choosing differently is a conflict: `prefer` "first" or "last" says which config wins (and
    `on_conflict` hears a line naming both), None refuses.

    Raises:
        ConfigError: a conflict without `prefer`, naming the problem and both files.
    """
    import torch

    labels = list(labels or [f"config {i + 1}" for i in range(len(configs))])
    taken: dict[tuple, tuple[Entry, str]] = {}  # key -> (entry, the label of the config it came from)
    for config, label in zip(configs, labels):
        for entry in config.entries:
            device = entry.device or config.device
            key = (entry.problem, device.get("type"), device.get("name"))
            new = Entry(**{**entry.__dict__, "device": device})
            held = taken.get(key)
            if held is not None and held[0].choice != new.choice:
                if prefer is None:
                    raise ConfigError(f"{held[1]} and {label} choose differently for {entry.problem.describe()} on "
                                      f"{device.get('name', device.get('type'))} ({choice_label(held[0].choice)} "
                                      f"against {choice_label(new.choice)}): give --prefer first or --prefer last")
                kept, dropped = (held, (new, label)) if prefer == "first" else ((new, label), held)
                if on_conflict is not None:
                    on_conflict(f"{entry.problem.describe()}: kept {choice_label(kept[0].choice)} from {kept[1]} over "
                                f"{choice_label(dropped[0].choice)} from {dropped[1]}")
                if prefer == "first":
                    continue
            taken[key] = (new, label)
    merged = {key: entry for key, (entry, _) in taken.items()}
    devices = {(e.device["type"], e.device.get("name")) for e in merged.values()}
    if len(devices) == 1:
        top = next(iter(merged.values())).device
    else:
        top = {"type": "mixed", "name": f"{len(devices)} devices"}
    return TunedConfig(entries=list(merged.values()), device=top, attn_tune=own_version(), torch=torch.__version__)


def choice_label(choice: dict[str, Any]) -> str:
    """A choice as people read it: `local(local_window=256)`, or the bare name when it has no knobs."""
    knobs = ",".join(f"{k}={v}" for k, v in (choice.get("params") or {}).items())
    return f"{choice['variant']}({knobs})" if knobs else choice["variant"]
