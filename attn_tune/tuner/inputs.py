"""Seeded random inputs for a problem (never zeros), and the float64 reference they are checked against."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from attn_tune.problem import Problem

__all__ = ["Inputs", "make_inputs", "reference_output", "relative_error"]


@dataclass(frozen=True)
class Inputs:
    """q, k, v in SDPA layout and, for problems with `mask`, a boolean keep-mask of shape (q_len, kv_len)."""

    q: Tensor
    k: Tensor
    v: Tensor
    attn_mask: Tensor | None

    def call_kwargs(self, problem: Problem) -> dict[str, Any]:
        """The masking keywords a variant's fn takes for this problem."""
        return {"is_causal": problem.causal, "window": problem.window, "attn_mask": self.attn_mask, "scale": None}


def make_inputs(problem: Problem, seed: int = 0) -> Inputs:
    """Standard-normal q, k, v drawn from `seed` on the CPU (so every device sees the same numbers), then moved.

    The mask keeps about 70% of keys and always the diagonal key (clamped to kv_len - 1), which every valid
    causal/window problem can see, so no query row is left without a key.
    """
    gen = torch.Generator().manual_seed(seed)

    def draw(*shape: int) -> Tensor:
        t = torch.randn(*shape, generator=gen).to(device=problem.device, dtype=problem.torch_dtype)
        return t.requires_grad_(problem.training)

    b, h, kvh, lq, lk, d = (
        problem.batch, problem.heads, problem.n_kv_heads, problem.q_len, problem.n_kv_len, problem.head_dim
    )
    q, k, v = draw(b, h, lq, d), draw(b, kvh, lk, d), draw(b, kvh, lk, d)
    mask = None
    if problem.mask:
        mask = torch.rand(lq, lk, generator=gen) < 0.7
        rows = torch.arange(lq)
        mask[rows, rows.clamp(max=lk - 1)] = True
        mask = mask.to(problem.device)
    return Inputs(q, k, v, mask)


@functools.lru_cache(maxsize=2)
def reference_output(problem: Problem, seed: int = 0) -> Tensor:
    """The problem's exact attention on `make_inputs(problem, seed)`, in float64 on the problem's device.

    Computed in query chunks, so that the reference itself fits in memory at long sequence lengths.
    """
    from attn_tune.families.chunked import chunked_attention

    inputs = make_inputs(problem, seed)
    q, k, v = (t.detach().to(torch.float64) for t in (inputs.q, inputs.k, inputs.v))
    with torch.no_grad():
        return chunked_attention(q, k, v, chunk=256, **inputs.call_kwargs(problem))


def relative_error(out: Tensor, ref: Tensor) -> float:
    """||out - ref|| / ||ref|| in float64; inf when the output is not finite."""
    diff = torch.linalg.vector_norm(out.detach().to(torch.float64) - ref)
    err = (diff / torch.linalg.vector_norm(ref)).item()
    return err if err == err and err != float("inf") else float("inf")
