"""Small character models trained on Python's reference text (`bench/train_reference.py`), shipped as weights.

`pretrained_lm` and `pretrained_encoder` are factories for `attn-tune capture` and `attn-tune validate`: each
returns (model, example inputs, targets) on held-out text, at the context the model was trained at. No download.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from attn_tune.models.causal_lm import CausalLM
from attn_tune.models.encoder import Encoder
from attn_tune.models.reference_text import MASK, VOCAB, reference_text

__all__ = ["CONTEXT", "MaskedCharLM", "build_lm", "build_encoder", "mask_characters", "pretrained_lm",
           "pretrained_encoder", "weights_file", "IGNORE", "character_accuracy"]

CONTEXT = 2048  # trained and evaluated at this length: no result rests on length extrapolation
IGNORE = -100  # target at positions that carry no loss (cross_entropy's ignore_index)
_WEIGHTS = Path(__file__).with_name("weights")


class MaskedCharLM(nn.Module):
    """An `Encoder` with a character head: predicts masked characters from both sides (BERT's objective)."""

    def __init__(self, encoder: Encoder, vocab_size: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.embed.embedding_dim, vocab_size)

    def forward(self, input_ids: Tensor, key_padding_mask: Tensor | None = None) -> Tensor:
        """input_ids: (batch, length) -> logits (batch, length, vocab_size)."""
        return self.head(self.encoder(input_ids, key_padding_mask))


def build_lm() -> CausalLM:
    """The reference causal LM's architecture, untrained: 4 layers, 128 wide, 4 heads of 32."""
    return CausalLM(vocab_size=len(VOCAB), dim=128, depth=4, heads=4)


def build_encoder() -> MaskedCharLM:
    """The reference encoder's architecture (pre-norm), untrained, with its masked-character head."""
    return MaskedCharLM(Encoder(vocab_size=len(VOCAB), dim=128, depth=4, heads=4, norm="pre"), len(VOCAB))


def weights_file(name: str) -> Path:
    return _WEIGHTS / f"{name}.safetensors"


def mask_characters(ids: Tensor, generator: torch.Generator, rate: float = 0.15) -> tuple[Tensor, Tensor]:
    """(inputs, targets): `rate` of positions replaced by the mask id; targets are IGNORE elsewhere."""
    chosen = torch.rand(ids.shape, generator=generator) < rate
    return ids.masked_fill(chosen, MASK), ids.masked_fill(~chosen, IGNORE)


def _load(model: nn.Module, name: str) -> nn.Module:
    from safetensors.torch import load_file

    path = weights_file(name)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: run `python bench/train_reference.py` to make it")
    model.load_state_dict({k: v.float() for k, v in load_file(str(path)).items()})
    return model.eval()


def _windows(split: str, batch: int, length: int, extra: int) -> Tensor:
    """`batch` consecutive windows of the split's text: "heldout" (for validation) or "train" (for fine-tuning)."""
    if not 1 <= length <= CONTEXT:
        raise ValueError(f"length must be 1..{CONTEXT} (the trained context), got {length}")
    if split not in ("heldout", "train"):
        raise ValueError(f"split must be 'heldout' or 'train', got {split!r}")
    text = reference_text(split)
    if batch * (length + extra) > len(text):
        raise ValueError(f"the {split} text has {len(text)} characters: batch x length must fit in it")
    return torch.stack([text[i * (length + extra):(i + 1) * (length + extra)] for i in range(batch)])


def character_accuracy(logits: Tensor, targets: Tensor) -> float:
    """The fraction of positions (target not IGNORE) whose most likely character is the target: the bundled models'
    task metric (next-character accuracy for the LM, masked-character accuracy for the encoder)."""
    scored = targets != IGNORE
    return float((logits.argmax(-1) == targets)[scored].float().mean())


def pretrained_lm(batch: int = 1, length: int = CONTEXT, batches: int | None = None, split: str = "heldout"
                  ) -> tuple[CausalLM, Any, Any, Any]:
    """The trained causal LM, held-out character ids (batch, length), their next characters as targets, and
    next-character accuracy as the metric; with `batches`, that many consecutive batches as lists; with
    split="train", batches of its training text (a fine-tune's)."""
    count = batches or 1
    windows = _windows(split, batch * count, length, 1)
    inputs, targets = [(w[:, :-1],) for w in windows.split(batch)], [w[:, 1:] for w in windows.split(batch)]
    model = _load(build_lm(), "causal_lm")
    if batches is None:
        return model, inputs[0], targets[0], character_accuracy
    return model, inputs, targets, character_accuracy


def pretrained_encoder(batch: int = 1, length: int = CONTEXT, seed: int = 0, batches: int | None = None,
                       split: str = "heldout") -> tuple[MaskedCharLM, Any, Any, Any]:
    """The trained encoder, held-out ids with 15% masked (seeded), the masked characters as targets, and
    masked-character accuracy as the metric; with `batches`, that many consecutive batches as lists; with
    split="train", batches of its training text (a fine-tune's)."""
    count = batches or 1
    generator = torch.Generator().manual_seed(seed)
    pairs = [mask_characters(w, generator) for w in _windows(split, batch * count, length, 0).split(batch)]
    model = _load(build_encoder(), "encoder")
    if batches is None:
        return model, (pairs[0][0],), pairs[0][1], character_accuracy
    return model, [(x,) for x, _ in pairs], [t for _, t in pairs], character_accuracy


def loss_of(logits: Any, targets: Tensor) -> Tensor:
    """Mean cross-entropy over positions whose target is not IGNORE."""
    return nn.functional.cross_entropy(logits.flatten(0, -2).float(), targets.flatten(), ignore_index=IGNORE)
