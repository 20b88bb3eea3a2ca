"""Python's own reference text (`pydoc_data.topics`, shipped with every CPython) as characters for small models.

Topics are split by a hash of their name, so the held-out part is the same topics in every Python version.
Some topics repeat others' sections (the special methods appear under several names), so every paragraph of the
held-out topics is also removed from the training text: no held-out paragraph is ever trained on.
"""

from __future__ import annotations

import zlib

import torch
from torch import Tensor

__all__ = ["VOCAB", "UNKNOWN", "MASK", "encode", "decode", "reference_text"]

UNKNOWN, MASK = 0, 1
VOCAB: tuple[str, ...] = ("<unk>", "<mask>", "\n") + tuple(chr(i) for i in range(32, 127))
_INDEX = {ch: i for i, ch in enumerate(VOCAB) if len(ch) == 1}
_PLAIN = str.maketrans({"\u2019": "'", "\u2018": "'", "\u201c": '"', "\u201d": '"', "\u2014": "-", "\u2013": "-",
                        "\u2026": "...", "\t": "    "})


def encode(text: str) -> Tensor:
    """Character ids (int64); typographic quotes and dashes become ASCII, anything else unknown."""
    return torch.tensor([_INDEX.get(ch, UNKNOWN) for ch in text.translate(_PLAIN)], dtype=torch.long)


def decode(ids: Tensor) -> str:
    return "".join(VOCAB[i] if len(VOCAB[i]) == 1 else "?" for i in ids.tolist())


def reference_text(split: str) -> Tensor:
    """The encoded topics of one split: "train" (9 in 10 topics, by name hash) or "heldout" (the rest)."""
    from pydoc_data import topics

    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    def held_out(name: str) -> bool:
        return zlib.crc32(name.encode()) % 10 == 0

    heldout = "\n\n".join(topics.topics[name] for name in sorted(topics.topics) if held_out(name))
    if split == "heldout":
        return encode(heldout)
    seen = {p.strip() for p in heldout.split("\n\n")}
    train = "\n\n".join(topics.topics[name] for name in sorted(topics.topics) if not held_out(name))
    return encode("\n\n".join(p for p in train.split("\n\n") if p.strip() not in seen))
