"""`attn-tune capture MODULE:FACTORY`: run a model once and write the attention problems it asked for."""

from __future__ import annotations

from pathlib import Path

import click

from attn_tune.cli.group import cli
from attn_tune.cli.render import counted, echo_json, table
from attn_tune.errors import AttnTuneError, users_code
from attn_tune.tuner.job import CAPTURED_SAMPLES


@cli.command("capture")
@click.argument("factory_spec", metavar="MODULE:FACTORY")
@click.option("--out", type=click.Path(dir_okay=False), default="shapes.json", show_default=True,
              help="Where the shapes file (for `attn-tune tune --shapes`) goes.")
@click.option("--activations", type=click.Path(dir_okay=False), default=None,
              help="Also keep the real q, k, v (and mask) of a few calls per problem here (safetensors), for "
                   "`attn-tune tune --activations`: errors measured on what the model computes.")
@click.option("--samples", type=click.IntRange(min=1), default=None,
              help=f"Calls kept per problem with --activations, spread across layers.  [default: {CAPTURED_SAMPLES}]")
@click.option("--training", is_flag=True, help="Run forward and backward in train mode (problems marked training).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output only.")
def capture_command(factory_spec: str, out: str, activations: str | None, samples: int | None, training: bool,
                    as_json: bool) -> None:
    """Run FACTORY()'s (model, example_inputs[, targets]) once and record every attn_tune.attention problem it
    asks for."""
    from attn_tune.activations import describe_inputs, save_activations
    from attn_tune.cli.progress import Progress
    from attn_tune.runtime.capture import (NO_CALLS, capture_activations, capture_factory, counting_calls, load_factory,
                                           save_shapes)

    for option, path in (("--out", out), ("--activations", activations)):
        if path is not None and not Path(path).resolve().parent.is_dir():
            raise click.BadParameter(f"folder {Path(path).parent} does not exist", param_hint=f"'{option}'")
    if samples is not None and activations is None:
        raise click.UsageError("--samples is the number of calls kept with --activations; give --activations FILE")
    factory = load_factory(factory_spec)
    kept: dict = {}
    with Progress(enabled=False if as_json else None) as progress, \
            counting_calls(lambda n: progress(f"capturing {factory_spec}: attention calls", n)):
        if activations is None:
            problems = users_code(factory_spec, lambda: capture_factory(factory, training=training))
        else:
            problems, kept = users_code(factory_spec, lambda: capture_activations(
                factory, samples or CAPTURED_SAMPLES, training=training))
    if not problems:
        raise AttnTuneError(f"{factory_spec} {NO_CALLS}; nothing written")
    save_shapes(problems, out, source=factory_spec)
    if activations is not None:
        save_activations(activations, kept, source=factory_spec)
    if as_json:
        report = {"out": out, "problems": [p.to_dict() for p in problems]}
        if activations is not None:
            report.update(activations=activations, samples=[len(kept.get(p, ())) for p in problems])
        echo_json(report)
        return
    rows = [(p.describe(), describe_inputs(kept.get(p)) if activations else "") for p in problems]
    click.echo(table(("PROBLEM", "ACTIVATIONS") if activations else ("PROBLEM",),
                     rows if activations else [row[:1] for row in rows]))
    written = f"{out} and {activations}" if activations else out
    then = f" --activations {activations}" if activations else ""
    click.echo(f"wrote {written} ({counted(len(problems), 'problem')}); next: attn-tune tune --shapes {out}{then} --out tuned.json")
