"""SDPA calls over pieces of q, k, v (query blocks, unfolded key slices) with SDPA's own backward per piece.

Autograd through the pieces themselves costs about what the attention does: every slice or unfolded view of k
and v gets its gradient as a zeroed tensor the size of the whole input (slice / unfold backward), which autograd
then sums. Here each piece's SDPA call runs on detached views with its graph kept; the backward asks each piece
for its gradients (`torch.autograd.grad`: SDPA's fused backward) and the layout adds them into one gradient per
input with plain slice `add_`s. With no gradient wanted, or under torch.compile, the pieces are plain SDPA calls.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from attn_tune.families.torch_sdpa import sdpa as torch_sdpa

__all__ = ["Layout", "Piece", "RunPiece", "piecewise_attention", "block_attention", "fold_slices"]

RunPiece = Callable[[Tensor, Tensor, Tensor, "Tensor | None", Any], Tensor]


def block_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float) -> Tensor:
    """One block of queries against its keys through SDPA's fused kernel: the scores are computed in tiles, never
    held whole, also in backward; grouped kv heads are read in place (no copies)."""
    return torch_sdpa(q, k, v, attn_mask=mask, scale=scale, enable_gqa=k.shape[1] != q.shape[1])


class Piece:
    """One SDPA call's output and its inputs as detached leaves: its graph, for SDPA's own backward."""

    __slots__ = ("where", "out", "leaves")

    def __init__(self, where: Any, out: Tensor, leaves: tuple[Tensor, Tensor, Tensor]) -> None:
        self.where, self.out, self.leaves = where, out, leaves  # `where`: the layout's note of the piece's place

    @classmethod
    def run(cls, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float, where: Any,
            needs: tuple[bool, bool, bool]) -> Piece:
        with torch.enable_grad():
            leaves = tuple(x.detach().requires_grad_(need) for x, need in zip((q, k, v), needs))
            return cls(where, block_attention(*leaves, mask, scale), leaves)  # type: ignore[arg-type]

    def grads(self, grad_out: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        """(dq, dk, dv) of this piece for `grad_out`, None where not wanted. The graph is kept (a retained outer
        graph may call again); it goes when the outer node releases its saved tensors."""
        wanted = [leaf for leaf in self.leaves if leaf.requires_grad]
        found = iter(torch.autograd.grad(self.out, wanted, grad_out, retain_graph=True))
        return tuple(next(found) if leaf.requires_grad else None for leaf in self.leaves)  # type: ignore[return-value]


class Layout(Protocol):
    """How a variant cuts q, k, v into SDPA calls (`forward`) and adds the pieces' gradients back (`backward`)."""

    scale: float

    def forward(self, q: Tensor, k: Tensor, v: Tensor, run: RunPiece, recorded: bool) -> Tensor:
        """The output, every piece through `run(q_piece, k_piece, v_piece, mask, where)`, which returns its
        output; `where` (anything) comes back with the piece in `backward`. `recorded`: the pieces are kept for
        `backward`, whose SDPA call allocates each piece's gradients whole (a layout may cut smaller pieces)."""
        ...

    def backward(self, grad_out: Tensor, pieces: list[Piece], q: Tensor, k: Tensor, v: Tensor,
                 needs: tuple[bool, bool, bool]) -> tuple[Tensor | None, ...]:
        """(dq, dk, dv), each where `needs` says, from every piece's `grads(its part of grad_out)`."""
        ...


class _Piecewise(torch.autograd.Function):
    """The pieces' outputs and leaves are saved tensors, so autograd frees them (and so the pieces' graphs) after
    a backward that does not retain the graph, as it frees SDPA's own."""

    @staticmethod
    def forward(ctx: Any, layout: Layout, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        needs = tuple(ctx.needs_input_grad[1:4])
        pieces: list[Piece] = []

        def run(qp: Tensor, kp: Tensor, vp: Tensor, mask: Tensor | None, where: Any) -> Tensor:
            pieces.append(Piece.run(qp, kp, vp, mask, layout.scale, where, needs))  # type: ignore[arg-type]
            return pieces[-1].out.detach()

        out = layout.forward(q, k, v, run, True)
        ctx.layout, ctx.wheres = layout, [piece.where for piece in pieces]
        ctx.save_for_backward(q, k, v, *(t for piece in pieces for t in (piece.out, *piece.leaves)))
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        q, k, v, *saved = ctx.saved_tensors
        pieces = [Piece(where, saved[4 * i], tuple(saved[4 * i + 1:4 * i + 4]))  # type: ignore[arg-type]
                  for i, where in enumerate(ctx.wheres)]
        return (None, *ctx.layout.backward(grad_out, pieces, q, k, v, tuple(ctx.needs_input_grad[1:4])))


def piecewise_attention(layout: Layout, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """`layout.forward` with SDPA per piece; when a gradient is wanted, its backward is `layout.backward`."""
    wanted = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    if wanted and not torch.compiler.is_compiling():
        return _Piecewise.apply(layout, q, k, v)
    return layout.forward(q, k, v, lambda qp, kp, vp, mask, where: block_attention(qp, kp, vp, mask, layout.scale),
                          False)


def fold_slices(total: Tensor, slices: Tensor, step: int, start: int = 0, fresh: bool = False) -> None:
    """Add `slices` (n, width, ...), slice j covering rows start + j*step ..., into `total` (rows, ...): the
    gradient of an unfold, as one strided `add_` per `step`-wide column of the slices, not a scatter. `fresh`:
    rows [start, start + n*step) hold nothing yet, so the first column is copied there, not added."""
    n, width = slices.shape[:2]
    if fresh and width < step:
        raise ValueError(f"slices of {width} rows cannot fill rows {step} at a time")
    for col in range(0, width, step):
        cols = min(step, width - col)
        rows = total[start + col:start + col + n * step].view(n, step, *total.shape[1:])
        if col == 0 and fresh:
            rows.copy_(slices[:, :step])
        else:
            rows[:, :cols].add_(slices[:, col:col + cols])
