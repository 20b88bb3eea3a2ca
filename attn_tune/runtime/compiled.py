"""`attention` under torch.compile: the route chosen while dynamo traces, the variant called in the graph.

Dynamo traces `attention_in_graph` wherever it meets `attention`; the choice is made at trace time
(`trace_time`), so a graph guards only on the bounds of the length's span. Dynamo learns of this module only once
it is loaded (`trace_in_place_of`): importing the runtime never imports dynamo.
"""

from __future__ import annotations

import functools
from types import ModuleType
from typing import Callable

import torch
from torch import Tensor

from attn_tune.runtime import active
from attn_tune.runtime.route import AS_IS, sdpa_as_is
from attn_tune.runtime.trace_time import fns, line_at_trace, needs_length, route_at_trace
from attn_tune.runtime.when_imported import when_imported

__all__ = ["compiled_attention", "attention_in_graph", "trace_in_place_of"]


def compiled_attention(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, is_causal: bool,
                       window: int | None, scale: float | None, enable_gqa: bool) -> Tensor:
    """`attention` for a call dynamo is tracing: the chosen variant's fn, called directly in the graph.

    Every size but the varying length is made static (dynamo specialises on it, as on any Python value); the
    length is only compared with span ends, so those bounds are the graph's only guards on it and a new length
    within the span reuses the graph. Shapes SDPA would broadcast are not checked here: PyTorch's SDPA reports
    them. A variant that refuses the call while being traced is not replaced: the error surfaces.
    """
    four_d = q.dim() == 4
    if not four_d and q.dim() != 3:
        return sdpa_as_is(q, k, v, is_causal=is_causal, window=window, attn_mask=attn_mask, scale=scale,
                          enable_gqa=enable_gqa)
    training = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    q_len, n = q.shape[-2], k.shape[-2]
    heads, kv_heads = (int(q.shape[1]), int(k.shape[1])) if four_d else (1, 1)
    signature = (int(q.shape[0]), heads, kv_heads, 0 if q_len == n else int(q_len), int(q.shape[-1]), q.dtype,
                 q.device, attn_mask is not None, is_causal, window, enable_gqa, training, four_d)
    ends = line_at_trace(signature)
    group = 0
    while n > ends[group]:
        group += 1
    name, params = route_at_trace(signature, group, int(n) if needs_length(signature, group) else 0, active.epoch())
    if name == AS_IS:
        return sdpa_as_is(q, k, v, is_causal=is_causal, window=window, attn_mask=attn_mask, scale=scale,
                          enable_gqa=enable_gqa)
    if not four_d:
        q, k, v = q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1)
        attn_mask = attn_mask.unsqueeze(1) if attn_mask is not None and attn_mask.dim() == 3 else attn_mask
    out = fns[name](q, k, v, is_causal=is_causal, window=window, attn_mask=attn_mask, scale=scale,
                    **dict(params))
    return out if four_d else out.squeeze(1)


def attention_in_graph(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    *,
    scale: float | None = None,
    enable_gqa: bool = False,
    window: int | None = None,
) -> Tensor:
    """What dynamo traces in place of `attention` (so the eager path never asks whether it is being compiled,
    which costs a decode step microseconds): the choice made at trace time, the variant called in the graph."""
    if dropout_p:
        return sdpa_as_is(query, key, value, is_causal=is_causal, window=window, attn_mask=attn_mask, scale=scale,
                          dropout_p=dropout_p, enable_gqa=enable_gqa)
    return compiled_attention(query, key, value, attn_mask, is_causal, window, scale, enable_gqa)


def trace_in_place_of(attention: Callable[..., Tensor]) -> None:
    """Have dynamo trace `attention_in_graph` wherever it meets `attention` (same signature), registered when
    dynamo is loaded: now if it is, else as soon as torch.compile (or anything) imports it; never loading it."""
    when_imported("torch._dynamo", functools.partial(_register, attention))


def _register(attention: Callable[..., Tensor], dynamo: ModuleType) -> None:
    """Tell dynamo what to trace in place of `attention`, and which trace-time lookups to run as constants."""
    for fn in (line_at_trace, needs_length, route_at_trace):
        dynamo.assume_constant_result(fn)
    dynamo.substitute_in_graph(attention)(attention_in_graph)
