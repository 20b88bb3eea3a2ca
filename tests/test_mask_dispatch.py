"""The runtime reads an explicit attn_mask for its structure: the variant tuned for causal / band / key padding
serves the call, the answer stays SDPA's with the mask, and anything else stays a generic mask."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F

import attn_tune
from attn_tune import Problem, mask_structure
from attn_tune.registry.variant import Variant
from attn_tune.runtime import capture, dispatch
from tests.runtime_helpers import config, entry, registered


def _band(n: int, window: int | None, kv: int | None = None) -> torch.Tensor:
    rows, cols = torch.arange(n)[:, None], torch.arange(kv or n)[None, :]
    keep = rows >= cols
    return keep & (rows - cols < window) if window else keep


def _qkv(batch: int, heads: int, n: int, d: int = 8, kv_heads: int | None = None, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    shapes = [(batch, heads, n, d), (batch, kv_heads or heads, n, d), (batch, kv_heads or heads, n, d)]
    return [torch.randn(*s, generator=gen) for s in shapes]


class Spy:
    """A variant that notes what it was called with and computes exact attention (SDPA with the flags folded)."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []

    def __call__(self, q, k, v, *, is_causal, window, attn_mask, scale, **params):  # noqa: ANN001, ANN003
        self.calls.append({"is_causal": is_causal, "window": window, "mask": attn_mask})
        return attn_tune.get_variant("sdpa").fn(q, k, v, is_causal=is_causal, window=window, attn_mask=attn_mask,
                                                scale=scale)

    def variant(self) -> Variant:
        return Variant(name="spy", family="dense", fn=self, exact=True)


def test_a_boolean_band_is_served_as_causal_window_by_the_variant_tuned_for_it():
    q, k, v = _qkv(1, 2, 64)
    mask = _band(64, 16)
    spy = Spy()
    problem = Problem(batch=1, heads=2, q_len=64, head_dim=8, causal=True, window=16)
    with registered(spy.variant()), attn_tune.use_config(config([entry(problem, "spy")])):
        decision = attn_tune.explain(q, k, v, attn_mask=mask)
        out = attn_tune.attention(q, k, v, attn_mask=mask)
    assert decision.variant == "spy" and decision.problem == problem
    assert "causal" in decision.mask_read and "16" in decision.mask_read
    assert "read from the mask" in str(decision)
    assert spy.calls == [{"is_causal": True, "window": 16, "mask": None}]
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, attn_mask=mask), rtol=0, atol=1e-6)


def test_an_additive_causal_mask_finds_the_causal_entry():
    q, k, v = _qkv(2, 2, 32)
    mask = torch.nn.Transformer.generate_square_subsequent_mask(32)
    spy = Spy()
    problem = Problem(batch=2, heads=2, q_len=32, head_dim=8, causal=True)
    with registered(spy.variant()), attn_tune.use_config(config([entry(problem, "spy")])):
        out = attn_tune.attention(q, k, v, attn_mask=mask)
    assert [c["is_causal"] for c in spy.calls] == [True] and spy.calls[0]["mask"] is None
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, attn_mask=mask), rtol=0, atol=1e-6)


def test_a_left_padded_causal_batch_reaches_the_variant_as_causal_plus_key_padding():
    q, k, v = _qkv(2, 4, 32, kv_heads=2)
    pad = torch.ones(2, 32, dtype=torch.bool)
    pad[1, :10] = False  # row 1 left-padded: its first 10 queries see no key
    mask = _band(32, None)[None, None] & pad[:, None, None, :]
    spy = Spy()
    problem = Problem(batch=2, heads=4, kv_heads=2, q_len=32, head_dim=8, causal=True, mask=True, key_padding=True)
    with registered(spy.variant()), attn_tune.use_config(config([entry(problem, "spy")])):
        assert attn_tune.explain(q, k, v, attn_mask=mask, enable_gqa=True).problem == problem
        out = attn_tune.attention(q, k, v, attn_mask=mask, enable_gqa=True)
    (call,) = spy.calls
    assert call["is_causal"] and call["window"] is None
    assert call["mask"].shape == (2, 1, 1, 32) and torch.equal(call["mask"][:, 0, 0], pad)
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
    assert out[1, :, :10].abs().max() == 0  # rows that see no key: zeros, as SDPA gives


def test_with_no_config_the_mask_is_not_read_and_sdpa_gets_it_as_given(monkeypatch):
    reads = []
    monkeypatch.setattr(dispatch, "read_mask", lambda *a: reads.append(a))
    q, k, v = _qkv(1, 2, 32)
    mask = _band(32, 8)
    with attn_tune.use_config(None):
        out = attn_tune.attention(q, k, v, attn_mask=mask)
    assert reads == []
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, attn_mask=mask), rtol=0, atol=0)


