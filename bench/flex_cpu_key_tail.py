"""torch's CPU FlexAttention kernel gives wrong answers for some key lengths; padding keys to whole blocks avoids it.

No attn-tune here: plain `torch.compile(flex_attention)` with `create_block_mask`, a sliding window of 5, against
float64 attention. For each key length it counts, over a few fresh random draws, the outputs that are wrong (relative
error above 1e-5 float32 / 1e-2 bfloat16, or non-finite), first as is and then with keys and values padded to a
whole number of blocks and the padding masked out (what `attn_tune.families.flex` does).

    .venv/bin/python bench/flex_cpu_key_tail.py [--dtype float32] [--block 128] [--q-len 17] [--draws 3]

Seen with torch 2.13.0+cpu (AMD EPYC, AVX2): with the default block of 128, every key length below the block that is
8 more than a multiple of 16 (8, 24, 40, ..., 120) gives wrong, sometimes non-finite, run-to-run different outputs,
in float32 and bfloat16, compiled with dynamic or static shapes; longer keys (136, 200) and the padded runs do not.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

WINDOW = 5


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    rows, cols = torch.arange(q.shape[-2])[:, None], torch.arange(k.shape[-2])[None, :]
    scores = (q.double() @ k.double().transpose(-1, -2)) / q.shape[-1] ** 0.5
    scores = scores.masked_fill((rows - cols).abs() >= WINDOW, float("-inf"))
    return torch.softmax(scores, -1).nan_to_num() @ v.double()


def run(flex, q, k, v, block: int, pad: bool) -> torch.Tensor:
    kv_len = k.shape[-2]
    padded = -(-kv_len // block) * block if pad else kv_len

    def mask_mod(b, h, q_idx, kv_idx):
        return ((q_idx - kv_idx).abs() < WINDOW) & (kv_idx < kv_len)

    mask = create_block_mask(mask_mod, None, None, q.shape[-2], padded, device="cpu", BLOCK_SIZE=block)
    k, v = F.pad(k, (0, 0, 0, padded - kv_len)), F.pad(v, (0, 0, 0, padded - kv_len))
    return flex(q, k, v, block_mask=mask)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--block", type=int, default=128)
    parser.add_argument("--q-len", type=int, default=17)
    parser.add_argument("--draws", type=int, default=3)
    args = parser.parse_args()
    dtype, tol = getattr(torch, args.dtype), (1e-5 if args.dtype == "float32" else 1e-2)
    flex = torch.compile(flex_attention, dynamic=True)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {args.dtype}, block {args.block}, q_len {args.q_len}, window {WINDOW}")
    print("kv_len  wrong as is  wrong padded  worst error as is")
    for kv_len in list(range(8, args.block + 1, 8)) + [args.block + 8, args.block + 72]:
        wrong, worst = {False: 0, True: 0}, 0.0
        for _ in range(args.draws):
            q = torch.randn(1, 2, args.q_len, 16, dtype=dtype)
            k, v = (torch.randn(1, 2, kv_len, 16, dtype=dtype) for _ in range(2))
            ref = reference(q, k, v)
            for pad in (False, True):
                out = run(flex, q, k, v, args.block, pad)
                err = ((out.double() - ref).norm() / ref.norm()).item()
                wrong[pad] += not (err < tol)  # NaN counts as wrong
                if not pad:
                    worst = float("nan") if err != err or worst != worst else max(worst, err)  # nan: non-finite
        print(f"{kv_len:6d}  {wrong[False]:>5d}/{args.draws}  {wrong[True]:>8d}/{args.draws}    {worst:.2e}")


if __name__ == "__main__":
    main()
