"""Python's own reference text (CPython 3.11.7's `pydoc_data.topics`, frozen and shipped) as characters.

The text was taken once from CPython 3.11.7's `pydoc_data.topics` (the text the bundled weights were trained on)
and ships in attn_tune/models/data/ (gzip, UTF-8): `pydoc_data.topics` changes between CPython patch releases, and
a held-out batch that differs by Python would change every figure quoted for the bundled models. Read from the
package, the text, and so every figure, is the same on every Python. `bench/freeze_reference_text.py` remakes it.

Topics are split by a hash of their name (one in ten held out). Some topics repeat others' sections (the special
methods appear under several names), so every paragraph of the held-out topics is also removed from the training
text: no held-out paragraph is ever trained on.
"""

from __future__ import annotations

import gzip
from functools import cache
from importlib.resources import files

import torch
from torch import Tensor

__all__ = ["VOCAB", "UNKNOWN", "MASK", "encode", "decode", "reference_text", "TEXT_FILES", "TEXT_SHA256"]

UNKNOWN, MASK = 0, 1
VOCAB: tuple[str, ...] = ("<unk>", "<mask>", "\n") + tuple(chr(i) for i in range(32, 127))
_INDEX = {ch: i for i, ch in enumerate(VOCAB) if len(ch) == 1}
_PLAIN = str.maketrans({"\u2019": "'", "\u2018": "'", "\u201c": '"', "\u201d": '"', "\u2014": "-", "\u2013": "-",
                        "\u2026": "...", "\t": "    "})
# the shipped text of each split (in attn_tune/models/data/) and the sha256 of its UTF-8 bytes, which it must keep
TEXT_FILES = {"train": "reference_text_train.txt.gz", "heldout": "reference_text_heldout.txt.gz"}
TEXT_SHA256 = {"train": "924d6d3b93014f2c283552907ff810344948104c96bf9a843384b07093f73718",
               "heldout": "3c8caa3465500aae281dc966b738518b9c4b6bed1968851c54bb0a28732dcb0f"}


def encode(text: str) -> Tensor:
    """Character ids (int64); typographic quotes and dashes become ASCII, anything else unknown."""
    return torch.tensor([_INDEX.get(ch, UNKNOWN) for ch in text.translate(_PLAIN)], dtype=torch.long)


def decode(ids: Tensor) -> str:
    return "".join(VOCAB[i] if len(VOCAB[i]) == 1 else "?" for i in ids.tolist())


@cache
def _text(split: str) -> str:
    shipped = files(__package__).joinpath("data").joinpath(TEXT_FILES[split])
    return gzip.decompress(shipped.read_bytes()).decode("utf-8")


def reference_text(split: str) -> Tensor:
    """The encoded text of one split: "train" (9 in 10 topics, by name hash) or "heldout" (the rest)."""
    if split not in TEXT_FILES:
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    return encode(_text(split))
