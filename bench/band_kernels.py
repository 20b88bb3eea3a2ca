"""Other ways to compute a causal sliding window's forward + backward on the CPU, against sdpa and `local`, CPU float32.

    .venv/bin/python bench/band_kernels.py [--rounds 11] [--shapes lm,4096] [--json]

Why: issue 34 asks `local` 256 at the bundled LM's call (b1 h4 q2048 d32, causal) to take at most 0.4x of sdpa's
forward + backward; the shipped path (`windowed.unfolded_window_attention`: blocks of queries against unfolded key
slices, SDPA's CPU flash kernel per call, SDPA's own backward per call) measures 0.42-0.48x. This script measures,
in one interleaved run on the same seeded inputs, what else could compute the same band (window 256):

- `sdpa` with is_causal over the whole sequence: what a user runs instead, the baseline of every ratio;
- `local` 256, block 64: the shipped path;
- SDPA's kernel alone: its forward and backward ops on ready-made contiguous blocks (no autograd, no folding), the
  floor of the shipped path (`training_attention._kernel_alone`);
- private ops, no autograd per piece: the shipped layout, each piece through SDPA's CPU forward op (keeping its
  logsumexp) and backward op directly, instead of a detached graph per piece and `torch.autograd.grad`;
- banded matmuls: the band as batched matmuls over the blocks (scores, mask, softmax, values), probabilities kept
  for a backward of five matmuls and softmax's backward (no recomputation), per head so the scores stay in cache;
- hybrid: SDPA's kernel forward (logsumexp kept), backward from matmuls: the probabilities recomputed from the
  logsumexp, then as above.

Each alternative is checked against a float64 reference first (out, dq, dk, dv); a row's ratio is its time over
sdpa's in the same round (median of 3 calls per round, order shuffled), the median over rounds and the 95% interval
of `headtohead.ratio_interval`. Forward columns time the same calls under no_grad where the path has one.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
from typing import Any, Callable

import torch
from torch import Tensor
from torch.nn.functional import scaled_dot_product_attention as sdpa

from attn_tune import Problem
from attn_tune.families import windowed
from attn_tune.families.blockwise_grad import fold_slices
from attn_tune.tuned_config import device_info
from attn_tune.tuner.headtohead import ratio_interval
from timing import interleaved
from training_attention import SHAPES, WINDOW, _kernel_alone, settle_malloc

BLOCK = 64
OPS = torch.ops.aten
_GROUP_BYTES = 2 * 2**20  # scores per matmul group: a core's share stays in its 2 MiB L2


@functools.lru_cache(maxsize=4)
def _band(length: int) -> tuple[windowed._Unfolded, Tensor]:
    """The shipped layout's geometry and its (blocks, block, width) additive mask, one per length."""
    shape = windowed._Unfolded.of(length, BLOCK, WINDOW, True)
    return shape, windowed._build_unfolded_masks(shape, False, torch.float32, torch.device("cpu"))[0][2][:, 0]


def _key_slices(x: Tensor, shape: windowed._Unfolded) -> Tensor:
    """(batch*heads, blocks, d, width) view of each block's keys, `before` zero rows in front."""
    b, h, length, d = x.shape
    padded = torch.nn.functional.pad(x, (0, 0, shape.before, shape.blocks * shape.block + shape.width
                                         - shape.before - length - shape.block))
    return padded.reshape(b * h, -1, d).unfold(1, shape.width, shape.block)


def _fold(slices: Tensor, shape: windowed._Unfolded, like: Tensor) -> Tensor:
    """(batch*heads, blocks, width, d) key-slice gradients added into one (batch, heads, length, d) gradient."""
    bh, d = slices.shape[0], slices.shape[-1]
    total = slices.new_empty(shape.blocks * shape.block + shape.width, bh, d)
    total[shape.blocks * shape.block:].zero_()
    fold_slices(total, slices.permute(1, 2, 0, 3), shape.block, 0, fresh=True)
    return total[shape.before:shape.before + shape.length].permute(1, 0, 2).reshape(like.shape)


