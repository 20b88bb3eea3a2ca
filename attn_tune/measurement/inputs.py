"""Seeded random inputs for a problem (never zeros), and the float64 reference they are checked against."""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from attn_tune.activations import ActivationsError, load_activations
from attn_tune.problem import Inputs, Problem

__all__ = ["load_captured", "make_inputs", "reference_output", "exact_attention", "relative_error", "captured_samples",
           "sample_reference"]


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


def relative_error(out: Tensor, ref: Tensor) -> float:
    """||out - ref|| / ||ref|| in float64; inf when the output is not finite."""
    diff = torch.linalg.vector_norm(out.detach().to(torch.float64) - ref)
    err = (diff / torch.linalg.vector_norm(ref)).item()
    return err if err == err and err != float("inf") else float("inf")
