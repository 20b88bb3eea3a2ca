"""Reading what a user's model returns: a tensor, a tuple or list, a dict, or an object with attributes (as
Hugging Face's ModelOutput), for its first tensor, its own loss and its logits."""

from __future__ import annotations

from typing import Any, Callable

import torch

__all__ = ["first_tensor", "own_loss", "logits", "loss_tensor", "IGNORE_INDEX"]

IGNORE_INDEX = -100  # targets at this value are not scored (Hugging Face's and PyTorch's convention)


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


def loss_tensor(out: Any, targets: Any) -> tuple[torch.Tensor | None, str | None]:
    """The model's loss as a tensor (differentiable when the output is) and where it came from: its own `loss`
    ("model"), else cross-entropy of its logits against integer targets (IGNORE_INDEX not scored) or mean squared
    error against float targets ("targets"); (None, None) without either."""
    own = own_loss(out)
    if own is not None:
        return own, "model"
    if targets is None:
        return None, None
    scores = logits(out)
    if scores is None:
        raise ValueError("the model's output holds no tensor to compute a loss from")
    if targets.dtype.is_floating_point:
        return torch.nn.functional.mse_loss(scores.float(), targets.float()), "targets"
    return torch.nn.functional.cross_entropy(scores.flatten(0, -2).float(), targets.flatten(),
                                             ignore_index=IGNORE_INDEX), "targets"
