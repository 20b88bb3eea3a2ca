"""The reference models trained on Python's reference text: shipped weights, held-out text kept apart."""

from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from attn_tune.models import pretrained_encoder, pretrained_lm
from attn_tune.models.pretrained import CONTEXT, IGNORE, build_lm, loss_of
from attn_tune.models.reference_text import MASK, VOCAB, decode, encode, reference_text

ROOT = Path(__file__).resolve().parents[1]


def test_the_held_out_topics_are_never_trained_on() -> None:
    train, heldout = reference_text("train"), reference_text("heldout")
    assert len(train) > 400_000 and len(heldout) > 2 * CONTEXT
    trained_on = decode(train)
    # topics repeat each other's sections: no 200-character stretch of held-out text (every 500th) is in training
    assert not [i for i in range(0, len(heldout) - 200, 500) if decode(heldout[i:i + 200]) in trained_on]
    assert decode(encode("a \u201cquote\u201d\u2014x")) == 'a "quote"-x'


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
    heldout = reference_text("heldout")
    model, (ids,), targets, _ = pretrained_lm()
    assert torch.equal(ids[0], heldout[:CONTEXT]) and torch.equal(targets[0], heldout[1:CONTEXT + 1])
    with torch.no_grad():
        assert loss_of(model(ids), targets).item() == pytest.approx(lm_loss, abs=5e-4)
    model, (ids,), targets, _ = pretrained_encoder()
    kept = ids[0] != MASK
    assert torch.equal(ids[0][kept], heldout[:CONTEXT][kept]) and torch.equal(targets[0][~kept], heldout[:CONTEXT][~kept])
    with torch.no_grad():
        assert loss_of(model(ids), targets).item() == pytest.approx(encoder_loss, abs=5e-4)
