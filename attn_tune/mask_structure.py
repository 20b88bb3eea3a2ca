"""Read an explicit SDPA `attn_mask` as a structure (causal, window, key padding), so a structured kernel can serve it.

Models often pass `F.scaled_dot_product_attention` a boolean or additive mask that is really "causal", "a band of
width W" or "these keys are padding". `read_mask` finds that structure, or answers None ("generic"): a hypothesis
from a sample of rows, the key padding read off the rows that see each key, then an exact check of every element of
every batch row and head (float masks: exactly 0 or -inf). An answer is never approximate. Answers are cached per
mask tensor (identity and version counter, held through a weakref), so a mask shared by every layer is read once.
"""

from __future__ import annotations

import contextlib
import functools
import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from typing import Iterator, NamedTuple

import torch
from torch import Tensor

from attn_tune.families.masks import shared_visible_keys

__all__ = ["MaskStructure", "read_mask", "clear_mask_cache", "known_structure"]

SAMPLE_ROWS = 64  # rows (besides the first and last) the hypothesis is drawn from
CHUNK_ELEMENTS = {"cpu": 1 << 20}  # mask elements per step of the exact check: on CPU its temporaries stay in cache
GPU_CHUNK_ELEMENTS = 1 << 26  # elsewhere a step is a kernel launch and a sync: few, bounded in memory
MAX_ENTRIES = 256
MAX_PADDING_BYTES = 64 << 20  # key_padding tensors the cache may keep alive


@dataclass(frozen=True, eq=False)
class MaskStructure:
    """Query i of batch row b sees key j iff the causal/window pattern lets it (top-left aligned, attn-tune's window
    convention, as `visible_keys`) and `key_padding[b, j]` (None: every key is real; mask_batch is 1 or the batch)."""

    causal: bool
    window: int | None
    key_padding: Tensor | None  # (mask_batch, kv_len) bool, True = a real key

    def padding_mask(self, batch: int) -> Tensor | None:
        """The key padding as a (batch, 1, 1, kv_len) boolean SDPA mask (an expanded view); None without padding."""
        if self.key_padding is None:
            return None
        pad = self.key_padding[:, None, None, :]
        return pad.expand(batch, 1, 1, pad.shape[-1])

    def describe(self) -> str:
        """One short line: 'causal, window 512, key padding (left) in 3 of 4 rows', 'all keys visible'."""
        parts = (["causal"] if self.causal else []) + ([] if self.window is None else [f"window {self.window}"])
        if self.key_padding is not None:
            parts.append(_describe_padding(self.key_padding))
        return ", ".join(parts) or "all keys visible"


def read_mask(attn_mask: Tensor, batch: int, heads: int | None, q_len: int, kv_len: int) -> MaskStructure | None:
    """The structure of an SDPA `attn_mask` for q (batch, heads, q_len, .) and keys (., kv_len, .), or None when it
    is not exactly one (or is not read: it requires grad, does not broadcast, or is traced by torch.compile or
    captured into a CUDA graph).

    `heads` is None for 3-D q. Cached per tensor and shape; inference tensors (no version counter) are read each call.
    """
    if (not isinstance(attn_mask, Tensor) or attn_mask.requires_grad or attn_mask.device.type == "meta"
            or torch.compiler.is_compiling() or attn_mask.is_cuda and torch.cuda.is_current_stream_capturing()):
        return None  # a traced or captured call cannot read values, and replays would not read them again
    known = getattr(_known, "value", None)
    if known is not None and known[0] == tuple(attn_mask.shape) and attn_mask.is_floating_point():
        _known.value = None  # the one call it was set for
        return known[1]
    if attn_mask.is_inference():
        return _read(attn_mask, batch, heads, q_len, kv_len)
    anchor = attn_mask if attn_mask._base is None else attn_mask._base  # views share the base's version counter
    key = (id(anchor), attn_mask.dtype, attn_mask.device, tuple(attn_mask.shape), attn_mask.stride(),
           attn_mask.storage_offset(), attn_mask.data_ptr(), batch, heads, q_len, kv_len)
    version = attn_mask._version
    found, answer = _CACHE.get(key, anchor, version)
    if not found:
        answer = _read(attn_mask, batch, heads, q_len, kv_len)
        _CACHE.put(key, anchor, version, answer)
    return answer


_known = threading.local()