def test_with_a_config_but_no_entry_for_the_structure_sdpa_gets_the_original_mask(monkeypatch):
    q, k, v = _qkv(1, 2, 32)
    mask = _band(32, 8)
    given = []
    real = dispatch.torch_sdpa
    monkeypatch.setattr(dispatch, "torch_sdpa", lambda *a, **kw: given.append(kw.get("attn_mask")) or real(*a, **kw))
    other = Problem(batch=1, heads=2, q_len=32, head_dim=16)
    with attn_tune.use_config(config([entry(other, "sdpa")])):
        decision = attn_tune.explain(q, k, v, attn_mask=mask)
        attn_tune.attention(q, k, v, attn_mask=mask)
    assert decision.rule == "default" and decision.problem.window == 8 and decision.mask_read
    assert len(given) == 1 and given[0] is mask


def test_a_near_miss_stays_a_generic_mask_and_exact():
    q, k, v = _qkv(1, 2, 32)
    mask = _band(32, 8)
    mask[20, 15] = False  # a hole in the band
    spy = Spy()
    structured = Problem(batch=1, heads=2, q_len=32, head_dim=8, causal=True, window=8)
    generic = Problem(batch=1, heads=2, q_len=32, head_dim=8, mask=True)
    with registered(spy.variant()), attn_tune.use_config(config([entry(structured, "spy")])):
        decision = attn_tune.explain(q, k, v, attn_mask=mask)
        out = attn_tune.attention(q, k, v, attn_mask=mask)
    assert decision.problem == generic and decision.mask_read is None and spy.calls == []
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, attn_mask=mask), rtol=0, atol=1e-6)


def test_a_mask_changed_in_place_after_its_first_call_is_read_again():
    q, k, v = _qkv(1, 2, 32)
    mask = _band(32, 8)
    spy = Spy()
    structured = Problem(batch=1, heads=2, q_len=32, head_dim=8, causal=True, window=8)
    with registered(spy.variant()), attn_tune.use_config(config([entry(structured, "spy")])):
        attn_tune.attention(q, k, v, attn_mask=mask)
        mask[20, 15] = False
        out = attn_tune.attention(q, k, v, attn_mask=mask)
    assert len(spy.calls) == 1  # the changed mask is a generic mask now: the default policy's SDPA ran it
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, attn_mask=mask), rtol=0, atol=1e-6)


def test_three_dimensional_calls_with_a_padding_mask():
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 16, 8, generator=gen) for _ in range(3))
    pad = torch.ones(2, 16, dtype=torch.bool)
    pad[0, 12:] = False
    mask = pad[:, None, :].expand(2, 16, 16)
    spy = Spy()
    problem = Problem(batch=2, heads=1, q_len=16, head_dim=8, mask=True, key_padding=True)
    with registered(spy.variant()), attn_tune.use_config(config([entry(problem, "spy")])):
        out = attn_tune.attention(q, k, v, attn_mask=mask)
    assert len(spy.calls) == 1 and spy.calls[0]["mask"].shape == (2, 1, 1, 16)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, attn_mask=mask), rtol=0, atol=1e-6)


def test_capture_records_the_structure_a_model_hands_sdpa_as_a_mask():
    class Banded(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            n = x.shape[-2]
            return F.scaled_dot_product_attention(x, x, x, attn_mask=_band(n, 8))

    def factory():
        return Banded(), (torch.randn(1, 2, 32, 8),)

    with attn_tune.patch_sdpa(None):
        problems = capture.capture_factory(factory)
    assert problems == [Problem(batch=1, heads=2, q_len=32, head_dim=8, causal=True, window=8)]


@pytest.mark.parametrize("training", [False, True])
def test_gradients_through_a_structured_call_match_sdpa_with_the_mask(training):
    q, k, v = (t.requires_grad_(training) for t in _qkv(2, 2, 32))
    pad = torch.ones(2, 32, dtype=torch.bool)
    pad[0, :5] = False
    mask = _band(32, 12)[None, None] & pad[:, None, None, :]
    problem = Problem(batch=2, heads=2, q_len=32, head_dim=8, causal=True, window=12, mask=True, key_padding=True,
                      training=training)
    grad = torch.randn(2, 2, 32, 8)
    spy = Spy()
    with registered(spy.variant()), attn_tune.use_config(config([entry(problem, "spy")])):
        out = attn_tune.attention(q, k, v, attn_mask=mask)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert len(spy.calls) == 1
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    if training:
        for a, b in zip(torch.autograd.grad(out, (q, k, v), grad), torch.autograd.grad(ref, (q, k, v), grad)):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def _count_reads(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, ...]]:
    """The shapes of the masks read from now on (cache emptied first), read for real."""
    reads: list[tuple[int, ...]] = []
    real_read = mask_structure._read
    monkeypatch.setattr(mask_structure, "_read", lambda m, *a: reads.append(tuple(m.shape)) or real_read(m, *a))
    mask_structure.clear_mask_cache()
    return reads