class _Matmuls(torch.autograd.Function):
    """The band from batched matmuls; `kernel_forward`: SDPA's CPU forward op instead, probabilities recomputed."""

    @staticmethod
    def forward(ctx: Any, q: Tensor, k: Tensor, v: Tensor, kernel_forward: bool) -> Tensor:
        shape, mask = _band(q.shape[2])
        b, h, _, d = q.shape
        scale = d ** -0.5
        blocks = q.reshape(b * h, shape.blocks, shape.block, d)
        kt, vt = _key_slices(k, shape), _key_slices(v, shape)
        if kernel_forward:
            out, lse = OPS._scaled_dot_product_flash_attention_for_cpu(
                blocks, kt.transpose(-1, -2), vt.transpose(-1, -2), 0.0, False, attn_mask=mask[None])[:2]
            ctx.save_for_backward(q, k, v, out, lse)
            ctx.kernel_forward = True
            return out.reshape(q.shape)
        kt, vs = kt.contiguous(), vt.transpose(-1, -2).contiguous()
        scaled = blocks * scale
        probs = q.new_empty(b * h, shape.blocks, shape.block, shape.width)
        out = q.new_empty(b * h, shape.blocks, shape.block, d)
        for part in _groups(shape, b * h):
            scores = torch.matmul(scaled[part], kt[part]).add_(mask)
            torch.softmax(scores, -1, out=probs[part])
            torch.matmul(probs[part], vs[part], out=out[part])
        ctx.save_for_backward(q, k, v, probs)
        ctx.kernel_forward = False
        return out.reshape(q.shape)

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        shape, mask = _band(grad_out.shape[2])
        q, k, v, *kept = ctx.saved_tensors
        b, h, _, d = q.shape
        scale = d ** -0.5
        scaled = q.reshape(b * h, shape.blocks, shape.block, d) * scale
        kt, vt = _key_slices(k, shape).contiguous(), _key_slices(v, shape).contiguous()
        grads = grad_out.reshape(b * h, shape.blocks, shape.block, d)
        dq = torch.empty_like(scaled)
        dks, dvs = (q.new_empty(b * h, shape.blocks, shape.width, d) for _ in "kv")
        if ctx.kernel_forward:
            out, lse = kept
            rows = (grads * out).sum(-1, keepdim=True)  # softmax backward's row term: sum(dO * O)
        for part in _groups(shape, b * h):
            if ctx.kernel_forward:
                probs = torch.matmul(scaled[part], kt[part]).add_(mask).sub_(lse[part, ..., None]).exp_()
            else:
                probs = kept[0][part]
            torch.matmul(probs.transpose(-1, -2), grads[part], out=dvs[part])
            dp = torch.matmul(grads[part], vt[part])
            if ctx.kernel_forward:
                ds = dp.sub_(rows[part]).mul_(probs)
            else:
                ds = OPS._softmax_backward_data(dp, probs, -1, probs.dtype)
            torch.matmul(ds, kt[part].transpose(-1, -2), out=dq[part])
            torch.matmul(ds.transpose(-1, -2), scaled[part], out=dks[part])
        return dq.mul_(scale).reshape(q.shape), _fold(dks, shape, k), _fold(dvs, shape, v), None


