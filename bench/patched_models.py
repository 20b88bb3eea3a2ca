"""Unchanged models through `attn_tune.patch_sdpa`: per-call overhead, and end to end against what a user runs
without attn-tune (the same model calling PyTorch's SDPA), in one run.

    python bench/patched_models.py [--quick]      # markdown tables on stdout; tuning progress on stderr

1. Per-call overhead of the patched `F.scaled_dot_product_attention` over PyTorch's own, at a tiny call and at a
   ViT-S/16 layer's call (b1 h6 q197 d64), without a config and with one whose entry keeps sdpa.
2. End to end, CPU float32, random init (no downloads): transformers' ViT-S/16 (attn_implementation="sdpa") at
   224 and 384, a diffusers UNet2DConditionModel (cross-attention) and an nn.TransformerEncoder (whose eval fast
   path the patch switches off: what that costs shows here), each tuned with
   `attn-tune tune bench.patched_models:FACTORY` (its own problems, its captured calls, validated), then timed
   unpatched, patched without a config, and patched with the tuned config, interleaved (A B C A B C ...); the
   figure is the median over rounds of each one's time over the unpatched time in the same round.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import attn_tune
from attn_tune import Problem
from attn_tune.families.torch_sdpa import sdpa as torch_sdpa
from attn_tune.tuned_config import Entry, TunedConfig, device_info, load_config

ROOT = Path(__file__).resolve().parents[1]


def _vit(size: int):
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    config = ViTConfig(image_size=size, patch_size=16, hidden_size=384, num_hidden_layers=12, num_attention_heads=6,
                       intermediate_size=1536, num_labels=1000, attn_implementation="sdpa")
    return ViTForImageClassification(config).eval(), {"pixel_values": torch.randn(1, 3, size, size)}


def vit224():
    """ViT-S/16 at 224 (197 tokens), random init."""
    return _vit(224)


def vit384():
    """ViT-S/16 at 384 (577 tokens), random init."""
    return _vit(384)


def unet():
    """A small diffusers UNet2DConditionModel with cross-attention (64x64 latents, 77 text tokens)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    model = UNet2DConditionModel(sample_size=32, in_channels=4, out_channels=4, layers_per_block=1,
                                 block_out_channels=(64, 128), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=128,
                                 attention_head_dim=8, norm_num_groups=16).eval()
    return model, (torch.randn(1, 4, 32, 32), 10, torch.randn(1, 77, 128))


def encoder():
    """nn.TransformerEncoder (6 layers, 384 wide, 6 heads) on 197 tokens, eval: unpatched, PyTorch takes its fused
    fast path (torch._transformer_encoder_layer_fwd); patched, that path is off so the calls reach SDPA."""
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(384, 6, 1536, dropout=0.0, batch_first=True)
    return torch.nn.TransformerEncoder(layer, 6, enable_nested_tensor=False).eval(), (torch.randn(1, 197, 384),)


def _keep_sdpa(problem: Problem) -> TunedConfig:
    entry = Entry(problem=problem, choice={"variant": "sdpa", "params": {}},
                  measured={"latency_ms": 0.0, "peak_bytes": 0, "rel_error": 0.0})
    return TunedConfig(entries=[entry], device=device_info("cpu"))


def _per_call_us(fn, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1e6


def overhead_table(rounds: int) -> str:
    rows = ["| call | PyTorch's SDPA, us | patched, no config: over it, us | patched, config keeping sdpa: over it, us |",
            "|---|---|---|---|"]
    for label, shape, calls in (("tiny: b1 h2 q16 d8 causal", (1, 2, 16, 8), 2000),
                                ("ViT-S/16 layer: b1 h6 q197 d64", (1, 6, 197, 64), 200)):
        q = torch.randn(*shape)
        causal = label.endswith("causal")
        problem = Problem(batch=shape[0], heads=shape[1], q_len=shape[2], head_dim=shape[3], causal=causal)
        raw, bare, kept = [], [], []
        for _ in range(rounds):  # interleaved: the machine's drift hits all three alike
            raw.append(_per_call_us(lambda: torch_sdpa(q, q, q, is_causal=causal), calls))
            with attn_tune.patch_sdpa(None):
                bare.append(_per_call_us(lambda: F.scaled_dot_product_attention(q, q, q, is_causal=causal), calls))
            with attn_tune.patch_sdpa(_keep_sdpa(problem)):
                kept.append(_per_call_us(lambda: F.scaled_dot_product_attention(q, q, q, is_causal=causal), calls))
        base = statistics.median(raw)
        rows.append(f"| {label} | {base:.1f} | {statistics.median(b - r for b, r in zip(bare, raw)):+.1f} | "
                    f"{statistics.median(k - r for k, r in zip(kept, raw)):+.1f} |")
    return "\n".join(rows)


def _forward_ms(model, inputs) -> float:
    start = time.perf_counter()
    with torch.no_grad():
        model(**inputs) if isinstance(inputs, dict) else model(*inputs)
    return (time.perf_counter() - start) * 1e3


def _tune(factory: str, folder: Path, trials: int) -> tuple[Path, list[str]]:
    out = folder / f"{factory}.json"
    result = subprocess.run([sys.executable, "-m", "attn_tune", "tune", f"bench.patched_models:{factory}",
                             "--trials", str(trials), "--samples", "2", "--out", str(out)],
                            cwd=ROOT, capture_output=True, text=True, timeout=1800)
    if result.returncode != 0:
        raise SystemExit(f"tuning {factory} failed: {result.stderr.strip().splitlines()[-1]}")
    return out, [line for line in result.stdout.splitlines() if " ms, " in line or line.startswith("validate ")]


def end_to_end(rounds: int, trials: int, factories: list[str]) -> str:
    rows = ["| model | unpatched (PyTorch's SDPA), ms | patched, no config | patched, tuned config | tuned choices |",
            "|---|---|---|---|---|"]
    notes = []
    with tempfile.TemporaryDirectory() as folder:
        for factory in factories:
            path, lines = _tune(factory, Path(folder), trials)
            notes += [f"- `{factory}`: {line}" for line in lines]
            choices = sorted({e.choice["variant"] for e in load_config(path).entries})
            model, inputs = globals()[factory]()
            _forward_ms(model, inputs)
            plain, bare, tuned = [], [], []
            for _ in range(rounds):
                plain.append(_forward_ms(model, inputs))
                with attn_tune.patch_sdpa(None):
                    bare.append(_forward_ms(model, inputs))
                with attn_tune.patch_sdpa(path):
                    tuned.append(_forward_ms(model, inputs))
            ratio = lambda xs: statistics.median(x / p for x, p in zip(xs, plain))  # noqa: E731
            rows.append(f"| {factory} | {statistics.median(plain):.1f} | {ratio(bare):.3f}x | {ratio(tuned):.3f}x | "
                        f"{', '.join(choices)} |")
    return "\n".join(rows) + "\n\nWhat `attn-tune tune bench.patched_models:FACTORY` printed:\n\n" + "\n".join(notes)


def main() -> None:
    quick = "--quick" in sys.argv
    torch.set_num_threads(torch.get_num_threads())
    print(f"torch {torch.__version__}, {device_info('cpu')['name']}, {torch.get_num_threads()} threads\n")
    print(overhead_table(rounds=5 if quick else 21))
    print()
    print(end_to_end(rounds=5 if quick else 15, trials=4 if quick else 10,
                     factories=["vit224", "unet"] if quick else ["vit224", "vit384", "unet", "encoder"]))


if __name__ == "__main__":
    main()
