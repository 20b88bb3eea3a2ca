"""Padded batches (a key-padding mask): every variant that claims them against a plain float64 reference, rows padded
on the left, on the right, with holes, not at all and wholly; gradients; local's own function; the trimming itself."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import Tensor

import attn_tune
from attn_tune import Problem, UnsupportedProblem
from attn_tune.families.masks import is_key_mask
from attn_tune.families.padding import trimmed_rows

LENGTHS = [(40, 40), (24, 40), (40, 24)]  # (q_len, kv_len)


def reference(q: Tensor, k: Tensor, v: Tensor, pad: Tensor, *, causal: bool, window: int | None,
              scale: float) -> Tensor:
    """float64 matmul-softmax-matmul: query i of row b sees key j iff causal/window allow it and pad[b, j]; a query
    that sees no key gets zeros. Differentiable (for the gradients' reference)."""
    q, k, v = (t.to(torch.float64) for t in (q, k, v))
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    i = torch.arange(q.shape[-2])[:, None]
    j = torch.arange(k.shape[-2])[None, :]
    keep = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool)
    if causal:
        keep = keep & (j <= i)
    if window is not None:
        keep = keep & ((i - j).abs() < window)
    keep = keep & pad.reshape(-1, 1, 1, k.shape[-2])
    scores = (q @ k.transpose(-2, -1) * scale).masked_fill(~keep, float("-inf"))
    empty = ~keep.any(-1, keepdim=True)
    probs = torch.softmax(scores.masked_fill(empty, 0.0), dim=-1).masked_fill(empty, 0.0)
    return probs @ v