def _groups(shape: windowed._Unfolded, rows: int) -> list[slice]:
    """Slices of the batch*heads axis whose float32 scores hold about `_GROUP_BYTES`."""
    step = max(1, _GROUP_BYTES // (shape.blocks * shape.block * shape.width * 4))
    return [slice(i, i + step) for i in range(0, rows, step)]


class _PrivateOps(torch.autograd.Function):
    """The shipped layout (`windowed._Blocks`) with SDPA's CPU forward and backward ops called per piece."""

    @staticmethod
    def forward(ctx: Any, layout: Any, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        pieces: list[_Piece] = []

        def run(qp: Tensor, kp: Tensor, vp: Tensor, mask: Tensor | None, where: Any) -> Tensor:
            out, lse = OPS._scaled_dot_product_flash_attention_for_cpu(qp, kp, vp, 0.0, False, attn_mask=mask,
                                                                       scale=layout.scale)[:2]
            pieces.append(_Piece(where, out, (qp, kp, vp), lse, mask, layout.scale))
            return out

        out = layout.forward(q, k, v, run, True)
        ctx.layout, ctx.pieces = layout, pieces
        ctx.save_for_backward(q, k, v)
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        q, k, v = ctx.saved_tensors
        return (None, *ctx.layout.backward(grad_out, ctx.pieces, q, k, v, (True, True, True)))


class _Piece:
    def __init__(self, where: Any, out: Tensor, leaves: tuple[Tensor, Tensor, Tensor], lse: Tensor,
                 mask: Tensor | None, scale: float) -> None:
        self.where, self.out, self.leaves, self.lse, self.mask, self.scale = where, out, leaves, lse, mask, scale

    def grads(self, grad_out: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return OPS._scaled_dot_product_flash_attention_for_cpu_backward(
            grad_out, *self.leaves, self.out, self.lse, 0.0, False, attn_mask=self.mask, scale=self.scale)


def private_ops(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    shape = windowed._Unfolded.of(q.shape[-2], BLOCK, WINDOW, True)
    layout = windowed._Blocks(shape, q.shape[-1] ** -0.5)
    if torch.is_grad_enabled():
        return _PrivateOps.apply(layout, q, k, v)
    return windowed.unfolded_window_attention(q, k, v, is_causal=True, window=WINDOW, block=BLOCK)


CANDIDATES: dict[str, Callable[[Tensor, Tensor, Tensor], Tensor]] = {
    "sdpa (causal, whole sequence)": lambda q, k, v: sdpa(q, k, v, is_causal=True),
    "local 256, block 64 (shipped)": lambda q, k, v: windowed.local_attention(
        q, k, v, is_causal=True, local_window=WINDOW, block=BLOCK),
    "private ops, no autograd per piece": private_ops,
    "banded matmuls, probabilities kept": lambda q, k, v: _Matmuls.apply(q, k, v, False),
    "hybrid: kernel forward, matmul backward": lambda q, k, v: _Matmuls.apply(q, k, v, True),
}


def _errors(fn: Callable[..., Tensor], inputs: list[Tensor], grad: Tensor) -> list[float]:
    """Relative errors of out, dq, dk, dv against float64 attention under the window's mask."""
    length = inputs[0].shape[2]
    offset = torch.arange(length)[:, None] - torch.arange(length)[None, :]
    wide = [x.detach().double().requires_grad_() for x in inputs]
    ref = sdpa(*wide, attn_mask=(offset >= 0) & (offset < WINDOW))
    refs = (ref, *torch.autograd.grad(ref, wide, grad.double()))
    out = fn(*inputs)
    got = (out, *torch.autograd.grad(out, inputs, grad))
    return [float((a.detach().double() - b.detach()).norm() / b.detach().norm()) for a, b in zip(got, refs)]


def run_shape(name: str, rounds: int) -> list[dict[str, Any]]:
    problem = Problem(**SHAPES[name], causal=True, training=True)
    g = torch.Generator().manual_seed(0)
    dims = (problem.batch, problem.heads, problem.q_len, problem.head_dim)
    inputs = [torch.randn(*dims, generator=g).requires_grad_() for _ in "qkv"]
    grad = torch.randn(*dims, generator=g)
    errors = {row: _errors(fn, inputs, grad) for row, fn in CANDIDATES.items() if not row.startswith("sdpa")}

    def both(fn: Callable[..., Tensor]) -> Callable[[], None]:
        def run() -> None:
            torch.autograd.grad(fn(*inputs), inputs, grad)
        return run

    def forward(fn: Callable[..., Tensor]) -> Callable[[], None]:
        def run() -> None:
            with torch.no_grad():
                fn(*inputs)
        return run

    steps = {f"{row}|fb": both(fn) for row, fn in CANDIDATES.items()}
    steps.update({f"{row}|fw": forward(fn) for row, fn in CANDIDATES.items()})
    steps.update({f"{row}|fb": step for row, step in _kernel_alone(problem).items() if f"block {BLOCK}" in row})
    times = interleaved(steps, rounds, 3)
    base = {part: times[f"sdpa (causal, whole sequence)|{part}"] for part in ("fb", "fw")}
    out = []
    for key, ts in times.items():
        row, part = key.split("|")
        ratios = [a / b for a, b in zip(ts, base[part])]
        interval = ratio_interval(ratios)
        out.append({"shape": name, "row": row, "part": part, "ms": statistics.median(ts),
                    "median": statistics.median(ratios), "low": interval.low, "high": interval.high,
                    "error": max(errors[row]) if row in errors else None})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=11)
    parser.add_argument("--shapes", default="lm,4096", help="comma-separated: lm, 4096")
    parser.add_argument("--settle", type=int, default=24, metavar="MIB", help="free one buffer this large first")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args()
    before = os.getloadavg()
    settle_malloc(args.settle)
    results = [entry for name in args.shapes.split(",") for entry in run_shape(name, args.rounds)]
    header = {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpu": device_info("cpu")["name"],
              "load_before": before, "load_after": os.getloadavg()}
    if args.json:
        print(json.dumps({**header, "results": results}, indent=1))
        return
    print(f"torch {header['torch']}, {header['threads']} threads, {header['cpu']}; load average before "
          f"{before[0]:.2f}, after {header['load_after'][0]:.2f}")
    print("| shape | row | fwd+bwd ms | fwd+bwd over sdpa | forward over sdpa | error (worst of out, dq, dk, dv) |")
    print("|---|---|---|---|---|---|")
    by_row: dict[tuple[str, str], dict[str, dict[str, Any]]] = {}
    for e in results:
        by_row.setdefault((e["shape"], e["row"]), {})[e["part"]] = e
    for (shape, row), parts in by_row.items():
        fb, fw = parts["fb"], parts.get("fw")
        error = "-" if fb["error"] is None else f"{fb['error']:.1e}"
        forward = "-" if fw is None else f"{fw['median']:.2f}x [{fw['low']:.2f}-{fw['high']:.2f}]"
        print(f"| {shape} | {row} | {fb['ms']:.1f} | {fb['median']:.2f}x [{fb['low']:.2f}-{fb['high']:.2f}] | "
              f"{forward} | {error} |")


if __name__ == "__main__":
    main()
