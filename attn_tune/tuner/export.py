"""`attn-tune export`: the tuned config held by a storage, one entry per finished study, each with its device."""

from __future__ import annotations

import datetime
from pathlib import Path

import optuna

from attn_tune.errors import AttnTuneError
from attn_tune.tuned_config import Entry, TunedConfig, _entry_from_dict, merge_configs
from attn_tune.tuner.storage import StorageError, open_storage

__all__ = ["export_config"]

_EPOCH = datetime.datetime.min


def export_config(storage_url: str) -> tuple[TunedConfig, list[str]]:
    """Entries of every attn-tune study in the storage that has made its choice, and a line per study that has not.

    A study's choice is made (and kept in the study) by the `tune` process that finishes it, on its own device;
    studies of several devices give a merged config whose entries carry their devices. Where two studies hold one
    problem on one device (another objective or variant set), the later one wins.

    Raises:
        StorageError: the storage cannot be opened or reached (an SQLite file that does not exist included: it
            is not created).
        AttnTuneError: no study in the storage has made a choice.
    """
    if storage_url.startswith("sqlite:///") and not Path(storage_url.removeprefix("sqlite:///")).is_file():
        raise StorageError(f"cannot open storage {storage_url}: the file does not exist")  # opening would create one
    storage = open_storage(storage_url)
    summaries = [s for s in optuna.get_all_study_summaries(storage, include_best_trial=False)
                 if s.study_name.startswith("attn-tune/")]
    by_device: dict[tuple[str, str], list[Entry]] = {}
    devices: dict[tuple[str, str], dict] = {}
    pending = []
    for summary in sorted(summaries, key=lambda s: s.datetime_start or _EPOCH):
        attrs = summary.user_attrs
        if "entry" not in attrs or "device" not in attrs:
            pending.append(f"{summary.study_name}: {summary.n_trials} trial(s), no choice yet "
                           "(run the same `attn-tune tune` again to finish it)")
            continue
        device = attrs["device"]
        key = (device.get("type", "?"), device.get("name", ""))
        devices[key] = device
        by_device.setdefault(key, []).append(_entry_from_dict(attrs["entry"]))
    if not by_device:
        raise AttnTuneError(f"no finished attn-tune study in this storage ({len(summaries)} unfinished)")
    return merge_configs([TunedConfig(entries=e, device=devices[k]) for k, e in by_device.items()]), pending
