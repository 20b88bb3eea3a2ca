"""`attn-tune validate MODULE:FACTORY --config tuned.json`: what a config does to a model, end to end."""

from __future__ import annotations

import statistics
import sys
from typing import Any

import click

from attn_tune.cli.group import cli, users_code
from attn_tune.cli.render import echo_json, table


def change_text(change: float, interval: Any, batches: int, percent: bool = True) -> str:
    """'+0.48% (95% CI +0.30% to +0.66%, 6 batches)', or '+0.48% (1 batch: no interval)'; `percent` False:
    plain numbers ('+0.0037 (95% CI ...)')."""
    fmt = "{:+.2%}" if percent else "{:+.4f}"
    if batches < 2 or not interval:
        return f"{fmt.format(change)} (1 batch: no interval)"
    return (f"{fmt.format(change)} (95% CI {fmt.format(interval[0])} to {fmt.format(interval[1])}, "
            f"{batches} batches)")


def loss_line(validation: Any) -> str:
    """The model's figures in one line: output error, and the loss with exact attention and with the config."""
    line = f"model: output rel error {validation.output_error:.2e}"
    if validation.loss_from is None:
        return line + "; no loss (the factory returns no targets and the output no loss)"
    change = change_text(validation.loss_change, validation.loss_change_interval, len(validation.losses_exact))
    return (line + f"; loss ({validation.loss_from}) exact {validation.loss_exact:.4f}, tuned "
            f"{validation.loss_tuned:.4f}, change {change}")


def metric_line(validation: Any) -> str | None:
    """The task metric in one line, or None without one."""
    if validation.metric is None:
        return None
    drop = change_text(validation.metric_drop, validation.metric_drop_interval, len(validation.metrics_exact),
                       percent=False)
    return (f"metric {validation.metric}: exact {statistics.fmean(validation.metrics_exact):.4f}, tuned "
            f"{statistics.fmean(validation.metrics_tuned):.4f}, drop {drop}")


def summary_line(v: dict[str, Any]) -> str:
    """A config's `validation` record in one line."""
    if v.get("loss_change") is None:
        return f"output rel error {v['output_rel_error']:.2e}; no loss"
    change = change_text(v["loss_change"], v.get("loss_change_interval"), v.get("batches", 1))
    metric = "" if v.get("metric") is None else (
        f"; {v['metric']} drop {change_text(v['metric_drop'], v.get('metric_drop_interval'), v.get('batches', 1), False)}")
    return (f"loss exact {v['loss_exact']:.4f}, tuned {v['loss_tuned']:.4f}, change {change}{metric}; "
            f"output rel error {v['output_rel_error']:.2e}; {v['approximate_calls']} of {v['calls']} calls approximate")


def calls_table(validation: Any) -> str:
    rows = []
    for c in validation.calls:
        params = ",".join(f"{k}={v}" for k, v in c.params.items())
        rows.append((c.number, c.problem.describe(), c.variant + (f"({params})" if params else ""), c.rule,
                     f"{c.rel_error:.1e}"))
    return table(("CALL", "PROBLEM", "VARIANT", "RULE", "REL ERR"), rows)


@cli.command("validate")
@click.argument("factory_spec", metavar="MODULE:FACTORY")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), required=True,
              help="The tuned config to run the model with.")
@click.option("--max-loss-change", type=click.FloatRange(min=0), default=None,
              help="Exit 1 unless the loss change's 95% interval lies within this (relative: 0.01 is 1%).")
@click.option("--batches", type=click.IntRange(min=1), default=1, show_default=True,
              help="Held-out batches to validate on (the factory takes `batches`); the loss change gets an interval.")
@click.option("--metric", "metric_spec", metavar="MODULE:FN", default=None,
              help="A task metric fn(outputs, targets) -> number, higher is better (else the factory's fourth item).")
@click.option("--max-metric-drop", type=click.FloatRange(min=0), default=None,
              help="Exit 1 unless the metric's drop (exact - tuned, its interval's upper end) is within this.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output only.")
def validate_command(factory_spec: str, config_path: str, max_loss_change: float | None, batches: int,
                     metric_spec: str | None, max_metric_drop: float | None, as_json: bool) -> None:
    """Run FACTORY's model with exact attention (sdpa) and with the config: each call's variant and error, the
    output's error, and the loss change (targets returned third by the factory, or the model's own loss), over
    `--batches` held-out batches with its 95% confidence interval."""
    from attn_tune.runtime.capture import load_factory
    from attn_tune.tuned_config import load_config

    config = load_config(config_path)
    validator = build_validator(factory_spec, load_factory(factory_spec), batches, metric_spec)
    if max_loss_change is not None:
        validator.require_loss()
    if max_metric_drop is not None:
        validator.require_metric()
    validation = users_code(factory_spec, lambda: validator.validate(config))
    loss_over = max_loss_change is not None and not validation.within(max_loss_change)
    metric_over = max_metric_drop is not None and not validation.metric_within(max_metric_drop)
    over = loss_over or metric_over
    if as_json:
        echo_json({**validation.to_dict(), "max_loss_change": max_loss_change, "max_metric_drop": max_metric_drop,
                   "within_budget": not over})
    else:
        click.echo(calls_table(validation))
        click.echo(loss_line(validation))
        if validation.metric is not None:
            click.echo(metric_line(validation))
        decides = " (the interval's upper end decides)" if batches > 1 else ""
        if max_loss_change is not None:
            click.echo(f"{'over' if loss_over else 'within'} the loss budget of {max_loss_change:+.2%}{decides}")
        if max_metric_drop is not None:
            click.echo(f"{'over' if metric_over else 'within'} the metric budget of a {max_metric_drop:g} drop"
                       f"{decides}")
    if over:
        sys.exit(1)


def build_validator(spec: str, factory: Any, batches: int = 1, metric_spec: str | None = None) -> Any:
    """The factory's model, run once with exact attention (per batch); a failure of the model is one line."""
    from attn_tune.runtime.capture import load_factory
    from attn_tune.tuner.validate import Validator

    metric = load_factory(metric_spec) if metric_spec else None
    return users_code(spec, lambda: Validator(factory, label=spec, batches=batches, metric=metric,
                                              metric_from=metric_spec))
