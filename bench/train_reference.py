"""Train the reference character models on Python's reference text and write their weights into the package.

    python bench/train_reference.py              # both, about 15 minutes on 2 CPU cores
    python bench/train_reference.py --only lm --steps 20 --out /tmp/w   # a quick look

Seeded; trained at the context they are evaluated at (2048); the held-out topics are never seen. Weights are
stored in float16 safetensors (a few MB) in attn_tune/models/weights/.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch

from attn_tune.models.pretrained import (CONTEXT, build_encoder, build_lm, loss_of, mask_characters,
                                         pretrained_encoder, pretrained_lm, weights_file)
from attn_tune.models.reference_text import reference_text


def windows(text: torch.Tensor, phases: list[tuple[int, int, int]], extra: int, gen: torch.Generator):
    """Random windows of the training text: `steps` batches of `batch` x `context` (+ extra) per phase."""
    for steps, context, batch in phases:
        for _ in range(steps):
            starts = torch.randint(0, len(text) - context - extra, (batch,), generator=gen)
            yield torch.stack([text[s:s + context + extra] for s in starts.tolist()])


def train(name: str, phases: list[tuple[int, int, int]], lr: float, out: Path, mask_rate: float = 0.15) -> None:
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    steps = sum(p[0] for p in phases)
    model = build_lm() if name == "causal_lm" else build_encoder()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.01)
    warmup = max(steps // 20, 1)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warmup, 0.5 * (1 + math.cos(math.pi * min(s / steps, 1.0)))))
    text = reference_text("train")
    started = time.perf_counter()
    model.train()
    for step, window in enumerate(windows(text, phases, 1 if name == "causal_lm" else 0, gen)):
        if name == "causal_lm":
            inputs, targets = window[:, :-1], window[:, 1:]
        else:
            inputs, targets = mask_characters(window, gen, mask_rate)
        loss = loss_of(model(inputs), targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 25 == 0 or step == steps - 1:
            print(f"{name} step {step:4d}/{steps} context {inputs.shape[1]} loss {loss.item():.3f} "
                  f"({time.perf_counter() - started:.0f} s)", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    from safetensors.torch import save_file

    target = out / weights_file(name).name
    save_file({k: v.detach().half().contiguous() for k, v in model.state_dict().items()}, str(target))
    print(f"wrote {target} ({target.stat().st_size / 1e6:.1f} MB)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=("lm", "encoder"))
    parser.add_argument("--steps", type=int, default=None, help="a quick look: this many steps at 2048 only")
    parser.add_argument("--batch", type=int, default=None, help="with --steps: sequences per batch")
    parser.add_argument("--out", type=Path, default=weights_file("causal_lm").parent)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--mask-rate", type=float, default=None)
    args = parser.parse_args()
    torch.set_num_threads(min(torch.get_num_threads(), 2))  # the figures in the docs are for 2 cores
    # (steps, context, batch). The encoder first learns to look at its neighbours on short windows (at 2048 a
    # fresh encoder's attention is spread over every key and it sits at the unigram loss), then trains at 2048.
    plan = {"lm": ("causal_lm", [(400, CONTEXT, 4)], 3e-3, 0.0),
            "encoder": ("encoder", [(100, 256, 16), (300, CONTEXT, 4)], 3e-3, 0.15)}
    for key, (name, phases, lr, mask_rate) in plan.items():
        if args.steps:
            phases = [(args.steps, CONTEXT, args.batch or 4)]
        if args.only in (None, key):
            train(name, phases, args.lr or lr, args.out, args.mask_rate or mask_rate)
    if args.out == weights_file("causal_lm").parent:
        for factory in (pretrained_lm, pretrained_encoder):
            if args.only in (None, "lm" if factory is pretrained_lm else "encoder"):
                model, inputs, targets, _ = factory()
                with torch.no_grad():
                    print(f"{factory.__name__}: held-out loss {loss_of(model(*inputs), targets).item():.3f} nats/char")


if __name__ == "__main__":
    main()
