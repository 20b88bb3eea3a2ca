"""`attn-tune show / merge / export / plot`: reading tuned configs (and a storage's studies) back."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from attn_tune.cli.group import cli
from attn_tune.cli.options import options_given, problem_options, problems_from_options
from attn_tune.cli.render import counted, echo_json, mib, table, versus_default
from attn_tune.errors import AttnTuneError
from attn_tune.problem import Problem


def _why(config: Any, config_path: str, problems: list[Problem], as_json: bool) -> None:
    import dataclasses
    import warnings

    from attn_tune.runtime import use_config
    from attn_tune.runtime.dispatch import decide

    with warnings.catch_warnings(record=True) as caught:  # a stale config's warning: one clean line, as `show`
        warnings.simplefilter("always")
        with use_config(config):
            decisions = [decide(p) for p in problems]
    for warning in caught:
        if str(warning.message).startswith("attn-tune: "):
            click.echo(str(warning.message).removeprefix("attn-tune: "), err=True)
        else:
            warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
    for d in decisions:
        d.config = config_path
    if as_json:
        echo_json([{**dataclasses.asdict(d), "problem": d.problem.to_dict(),
                    "entry": d.entry.to_dict() if d.entry else None} for d in decisions])
        return
    click.echo("\n\n".join(str(d) for d in decisions))


def _load(path: str):
    from attn_tune.tuned_config import load_config

    return load_config(path)


@cli.command("show")
@click.argument("config_path", metavar="TUNED.json")
@click.option("--why", is_flag=True, help="Say which entry and variant attn_tune.attention would use for the problem options.")
@problem_options
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output only.")
@click.pass_context
def show_command(ctx: click.Context, config_path: str, why: bool, as_json: bool, **options: Any) -> None:
    """Print a tuned config as a table (or, with --why, the runtime's choice for given problems)."""
    config = _load(config_path)
    if why:
        _why(config, config_path, problems_from_options(options, check_devices=False), as_json)
        return
    if options_given(ctx):
        raise click.UsageError("problem options go with --why")
    from attn_tune.staleness import local_devices, stale_report

    report = stale_report(config, config_path, local_devices())
    status = {i: ("not used: " if i in report.retired else "stale: ") + "; ".join(map(str, found))
              for i, found in report.changed.items()}
    if as_json:
        data = config.to_dict()
        for i, entry in enumerate(data["entries"]):
            entry["status"] = status.get(i, "current")
        echo_json(data)
        return
    if report.message:
        click.echo(report.message.removeprefix("attn-tune: "), err=True)
    device = config.device
    click.echo(f"{config_path}: {counted(len(config.entries), 'entry', 'entries')}, {device.get('type')} {device.get('name', '')}, "
               f"attn-tune {config.attn_tune}, torch {config.torch}, created {config.created}")
    rows = []
    for i, e in enumerate(config.entries):
        m = e.measured
        rows.append((
            e.problem.describe(),
            e.choice["variant"],
            ",".join(f"{k}={v}" for k, v in e.choice["params"].items()),
            f"{m['latency_ms']:.3f}",
            versus_default(e),
            mib(m.get("peak_bytes")),
            f"{m.get('rel_error', float('nan')):.1e}",
            (e.error_inputs or "random").replace("captured: ", "captured "),
            e.trials,
        ) + (((e.device or device).get("name", ""),) if device.get("type") == "mixed" else ())
          + ((status.get(i, "current"),) if status else ()))
    headers = ("PROBLEM", "VARIANT", "PARAMS", "LATENCY ms", "vs sdpa", "PEAK MiB", "REL ERR", "ERROR ON", "TRIALS")
    headers += (("DEVICE",) if device.get("type") == "mixed" else ()) + (("STATUS",) if status else ())
    click.echo(table(headers, rows))
    if config.validation:
        from attn_tune.cli.guard_text import fine_tune_lines, rechoices, summary_line

        v = config.validation
        click.echo(f"validated on {v.get('factory')}: {summary_line(v)}{rechoices(v)}")
        for line in fine_tune_lines(v):
            click.echo(line)


@cli.command("merge")
@click.argument("config_paths", nargs=-1, required=True, metavar="A.json B.json...")
@click.option("--out", type=click.Path(dir_okay=False), required=True, help="The merged config.")
@click.option("--prefer", type=click.Choice(["first", "last"]), default=None,
              help="Where two configs choose differently for one problem on one device, keep the first file's "
                   "entry or the last's. [default: refuse, naming the conflict]")
def merge_command(config_paths: tuple[str, ...], out: str, prefer: str | None) -> None:
    """Join configs from several devices; each entry keeps its device."""
    from attn_tune.tuned_config import merge_configs

    merged = merge_configs([_load(p) for p in config_paths], labels=config_paths, prefer=prefer,
                           on_conflict=lambda line: click.echo(line, err=True))
    merged.save(out)
    click.echo(f"wrote {out} ({counted(len(merged.entries), 'entry', 'entries')} from {counted(len(config_paths), 'config')})")


@cli.command("export")
@click.option("--storage", required=True, help="The Optuna storage URL the studies are in.")
@click.option("--out", type=click.Path(dir_okay=False), required=True, help="The tuned config to write.")
def export_command(storage: str, out: str) -> None:
    """Write the tuned config a storage holds: every finished study's choice, each with its device."""
    from attn_tune.registry.space import quiet_optuna
    from attn_tune.tuner.export import export_config

    if not Path(out).resolve().parent.is_dir():
        raise click.BadParameter(f"folder {Path(out).parent} does not exist", param_hint="'--out'")
    with quiet_optuna():
        config, pending = export_config(storage)
    for line in pending:
        click.echo(f"skipped {line}", err=True)
    config.save(out)
    kinds = sorted({(e.device or config.device).get("name", "?") for e in config.entries})
    click.echo(f"wrote {out} ({counted(len(config.entries), 'entry', 'entries')} from {counted(len(kinds), 'device')}: {', '.join(kinds)})")


@cli.command("plot")
@click.argument("config_path", metavar="TUNED.json")
@click.option("--out", type=click.Path(dir_okay=False), required=True, help="The PNG to write.")
def plot_command(config_path: str, out: str) -> None:
    """Draw latency and peak memory against q_len per variant, the chosen one marked."""
    from attn_tune.tuner.plot import plot_config

    config = _load(config_path)
    if not config.entries:
        raise AttnTuneError(f"{config_path} has no entries to plot")
    plot_config(config, out)
    click.echo(f"wrote {out}")