@contextlib.contextmanager
def known_structure(shape: tuple[int, ...], structure: MaskStructure) -> Iterator[None]:
    """Inside the block, the next additive mask of exactly `shape` that `read_mask` sees is `structure`, unread.

    For a caller that builds the mask itself from parts it has read (nn.MultiheadAttention adds its key padding to
    its attention mask, a new (batch, heads, q, k) tensor per call): reading the sum would cost a pass over it per
    layer, while its structure follows from the parts. Per thread; the hint ends with the block.
    """
    _known.value = (tuple(shape), structure)
    try:
        yield
    finally:
        _known.value = None


def clear_mask_cache() -> None:
    """Forget every cached answer."""
    _CACHE.clear()


def _read(mask: Tensor, batch: int, heads: int | None, q_len: int, kv_len: int) -> MaskStructure | None:
    """The uncached read: shape and dtype checks, then `_structure` on a (mask_batch, mask_heads, q, k) view."""
    if mask.dtype != torch.bool and not mask.is_floating_point():
        return None
    target = (batch, q_len, kv_len) if heads is None else (batch, heads, q_len, kv_len)
    if min(target) < 1 or not 1 <= mask.ndim <= len(target):
        return None
    view = mask[(None,) * (len(target) - mask.ndim)]  # PyTorch broadcasting aligns trailing dimensions
    if any(size not in (1, want) for size, want in zip(view.shape, target)):
        return None
    if heads is None:
        view = view.unsqueeze(1)
    with torch.inference_mode(False), torch.no_grad():  # plain tensors in the answer, usable later under autograd
        return _structure(view, q_len, kv_len)


class _Hypothesis(NamedTuple):
    causal: bool
    window: int | None


def _structure(m: Tensor, q: int, k: int) -> MaskStructure | None:
    """A hypothesis from sampled rows (from every row if none of them sees a key), then the exact check; when only
    the full check fails, one retry from every row's offsets."""
    mb, mh = m.shape[:2]
    if m.shape[2] == 1:  # the same keys for every query: pure key padding at most
        row = m[:, :, 0, :].expand(mb, mh, k)
        visible = _visible(row)
        if not torch.equal(visible, visible[:, :1].expand_as(visible)):
            return None
        if row.is_floating_point() and not _equal(row, _additive(visible, row.dtype)):
            return None
        pad = visible[:, 0]
        return _finish(q, k, False, None, None if bool(pad.all()) else pad)
    m = m.expand(mb, mh, q, k)
    rows = _sample_rows(q, m.device)
    sample = m[:, :1, rows]
    sampled = _hypothesis(_visible(sample[:, 0]), rows, q, k)
    hypothesis = sampled or _every_row_hypothesis(m, q, k)  # None: no sampled row sees a key
    ok, pad = _verify(m, hypothesis)
    if not ok and sampled not in (None, (False, None)) and _sample_fits(sample, rows, q, k, hypothesis, pad):
        # the sample's entries fit a pattern no wider than any true one, so unsampled rows may widen it: read all
        exact = _every_row_hypothesis(m, q, k)
        if exact != hypothesis:
            hypothesis = exact
            ok, pad = _verify(m, hypothesis)
    return _finish(q, k, *hypothesis, pad) if ok else None


def _from_offsets(d_hi: int, d_lo: int, q: int, k: int) -> _Hypothesis:
    """The narrowest pattern containing visible offsets i - j in [d_lo, d_hi]; a window cutting nothing is None."""
    causal = d_lo >= 0
    window = d_hi + 1 if causal else max(d_hi, -d_lo) + 1
    if window >= (q if causal else max(q, k)):
        window = None
    return _Hypothesis(causal, window)


def _hypothesis(visible: Tensor, rows: Tensor, q: int, k: int) -> _Hypothesis | None:
    """From the visible entries (mask_batch, len(rows), k) of query rows `rows`: each row's first and last key.
    None when those rows see no key at all."""
    as_bytes = visible.view(torch.uint8)
    first = as_bytes.argmax(-1)  # argmax returns the first maximal index
    after_last = as_bytes.flip(-1).argmax(-1)  # keys after the last visible one
    seen = as_bytes.gather(-1, first[..., None])[..., 0] == 1
    far = q + k
    reach = torch.stack([rows - first, (k - 1 - rows) - after_last])  # i - first j, last j - i
    d_hi, minus_d_lo = torch.where(seen, reach, -far).flatten(1).amax(1).tolist()
    return None if d_hi == -far else _from_offsets(d_hi, -minus_d_lo, q, k)


