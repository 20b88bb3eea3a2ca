"""An independent float64 oracle for the tests: masks written out position by position, one head at a time.

Deliberately shares no code with attn_tune, so that a mistake in the package's mask helpers cannot hide.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor


@functools.lru_cache(maxsize=256)
def _structural(q_len: int, kv_len: int, causal: bool, window: int | None) -> Tensor:
    rows = []
    for i in range(q_len):
        row = []
        for j in range(kv_len):
            ok = True
            if causal and j > i:
                ok = False
            if window is not None and not (abs(i - j) < window):
                ok = False
            row.append(ok)
        rows.append(row)
    return torch.tensor(rows, dtype=torch.bool)


def oracle(q: Tensor, k: Tensor, v: Tensor, *, causal=False, window=None, mask=None, bias=None, scale=None) -> Tensor:
    """Exact attention in float64 on the CPU; `mask` a boolean keep-mask broadcastable to (batch, heads, q_len,
    kv_len), `bias` an additive float mask likewise; a query that sees no key gets zeros."""
    q, k, v = (t.to("cpu", torch.float64) for t in (q, k, v))
    batch, heads, q_len, dim = q.shape
    kv_heads, kv_len = k.shape[1], k.shape[2]
    allowed = _structural(q_len, kv_len, causal, window)
    if mask is not None:
        allowed = allowed & mask.to("cpu")
    allowed = allowed.expand(batch, heads, q_len, kv_len)
    scale = 1 / math.sqrt(dim) if scale is None else scale
    out = torch.empty(batch, heads, q_len, v.shape[-1], dtype=torch.float64)
    for h in range(heads):
        kh, vh = k[:, h // (heads // kv_heads)], v[:, h // (heads // kv_heads)]
        scores = q[:, h] @ kh.transpose(-1, -2) * scale
        if bias is not None:
            scores = scores + bias.to("cpu", torch.float64).expand(batch, heads, q_len, kv_len)[:, h]
        scores = scores.masked_fill(~allowed[:, h], float("-inf"))
        weights = torch.softmax(scores, dim=-1)
        empty = ~allowed[:, h].any(-1, keepdim=True)  # a query that sees no key gets zeros, as SDPA gives
        out[:, h] = weights.masked_fill(empty, 0.0) @ vh
    return out


def rel_error(out: Tensor, ref: Tensor) -> float:
    out = out.detach().to("cpu", torch.float64)
    return ((out - ref).norm() / ref.norm()).item()
