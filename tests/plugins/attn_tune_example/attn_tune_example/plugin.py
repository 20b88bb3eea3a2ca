"""A third-party plugin: exact attention via two einsums, registered through the `attn_tune` entry point."""

import torch

import attn_tune


def einsum_attention(q, k, v, *, is_causal=False, window=None, attn_mask=None, scale=None):
    if attn_mask is not None or window is not None or q.shape[1] != k.shape[1]:
        raise attn_tune.UnsupportedProblem("einsum-example takes only plain or causal attention with equal heads")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = torch.einsum("bhqd,bhkd->bhqk", q, k).float() * scale
    if is_causal:
        scores = scores.masked_fill(torch.ones_like(scores, dtype=torch.bool).triu(1), float("-inf"))
    return torch.einsum("bhqk,bhkd->bhqd", scores.softmax(-1).to(v.dtype), v)


def _supports(problem):
    if problem.mask or problem.window is not None or problem.n_kv_heads != problem.heads:
        return "only plain or causal attention with equal heads"
    return None


@attn_tune.hookimpl
def attn_tune_variants():
    return [attn_tune.Variant(name="einsum-example", family="dense", fn=einsum_attention, exact=True,
                              supports=_supports, description="two einsums (a third-party plugin)")]