def _every_row_hypothesis(m: Tensor, q: int, k: int) -> _Hypothesis:
    """`_hypothesis` from every query row of head 0; all keys visible (then checked) when none sees a key."""
    return _hypothesis(_visible(m[:, 0]), torch.arange(q, device=m.device), q, k) or _Hypothesis(False, None)


def _verify(m: Tensor, hypothesis: _Hypothesis) -> tuple[bool, Tensor | None]:
    """(m is exactly pattern & padding, the padding): (mask_batch, k), read at the first query the pattern shows each
    key to (keys it never shows: False); None when no key the pattern shows is padding."""
    q, k = m.shape[2:]
    lo, hi = _columns(q, k, *hypothesis, m.device)
    shown = lo < hi
    pad = _visible(m[:, 0, lo.clamp(max=q - 1), torch.arange(k, device=m.device)]) & shown
    if bool((pad | ~shown).all()):  # the pattern's own columns hide the keys it never shows
        pad = None
    return _matches(m, _pattern(q, k, hypothesis, m.device), pad), pad


def _pattern(q: int, k: int, hypothesis: _Hypothesis, device: torch.device) -> Tensor | None:
    """The (q, k) bool pattern, built once per shape and shared (never modified); None when it shows every key."""
    return shared_visible_keys(q, k, causal=hypothesis.causal, window=hypothesis.window, device=device)


def _sample_fits(sample: Tensor, rows: Tensor, q: int, k: int, hypothesis: _Hypothesis, pad: Tensor | None) -> bool:
    """Whether the sampled rows (of head 0) are pattern & padding: if not, no wider pattern explains them either."""
    pattern = _pattern(q, k, hypothesis, sample.device)
    return _matches(sample, None if pattern is None else pattern[rows], pad)


def _finish(q: int, k: int, causal: bool, window: int | None, pad: Tensor | None) -> MaskStructure | None:
    """The widest equivalent pattern (a window or causality that padding makes moot is dropped), keys the pattern
    never shows counted as real, no padding if every key is; None if the window leaves queries with no key.
    Without padding the pattern is already the widest: a wider one would show some key to more queries."""
    if pad is not None:
        lo, hi = _columns(q, k, causal, window, pad.device)
        for wide in (_Hypothesis(False, None), _Hypothesis(causal, None), _Hypothesis(causal, window)):
            wide_lo, wide_hi = _columns(q, k, *wide, pad.device)
            if bool(((wide_lo == lo) & (wide_hi == hi) | ~pad).all()):  # each real key's queries are unchanged
                break  # the last candidate always fits
        causal, window = wide
        pad = pad | (wide_lo >= wide_hi)
        if bool(pad.all()):
            pad = None
    if window is not None and q >= k + window:
        return None
    return MaskStructure(causal, window, pad)


def _columns(q: int, k: int, causal: bool, window: int | None, device: torch.device) -> tuple[Tensor, Tensor]:
    """For each key j, the half-open range [lo, hi) of queries the pattern shows it to (empty when lo >= hi)."""
    j = torch.arange(k, device=device)
    lo = j if causal else torch.zeros_like(j)
    if window is None:
        return lo, torch.full_like(j, q)
    if not causal:
        lo = (j - window + 1).clamp(min=0)
    return lo, (j + window).clamp(max=q)


