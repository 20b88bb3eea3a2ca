"""`attn_tune.mask_structure`: explicit SDPA masks read as (causal, window, key padding), exactly or not at all.

Every recognised structure is checked twice: its visible set rebuilt from the answer equals the mask's, and SDPA in
float64 with the original mask equals attention computed from the answer's flags and padding mask (1e-12).
"""

from __future__ import annotations

import gc

import pytest
import torch
import torch.nn.functional as F

import attn_tune.mask_structure as ms
from attn_tune.families.masks import merge_masks, visible_keys
from attn_tune.mask_structure import MaskStructure, clear_mask_cache, read_mask
from tests.conftest import DEVICES

pytestmark = pytest.mark.filterwarnings("error")  # the reader must be silent

FORMS = ["bool", "float32", "float64", "bfloat16"]
B, H = 4, 3


@pytest.fixture(autouse=True)
def fresh_cache():
    clear_mask_cache()
    yield
    clear_mask_cache()


# ---------------------------------------------------------------------------------------------------- helpers


def pattern(q: int, k: int, causal: bool, window: int | None, device: str = "cpu") -> torch.Tensor:
    """The (q, k) bool causal/window pattern, top-left aligned."""
    p = visible_keys(q, k, causal=causal, window=window, device=device)
    return torch.ones(q, k, dtype=torch.bool, device=device) if p is None else p


def mixed_padding(batch: int, k: int, device: str = "cpu") -> torch.Tensor:
    """(batch, k) True = real: row 0 unpadded, 1 left-padded (3), 2 right-padded (2), 3 with holes at keys 1 and 4."""
    pad = torch.ones(batch, k, dtype=torch.bool, device=device)
    pad[1, :3] = False
    pad[2, k - 2:] = False
    pad[3, [1, 4]] = False
    return pad


def form(mask: torch.Tensor, name: str) -> torch.Tensor:
    """A bool mask as itself or as an additive mask (0 visible, -inf hidden) of that float dtype."""
    if name == "bool":
        return mask
    dtype = getattr(torch, name)
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, float("-inf"))


def visible_of(mask: torch.Tensor, batch: int, heads: int | None, q: int, k: int) -> torch.Tensor:
    """The mask's visible set broadcast to (batch, heads or 1, q, k)."""
    vis = mask if mask.dtype == torch.bool else mask == 0
    if heads is None:
        return vis.expand(batch, q, k)[:, None]
    return vis.expand(batch, heads, q, k)


def dense(s: MaskStructure, batch: int, heads: int | None, q: int, k: int) -> torch.Tensor:
    """The visible set the answer stands for, (batch, heads or 1, q, k)."""
    device = s.key_padding.device if s.key_padding is not None else "cpu"
    vis = pattern(q, k, s.causal, s.window, device)[None, None]
    pad = s.padding_mask(batch)
    if pad is not None:
        vis = vis & pad
    return vis.expand(batch, heads or 1, q, k)


def structured_attention(q, k, v, s: MaskStructure) -> torch.Tensor:
    """Attention from the answer alone: its causal/window pattern folded into a mask, with its padding mask."""
    q_len, kv_len = q.shape[-2], k.shape[-2]
    mask = merge_masks(visible_keys(q_len, kv_len, causal=s.causal, window=s.window, device=q.device),
                       s.padding_mask(q.shape[0]))
    if mask is not None and q.dim() == 3 and mask.dim() == 4:
        mask = mask[:, 0]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def assert_exact(mask: torch.Tensor, s: MaskStructure | None, batch: int, heads: int | None, q: int, k: int) -> None:
    """The answer's visible set is the mask's, and SDPA agrees to 1e-12 in float64 on random q/k/v."""
    assert s is not None
    vis = visible_of(mask, batch, heads, q, k)
    assert torch.equal(dense(s, batch, heads, q, k).to(vis.device).expand_as(vis), vis)
    gen = torch.Generator().manual_seed(q * 1000 + k)
    lead = (batch,) if heads is None else (batch, heads)
    qq, kk, vv = (torch.randn(*lead, n, 8, generator=gen, dtype=torch.float64).to(mask.device) for n in (q, k, k))
    original = mask if mask.dtype == torch.bool else mask.to(torch.float64)
    want = F.scaled_dot_product_attention(qq, kk, vv, attn_mask=original)
    torch.testing.assert_close(structured_attention(qq, kk, vv, s), want, atol=1e-12, rtol=0)


