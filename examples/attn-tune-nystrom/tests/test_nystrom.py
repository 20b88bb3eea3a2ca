"""The plugin's own tests: attn-tune's conformance kit, and the Nystrom formula written out independently."""

from __future__ import annotations

import math

import pytest
import torch

import attn_tune
from attn_tune.testing import conformance_cases
from attn_tune_nystrom.plugin import nystrom_attention

VARIANT = attn_tune.get_variant("nystrom")  # found through the entry point: the package must be installed


@pytest.mark.parametrize("case", conformance_cases(VARIANT), ids=str)
def test_conformance(case) -> None:
    case.run()


def _written_out(q, k, v, m):
    """Xiong et al. 2021, eq. 13-15, in float64 with explicit segment loops."""
    q, k, v = (t.double() for t in (q, k, v))
    n, n_k, d = q.shape[-2], k.shape[-2], q.shape[-1]

    def means(x, length):
        parts = [x[..., (i * length) // m : -((-(i + 1) * length) // m), :].mean(-2) for i in range(m)]
        return torch.stack(parts, dim=-2)

    ql, kl = means(q, n), means(k, n_k)
    s = 1 / math.sqrt(d)
    f = torch.softmax(s * q @ kl.transpose(-1, -2), -1)
    a = torch.softmax(s * ql @ kl.transpose(-1, -2), -1)
    b = torch.softmax(s * ql @ k.transpose(-1, -2), -1)
    return f @ torch.linalg.pinv(a) @ b @ v


@pytest.mark.parametrize("q_len,kv_len,m", [(64, 64, 8), (50, 70, 16), (70, 50, 7)])
def test_matches_the_written_out_formula(q_len: int, kv_len: int, m: int) -> None:
    gen = torch.Generator().manual_seed(q_len)
    q = torch.randn(2, 2, q_len, 16, generator=gen)
    k, v = torch.randn(2, 2, kv_len, 16, generator=gen), torch.randn(2, 2, kv_len, 16, generator=gen)
    out = nystrom_attention(q, k, v, landmarks=m)
    ref = _written_out(q, k, v, m)
    assert ((out.double() - ref).norm() / ref.norm()).item() < 1e-4


def test_error_against_full_attention_is_measured() -> None:
    from attn_tune.tuner import measure

    problem = attn_tune.Problem(batch=1, heads=2, q_len=256, head_dim=32)
    m = measure(VARIANT, problem, {"landmarks": 32}, min_repeats=1, min_time_s=0.0)
    assert math.isfinite(m.rel_error) and m.rel_error > 1e-3
