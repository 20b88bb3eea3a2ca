"""PyTorch's own scaled-dot-product attention, held under a name `attn_tune.patch_sdpa()` never replaces.

`torch.nn.functional.scaled_dot_product_attention` is the Python name of `torch._C._nn.scaled_dot_product_attention`;
the patch rebinds that name. Every built-in variant and every fallback calls `sdpa` below instead, so a patched
model's attention never comes back into attn-tune (no recursion), whichever order things were imported in.
"""

from __future__ import annotations

import torch

__all__ = ["sdpa"]

sdpa = torch._C._nn.scaled_dot_product_attention