def assert_structure(s: MaskStructure | None, causal: bool, window: int | None, pad: torch.Tensor | None) -> None:
    assert s is not None
    assert (s.causal, s.window) == (causal, window)
    if pad is None:
        assert s.key_padding is None
    else:
        assert s.key_padding is not None and torch.equal(s.key_padding.cpu(), pad.cpu())


def layouts(m4: torch.Tensor, batch: int, heads: int):
    """(mask, heads) pairs: the same (mask_batch, 1, q, k) mask as 2-D/3-D/4-D tensors, copies and expanded views."""
    mb, _, q, k = m4.shape
    out = [(m4, heads), (m4.expand(batch, heads, q, k), heads), (m4.expand(batch, heads, q, k).contiguous(), heads),
           (m4[:, 0], None), (m4[:, 0].expand(batch, q, k), None)]
    if mb == 1:
        out += [(m4[0, 0], heads), (m4[0, 0], None), (m4[0].expand(heads, q, k), heads),
                (m4.expand(batch, 1, q, k).contiguous(), heads)]
    return out


# ---------------------------------------------------------------------------------------------- recognised


CASES = [  # name, q, k, causal, window given, window expected (a window cutting nothing is None)
    ("all visible", 7, 7, False, None, None),
    ("causal", 7, 7, True, None, None),
    ("causal band", 9, 9, True, 3, 3),
    ("symmetric band", 9, 9, False, 3, 3),
    ("causal, kv longer", 5, 9, True, None, None),
    ("causal, q longer", 9, 5, True, None, None),
    ("causal band, kv longer", 6, 11, True, 3, 3),
    ("symmetric band, kv longer", 6, 11, False, 4, 4),
    ("symmetric band, q longer", 10, 7, False, 4, 4),
    ("causal window cutting nothing", 6, 6, True, 6, None),
    ("symmetric window cutting nothing", 6, 8, False, 8, None),
]


@pytest.mark.parametrize("padded", [False, True], ids=["no padding", "padding"])
@pytest.mark.parametrize("name", FORMS)
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_structures_are_recognised_in_every_form_and_layout(case, name, padded) -> None:
    _, q, k, causal, window, want_window = case
    p = pattern(q, k, causal, window)
    pad = mixed_padding(B, k) if padded else torch.ones(1, k, dtype=torch.bool)
    want_pad = pad | ~p.any(0)  # keys the pattern never shows count as real
    want_pad = None if bool(want_pad.all()) else want_pad
    m4 = form(p[None, None] & pad[:, None, None, :], name)
    for mask, heads in layouts(m4, B, H):
        s = read_mask(mask, B, heads, q, k)
        assert_structure(s, causal, want_window, want_pad)
        assert_exact(mask, s, B, heads, q, k)


@pytest.mark.parametrize("name", FORMS)
def test_decode_masks(name) -> None:
    """q_len 1 (batch, 1, 1, kv_len): all visible, or key padding only."""
    k = 10
    pad = mixed_padding(B, k)
    s = read_mask(form(pad[:, None, None, :], name), B, H, 1, k)
    assert_structure(s, False, None, pad)
    assert_exact(form(pad[:, None, None, :], name), s, B, H, 1, k)
    assert_structure(read_mask(form(torch.ones(1, 1, 1, k, dtype=torch.bool), name), B, H, 1, k), False, None, None)
    # a decode step's causal mask over the cache (bottom-right: the last query sees every key) is all visible
    assert_structure(read_mask(form(torch.ones(B, 1, 1, k, dtype=torch.bool), name), B, H, 1, k), False, None, None)


