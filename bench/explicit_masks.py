"""Unchanged models that hand SDPA an explicit mask, tuned in one command and run through `attn_tune.patch_sdpa`.

    .venv/bin/python bench/explicit_masks.py [--quick] [--trials 8] [--rounds 5] [--threads N] [--json out.json]

Each case's model (random weights, CPU float32) is tuned with `attn-tune tune bench.explicit_masks:FACTORY` in a
subprocess (exact variants unless said), then timed in this process unpatched (PyTorch's SDPA with the model's own
mask) and patched with the tuned config, interleaved (A B A B ..., one warm-up call each); the ratio is the median
over rounds of unpatched / patched in the same round (> 1: patched is faster). Logits are compared at real tokens.

1. Mistral-style, transformers' "sdpa" path, 4096 tokens, window 512 (a boolean band mask): target >= 2x and
   max |logits difference| <= 1e-5; the same model on attn_implementation="attn_tune" with its own tuned config
   (the window arrives as a window) is the reference point.
2. A stack of nanoGPT-style causal self-attention modules handing SDPA a boolean causal band (window 512) they
   built themselves (a buffer, sliced per call), 4096 tokens: target >= 3x.
3. Qwen2-style, "sdpa" path, a left-padded batch of 4 at 2048 (causal + padding mask): exact variants, and
   again with --max-error 0.35 (approximate variants may be chosen).
4. nn.TransformerEncoder decoder-only: generate_square_subsequent_mask plus a right-padded src_key_padding_mask,
   4 x 1024 (the merged additive (batch, heads, L, L) mask reaches SDPA); patched without a config too, since
   the patch switches the encoder's fused fast path off, which by itself changes its speed.

--quick runs small sizes (a smoke test of the script, not figures). The CLI's subprocess sees the sizes through
the environment variable EXPLICIT_MASKS_QUICK. On a machine other jobs load, two threads can be slower than one
(each parallel region waits for a core): --threads 1 shows the figures without that.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

import attn_tune
from attn_tune.integrations.transformers_examples import (
    mistral_example,
    mistral_sdpa_example,
    qwen2_sdpa_padded_example,
)
from attn_tune.models.masked_examples import band_attention_example, next_token_targets, torch_decoder_example
from attn_tune.runtime.capture import observe
from attn_tune.tuned_config import TunedConfig, device_info, load_config

__all__ = ["mistral_sdpa", "mistral_attn_tune", "band_attention", "qwen2_padded", "torch_decoder", "Row", "main"]

ROOT = Path(__file__).resolve().parents[1]
QUICK = "EXPLICIT_MASKS_QUICK"


def _quick() -> bool:
    return os.environ.get(QUICK) == "1"


def mistral_sdpa() -> tuple[Any, ...]:
    """Mistral-style on transformers' "sdpa" path: 4096 tokens, window 512 (quick: 256, window 64)."""
    return mistral_sdpa_example(length=256, window=64) if _quick() else mistral_sdpa_example(length=4096, window=512)


def mistral_attn_tune() -> tuple[Any, ...]:
    """The same model on attn_implementation="attn_tune" (the window arrives as a window), the reference point."""
    model, inputs = mistral_example(length=256, window=64) if _quick() else mistral_example(length=4096, window=512)
    return model, inputs, next_token_targets(inputs["input_ids"])


def band_attention() -> tuple[Any, ...]:
    """nanoGPT-style causal self-attention modules with a boolean band: 4096 tokens, window 512 (quick: 256, 64)."""
    return band_attention_example(length=256, window=64) if _quick() else band_attention_example(length=4096,
                                                                                                 window=512)


def qwen2_padded() -> tuple[Any, ...]:
    """Qwen2-style on the "sdpa" path, a left-padded batch of 4 at 2048 (quick: 4 x 128)."""
    return qwen2_sdpa_padded_example(batch=4, length=128 if _quick() else 2048)


def torch_decoder() -> tuple[Any, ...]:
    """nn.TransformerEncoder decoder-only, causal mask plus right padding, 4 x 1024 (quick: 4 x 128)."""
    return torch_decoder_example(batch=4, length=128 if _quick() else 1024)