def padding(kv_len: int, kinds: list[str]) -> Tensor:
    """(rows, 1, 1, kv_len) bool, True = a real key, one row per kind."""
    pad = torch.ones(len(kinds), 1, 1, kv_len, dtype=torch.bool)
    for row, kind in enumerate(kinds):
        keys = pad[row, 0, 0]
        if kind == "left":
            keys[:kv_len // 3] = False
        elif kind == "right":
            keys[kv_len - kv_len // 4:] = False
        elif kind == "both":
            keys[:5] = False
            keys[kv_len - 6:] = False
        elif kind == "holes":
            keys[3:7] = False
            keys[kv_len // 2] = False
        elif kind == "empty":
            keys[:] = False
        else:
            assert kind == "none"
    return pad


KINDS = ["left", "right", "holes", "none", "both", "left"]


def _inputs(batch: int, q_len: int, kv_len: int, seed: int, heads: int = 4, kv_heads: int = 2, dim: int = 8):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, q_len, dim, generator=g)
    k, v = (torch.randn(batch, kv_heads, kv_len, dim, generator=g) for _ in range(2))
    return q, k, v


def _rel(out: Tensor, ref: Tensor) -> float:
    return ((out.detach().double() - ref.detach()).norm() / ref.detach().norm()).item()


def _cases(name: str) -> list:
    windows = [4, 9] if name == "window-chunked" else [None, 4, 9]
    return [(name, causal, window, lengths) for causal, window, lengths in itertools.product(
        (False, True), windows, LENGTHS) if window is None or lengths[0] < lengths[1] + window]


CASES = [case for name in ("sdpa-unpadded", "window-chunked", "sdpa", "chunked", "dense") for case in _cases(name)]


@pytest.mark.parametrize("name, causal, window, lengths", CASES, ids=str)
def test_padded_batches_equal_the_float64_reference(name, causal, window, lengths) -> None:
    """Rows padded left, right, on both sides, with holes and not at all, in one GQA batch, through each exact
    variant that claims key padding (those that took any mask before among them)."""
    q_len, kv_len = lengths
    problem = Problem(batch=len(KINDS), heads=4, kv_heads=2, q_len=q_len, kv_len=kv_len, head_dim=8, causal=causal,
                      window=window, mask=True, key_padding=True)
    variant = attn_tune.get_variant(name)
    assert variant.supports(problem) is None
    q, k, v = _inputs(len(KINDS), q_len, kv_len, seed=q_len + 7 * kv_len + causal + (window or 0))
    pad = padding(kv_len, KINDS)
    out = variant.fn(q, k, v, is_causal=causal, window=window, attn_mask=pad, scale=0.3)
    assert out.shape == q.shape and out.dtype == q.dtype and torch.isfinite(out).all()
    assert _rel(out, reference(q, k, v, pad, causal=causal, window=window, scale=0.3)) < 1e-5


@pytest.mark.parametrize("name, window", [("sdpa-unpadded", None), ("sdpa-unpadded", 6), ("window-chunked", 6)])
@pytest.mark.parametrize("causal", [True, False])
def test_gradients_equal_float64_autograd(name, window, causal) -> None:
    q, k, v = _inputs(5, 30, 30, seed=11 + causal)
    pad = padding(30, ["left", "right", "holes", "empty", "none"])
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = attn_tune.get_variant(name).fn(*leaves, is_causal=causal, window=window, attn_mask=pad, scale=None)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(5))
    got = torch.autograd.grad(out, leaves, grad_out)
    exact = [t.double().requires_grad_() for t in (q, k, v)]
    ref = reference(*exact, pad, causal=causal, window=window, scale=8 ** -0.5)
    want = torch.autograd.grad(ref, exact, grad_out.double())
    assert _rel(out, ref) < 1e-5
    for name_, g, w in zip("qkv", got, want):
        assert torch.isfinite(g).all() and _rel(g, w) < 1e-4, f"d{name_}"


@pytest.mark.parametrize("name, window", [("sdpa-unpadded", None), ("window-chunked", 5), ("local", 12)])
def test_a_row_with_no_real_key_gives_zeros_and_zero_gradients(name, window) -> None:
    q, k, v = (t.requires_grad_() for t in _inputs(2, 16, 16, seed=3))
    pad = padding(16, ["empty", "left"])
    params = {"local_window": 4} if name == "local" else {}
    out = attn_tune.get_variant(name).fn(q, k, v, is_causal=True, window=window, attn_mask=pad, scale=None, **params)
    assert torch.equal(out[0], torch.zeros_like(out[0])) and out[1].abs().sum() > 0
    out.sum().backward()
    assert q.grad is not None and torch.equal(q.grad[0], torch.zeros_like(q.grad[0]))
    assert torch.equal(k.grad[0], torch.zeros_like(k.grad[0])) and torch.equal(v.grad[0], torch.zeros_like(v.grad[0]))


def test_a_batch_with_no_real_key_anywhere_still_gives_gradients() -> None:
    q, k, v = (t.requires_grad_() for t in _inputs(2, 8, 8, seed=4))
    out = attn_tune.get_variant("sdpa-unpadded").fn(q, k, v, is_causal=True, window=None,
                                                    attn_mask=padding(8, ["empty", "empty"]), scale=None)
    assert torch.equal(out, torch.zeros_like(out)) and out.requires_grad
    out.sum().backward()
    assert all(torch.equal(t.grad, torch.zeros_like(t)) for t in (q, k, v))


@pytest.mark.parametrize("causal, window, local_window", [(True, None, 8), (True, 20, 6), (False, 20, 5),
                                                           (False, None, 7)])
def test_local_computes_its_own_function_exactly(causal, window, local_window) -> None:
    """local: the narrower window and the padding, exactly (its own function, not the problem's)."""
    problem = Problem(batch=5, heads=4, kv_heads=2, q_len=36, head_dim=8, causal=causal, window=window, mask=True,
                      key_padding=True)
    variant = attn_tune.get_variant("local")
    assert variant.supports(problem) is None and not variant.exact
    q, k, v = _inputs(5, 36, 36, seed=local_window)
    pad = padding(36, ["left", "right", "holes", "none", "both"])
    out = variant.fn(q, k, v, is_causal=causal, window=window, attn_mask=pad, scale=None, local_window=local_window)
    assert _rel(out, reference(q, k, v, pad, causal=causal, window=local_window, scale=8 ** -0.5)) < 1e-5


def test_local_still_refuses_a_generic_mask_in_one_line() -> None:
    variant = attn_tune.get_variant("local")
    reason = variant.supports(Problem(batch=1, heads=2, q_len=64, head_dim=8, causal=True, mask=True))
    assert reason and "\n" not in reason
    q, k, v = _inputs(1, 64, 64, seed=0, kv_heads=4)
    with pytest.raises(UnsupportedProblem) as caught:
        variant.fn(q, k, v, is_causal=True, window=None, attn_mask=torch.ones(64, 64, dtype=torch.bool), scale=None,
                   local_window=16)
    assert "\n" not in str(caught.value)


def test_sdpa_unpadded_serves_padded_batches_only() -> None:
    variant = attn_tune.get_variant("sdpa-unpadded")
    assert variant.exact and variant.family == "flash"
    for problem in (Problem(batch=2, heads=2, q_len=8, head_dim=8, causal=True),
                    Problem(batch=2, heads=2, q_len=8, head_dim=8, mask=True)):
        assert variant.supports(problem) == "only for padded batches (key_padding)"
    q, k, v = _inputs(2, 8, 8, seed=1, kv_heads=4)
    for mask in (None, torch.ones(8, 8, dtype=torch.bool), torch.zeros(2, 1, 1, 8)):
        with pytest.raises(UnsupportedProblem, match="padded batches"):
            variant.fn(q, k, v, is_causal=True, window=None, attn_mask=mask, scale=None)


def test_key_masks_are_recognised_by_shape_and_dtype() -> None:
    yes = [torch.ones(3, 1, 1, 9, dtype=torch.bool), torch.ones(1, 1, 1, 9, dtype=torch.bool),
           torch.ones(1, 9, dtype=torch.bool), torch.ones(3, 1, 1, 1, dtype=torch.bool).expand(3, 1, 1, 9)]
    no = [None, torch.ones(3, 1, 1, 9), torch.ones(3, 1, 4, 9, dtype=torch.bool), torch.ones(3, 2, 1, 9, dtype=torch.bool),
          torch.ones(4, 9, dtype=torch.bool), torch.ones(9, dtype=torch.bool)]  # 1-D: SDPA refuses it
    assert all(is_key_mask(m) for m in yes) and not any(is_key_mask(m) for m in no)


def test_one_mask_for_every_row_and_expanded_views_are_served() -> None:
    q, k, v = _inputs(3, 20, 20, seed=2)
    scale = 8 ** -0.5
    shared = padding(20, ["left"])
    out = attn_tune.get_variant("sdpa-unpadded").fn(q, k, v, is_causal=True, window=None, attn_mask=shared, scale=None)
    assert _rel(out, reference(q, k, v, shared.expand(3, 1, 1, 20), causal=True, window=None, scale=scale)) < 1e-5
    view = padding(20, ["right"]).expand(3, 1, 1, 20)
    out = attn_tune.get_variant("window-chunked").fn(q, k, v, is_causal=False, window=5, attn_mask=view, scale=None)
    assert _rel(out, reference(q, k, v, view, causal=False, window=5, scale=scale)) < 1e-5


def test_a_left_padded_causal_row_runs_unmasked_on_its_real_tokens() -> None:
    """The point of trimming: each row's real tokens reach the structured kernel as an unpadded causal problem, rows
    with the same padding in one call; only the queries past the keys (none here) would need a mask."""
    q, k, v = _inputs(3, 24, 24, seed=9)
    pad = padding(24, ["left", "left", "none"])
    calls = []

    def inner(qs, ks, vs, causal, window, scale):
        calls.append((qs.shape[0], qs.shape[-2], ks.shape[-2], causal, window))
        return torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, is_causal=causal, scale=scale,
                                                                enable_gqa=True)

    out = trimmed_rows(inner, q, k, v, pad, causal=True, window=None, scale=None)
    assert calls == [(2, 16, 16, True, None), (1, 24, 24, True, None)]
    assert _rel(out, reference(q, k, v, pad, causal=True, window=None, scale=8 ** -0.5)) < 1e-5