def _matches(m: Tensor, pattern: Tensor | None, pad: Tensor | None) -> bool:
    """True when m (mb, mh, q, k) is exactly pattern (q, k) & pad (mb, k) in every head; None = all True.
    Float masks must hold exactly 0 where visible and -inf elsewhere. Compared a block of rows at a time."""
    mb, mh, q, k = m.shape
    step = max(1, CHUNK_ELEMENTS.get(m.device.type, GPU_CHUNK_ELEMENTS) // (mb * mh * k))
    for start in range(0, q, step):
        rows = slice(start, start + step)
        got = m[:, :, rows]
        if pattern is None:
            want = torch.ones(1, 1, 1, k, dtype=torch.bool, device=m.device) if pad is None else pad[:, None, None]
        else:
            want = pattern[rows][None, None]
            if pad is not None:
                want = want & pad[:, None, None]
        if m.is_floating_point():
            want = _additive(want, m.dtype)
        if not _equal(got, want.expand(got.shape)):
            return False
    return True


def _equal(a: Tensor, b: Tensor) -> bool:
    """torch.equal, comparing the bits as wide integers where the layout allows (several times faster on CPU);
    float masks whose bits differ get a value comparison too (-0.0 is a 0)."""
    for wide in (torch.int64, torch.int32, torch.int16):
        if wide.itemsize < a.element_size():
            break
        try:
            a_bits, b_bits = a.view(wide), b.view(wide)
        except RuntimeError:  # the last dimension's size, stride or offset does not divide
            continue
        return torch.equal(a_bits, b_bits) or (a.is_floating_point() and torch.equal(a, b))
    return torch.equal(a, b)


def _visible(t: Tensor) -> Tensor:
    """Where a mask lets a query attend: a bool mask itself, an additive mask's zeros."""
    return t if t.dtype == torch.bool else t == 0


def _additive(visible: Tensor, dtype: torch.dtype) -> Tensor:
    """The additive mask (0 visible, -inf hidden) of a boolean one."""
    zero = torch.zeros((), dtype=dtype, device=visible.device)
    return torch.where(visible, zero, zero - float("inf"))


@functools.lru_cache(maxsize=32)
def _sample_rows(q: int, device: torch.device) -> Tensor:
    """Up to SAMPLE_ROWS evenly spaced query rows, the first and last included (shared: never modified)."""
    n = min(q, SAMPLE_ROWS)
    rows = sorted({r * (q - 1) // max(n - 1, 1) for r in range(n)} | {0, q - 1})
    return torch.tensor(rows, device=device)


def _describe_padding(pad: Tensor) -> str:
    """'key padding (left) in 3 of 4 rows': where each padded row's padding sits."""
    kinds = [_padding_kind(hidden) for hidden in (~pad).cpu() if bool(hidden.any())]
    where = ", ".join(sorted(set(kinds), key=kinds.index))
    if pad.shape[0] == 1:
        return f"key padding ({where}) in every batch row"
    return f"key padding ({where}) in {len(kinds)} of {pad.shape[0]} rows"


def _padding_kind(hidden: Tensor) -> str:
    """'left', 'right', 'both ends', 'holes' or 'all keys' for one row's padded keys (True = padding)."""
    k, n = hidden.numel(), int(hidden.sum())
    if n == k:
        return "all keys"
    if bool(hidden[:n].all()):
        return "left"
    if bool(hidden[k - n:].all()):
        return "right"
    real = (~hidden).nonzero().flatten()
    return "both ends" if int(real[-1] - real[0]) + 1 == k - n else "holes"


class _Entry(NamedTuple):
    ref: weakref.ref
    version: int
    answer: MaskStructure | None
    nbytes: int


class _Cache:
    """Answers per (mask tensor, view geometry, call shape), oldest evicted first past MAX_ENTRIES or
    MAX_PADDING_BYTES of key padding; an entry holds its tensor weakly and is dropped when the tensor dies."""

    def __init__(self) -> None:
        self._entries: OrderedDict[tuple, _Entry] = OrderedDict()
        self._bytes = 0
        self._lock = threading.RLock()  # RLock: a weakref callback may run while this thread holds it

    def get(self, key: tuple, anchor: Tensor, version: int) -> tuple[bool, MaskStructure | None]:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None or entry.ref() is not anchor or entry.version != version:
                return False, None
            self._entries.move_to_end(key)
            return True, entry.answer

    def put(self, key: tuple, anchor: Tensor, version: int, answer: MaskStructure | None) -> None:
        nbytes = 0 if answer is None or answer.key_padding is None else answer.key_padding.nbytes
        with self._lock:
            self._pop(key)
            if nbytes <= MAX_PADDING_BYTES:  # a larger answer is returned, not kept
                self._entries[key] = _Entry(weakref.ref(anchor, functools.partial(self._drop, key)), version,
                                            answer, nbytes)
                self._bytes += nbytes
            while len(self._entries) > MAX_ENTRIES or self._bytes > MAX_PADDING_BYTES:
                self._pop(next(iter(self._entries)))

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0

    def _pop(self, key: tuple) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self._bytes -= entry.nbytes

    def _drop(self, key: tuple, ref: weakref.ref) -> None:
        """Weakref callback: the tensor died; forget its entry (unless a newer tensor's entry replaced it)."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None and entry.ref is ref:
                self._pop(key)


_CACHE = _Cache()