@pytest.mark.parametrize("name", FORMS)
def test_pure_key_padding_broadcast_over_queries(name) -> None:
    q, k = 6, 9
    pad = mixed_padding(B, k)
    for mask, heads in ((pad[:, None, None, :], H), (pad[:, None, :].expand(B, q, k), None),
                        (pad[:, None, None, :].expand(B, H, q, k), H), (pad[:, None, :], None)):
        mask = form(mask, name)
        s = read_mask(mask, B, heads, q, k)
        assert_structure(s, False, None, pad)
        assert_exact(mask, s, B, heads, q, k)
    assert read_mask(pad[:, None, :].expand(B, q, k), B, H, q, k) is None  # 3-D aligns with (heads, q, k)


def test_bottom_right_causal() -> None:
    """Recognised where it has a top-left form: q_len == kv_len (causal), q_len 1 (all visible), short q (a band)."""
    def bottom_right(q, k):
        return visible_keys(q, k, causal=True, window=None, device="cpu", q_offset=k - q)

    assert_structure(read_mask(bottom_right(8, 8), 1, 2, 8, 8), True, None, None)
    assert_structure(read_mask(bottom_right(1, 8), 1, 2, 1, 8), False, None, None)
    s = read_mask(bottom_right(2, 8), 1, 2, 2, 8)  # query i sees j <= i + 6: exactly |i - j| < 7
    assert_structure(s, False, 7, None)
    assert_exact(bottom_right(2, 8), s, 1, 2, 2, 8)
    assert read_mask(bottom_right(6, 8), 1, 2, 6, 8) is None


def test_padding_that_makes_a_window_or_causality_moot_is_read_as_the_wider_pattern() -> None:
    q = k = 12
    # every row left-padded: only the first real keys bound the offsets seen, yet this is plain causal + padding
    pad = torch.ones(2, k, dtype=torch.bool)
    pad[0, :3], pad[1, :5] = False, False
    mask = pattern(q, k, True, None)[None, None] & pad[:, None, None, :]
    s = read_mask(mask, 2, 2, q, k)
    assert_structure(s, True, None, pad)
    assert_exact(mask, s, 2, 2, q, k)
    # only key 0 real: causal with padding or key padding alone? every query sees key 0 either way
    only_first = torch.zeros(1, k, dtype=torch.bool)
    only_first[0, 0] = True
    mask = pattern(q, k, True, None)[None, None] & only_first[:, None, None, :]
    assert_structure(read_mask(mask, 1, 2, q, k), False, None, only_first)


def test_offsets_seen_only_by_unsampled_rows_are_found(monkeypatch) -> None:
    """The sampled rows suggest too narrow a band; the exact offsets of every row give the right one."""
    hypotheses = []
    real = ms._hypothesis
    monkeypatch.setattr(ms, "_hypothesis", lambda *args: hypotheses.append(real(*args)) or hypotheses[-1])
    q = k = 200
    pad = torch.zeros(1, k, dtype=torch.bool)
    pad[0, [0, 101]] = True
    mask = pattern(q, k, True, 8)[None, None] & pad[:, None, None, :]
    s = read_mask(mask, 1, 1, q, k)
    assert_structure(s, True, 8, pad)
    assert_exact(mask, s, 1, 1, q, k)
    assert hypotheses == [(True, 7), (True, 8)]  # the sample's, then every row's
    # no sampled row sees a key: only rows 4 and 5 see the one real key
    pad = torch.zeros(1, k, dtype=torch.bool)
    pad[0, 4] = True
    mask = pattern(q, k, True, 2)[None, None] & pad[:, None, None, :]
    s = read_mask(mask, 1, 1, q, k)
    assert_structure(s, True, 2, pad)
    assert_exact(mask, s, 1, 1, q, k)
    # a symmetric band over short right-padded rows: the widest offsets sit in padded query rows
    pad = torch.zeros(2, k, dtype=torch.bool)
    pad[0, :5], pad[1, :3] = True, True
    mask = pattern(q, k, False, 70)[None, None] & pad[:, None, None, :]
    s = read_mask(mask, 2, 1, q, k)
    assert_structure(s, False, 70, pad)
    assert_exact(mask, s, 2, 1, q, k)


