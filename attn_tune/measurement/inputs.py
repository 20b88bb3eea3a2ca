"""Seeded random inputs for a problem (never zeros), and the float64 reference they are checked against (for a
training problem also the gradients backward gives q, k and v)."""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor

from attn_tune.activations import ActivationsError, load_activations
from attn_tune.problem import Inputs, Problem

__all__ = ["load_captured", "make_inputs", "reference_output", "exact_attention", "relative_error", "captured_samples",
           "sample_reference", "Gradients", "grad_output", "sample_grad_out", "exact_gradients", "reference_gradients",
           "sample_gradients"]


class Gradients(NamedTuple):
    """A call's output and the gradients backward gives its q, k and v for one gradient of that output."""

    out: Tensor
    dq: Tensor
    dk: Tensor
    dv: Tensor


def make_inputs(problem: Problem, seed: int = 0) -> Inputs:
    """Standard-normal q, k, v drawn from `seed` on the CPU (so every device sees the same numbers), then moved.

    The mask keeps about 70% of keys and always the diagonal key (clamped to kv_len - 1), which every valid
    causal/window problem can see, so no query row is left without a key. A `key_padding` problem's mask is
    `_padding_mask`'s: rows padded on the left and on the right, as padded batches are.
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
    if problem.key_padding:
        mask = _padding_mask(b, lk).to(problem.device)
    elif problem.mask:
        mask = torch.rand(lq, lk, generator=gen) < 0.7
        rows = torch.arange(lq)
        mask[rows, rows.clamp(max=lk - 1)] = True
        mask = mask.to(problem.device)
    return Inputs(q, k, v, mask)


def _padding_mask(batch: int, kv_len: int) -> Tensor:
    """(batch, 1, 1, kv_len) bool, True = a real key: row b has (b + 1) / (2 (batch + 1)) of its keys padded, on the
    left for even b (a batch left-padded for generation), on the right for odd b (an encoder's batch)."""
    mask = torch.ones(batch, 1, 1, kv_len, dtype=torch.bool)
    for row in range(batch):
        pad = (row + 1) * kv_len // (2 * (batch + 1))
        if pad:
            mask[row, ..., slice(kv_len - pad, None) if row % 2 else slice(None, pad)] = False
    return mask


@functools.lru_cache(maxsize=2)
def reference_output(problem: Problem, seed: int = 0) -> Tensor:
    """The problem's exact attention on `make_inputs(problem, seed)`, in float64 on the problem's device.

    Computed in query chunks, so that the reference itself fits in memory at long sequence lengths.
    """
    inputs = make_inputs(problem, seed)
    return exact_attention(inputs.q, inputs.k, inputs.v, **inputs.call_kwargs(problem))


def exact_attention(q: Tensor, k: Tensor, v: Tensor, *, attn_mask: Tensor | None = None, **kwargs: Any) -> Tensor:
    """The float64 exact attention of any q, k, v (a float mask too is promoted), in query chunks of 256 so that it
    fits in memory at long lengths: the reference every error is measured against."""
    from attn_tune.families.chunked import chunked_attention

    q, k, v = (t.detach().to(torch.float64) for t in (q, k, v))
    if attn_mask is not None and attn_mask.dtype != torch.bool:
        attn_mask = attn_mask.to(torch.float64)
    with torch.no_grad():
        return chunked_attention(q, k, v, chunk=256, attn_mask=attn_mask, **kwargs)


def grad_output(problem: Problem, seed: int = 0) -> Tensor:
    """The seeded gradient a training measurement feeds back into the output (standard normal, never zeros), drawn
    on the CPU from `seed + 1` (not q's stream), then moved and cast like q."""
    shape = (problem.batch, problem.heads, problem.q_len, problem.head_dim)
    grad = torch.randn(shape, generator=torch.Generator().manual_seed(seed + 1))
    return grad.to(device=problem.device, dtype=problem.torch_dtype)


def exact_gradients(q: Tensor, k: Tensor, v: Tensor, grad_out: Tensor, *, is_causal: bool = False,
                    window: int | None = None, attn_mask: Tensor | None = None, scale: float | None = None
                    ) -> Gradients:
    """Float64 exact attention of q, k, v and the gradients of q, k and v for `grad_out` (upcast): the reference a
    training problem's dq, dk and dv are measured against.

    Plain matmul-softmax-matmul under autograd, 256 queries at a time (each chunk's graph freed before the next,
    so memory stays O(chunk x kv_len)); it shares no code with the variants, whose own backward it checks.
    """
    q64, k64, v64 = (t.detach().to(torch.float64) for t in (q, k, v))
    g64 = grad_out.detach().to(torch.float64)
    k64.requires_grad_()
    v64.requires_grad_()
    if attn_mask is not None and attn_mask.dtype != torch.bool:
        attn_mask = attn_mask.detach().to(torch.float64)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    out, dq = torch.empty(q.shape[:-1] + (v.shape[-1],), dtype=torch.float64, device=q.device), torch.empty_like(q64)
    dk, dv = torch.zeros_like(k64), torch.zeros_like(v64)
    for r0 in range(0, q.shape[-2], 256):
        r1 = min(r0 + 256, q.shape[-2])
        rows = q64[..., r0:r1, :].detach().requires_grad_()
        with torch.enable_grad():
            part = _plain_attention(rows, k64, v64, r0, is_causal, window, attn_mask, scale)
            gq, gk, gv = torch.autograd.grad(part, (rows, k64, v64), g64[..., r0:r1, :])
        out[..., r0:r1, :], dq[..., r0:r1, :] = part.detach(), gq
        dk += gk
        dv += gv
    return Gradients(out, dq, dk, dv)


def _plain_attention(q: Tensor, k: Tensor, v: Tensor, r0: int, causal: bool, window: int | None,
                     attn_mask: Tensor | None, scale: float) -> Tensor:
    """Queries r0.. against every key: causal is top-left aligned (key j <= query i), a window keeps |i - j| < w,
    grouped kv heads are repeated, and a query left with no key gets zeros (as SDPA gives)."""
    if k.shape[1] != q.shape[1]:
        k, v = (t.repeat_interleave(q.shape[1] // k.shape[1], dim=1) for t in (k, v))
    scores = q @ k.transpose(-2, -1) * scale
    i = torch.arange(r0, r0 + q.shape[-2], device=q.device)[:, None]
    j = torch.arange(k.shape[-2], device=q.device)[None, :]
    keep = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device)
    if causal:
        keep &= j <= i
    if window is not None:
        keep &= (i - j).abs() < window
    if attn_mask is not None:
        mask = attn_mask[..., r0:r0 + q.shape[-2], :] if attn_mask.shape[-2] != 1 else attn_mask
        if mask.dtype == torch.bool:
            keep = keep & mask
        else:
            scores = scores + mask
    scores = scores.masked_fill(~keep, float("-inf"))
    dead = scores.amax(dim=-1, keepdim=True) == float("-inf")
    return torch.softmax(scores.masked_fill(dead, 0.0), dim=-1).masked_fill(dead, 0.0) @ v


@functools.lru_cache(maxsize=2)
def reference_gradients(problem: Problem, seed: int = 0) -> Gradients:
    """`exact_gradients` of `make_inputs(problem, seed)` for `grad_output(problem, seed)`, on the problem's device."""
    inputs = make_inputs(problem, seed)
    return exact_gradients(inputs.q, inputs.k, inputs.v, grad_output(problem, seed), **inputs.call_kwargs(problem))


@functools.lru_cache(maxsize=4)
def _activations(path: str, stamp: tuple[int, int]) -> dict[Problem, list[Inputs]]:
    return load_activations(path)


def load_captured(path: str | os.PathLike) -> dict[Problem, list[Inputs]]:
    """The activations file at `path`, read once while it is unchanged (the tuner and every measurement share it).

    Raises:
        ActivationsError: the file is missing, not an activations file, or malformed.
    """
    try:
        stat = os.stat(path)
    except OSError:
        raise ActivationsError(f"activations file {path} does not exist") from None
    return _activations(str(Path(path).resolve()), (stat.st_mtime_ns, stat.st_size))  # one key per file


def captured_samples(path: str | os.PathLike, problem: Problem) -> list[Inputs]:
    """The captured calls of `problem` in the activations file at `path`, on the problem's device ([] if none).

    Raises:
        ActivationsError: the file is missing or not an activations file.
    """
    samples = load_captured(path).get(problem, [])
    return [sample.to(problem.device) for sample in samples]


@functools.lru_cache(maxsize=16)
def _sample_reference(path: str, stamp: tuple[int, int], problem: Problem, index: int) -> Tensor:
    sample = captured_samples(path, problem)[index]
    return exact_attention(sample.q, sample.k, sample.v, **sample.call_kwargs(problem))


def sample_reference(path: str | os.PathLike, problem: Problem, index: int) -> Tensor:
    """The float64 exact attention of captured sample `index` of `problem` (cached while the file is unchanged)."""
    stat = os.stat(path)
    return _sample_reference(str(path), (stat.st_mtime_ns, stat.st_size), problem, index)


def sample_grad_out(sample: Inputs, problem: Problem, index: int) -> Tensor:
    """The gradient fed back into captured sample `index`'s output: the one the model gave it when captured, else
    (a forward capture, or a call off the loss's path) a seeded one."""
    if sample.grad_out is None:
        return grad_output(problem, seed=index)
    return sample.grad_out.to(device=problem.device, dtype=problem.torch_dtype)


@functools.lru_cache(maxsize=16)
def _sample_gradients(path: str, stamp: tuple[int, int], problem: Problem, index: int) -> Gradients:
    sample = captured_samples(path, problem)[index]
    return exact_gradients(sample.q, sample.k, sample.v, sample_grad_out(sample, problem, index),
                           **sample.call_kwargs(problem))


def sample_gradients(path: str | os.PathLike, problem: Problem, index: int) -> Gradients:
    """`exact_gradients` of captured sample `index` of `problem` for `sample_grad_out` (cached while the file is
    unchanged)."""
    stat = os.stat(path)
    return _sample_gradients(str(path), (stat.st_mtime_ns, stat.st_size), problem, index)


def relative_error(out: Tensor, ref: Tensor) -> float:
    """||out - ref|| / ||ref|| in float64; inf when the output is not finite."""
    diff = torch.linalg.vector_norm(out.detach().to(torch.float64) - ref)
    err = (diff / torch.linalg.vector_norm(ref)).item()
    return err if err == err and err != float("inf") else float("inf")
