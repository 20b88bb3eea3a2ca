"""The shared PROBLEM OPTIONS (`--batch --heads ... --training`) and their expansion into problems."""

from __future__ import annotations

import itertools
from typing import Any, Callable

import click

from attn_tune.problem import DTYPES, Problem, check_device

__all__ = ["problem_options", "problems_from_options", "options_given", "PROBLEM_OPTION_NAMES", "batches_help"]


def batches_help(what: str, **others: Any) -> str:
    """`--batches`' help: `what` they are, and the guard's default count (`guard_batches`) with `others` beside it."""
    from attn_tune.tuner.job import INTERVAL_BATCHES

    shown = "".join(f", {key}: {value}" for key, value in others.items())
    return f"{what} [default: {INTERVAL_BATCHES} when the factory takes `batches` (an interval), else 1{shown}]"


class IntList(click.ParamType):
    """A comma-separated list of integers: `512,1024,2048`."""

    name = "N[,N...]"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> tuple[int, ...]:
        if isinstance(value, tuple):
            return value
        parts = [part.strip() for part in str(value).split(",")]
        if not any(parts):
            self.fail("give at least one integer", param, ctx)
        if not all(parts):
            self.fail(f"{value!r} has an empty item; give integers separated by single commas", param, ctx)
        try:
            return tuple(int(part) for part in parts)
        except ValueError:
            self.fail(f"{value!r} is not a comma-separated list of integers", param, ctx)


_OPTIONS = (
    click.option("--batch", type=IntList(), default="1", show_default=True, help="Batch size(s), comma-separated."),
    click.option("--heads", type=int, default=8, show_default=True, help="Query heads."),
    click.option("--kv-heads", type=int, default=None, help="Key/value heads (fewer: grouped-query). [default: heads]"),
    click.option("--seq-len", type=IntList(), default="1024", show_default=True, help="Query length(s), comma-separated."),
    click.option("--kv-len", type=int, default=None, help="Key/value length. [default: seq-len]"),
    click.option("--head-dim", type=int, default=64, show_default=True, help="Head dimension."),
    click.option("--dtype", type=click.Choice(DTYPES), default="float32", show_default=True,
                 help="Element type of q, k and v."),
    click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N."),
    click.option("--causal", is_flag=True, help="Causal masking (top-left aligned, as SDPA)."),
    click.option("--window", type=int, default=None, help="Sliding window: query i sees keys j with |i - j| < W."),
    click.option("--training", is_flag=True,
                 help="A training step: forward + backward measured (with tune MODULE:FACTORY, a training step "
                      "captured and the choice guarded by a paired fine-tune: docs/training.md)."),
    click.option("--key-padding", is_flag=True,
                 help="Padded batches: a mask of each row's real keys (seeded rows padded left and right)."),
)
PROBLEM_OPTION_NAMES = (
    "batch", "heads", "kv_heads", "seq_len", "kv_len", "head_dim", "dtype", "device", "causal", "window", "training",
    "key_padding",
)


def problem_options(command: Callable) -> Callable:
    """Decorate a click command with the PROBLEM OPTIONS."""
    for option in reversed(_OPTIONS):
        command = option(command)
    return command


def problems_from_options(options: dict[str, Any], *, check_devices: bool = True) -> list[Problem]:
    """One problem per (batch, seq_len) combination; invalid values raise `InvalidProblem` with one line."""
    problems = [
        Problem(
            batch=batch,
            heads=options["heads"],
            kv_heads=options["kv_heads"],
            q_len=seq_len,
            kv_len=options["kv_len"],
            head_dim=options["head_dim"],
            dtype=options["dtype"],
            device=options["device"],
            causal=options["causal"],
            window=options["window"],
            training=options["training"],
            mask=options["key_padding"],
            key_padding=options["key_padding"],
        )
        for batch, seq_len in itertools.product(options["batch"], options["seq_len"])
    ]
    if check_devices:
        for device in sorted({p.device for p in problems}):
            check_device(device)
    return problems


def options_given(ctx: click.Context, but: tuple[str, ...] = ()) -> bool:
    """True when the user set any PROBLEM OPTION (other than those named in `but`) on the command line."""
    return any(ctx.get_parameter_source(n) != click.core.ParameterSource.DEFAULT
               for n in PROBLEM_OPTION_NAMES if n not in but)
