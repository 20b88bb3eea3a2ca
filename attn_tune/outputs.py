"""Reading what a user's model returns: a tensor, a tuple or list, a dict, or an object with attributes (as
Hugging Face's ModelOutput), for its first tensor, its own loss and its logits."""

from __future__ import annotations

from typing import Any, Callable

import torch

__all__ = ["first_tensor", "own_loss", "logits"]


def first_tensor(out: Any, wanted: Callable[[torch.Tensor], bool] = lambda t: t.dim() > 0) -> torch.Tensor | None:
    """The output itself if a tensor, else the first of its values that is a tensor `wanted` accepts; None if none."""
    if isinstance(out, torch.Tensor):
        return out
    values = out.values() if isinstance(out, dict) else out if isinstance(out, (tuple, list)) else vars(out).values()
    return next((v for v in values if isinstance(v, torch.Tensor) and wanted(v)), None)


def own_loss(out: Any) -> torch.Tensor | None:
    """The model's own scalar `loss` (as Hugging Face models return given labels), or None."""
    loss = out.get("loss") if isinstance(out, dict) else getattr(out, "loss", None)
    return loss if isinstance(loss, torch.Tensor) and loss.numel() == 1 else None


def logits(out: Any) -> torch.Tensor | None:
    """The output's `logits`, else its first tensor."""
    found = out.get("logits") if isinstance(out, dict) else getattr(out, "logits", None)
    return found if isinstance(found, torch.Tensor) else first_tensor(out)