def test_all_keys_padded_and_fully_hidden_masks() -> None:
    q = k = 6
    pad = torch.ones(2, k, dtype=torch.bool)
    pad[1] = False  # an empty sequence in the batch: its queries see nothing, as SDPA gives zeros
    mask = pattern(q, k, True, None)[None, None] & pad[:, None, None, :]
    s = read_mask(mask, 2, 1, q, k)
    assert_structure(s, True, None, pad)
    assert_exact(mask, s, 2, 1, q, k)
    assert "all keys" in s.describe()


# ------------------------------------------------------------------------------------------------ generic


def test_one_flipped_element_is_never_misread() -> None:
    """Flip every element of small structured masks: each answer is None or exactly the flipped mask."""
    q = k = 6
    pad = torch.ones(2, k, dtype=torch.bool)
    pad[1, :2] = False
    for causal, window in ((True, None), (True, 3), (False, 2), (False, None)):
        base = (pattern(q, k, causal, window)[None, None] & pad[:, None, None, :]).expand(2, 2, q, k).contiguous()
        misses = 0
        for index in range(base.numel()):
            mask = base.clone()
            mask.view(-1)[index] = ~mask.view(-1)[index]
            s = read_mask(mask, 2, 2, q, k)
            if s is None:
                misses += 1
            else:
                assert_exact(mask, s, 2, 2, q, k)
        assert misses > base.numel() // 2


@pytest.mark.parametrize("name", FORMS)
def test_near_misses_are_generic(name) -> None:
    q = k = 9
    pad = mixed_padding(B, k)
    good = (pattern(q, k, True, None)[None, None] & pad[:, None, None, :]).expand(B, H, q, k).contiguous()
    assert read_mask(form(good, name), B, H, q, k) is not None
    for where in [(0, 0, 0, 0), (3, 2, 8, 8), (0, 0, 0, 8), (3, 2, 8, 0), (1, 0, 1, 0), (1, 1, 2, 2), (2, 1, 4, 2),
                  (0, 2, 2, 5), (3, 0, 6, 4)]:  # corners, a padded query row, a padded key, above the diagonal
        mask = good.clone()
        mask[where] = ~mask[where]
        assert read_mask(form(mask, name), B, H, q, k) is None, where

    def generic(mask: torch.Tensor, heads: int | None = 1) -> None:
        assert read_mask(form(mask, name), mask.shape[0] if mask.dim() == 4 else 1, heads, q, k) is None

    d = torch.arange(q)[:, None] - torch.arange(k)
    band = (d >= 0) & (d < 3)
    holed = band.clone()
    holed[5, 4] = False
    generic(holed)  # a band with a hole
    generic(d > 0)  # strictly causal: the diagonal hidden
    generic((d >= -1) & (d < 3))  # an asymmetric band
    empty_row = d >= 0
    empty_row[4] = False
    generic(empty_row)  # an empty query row no padding explains
    heads = band[None, None].repeat(1, 2, 1, 1)
    heads[0, 1] = d >= 0
    generic(heads, 2)  # heads that differ
    shifted = band[None, None].repeat(2, 1, 1, 1)
    shifted[1] = (d >= 1) & (d < 4)
    generic(shifted)  # batch rows with different patterns