@dataclass
class Row:
    """One line of the table: a model served one way against the same model unpatched."""

    what: str
    unpatched_ms: float
    patched_ms: float
    ratio: float
    max_diff: float
    read_as: list[str] = field(default_factory=list)
    chosen: list[str] = field(default_factory=list)
    target: str = ""


def _tune(factory: str, folder: Path, trials: int, extra: list[str]) -> tuple[TunedConfig, list[str]]:
    """`attn-tune tune bench.explicit_masks:FACTORY` in a subprocess: the config and the lines worth keeping."""
    out = folder / f"{factory}{len(list(folder.iterdir()))}.json"
    command = [sys.executable, "-m", "attn_tune", "tune", f"bench.explicit_masks:{factory}", "--trials", str(trials),
               "--samples", "2", "--seed", "0", "--out", str(out), *extra]
    print(f"  $ attn-tune {' '.join(command[3:])}", file=sys.stderr, flush=True)
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=1800)
    if result.returncode != 0:
        raise SystemExit(f"tuning {factory} failed: {(result.stderr or result.stdout).strip().splitlines()[-1:]}")
    kept = [line for line in result.stdout.splitlines() if " ms, " in line or line.startswith(("validate ", "time:"))]
    return load_config(out), kept


def _chosen(tuned: TunedConfig) -> list[str]:
    return [f"{e.problem.describe()} -> {e.choice['variant']} {e.choice['params'] or ''}".rstrip()
            for e in tuned.entries]


def _call(model: Any, inputs: Any) -> torch.Tensor:
    with torch.no_grad():
        out = model(**inputs) if isinstance(inputs, dict) else model(*inputs)
    return out.logits if hasattr(out, "logits") else out


def _real(inputs: Any) -> torch.Tensor:
    """(batch, length) bool, True at a real token: the attention_mask, or not the src_key_padding_mask."""
    if isinstance(inputs, dict):
        mask = inputs.get("attention_mask")
        return torch.ones_like(inputs["input_ids"], dtype=torch.bool) if mask is None else mask.bool()
    return ~inputs[1] if len(inputs) == 2 else torch.ones_like(inputs[0], dtype=torch.bool)


def _read_as(model: Any, inputs: Any, tuned: TunedConfig) -> list[str]:
    """What each distinct call's mask was read as, and the variant that served it."""
    seen: dict[str, None] = {}

    def note(call: Any) -> None:
        read = getattr(call.decision, "mask_read", None)
        seen[f"{call.problem.describe()} (mask read as {read}) -> {call.decision.variant}"] = None

    with attn_tune.patch_sdpa(tuned), observe(note):
        _call(model, inputs)
    return list(seen)


def compare(what: str, factory: Callable[[], tuple[Any, ...]], tuned: TunedConfig, rounds: int, target: str = "",
            others: dict[str, Callable[[], torch.Tensor]] | None = None, bare: str = "") -> list[Row]:
    """The factory's model unpatched against patched with `tuned` (and `others`, each a call of its own; with
    `bare`, a row of that name patched without a config), interleaved: one row each, ratio = unpatched / it in the
    same round, max |diff| at real tokens."""
    model, inputs = factory()[:2]
    real = _real(inputs)

    def patched(config: TunedConfig | None) -> Callable[[], torch.Tensor]:
        def run() -> torch.Tensor:
            with attn_tune.patch_sdpa(config):
                return _call(model, inputs)
        return run

    fns = {"unpatched": lambda: _call(model, inputs), what: patched(tuned), **(others or {})}
    if bare:
        fns[bare] = patched(None)
    outputs = {name: fn() for name, fn in fns.items()}
    from timing import interleaved  # here: the tuning subprocess imports this module as bench.explicit_masks

    times = interleaved(fns, rounds, shuffle=False)
    base = times["unpatched"]
    rows = []
    for name in fns:
        if name == "unpatched":
            continue
        diff = float((outputs[name][real] - outputs["unpatched"][real]).abs().max())
        rows.append(Row(name, statistics.median(base), statistics.median(times[name]),
                        statistics.median(b / t for b, t in zip(base, times[name])), diff,
                        target=target if name == what else ""))
    rows[0].read_as = _read_as(model, inputs, tuned)
    return rows