@pytest.mark.parametrize("bool_masks", [False, True])
def test_multihead_attention_padding_is_known_from_its_parts_not_read_per_layer(monkeypatch, bool_masks):
    """nn.MultiheadAttention adds its key padding to its attention mask: a new (batch, heads, q, k) tensor per layer.
    Its structure follows from the parts (the causal mask, read once; the padding), so the sum is never read."""
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
    model = torch.nn.TransformerEncoder(layer, 3, enable_nested_tensor=False).eval()
    x = torch.randn(2, 24, 32)
    causal = torch.nn.Transformer.generate_square_subsequent_mask(24)
    pad = torch.zeros(2, 24, dtype=torch.bool)
    pad[1, 18:] = True  # row 1 right-padded (True = ignore, as nn.MultiheadAttention takes it)
    if bool_masks:
        causal = causal.isinf()  # True = hidden
    else:
        pad = torch.zeros(2, 24).masked_fill(pad, float("-inf"))
    with torch.no_grad():
        expected = model(x, mask=causal, src_key_padding_mask=pad)
    reads = _count_reads(monkeypatch)
    spy = Spy()
    problem = Problem(batch=2, heads=4, q_len=24, head_dim=8, causal=True, mask=True, key_padding=True)
    with registered(spy.variant()), attn_tune.patch_sdpa(config([entry(problem, "spy")])), torch.no_grad():
        out = model(x, mask=causal, src_key_padding_mask=pad)
    assert len(spy.calls) == 3 and all(c["is_causal"] and c["mask"].shape == (2, 1, 1, 24) for c in spy.calls)
    assert torch.equal(spy.calls[0]["mask"][:, 0, 0], torch.tensor([[True] * 24, [True] * 18 + [False] * 6]))
    assert reads == [(24, 24)]  # the causal mask once (nn.TransformerEncoder makes a bool one float, once)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("with_mask", [True, False])
def test_a_direct_multihead_attention_call_with_a_bool_mask_reads_it_once(monkeypatch, with_mask):
    """nn.MultiheadAttention makes its bool mask (True = hidden) a new float one per call: that (q, k) part is read
    per call, the (batch, heads, q, k) sum never; with the key padding alone SDPA gets a (batch, heads, 1, keys)
    mask, known from the padding, never read."""
    torch.manual_seed(1)
    mha = torch.nn.MultiheadAttention(16, 2, batch_first=True).eval()
    x = torch.randn(2, 12, 16)
    hidden = torch.ones(12, 12, dtype=torch.bool).triu(1) if with_mask else None
    pad = torch.zeros(2, 12, dtype=torch.bool)
    pad[0, :3] = True
    with torch.no_grad(), attn_tune.patch_sdpa(None):  # SDPA's answer (the fused fast path gives NaN on empty rows)
        expected = mha(x, x, x, attn_mask=hidden, key_padding_mask=pad, need_weights=False)[0]
    reads = _count_reads(monkeypatch)
    spy = Spy()
    problem = Problem(batch=2, heads=2, q_len=12, head_dim=8, causal=with_mask, mask=True, key_padding=True)
    with registered(spy.variant()), attn_tune.patch_sdpa(config([entry(problem, "spy")])), torch.no_grad():
        outs = [mha(x, x, x, attn_mask=hidden, key_padding_mask=pad, need_weights=False)[0] for _ in range(3)]
    assert len(spy.calls) == 3 and reads == ([(12, 12)] * 3 if with_mask else [])
    for out in outs:
        torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)


def test_a_config_tuned_for_the_generic_mask_still_serves_it():
    """An entry tuned before masks were read (the call as a generic mask) keeps serving the call when the config has
    no entry for its structure."""
    q, k, v = _qkv(1, 2, 32)
    mask = _band(32, 8)
    spy = Spy()
    generic = Problem(batch=1, heads=2, q_len=32, head_dim=8, mask=True)
    with registered(spy.variant()), attn_tune.use_config(config([entry(generic, "spy")])):
        decision = attn_tune.explain(q, k, v, attn_mask=mask)
        out = attn_tune.attention(q, k, v, attn_mask=mask)
    assert (decision.variant, decision.problem) == ("spy", generic) and len(spy.calls) == 1
    assert spy.calls[0]["mask"] is mask
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, attn_mask=mask), rtol=0, atol=1e-6)


def test_a_float_mask_of_another_dtype_is_not_read_and_sdpa_says_why():
    q, k, v = _qkv(1, 2, 16)
    mask = torch.zeros(16, 16, dtype=torch.float64).masked_fill(~_band(16, None), float("-inf"))
    problem = Problem(batch=1, heads=2, q_len=16, head_dim=8, causal=True)
    with attn_tune.use_config(config([entry(problem, "sdpa")])):
        assert attn_tune.explain(q, k, v, attn_mask=mask).mask_read is None
        with pytest.raises(RuntimeError):
            attn_tune.attention(q, k, v, attn_mask=mask)
