"""The unfolded window path (every query block in one SDPA call) against float64, and as a parameter of both
windowed variants: exact for window-chunked (a knob the tuner chooses per shape), local's own function for local."""

from __future__ import annotations

import itertools

import pytest
import torch

import attn_tune
from attn_tune import Problem
from attn_tune.families import windowed
from attn_tune.families.windowed import unfolded_window_attention
from tests.oracle import oracle, rel_error

SHAPES = [(2, 4, 2, 37, 8), (1, 2, 2, 64, 16), (1, 3, 1, 5, 4)]  # (batch, heads, kv_heads, length, head_dim)


@pytest.mark.parametrize("shape, window, causal, block",
                         list(itertools.product(SHAPES, [1, 3, 8, 40], [True, False], [4, 16, 64])))
def test_unfolded_windows_equal_float64_attention(shape, window, causal, block) -> None:
    batch, heads, kv_heads, length, dim = shape
    g = torch.Generator().manual_seed(hash((shape, window, causal, block)) % 2**31)
    q = torch.randn(batch, heads, length, dim, generator=g)
    k, v = (torch.randn(batch, kv_heads, length, dim, generator=g) for _ in range(2))
    out = unfolded_window_attention(q, k, v, is_causal=causal, window=window, block=block, scale=0.3)
    assert torch.isfinite(out).all()
    assert rel_error(out, oracle(q, k, v, causal=causal, window=window, scale=0.3)) < 1e-5


@pytest.mark.parametrize("window, causal", [(40, True), (100, True), (40, False), (1, True)])
@pytest.mark.parametrize("split", [False, True], ids=["one-mask", "shared-interior"])
def test_long_sequences_in_module_layout_equal_float64(window, causal, split, monkeypatch) -> None:
    """Interior blocks between both ends, GQA, a batch of two, q/k/v as views of one (batch, length, heads)
    projection; once with one mask for every block, once with the interior's mask shared (long sequences)."""
    if split:
        monkeypatch.setattr(windowed, "_CACHED_MASK_BYTES", 0)
    g = torch.Generator().manual_seed(window + causal)
    projected = torch.randn(2, 300, 4 + 2 + 2, 16, generator=g)  # (batch, length, q + k + v heads, head_dim)
    q, k, v = (x.transpose(1, 2) for x in projected.split([4, 2, 2], dim=2))
    out = unfolded_window_attention(q, k, v, is_causal=causal, window=window, block=32)
    assert rel_error(out, oracle(q, k, v, causal=causal, window=window)) < 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_stays_within_its_rounding(dtype) -> None:
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, 200, 16, generator=g).to(dtype) for _ in range(3))
    out = unfolded_window_attention(q, k, v, is_causal=True, window=50, block=32)
    assert out.dtype == dtype
    assert rel_error(out, oracle(q, k, v, causal=True, window=50)) < 1e-2


def test_mask_memory_grows_with_the_window_not_the_length() -> None:
    """A long sequence's blocks share the interior's mask: the masks hold ~window^2 values, not length x window."""
    shape = windowed._Unfolded.of(length=200_000, block=32, window=64, causal=True)
    masks = windowed._unfolded_masks(shape, torch.float32, torch.device("cpu"))
    held = sum(mask.numel() for _, _, mask in masks)
    assert [(first, end) for first, end, _ in masks] == [(0, 2), (2, shape.blocks)]
    assert held <= 3 * 32 * shape.width < 200_000 * shape.width / 1000


@pytest.mark.parametrize("split", [False, True], ids=["one-mask", "shared-interior"])
def test_unfolded_gradients_equal_float64(split, monkeypatch) -> None:
    if split:
        monkeypatch.setattr(windowed, "_CACHED_MASK_BYTES", 0)
    g = torch.Generator().manual_seed(4)
    leaves = [torch.randn(1, 2, 150, 8, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    grads = [torch.autograd.grad(fn(*leaves).square().sum(), leaves) for fn in (
        lambda q, k, v: unfolded_window_attention(q, k, v, is_causal=True, window=40, block=32),
        lambda q, k, v: oracle(q, k, v, causal=True, window=40))]
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, atol=1e-9, rtol=1e-9)


def test_unfolded_gradients_are_the_loops() -> None:
    g = torch.Generator().manual_seed(0)
    leaves = [torch.randn(1, 2, 50, 8, generator=g, requires_grad=True) for _ in range(3)]
    fn = attn_tune.get_variant("window-chunked").fn
    grads = []
    for unfolded in (False, True):
        out = fn(*leaves, is_causal=True, window=7, attn_mask=None, scale=None, block=16, unfolded=unfolded)
        grads.append(torch.autograd.grad(out.square().sum(), leaves))
    for a, b in zip(*grads):
        assert torch.isfinite(b).all()
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_local_unfolded_computes_locals_own_function() -> None:
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 4, 300, 16, generator=g) for _ in range(3))
    local = attn_tune.get_variant("local").fn
    out = local(q, k, v, is_causal=True, window=None, attn_mask=None, scale=None, local_window=64, unfolded=True)
    assert rel_error(out, oracle(q, k, v, causal=True, window=64)) < 1e-5  # local's own function, exactly


def test_the_knob_is_offered_only_where_it_applies() -> None:
    self_attention = Problem(batch=1, heads=2, q_len=512, head_dim=16, causal=True, window=64)
    cross = Problem(batch=1, heads=2, q_len=512, kv_len=600, head_dim=16, window=64)
    masked = Problem(batch=1, heads=2, q_len=512, head_dim=16, window=64, mask=True)
    space = attn_tune.get_variant("window-chunked").space
    assert "unfolded" in space(self_attention) and "unfolded" not in space(cross)
    assert "unfolded" not in space(masked)
    g = torch.Generator().manual_seed(2)
    q, k = torch.randn(1, 2, 40, 8, generator=g), torch.randn(1, 2, 48, 8, generator=g)
    out = attn_tune.get_variant("window-chunked").fn(q, k, k, is_causal=False, window=5, attn_mask=None, scale=None,
                                                     block=16, unfolded=True)  # not self-attention: the loop
    assert rel_error(out, oracle(q, k, k, window=5)) < 1e-5