@pytest.mark.parametrize("value", [-1e9, "finfo.min", 0.5, float("inf"), float("nan"), -1.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_additive_masks_hold_only_zero_and_minus_inf(dtype, value) -> None:
    q = k = 8
    value = torch.finfo(dtype).min if value == "finfo.min" else value
    hidden = ~pattern(q, k, True, None)
    mask = torch.zeros(q, k, dtype=dtype).masked_fill(hidden, float("-inf"))
    assert_structure(read_mask(mask, 1, 1, q, k), True, None, None)
    clear_mask_cache()
    assert read_mask(torch.zeros(q, k, dtype=dtype).masked_fill(hidden, value), 1, 1, q, k) is None
    one = mask.clone()
    one[5, 7] = value  # a single hidden entry that is not -inf
    assert read_mask(one, 1, 1, q, k) is None
    one = mask.clone()
    one[5, 2] = value  # a single visible entry that is not 0
    assert read_mask(one, 1, 1, q, k) is None


def test_negative_zero_is_a_zero() -> None:
    mask = torch.zeros(8, 8).masked_fill(~pattern(8, 8, True, 3), float("-inf"))
    mask[mask == 0] = -0.0
    assert_structure(read_mask(mask, 1, 1, 8, 8), True, 3, None)


def test_masks_not_read() -> None:
    q = k = 6
    causal = pattern(q, k, True, None)
    float_mask = form(causal, "float32").requires_grad_()
    assert read_mask(float_mask, 1, 1, q, k) is None  # requires grad
    assert read_mask(causal, 1, 1, q, k + 1) is None  # does not broadcast
    assert read_mask(causal[None].expand(3, q, k), 2, None, q, k) is None  # batch 3 for 2
    assert read_mask(causal[None].expand(3, q, k), 2, 2, q, k) is None  # 3 heads for 2
    assert read_mask(causal[None, None, None], 1, 1, q, k) is None  # 5-D
    assert read_mask(causal[None, None], 1, None, q, k) is None  # 4-D for 3-D q
    assert read_mask(causal.to(torch.int64), 1, 1, q, k) is None  # not bool nor float
    assert read_mask(torch.ones((), dtype=torch.bool), 1, 1, q, k) is None  # 0-D
    assert read_mask(None, 1, 1, q, k) is None


def test_masks_broadcast_over_keys() -> None:
    q, k = 5, 7
    assert_structure(read_mask(torch.ones(q, 1, dtype=torch.bool), 1, 1, q, k), False, None, None)
    rows = torch.ones(2, 1, q, 1, dtype=torch.bool)
    rows[1, :, 2] = False  # one query of one batch row sees nothing: no padding explains it
    assert read_mask(rows, 2, 1, q, k) is None
    assert_structure(read_mask(torch.zeros(1, 1), 1, None, q, k), False, None, None)  # a scalar-like float mask


def test_traced_calls_are_not_read(monkeypatch) -> None:
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert read_mask(pattern(4, 4, True, None), 1, 1, 4, 4) is None


def test_windows_leaving_queries_without_keys_are_generic() -> None:
    """attn_tune's Problem refuses q_len >= kv_len + window (those queries see nothing), so the reader does too."""
    q, k = 12, 4
    mask = pattern(q, k, True, 3)
    assert read_mask(mask, 1, 1, q, k) is None
    assert_structure(read_mask(pattern(q, k, True, None), 1, 1, q, k), True, None, None)


# ---------------------------------------------------------------------------------------------- describe


def test_describe_and_padding_mask() -> None:
    assert MaskStructure(False, None, None).describe() == "all keys visible"
    assert MaskStructure(True, None, None).describe() == "causal"
    assert MaskStructure(False, 7, None).describe() == "window 7"
    pad = torch.ones(4, 10, dtype=torch.bool)
    pad[1:, :2] = False
    s = MaskStructure(True, 512, pad)
    assert s.describe() == "causal, window 512, key padding (left) in 3 of 4 rows"
    assert s.padding_mask(4).shape == (4, 1, 1, 10) and torch.equal(s.padding_mask(4)[:, 0, 0], pad)
    assert MaskStructure(False, None, None).padding_mask(3) is None
    one = pad[1:2]
    assert MaskStructure(False, None, one).describe() == "key padding (left) in every batch row"
    assert MaskStructure(False, None, one).padding_mask(5).shape == (5, 1, 1, 10)
    assert MaskStructure(False, None, mixed_padding(4, 10)).describe() == \
        "key padding (left, right, holes) in 3 of 4 rows"
    ends = torch.ones(2, 10, dtype=torch.bool)
    ends[0, [0, 9]] = False
    assert MaskStructure(False, None, ends).describe() == "key padding (both ends) in 1 of 2 rows"


# ------------------------------------------------------------------------------------------------- cache


@pytest.fixture
def reads(monkeypatch):
    """Counts the uncached reads."""
    calls = []
    real = ms._read

    def spy(*args):
        calls.append(args[1:])
        return real(*args)

    monkeypatch.setattr(ms, "_read", spy)
    return calls


def test_a_mask_is_read_once_per_shape(reads) -> None:
    mask = pattern(8, 8, True, 3)[None, None]
    for _ in range(3):
        assert_structure(read_mask(mask, 2, 4, 8, 8), True, 3, None)
    assert len(reads) == 1
    read_mask(mask, 3, 4, 8, 8)  # the same mask serving another batch size
    read_mask(mask, 2, None, 8, 8)
    assert len(reads) == 3
    assert read_mask(mask, 2, 4, 8, 9) is None and read_mask(mask, 2, 4, 8, 9) is None  # negative answers cached too
    assert len(reads) == 4
    for _ in range(2):  # fresh views of one base: the same geometry of the same storage, one read
        read_mask(mask[0], 2, 4, 8, 8)
    assert len(reads) == 5


def test_a_mask_changed_in_place_is_read_again(reads) -> None:
    mask = pattern(8, 8, True, None)[None, None].clone()
    assert_structure(read_mask(mask, 1, 2, 8, 8), True, None, None)
    mask[..., 3, 1] = ~mask[..., 3, 1]
    assert read_mask(mask, 1, 2, 8, 8) is None
    mask[..., 3, 1] = ~mask[..., 3, 1]
    assert_structure(read_mask(mask, 1, 2, 8, 8), True, None, None)
    mask.masked_fill_(~pattern(8, 8, True, 2), False)
    assert_structure(read_mask(mask, 1, 2, 8, 8), True, 2, None)
    view = mask[0, 0]
    assert_structure(read_mask(view, 1, 2, 8, 8), True, 2, None)
    mask[0, 0, 7, 0] = True  # through the base: the view shares its version counter
    assert read_mask(view, 1, 2, 8, 8) is None
    assert len(reads) == 6

    additive = form(pattern(8, 8, True, None), "float32")
    assert_structure(read_mask(additive, 1, 2, 8, 8), True, None, None)
    additive.masked_fill_(~pattern(8, 8, True, 4), float("-inf"))
    assert_structure(read_mask(additive, 1, 2, 8, 8), True, 4, None)


@pytest.mark.parametrize("drop_callbacks", [True, False], ids=["callbacks", "no callbacks"])
def test_a_new_mask_at_a_reused_address_is_read(monkeypatch, drop_callbacks) -> None:
    """Freed masks' ids come back for new masks of version 0: answers follow the tensor, never the address.
    Without the weakref callbacks the stale entry stays, and the dead reference alone must refuse it."""
    if not drop_callbacks:
        monkeypatch.setattr(ms._Cache, "_drop", lambda self, key, ref: None)
    q = k = 8
    for step in range(6):
        causal, window = (True, None) if step % 2 == 0 else (False, 3)
        mask = pattern(q, k, causal, window)[None, None].clone()
        assert_structure(read_mask(mask, 1, 1, q, k), causal, window, None)
        del mask
        gc.collect()


def test_entries_die_with_their_mask() -> None:
    mask = pattern(8, 8, True, None)[None, None].clone()
    read_mask(mask, 1, 1, 8, 8)
    read_mask(mask, 2, 1, 8, 8)
    assert len(ms._CACHE._entries) == 2
    del mask
    gc.collect()
    assert len(ms._CACHE._entries) == 0


def test_inference_tensors_are_read_each_call(reads) -> None:
    pad = mixed_padding(B, 8)
    with torch.inference_mode():
        mask = pattern(8, 8, True, None)[None, None] & pad[:, None, None, :]
        inside = read_mask(mask, B, 2, 8, 8)
    outside = read_mask(mask, B, 2, 8, 8)
    for s in (inside, outside):
        assert_structure(s, True, None, pad)
        assert not s.key_padding.is_inference()  # usable by autograd later
    assert len(reads) == 2 and len(ms._CACHE._entries) == 0
    # a normal mask read inside inference mode still gives (and caches) a normal tensor
    plain = pad[:, None, None, :].clone()
    with torch.inference_mode():
        s = read_mask(plain, B, 2, 8, 8)
    assert not s.key_padding.is_inference()


def test_cache_bounds(monkeypatch, reads) -> None:
    monkeypatch.setattr(ms, "MAX_PADDING_BYTES", 200)
    masks = [mixed_padding(B, 16)[:, None, None, :].clone() for _ in range(6)]  # 64 bytes of padding each
    for mask in masks:
        read_mask(mask, B, 1, 4, 16)
        assert ms._CACHE._bytes <= 200
    assert len(ms._CACHE._entries) == 3 and ms._CACHE._bytes == 192
    read_mask(masks[-1], B, 1, 4, 16)
    assert len(reads) == 6  # the newest kept
    read_mask(masks[0], B, 1, 4, 16)
    assert len(reads) == 7  # the oldest evicted

    monkeypatch.setattr(ms, "MAX_PADDING_BYTES", 10)  # larger than the whole bound: answered, not kept
    assert read_mask(masks[1], B, 1, 4, 16) is not None
    assert ms._CACHE._bytes <= 10

    clear_mask_cache()
    monkeypatch.setattr(ms, "MAX_ENTRIES", 4)
    plain = [pattern(8, 8, True, None).clone() for _ in range(7)]
    for mask in plain:
        read_mask(mask, 1, 1, 8, 8)
    assert len(ms._CACHE._entries) == 4


# -------------------------------------------------------------------------------------------------- devices


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["bool", "float16", "bfloat16", "float32"])
def test_devices(device, name) -> None:
    q, k = 40, 48
    pad = mixed_padding(B, k, device)
    for causal, window in ((True, None), (True, 9), (False, 5), (False, None)):
        p = pattern(q, k, causal, window, device)
        mask = form(p[None, None] & pad[:, None, None, :], name)
        s = read_mask(mask, B, H, q, k)
        assert s is not None and s.key_padding.device.type == torch.device(device).type
        assert (s.causal, s.window) == (causal, window)
        assert_exact(mask, s, B, H, q, k)
        broken = mask.clone()
        broken[0, 0, 30, 30] = form(torch.zeros((), dtype=torch.bool), name)  # hide a diagonal key of one query
        assert read_mask(broken, B, H, q, k) is None


def test_the_shared_patterns_are_bounded_in_bytes(monkeypatch):
    """Every distinct length a reader sees builds a (q, k) pattern; the shared cache keeps the latest within its
    byte bound, and a kept pattern is the same tensor on the next ask."""
    from attn_tune.families import masks

    monkeypatch.setattr(masks, "_patterns", masks.OrderedDict())
    monkeypatch.setattr(masks, "_KEPT_PATTERN_BYTES", 100_000)
    for n in range(200, 260):
        masks.shared_visible_keys(n, n, causal=True, window=None, device="cpu")
    assert 0 < masks._pattern_bytes() <= 100_000 and len(masks._patterns) < 60
    last = masks.shared_visible_keys(259, 259, causal=True, window=None, device="cpu")
    assert masks.shared_visible_keys(259, 259, causal=True, window=None, device="cpu") is last
    assert torch.equal(last, torch.ones(259, 259, dtype=torch.bool).tril())
