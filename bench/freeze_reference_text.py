"""Remake the bundled models' reference text (attn_tune/models/data/) from this Python's `pydoc_data.topics`.

    python bench/freeze_reference_text.py           # write both splits' files (CPython 3.11.7 remakes them as shipped)
    python bench/freeze_reference_text.py --check   # write nothing: does this Python's text have the shipped hashes?

It writes nothing where this Python's text differs from the shipped text unless given --replace.

`pydoc_data.topics` changes between CPython patch releases, so the text is frozen once (from CPython 3.11.7, the
text the weights in attn_tune/models/weights/ were trained on) and shipped; `reference_text` reads only the files.
The split: a topic is held out when crc32 of its name is 0 mod 10 (one in ten); every paragraph of the held-out
topics is also removed from the training text (topics repeat each other's sections). Files are gzip with mtime 0.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import os
import platform
import sys
import tempfile
import zlib
from pathlib import Path

import attn_tune.models
from attn_tune.models.reference_text import TEXT_FILES, TEXT_SHA256


def text_file(split: str) -> Path:
    """Where the package's text of one split lives (in the source tree, for an editable install)."""
    return Path(attn_tune.models.__file__).with_name("data") / TEXT_FILES[split]


def split_topics(topics: dict[str, str]) -> dict[str, str]:
    """{"train": ..., "heldout": ...}: the topics' text, split by a hash of each topic's name."""
    def held_out(name: str) -> bool:
        return zlib.crc32(name.encode()) % 10 == 0

    heldout = "\n\n".join(topics[name] for name in sorted(topics) if held_out(name))
    seen = {p.strip() for p in heldout.split("\n\n")}
    train = "\n\n".join(topics[name] for name in sorted(topics) if not held_out(name))
    return {"train": "\n\n".join(p for p in train.split("\n\n") if p.strip() not in seen), "heldout": heldout}


def write_atomically(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="write nothing; exit 1 if this Python's text differs from the shipped text")
    parser.add_argument("--replace", action="store_true",
                        help="write the text even where it differs from the shipped text (then retrain and remeasure)")
    args = parser.parse_args(argv)
    from pydoc_data import topics

    texts = split_topics(topics.topics)
    print(f"pydoc_data.topics of {platform.python_implementation()} {platform.python_version()}")
    digests = {split: hashlib.sha256(text.encode("utf-8")).hexdigest() for split, text in texts.items()}
    for split, text in texts.items():
        same = digests[split] == TEXT_SHA256[split]
        print(f"{split}: {len(text)} characters, sha256 {digests[split]} "
              f"({'the shipped text' if same else 'differs from the shipped ' + TEXT_SHA256[split]})")
    differs = digests != TEXT_SHA256
    if args.check or (differs and not args.replace):
        if differs and not args.check:
            print("wrote nothing: this Python's text is not the shipped text (it was frozen from CPython 3.11.7); "
                  "--replace writes it", file=sys.stderr)
        return 1 if differs else 0
    for split, text in texts.items():
        write_atomically(text_file(split), gzip.compress(text.encode("utf-8"), compresslevel=9, mtime=0))
        print(f"wrote {text_file(split)}")
    if differs:
        print("the text changed: set TEXT_SHA256 in attn_tune/models/reference_text.py, retrain the weights "
              "(bench/train_reference.py) and remeasure the figures the docs quote", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
