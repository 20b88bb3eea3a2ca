"""`attn-tune validate MODULE:FACTORY --config tuned.json`: what a config does to a model, end to end."""

from __future__ import annotations

import sys

import click

from attn_tune.cli.group import cli
from attn_tune.cli.guard_text import calls_table, fine_tune_lines, loss_line, metric_line, not_run_text
from attn_tune.cli.render import echo_json
from attn_tune.cli.options import batches_help
from attn_tune.tuner.job import FINE_TUNE_STEPS, default_text


@cli.command("validate")
@click.argument("factory_spec", metavar="MODULE:FACTORY")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), required=True,
              help="The tuned config to run the model with.")
@click.option("--max-loss-change", type=click.FloatRange(min=0), default=None,
              help="Exit 1 unless the loss change's 95% interval lies within this (relative: 0.01 is 1%).")
@click.option("--batches", type=click.IntRange(min=1), default=None,
              help=batches_help("Held-out batches to validate on (the factory takes `batches`); the loss change gets "
                                "an interval."))
@click.option("--metric", "metric_spec", metavar="MODULE:FN", default=None,
              help="A task metric fn(outputs, targets) -> number, higher is better (else the factory's fourth item).")
@click.option("--max-metric-drop", type=click.FloatRange(min=0), default=None,
              help="Exit 1 unless the metric's drop (exact - tuned, its interval's upper end) is within this.")
@click.option("--training", is_flag=True,
              help="Validate by training: fine-tune the model with exact attention and with the config from the "
                   "factory's weights (the factory takes split='train'), then compare held-out loss and metric.")
@click.option("--fine-tune-steps", type=click.IntRange(min=1), default=None,
              help=f"With --training: steps of each fine-tune. [default: {FINE_TUNE_STEPS}]")
@click.option("--learning-rate", type=click.FloatRange(min=0, min_open=True), default=None,
              help="With --training: the fine-tune's AdamW learning rate. " + default_text("learning_rate"))
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output only.")
def validate_command(factory_spec: str, config_path: str, max_loss_change: float | None, batches: int | None,
                     metric_spec: str | None, max_metric_drop: float | None, training: bool,
                     fine_tune_steps: int | None, learning_rate: float | None, as_json: bool) -> None:
    """Run FACTORY's model with exact attention (sdpa) and with the config: each call's variant and error, the
    output's error, and the loss change (targets returned third by the factory, or the model's own loss), over
    `--batches` held-out batches with its 95% confidence interval. With --training, the two are fine-tuned first
    (a paired fine-tune) and the fine-tuned models compared."""
    from attn_tune.tuned_config import load_config
    from attn_tune.cli.progress import Progress
    from attn_tune.tuner.guard import batches_text, broken_budgets, build_validator
    from attn_tune.tuner.job import TuneJob

    if (fine_tune_steps is not None or learning_rate is not None) and not training:
        raise click.UsageError("--fine-tune-steps and --learning-rate go with --training")
    config = load_config(config_path)
    chosen = {"batches": batches, "learning_rate": learning_rate,
              "fine_tune_steps": (fine_tune_steps or FINE_TUNE_STEPS) if training else None}
    guard = TuneJob().updated(factory=factory_spec, metric=metric_spec, max_loss_change=max_loss_change,
                              max_metric_drop=max_metric_drop,
                              **{key: value for key, value in chosen.items() if value is not None}).guard
    with Progress(enabled=None if not as_json else False) as progress:
        validation = build_validator(guard, progress=progress).validate(config)
    broken = broken_budgets(validation.summary(), guard)
    if as_json:
        echo_json({**validation.to_dict(), "max_loss_change": max_loss_change, "max_metric_drop": max_metric_drop,
                   "within_budget": not broken})
    else:
        click.echo(calls_table(validation))
        click.echo(loss_line(validation))
        if guard.batches is None:
            click.echo(batches_text(guard))
        if validation.metric is not None:
            click.echo(metric_line(validation))
        summary = validation.summary()
        for line in fine_tune_lines(summary):
            click.echo(line)
        if summary.get("entries_not_run"):
            click.echo("not checked" + not_run_text(summary["entries_not_run"]))
        decides = " (the interval's upper end decides)" if validation.batches > 1 else ""
        if max_loss_change is not None:
            click.echo(f"{'over' if 'loss' in broken else 'within'} the loss budget of {max_loss_change:+.2%}{decides}")
        if max_metric_drop is not None:
            click.echo(f"{'over' if 'metric' in broken else 'within'} the metric budget of a {max_metric_drop:g} drop"
                       f"{decides}")
    if broken:
        sys.exit(1)
