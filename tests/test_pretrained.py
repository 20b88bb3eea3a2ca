"""The reference models trained on Python's reference text: shipped weights, shipped text, held-out text kept apart."""

from __future__ import annotations

import gzip
import hashlib
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from attn_tune.models import pretrained_encoder, pretrained_lm
from attn_tune.models.pretrained import CONTEXT, IGNORE, build_lm, loss_of
from attn_tune.models.reference_text import MASK, TEXT_FILES, TEXT_SHA256, VOCAB, decode, encode, reference_text

ROOT = Path(__file__).resolve().parents[1]


def test_the_held_out_topics_are_never_trained_on() -> None:
    train, heldout = reference_text("train"), reference_text("heldout")
    assert len(train) > 400_000 and len(heldout) > 2 * CONTEXT
    trained_on = decode(train)
    # topics repeat each other's sections: no 200-character stretch of held-out text (every 500th) is in training
    assert not [i for i in range(0, len(heldout) - 200, 500) if decode(heldout[i:i + 200]) in trained_on]
    paragraphs = [{p.strip() for p in decode(text).split("\n\n")} for text in (train, heldout)]
    assert len(paragraphs[1]) > 100 and not paragraphs[0] & paragraphs[1]  # no paragraph in both
    assert decode(encode("a \u201cquote\u201d\u2014x")) == 'a "quote"-x'


# the text the shipped weights were trained on, frozen from CPython 3.11.7's pydoc_data.topics: a change to it
# changes every figure quoted for the bundled models (retrain with bench/train_reference.py and remeasure them)
FROZEN_SHA256 = {"train": "924d6d3b93014f2c283552907ff810344948104c96bf9a843384b07093f73718",
                 "heldout": "3c8caa3465500aae281dc966b738518b9c4b6bed1968851c54bb0a28732dcb0f"}


def test_the_shipped_text_is_the_frozen_text() -> None:
    from importlib.resources import files

    assert TEXT_SHA256 == FROZEN_SHA256
    for split, name in TEXT_FILES.items():
        shipped = gzip.decompress(files("attn_tune.models").joinpath("data").joinpath(name).read_bytes())
        assert hashlib.sha256(shipped).hexdigest() == FROZEN_SHA256[split]
        assert torch.equal(reference_text(split), encode(shipped.decode("utf-8")))
    assert (len(reference_text("train")), len(reference_text("heldout"))) == (406_416, 42_758)


def test_the_text_is_the_same_whatever_this_pythons_pydoc_data_says() -> None:
    """pydoc_data.topics differs between CPython patch releases (3.11.2's sixth held-out batch is not 3.11.7's):
    in a fresh interpreter whose pydoc_data gives other text, reference_text gives the same tensors."""
    code = ("import hashlib, sys, types\n"
            "topics = types.ModuleType('pydoc_data.topics'); topics.topics = {'assert': 'not the reference text'}\n"
            "sys.modules['pydoc_data'] = types.ModuleType('pydoc_data'); sys.modules['pydoc_data'].topics = topics\n"
            "sys.modules['pydoc_data.topics'] = topics\n"
            "from attn_tune.models.reference_text import reference_text\n"
            "print(*(hashlib.sha256(reference_text(s).numpy().tobytes()).hexdigest() for s in ('train', 'heldout')))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [hashlib.sha256(reference_text(s).numpy().tobytes()).hexdigest()
                                     for s in ("train", "heldout")]


def test_pretrained_lm_predicts_held_out_text_far_better_than_chance() -> None:
    model, (ids,), targets, _ = pretrained_lm()
    assert ids.shape == (1, CONTEXT) and torch.equal(ids[:, 1:], targets[:, :-1])
    with torch.no_grad():
        loss = loss_of(model(ids), targets).item()
    assert loss < 0.6 * math.log(len(VOCAB))  # chance is log(98) = 4.58 nats per character
    untrained = build_lm().eval()
    with torch.no_grad():
        assert loss_of(untrained(ids), targets).item() > 4.0


def test_pretrained_encoder_fills_in_masked_characters() -> None:
    model, (ids,), targets, _ = pretrained_encoder()
    masked = ids == MASK
    assert 0.1 < masked.float().mean() < 0.2 and bool(((targets != IGNORE) == masked).all())
    with torch.no_grad():
        loss = loss_of(model(ids), targets).item()
    assert loss < 0.7 * math.log(len(VOCAB))
    again = pretrained_encoder()
    assert torch.equal(again[1][0], ids)  # seeded: the same masked positions every time


@pytest.mark.slow
def test_the_training_script_writes_weights_the_models_load(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "train_reference.py"), "--steps", "1", "--batch", "1",
                             "--out", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    from safetensors.torch import load_file

    state = load_file(str(tmp_path / "causal_lm.safetensors"))
    build_lm().load_state_dict({k: v.float() for k, v in state.items()})
    assert (tmp_path / "encoder.safetensors").stat().st_size > 1_000_000


def _readme_losses() -> tuple[float, float]:
    """The held-out losses the README states for the LM and the encoder."""
    text = " ".join((ROOT / "README.md").read_text().split())
    found = re.search(r"the loss is ([0-9.]+) nats per character for the LM and ([0-9.]+) for the encoder", text)
    assert found, "the README no longer states the reference models' held-out losses"
    return float(found.group(1)), float(found.group(2))


def test_the_factories_give_held_out_text_and_the_losses_the_readme_states() -> None:
    """Each factory's inputs are the start of the held-out text (never training text), and the shipped weights give
    the README's losses on them (undertrained or wrong weights would not)."""
    lm_loss, encoder_loss = _readme_losses()
    # the README rounds to 4 places; float32 summation order (CPU, BLAS, threads) moves the loss by about 1e-6
    tolerance = 2e-4
    heldout = reference_text("heldout")
    model, (ids,), targets, _ = pretrained_lm()
    assert torch.equal(ids[0], heldout[:CONTEXT]) and torch.equal(targets[0], heldout[1:CONTEXT + 1])
    with torch.no_grad():
        assert loss_of(model(ids), targets).item() == pytest.approx(lm_loss, abs=tolerance)
    model, (ids,), targets, _ = pretrained_encoder()
    kept = ids[0] != MASK
    assert torch.equal(ids[0][kept], heldout[:CONTEXT][kept]) and torch.equal(targets[0][~kept], heldout[:CONTEXT][~kept])
    with torch.no_grad():
        assert loss_of(model(ids), targets).item() == pytest.approx(encoder_loss, abs=tolerance)