def _mistral(folder: Path, trials: int, rounds: int, notes: list[str]) -> list[Row]:
    tuned, lines = _tune("mistral_sdpa", folder, trials, [])
    reference, reference_lines = _tune("mistral_attn_tune", folder, trials, [])
    notes += [f"- `mistral_sdpa`: {line}" for line in lines]
    notes += [f"- `mistral_attn_tune`: {line}" for line in reference_lines]
    hf_model, hf_inputs = mistral_attn_tune()[:2]

    def attn_tune_path() -> torch.Tensor:
        with attn_tune.use_config(reference):
            return _call(hf_model, hf_inputs)

    rows = compare("Mistral, \"sdpa\" path + patch_sdpa", mistral_sdpa, tuned, rounds, ">= 2x, diff <= 1e-5",
                   {"Mistral, attn_implementation=\"attn_tune\" (reference)": attn_tune_path})
    rows[0].chosen, rows[1].chosen = _chosen(tuned), _chosen(reference)
    return rows


def _one(what: str, factory_name: str, folder: Path, trials: int, rounds: int, notes: list[str], target: str = "",
         extra: list[str] | None = None, bare: str = "") -> list[Row]:
    tuned, lines = _tune(factory_name, folder, trials, extra or [])
    notes += [f"- `{factory_name}` {' '.join(extra or [])}: {line}" for line in lines]
    rows = compare(what, globals()[factory_name], tuned, rounds, target, bare=bare)
    rows[0].chosen = _chosen(tuned)
    return rows


def table(rows: list[Row]) -> str:
    lines = ["| what | unpatched, ms | patched, ms | ratio | max diff | target | chosen variants |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.what} | {r.unpatched_ms:.0f} | {r.patched_ms:.0f} | {r.ratio:.2f}x | {r.max_diff:.1e} | "
                     f"{r.target} | {'; '.join(r.chosen)} |")
    read = [f"- {r.what}: {line}" for r in rows for line in r.read_as]
    return "\n".join(lines) + ("\n\nWhat each patched call was read as and served by:\n\n" + "\n".join(read)
                               if read else "")


CASES = ("mistral", "band", "qwen2", "torch")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke test of the script")
    parser.add_argument("--trials", type=int, default=8, help="trials per problem of each tune")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds of each timing")
    parser.add_argument("--cases", default=",".join(CASES), help=f"a subset of {','.join(CASES)}")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads here and in the tuning subprocesses (default: torch's own)")
    parser.add_argument("--json", dest="json_out", default=None, help="also write the rows here")
    args = parser.parse_args()
    if args.quick:
        os.environ[QUICK] = "1"
    if args.threads:
        torch.set_num_threads(args.threads)
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # the CLI's subprocesses tune with as many
    cases = args.cases.split(",")
    print(f"torch {torch.__version__}, {device_info('cpu')['name']}, {torch.get_num_threads()} threads, float32"
          f"{', quick sizes' if args.quick else ''}\n", flush=True)
    rows: list[Row] = []
    notes: list[str] = []
    with tempfile.TemporaryDirectory() as name:
        folder = Path(name)
        if "mistral" in cases:
            rows += _mistral(folder, args.trials, args.rounds, notes)
        if "band" in cases:
            rows += _one("nanoGPT-style attention stack, boolean band + patch_sdpa", "band_attention", folder,
                         args.trials, args.rounds, notes, ">= 3x")
        if "qwen2" in cases:
            rows += _one("Qwen2, \"sdpa\" path, left-padded + patch_sdpa", "qwen2_padded", folder, args.trials,
                         args.rounds, notes)
            rows += _one("Qwen2, left-padded, tuned --max-error 0.35", "qwen2_padded", folder, args.trials,
                         args.rounds, notes, extra=["--max-error", "0.35"])
        if "torch" in cases:
            rows += _one("nn.TransformerEncoder causal + key padding + patch_sdpa", "torch_decoder", folder,
                         args.trials, args.rounds, notes,
                         bare="nn.TransformerEncoder, patch_sdpa without a config (its fast path off, SDPA as is)")
    print(table(rows))
    print("\nWhat `attn-tune tune` printed:\n\n" + "\n".join(notes))
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({"torch": torch.__version__, "threads": torch.get_num_threads(), "quick": args.quick,
                       "rows": [asdict(r) for r in rows], "tune_output": notes}, f, indent=2)


if __name__ == "__main__":
    main()
