"""`nystrom` (approximate, low-rank): Nystromformer attention (Xiong et al. 2021) with landmarks by segment means.

With m landmark queries Q~ and keys K~ (the means of m contiguous segments of q and k), full attention
softmax(s q k^T) v is approximated by

    softmax(s q K~^T) . pinv(softmax(s Q~ K~^T)) . (softmax(s Q~ k^T) v)

so no (q_len x kv_len) matrix is formed: memory and time O((q_len + kv_len) x m). The pseudo-inverse is exact
(`torch.linalg.pinv`, in float32 or wider), so the function is deterministic and well defined. Non-causal only.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

import attn_tune

LANDMARK_CHOICES = (8, 16, 32, 64, 128)


def segment_means(x: Tensor, landmarks: int) -> Tensor:
    """(..., n, d) -> (..., landmarks, d): the means of `landmarks` contiguous, nearly equal segments."""
    flat = x.flatten(0, -3).transpose(-1, -2)  # (rows, d, n)
    pooled = F.adaptive_avg_pool1d(flat, landmarks)  # segment i covers [floor(i n / m), ceil((i + 1) n / m))
    return pooled.transpose(-1, -2).unflatten(0, x.shape[:-2])


def nystrom_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    is_causal: bool = False,
    window: int | None = None,
    attn_mask: Tensor | None = None,
    scale: float | None = None,
    landmarks: int = 32,
) -> Tensor:
    """Nystrom approximation of softmax attention; SDPA layout in, q's shape and dtype out. Inputs are not modified."""
    if is_causal or window is not None or attn_mask is not None:
        raise attn_tune.UnsupportedProblem("nystrom landmarks summarise the whole sequence: no causal, window or mask")
    if not 1 <= landmarks < min(q.shape[-2], k.shape[-2]):
        raise attn_tune.UnsupportedProblem(
            f"{landmarks} landmarks do not summarise q_len {q.shape[-2]} / kv_len {k.shape[-2]}"
        )
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    dtype, work = q.dtype, torch.promote_types(q.dtype, torch.float32)
    q, k, v = q.to(work), k.to(work), v.to(work)
    s = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    q_land, k_land = segment_means(q, landmarks), segment_means(k, landmarks)
    kernel_1 = torch.softmax(s * q @ k_land.transpose(-1, -2), dim=-1)  # (b, h, q_len, m)
    kernel_2 = torch.softmax(s * q_land @ k_land.transpose(-1, -2), dim=-1)  # (b, h, m, m)
    kernel_3 = torch.softmax(s * q_land @ k.transpose(-1, -2), dim=-1)  # (b, h, m, kv_len)
    out = kernel_1 @ (torch.linalg.pinv(kernel_2) @ (kernel_3 @ v))
    return out.to(dtype)


def supports(problem: attn_tune.Problem) -> str | None:
    if problem.causal:
        return "nystrom landmarks mix future keys into every summary: no causal"
    if problem.window is not None or problem.mask:
        return "nystrom cannot honour a sliding window or an explicit attn_mask"
    if not _choices(problem):
        return f"sequences shorter than {LANDMARK_CHOICES[0] + 1} leave nothing to summarise"
    return None


def _choices(problem: attn_tune.Problem) -> list[int]:
    return [m for m in LANDMARK_CHOICES if m < min(problem.q_len, problem.n_kv_len)]


def space(problem: attn_tune.Problem) -> dict[str, Any]:
    from optuna.distributions import CategoricalDistribution  # inside: `import attn_tune` must stay light

    return {"landmarks": CategoricalDistribution(_choices(problem) or [LANDMARK_CHOICES[0]])}


@attn_tune.hookimpl
def attn_tune_variants() -> list[attn_tune.Variant]:
    return [
        attn_tune.Variant(
            name="nystrom",
            family="low-rank",
            fn=nystrom_attention,
            exact=False,
            space=space,
            supports=supports,
            description="approximate: Nystromformer, landmarks by segment means (knob landmarks)",
        )
    ]
