"""`attn-tune capture MODULE:FACTORY`: run a model once and write the attention problems it asked for."""

from __future__ import annotations

from pathlib import Path

import click

from attn_tune.cli.group import cli
from attn_tune.cli.render import echo_json, table
from attn_tune.errors import AttnTuneError


@cli.command("capture")
@click.argument("factory_spec", metavar="MODULE:FACTORY")
@click.option("--out", type=click.Path(dir_okay=False), default="shapes.json", show_default=True,
              help="Where the shapes file (for `attn-tune tune --shapes`) goes.")
@click.option("--training", is_flag=True, help="Run forward and backward in train mode (problems marked training).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output only.")
def capture_command(factory_spec: str, out: str, training: bool, as_json: bool) -> None:
    """Run FACTORY()'s (model, example_inputs) once and record every attn_tune.attention problem it asks for."""
    from attn_tune.runtime.capture import capture_factory, load_factory, save_shapes

    if not Path(out).resolve().parent.is_dir():
        raise click.BadParameter(f"folder {Path(out).parent} does not exist", param_hint="'--out'")
    factory = load_factory(factory_spec)
    try:
        problems = capture_factory(factory, training=training)
    except AttnTuneError:
        raise
    except Exception as exc:  # noqa: BLE001 - the user's model failed: one line, not a traceback
        raise click.ClickException(f"{factory_spec} raised {type(exc).__name__}: {' '.join(str(exc).split())[:300]}")
    if not problems:
        raise AttnTuneError(f"{factory_spec} made no attn_tune.attention call (does the model use AutoAttention or "
                            "attn_implementation='attn_tune'?); nothing written")
    save_shapes(problems, out, source=factory_spec)
    if as_json:
        echo_json({"out": out, "problems": [p.to_dict() for p in problems]})
        return
    click.echo(table(("PROBLEM",), [(p.describe(),) for p in problems]))
    click.echo(f"wrote {out} ({len(problems)} problem(s)); next: attn-tune tune --shapes {out} --out tuned.json")
