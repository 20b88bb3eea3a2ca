"""What switching nn.MultiheadAttention's fused eval fast path off does to a model's time by itself: `patch_sdpa`
switches it off, so a patched model's speed-up (or slow-down) is partly this, not the tune.

    python bench/mha_fast_path.py [--quick]      # a markdown table on stdout

nn.TransformerEncoder, eval, no_grad, CPU float32, random init, timed three ways interleaved (A B C A B C ...):
unpatched with the fast path on (PyTorch's default, `torch._transformer_encoder_layer_fwd`), unpatched with it off
(`torch.backends.mha.set_fastpath_enabled(False)`: the slow path, attention through PyTorch's SDPA), and inside
`attn_tune.patch_sdpa()` without a config (the slow path, attention through attn-tune's `sdpa`). Each figure is the
median over rounds of its time over the fast path's in the same round.
"""

from __future__ import annotations

import statistics
import sys
import time

import torch

import attn_tune
from attn_tune.tuned_config import device_info

CASES = (  # label, layers, d_model, heads, batch, seq
    ("2 layers, d_model 256, 4 heads, b4 x 512 tokens", 2, 256, 4, 4, 512),
    ("6 layers, d_model 384, 6 heads, b1 x 197 tokens", 6, 384, 6, 1, 197),
)


def _encoder(layers: int, width: int, heads: int) -> torch.nn.TransformerEncoder:
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0, batch_first=True)
    return torch.nn.TransformerEncoder(layer, layers, enable_nested_tensor=False).eval()


def _ms(model: torch.nn.Module, x: torch.Tensor, reps: int) -> float:
    start = time.perf_counter()
    for _ in range(reps):
        model(x)
    return (time.perf_counter() - start) / reps * 1e3


def _fast_path_off(model: torch.nn.Module, x: torch.Tensor, reps: int) -> float:
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        return _ms(model, x, reps)
    finally:
        torch.backends.mha.set_fastpath_enabled(True)


def _patched(model: torch.nn.Module, x: torch.Tensor, reps: int) -> float:
    with attn_tune.patch_sdpa():
        return _ms(model, x, reps)


def table(rounds: int, reps: int) -> str:
    rows = ["| nn.TransformerEncoder | fast path on (unpatched), ms | fast path off (unpatched) | patched, no config |",
            "|---|---|---|---|"]
    for label, layers, width, heads, batch, seq in CASES:
        model, x = _encoder(layers, width, heads), torch.randn(batch, seq, width)
        on, off, patched = [], [], []
        with torch.no_grad():
            _ms(model, x, 1), _fast_path_off(model, x, 1), _patched(model, x, 1)  # warm-up
            for _ in range(rounds):
                on.append(_ms(model, x, reps))
                off.append(_fast_path_off(model, x, reps))
                patched.append(_patched(model, x, reps))
        ratio = lambda xs: statistics.median(t / o for t, o in zip(xs, on))  # noqa: E731
        rows.append(f"| {label} | {statistics.median(on):.1f} | {ratio(off):.2f}x | {ratio(patched):.2f}x |")
    return "\n".join(rows)


def main() -> None:
    quick = "--quick" in sys.argv
    print(f"torch {torch.__version__}, {device_info('cpu')['name']}, {torch.get_num_threads()} threads\n")
    print(table(rounds=5 if quick else 15, reps=2 if quick else 5))


if __name__ == "__main__":
    main()
