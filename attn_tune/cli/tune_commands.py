"""`attn-tune tune`: translate the options (problems, a preset, a stale config) into one `tune()` or `retune()` run,
then report it; every check of the arguments is `tune()`'s."""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path
from typing import Any

import click

from attn_tune.cli.group import cli, users_code
from attn_tune.cli.options import options_given, problem_options, problems_from_options
from attn_tune.cli.render import mib, named, versus_default
from attn_tune.errors import AttnTuneError, InvalidProblem
from attn_tune.problem import Problem

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


class ByteSize(click.ParamType):
    """A size such as 2GiB, 512MB or 1000000 (bytes)."""

    name = "SIZE"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(value))
        if not match or match.group(2).lower() not in _UNITS:
            self.fail(f"{value!r} is not a size like 2GiB, 512MB or 1000000", param, ctx)
        size = int(float(match.group(1)) * _UNITS[match.group(2).lower()])
        if size <= 0:
            self.fail(f"{value!r} must be positive", param, ctx)
        return size


_SECONDS = click.FloatRange(min=0, min_open=True)


def _problems_from_shapes(path: str) -> list[Problem]:
    try:
        data = json.loads(Path(path).read_text())
    except OSError as exc:
        raise click.BadParameter(f"cannot read {path}: {exc.strerror or exc}", param_hint="'--shapes'") from None
    except json.JSONDecodeError as exc:
        raise click.BadParameter(f"{path} is not valid JSON ({exc.msg}, line {exc.lineno})", param_hint="'--shapes'") from None
    if isinstance(data, dict) and "problems" in data:  # the output of `attn-tune capture`
        data = data["problems"]
    if not isinstance(data, list) or not data:
        raise click.BadParameter(f"{path} must hold a non-empty JSON list of problems", param_hint="'--shapes'")
    problems = []
    for i, raw in enumerate(data):
        try:
            problems.append(Problem.from_dict(raw))
        except InvalidProblem as exc:
            raise InvalidProblem(f"{path}, problem {i}: {exc}") from None
    return list(dict.fromkeys(problems))


class _TrialProgress:
    """One progress bar per problem on stderr, advanced by tune()'s on_trial callback."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.problem: Problem | None = None
        self.bar: Any = None

    def __call__(self, problem: Problem, done: int, total: int) -> None:
        if not self.enabled:
            return
        if problem != self.problem:
            self.close()
            self.problem = problem
            self.bar = click.progressbar(length=total, label=problem.describe(), file=sys.stderr, show_pos=True)
            self.bar.__enter__()
        self.bar.update(max(0, min(done, total) - self.bar.pos))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.__exit__(None, None, None)
            self.bar = None


def _summary(problem: Problem, entry: Any, note: str) -> str:
    if entry is None:
        return f"{problem.describe()}: no choice: {note}"
    choice = named(entry.choice["variant"], entry.choice["params"])
    latency = entry.measured["latency_ms"]
    base = entry.baseline_latency_ms()
    against = versus_default(entry)
    if not base:
        versus = ", sdpa not measured"
    elif against.startswith("kept"):  # sdpa itself, and the best rival's interval that did not beat it
        versus = f", 1.00x sdpa's {base:.3f} ms, {against}"
    else:
        versus = f", {against} sdpa's {base:.3f} ms"
    cut = f", cut short: {entry.tuning['cut_short']}" if (entry.tuning or {}).get("cut_short") else ""
    error = f", error {entry.measured['rel_error']:.1e} on {entry.error_inputs}" if entry.error_inputs else ""
    return (f"{problem.describe()}: {choice} {latency:.3f} ms{versus}, {mib(entry.measured['peak_bytes'])} MiB"
            f"{error}, {entry.trials} trials{cut}")


def _time_summary(entries: list[Any], tuned: list[Problem], notes: list[str], wall_s: float) -> str:
    """Where the run's time went: first calls (compiling, masks) against the rest; problems cut short."""
    records = [e.tuning for e in entries if e.problem in set(tuned) and e.tuning]
    first = sum(r["first_calls_s"] for r in records)
    cut = sum(note.startswith("cut short") for note in notes)
    line = (f"time: {wall_s:.1f} s for {len(tuned)} problem(s): {first:.1f} s in first calls (compiling, building masks), "
            f"{max(wall_s - first, 0.0):.1f} s in timed calls and choosing")
    return line + (f"; {cut} cut short by the time limit" if cut else "")


def _capture_for_factory(spec: str, samples: int, activations: str) -> list[Problem]:
    """The factory's model, run once as it is (SDPA patched for the run): its problems, and `samples` real calls
    of each kept in `activations`. A model that fails, or makes no call attn-tune sees, is one line."""
    from attn_tune.activations import save_activations
    from attn_tune.runtime.capture import NO_CALLS, capture_activations, load_factory

    factory = load_factory(spec)
    captured, kept = users_code(spec, lambda: capture_activations(factory, samples))
    if not captured:
        raise AttnTuneError(f"{spec} {NO_CALLS}; nothing written")
    save_activations(activations, kept, source=spec)
    click.echo(f"captured {len(captured)} problem(s) of {spec}, up to {samples} real calls each")
    return captured


def _dropped_line(max_loss_change: float | None, max_metric_drop: float | None, lines: list[str]) -> Any:
    """The line a re-choice prints: which guard the model broke (loss, metric or both), and what replaced what."""
    from attn_tune.tuner.validate import broken_budgets

    def say(record: dict[str, Any]) -> None:
        now, before = record["now"], named(record["variant"], record["params"])
        then = "sdpa serves it" if now is None else \
            f"chosen again with errors below it: {named(now['variant'], now['params'])} replaces {before}"
        broken = " and ".join(broken_budgets(record, max_loss_change, max_metric_drop).values()) or "over budget"
        lines.append(f"validate: {broken}; {before} for {record['problem']} had the worst call "
                     f"(error {record['worst_call_error']:.2e}): {then}")
    return say


@cli.command("tune")
@click.argument("factory_spec", metavar="[MODULE:FACTORY]", required=False)
@problem_options
@click.option("--shapes", type=click.Path(dir_okay=False), help="A JSON list of problems (e.g. from `attn-tune capture`).")
@click.option("--preset", type=click.Choice(["quick"]), help="A named tuning job: quick = the reference LM's problems with its activations and a loss budget, plus a sliding window; a few minutes.")
@click.option("--trials", type=click.IntRange(min=1), default=None, help="Trials per problem. [default: 20, quick: 20]")
@click.option("--max-error", type=click.FloatRange(min=0), default=None, help="Let approximate variants take part within this relative error per call (a search filter). [quick: 0.35]")
@click.option("--memory-budget", type=ByteSize(), default=None, help="Never choose a candidate whose peak memory exceeds this (2GiB, 512MB).")
@click.option("--objective", type=click.Choice(["latency", "memory", "balanced"]), default="latency", show_default=True)
@click.option("--storage", default=None, help="Optuna storage URL (sqlite:///..., postgresql://user@host/db). [default: an SQLite file beside --out]")
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True, help="Processes measuring trials at once, sharing each study through the storage.")
@click.option("--seed", type=int, default=None, help="Seed of the sampler, for reproducible searches.")
@click.option("--variant", "variant_names", multiple=True, metavar="NAME", help="Only these variants take part (repeatable).")
@click.option("--out", type=click.Path(dir_okay=False), default="tuned.json", show_default=True, help="Where the tuned config goes.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), default=None, help="Also draw the report PNG here. [quick: report.png]")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None, help="With --stale-only: the tuned config to bring up to date.")
@click.option("--stale-only", is_flag=True, help="Re-tune only the --config entries measured under other versions or devices (and problems it lacks); keep the rest. [trials default: 5]")
@click.option("--timeout", type=_SECONDS, default=None, help="Seconds for the whole run: no trial starts after it; each problem keeps its best so far.")
@click.option("--problem-timeout", type=_SECONDS, default=None, help="Seconds for one problem, likewise.")
@click.option("--activations", type=click.Path(dir_okay=False), default=None,
              help="Real q, k, v from `attn-tune capture --activations`: each candidate's error is the worst over them.")
@click.option("--validate", "validate_spec", metavar="MODULE:FACTORY", default=None,
              help="Then run the factory's model with exact attention and with the config; record the loss change.")
@click.option("--max-loss-change", type=click.FloatRange(min=0), default=None,
              help="With --validate or MODULE:FACTORY: until the loss rises by at most this (relative: 0.01 is 1%), "
                   "choose the approximate entry with the worst call again with smaller errors (a safer knob, or "
                   "exact). [quick: 0.01]")
@click.option("--samples", type=click.IntRange(min=1), default=None,
              help="With MODULE:FACTORY: real calls kept per problem to measure errors on. [default: 4]")
@click.option("--batches", type=click.IntRange(min=1), default=None,
              help="Held-out batches the loss budget is checked on (the factory takes `batches`); the loss change's "
                   "95% interval must lie within the budget. [default: 1, quick: 4]")
@click.option("--metric", "metric_spec", metavar="MODULE:FN", default=None,
              help="With the model's validation: a task metric fn(outputs, targets) -> number, higher is better "
                   "(else the factory's fourth item).")
@click.option("--max-metric-drop", type=click.FloatRange(min=0), default=None,
              help="With the model's validation: the metric may drop by at most this (its interval's upper end), "
                   "as the loss budget.")
@click.pass_context
def tune_command(ctx: click.Context, factory_spec: str | None, samples: int | None, shapes: str | None,
                 preset: str | None, trials: int | None, max_error: float | None,
                 memory_budget: int | None, objective: str, storage: str | None, workers: int, seed: int | None,
                 variant_names: tuple[str, ...], out: str, plot_path: str | None, config_path: str | None,
                 stale_only: bool, timeout: float | None, problem_timeout: float | None, activations: str | None,
                 validate_spec: str | None, max_loss_change: float | None, batches: int | None,
                 metric_spec: str | None, max_metric_drop: float | None, **options: Any) -> None:
    """Search variants and knobs per problem by measuring them; write the tuned config.

    With MODULE:FACTORY (a function returning (model, example_inputs[, targets])), the model runs unchanged: its
    attention problems and a few real calls of each are captured, tuned, and validated end to end (report.png
    beside the config). --preset quick is this applied to the bundled LM.
    """
    from attn_tune.registry import get_variant
    from attn_tune.tuned_config import load_config
    from attn_tune.tuner.presets import PRESETS
    from attn_tune.tuner.retune import stale_problems
    from attn_tune.tuner.storage import default_storage_url

    _refuse_conflicts(ctx, factory_spec, shapes, preset, stale_only, config_path, validate_spec, max_loss_change,
                      activations, samples)
    if not Path(out).resolve().parent.is_dir():
        raise click.BadParameter(f"folder {Path(out).parent} does not exist", param_hint="'--out'")
    given = {name for name in ("max_error", "memory_budget", "objective") if _given(ctx, name)}
    search = dict(max_error=max_error, memory_budget=memory_budget, objective=objective,
                  variants=[get_variant(name) for name in variant_names] or None)
    run: dict[str, Any] = dict(trials=trials, storage=storage or default_storage_url(out), seed=seed, workers=workers,
                               timeout=timeout, problem_timeout=problem_timeout,
                               problems_label=f"the problems of {shapes}" if shapes else "the problems tuned")
    problems: list[Problem] = []
    if preset:  # the factory path below, with the preset's model, settings and extra problems
        chosen = PRESETS[preset]
        factory_spec, samples = chosen.factory, samples or chosen.samples
        run.update(trials=trials or chosen.trials, measure_kwargs=chosen.measure_kwargs,
                   final_kwargs=chosen.final_kwargs, rounds=chosen.rounds)
        if chosen.variants and not variant_names:
            search["variants"] = [get_variant(name) for name in chosen.variants]
        search["max_error"] = chosen.max_error if max_error is None else max_error
        max_loss_change = chosen.max_loss_change if max_loss_change is None else max_loss_change
        max_metric_drop = chosen.max_metric_drop if max_metric_drop is None else max_metric_drop
        batches = batches or chosen.batches
        problems = list(chosen.problems)
    written = None  # a file this run made, removed if the run fails: nothing half-written
    if factory_spec:
        plot_path = plot_path or str(Path(out).with_name("report.png"))
        validate_spec = factory_spec
        activations = str(Path(out).with_suffix(".activations.safetensors"))  # kept: a re-tune reads it again
        written = None if Path(activations).exists() else Path(activations)
        problems = _capture_for_factory(factory_spec, samples or 4, activations) + problems
    elif shapes:
        problems = _problems_from_shapes(shapes)
    elif not stale_only or options_given(ctx):
        problems = problems_from_options(options, check_devices=False)
    else:
        problems = []
    earlier, drops = None, []
    if stale_only:
        earlier = load_config(config_path)
        problems = stale_problems(earlier, problems)
        run["trials"] = trials or 5
        search = {k: v for k, v in search.items() if k in given or (k == "variants" and v)}  # the rest: as recorded
        budget = (earlier.validation or {}).get("max_loss_change")
        metric_budget = (earlier.validation or {}).get("max_metric_drop")
        run["on_drop"] = _dropped_line(budget, metric_budget, drops) \
            if budget is not None or metric_budget is not None else None
        if not problems:
            earlier.save(out)
            click.echo(f"nothing in {config_path} is stale and no problem is missing from it; wrote {out} unchanged")
            return
    run["trials"] = run["trials"] or 20
    if activations is not None:
        search["activations"] = activations
    try:
        if validate_spec:
            from attn_tune.cli.validate_command import build_validator
            from attn_tune.runtime.capture import load_factory

            run.update(validator=build_validator(validate_spec, load_factory(validate_spec), batches or 1,
                                                 metric_spec),
                       max_loss_change=max_loss_change, max_metric_drop=max_metric_drop,
                       on_drop=_dropped_line(max_loss_change, max_metric_drop, drops)
                       if max_loss_change is not None or max_metric_drop is not None else None)
        _run_and_report(problems, earlier, {**run, **search}, drops, out, plot_path)
    except BaseException:
        if written is not None:
            written.unlink(missing_ok=True)
        raise


def _given(ctx: click.Context, name: str) -> bool:
    return ctx.get_parameter_source(name) != click.core.ParameterSource.DEFAULT


def _refuse_conflicts(ctx: click.Context, factory_spec: str | None, shapes: str | None, preset: str | None,
                      stale_only: bool, config_path: str | None, validate_spec: str | None,
                      max_loss_change: float | None, activations: str | None, samples: int | None) -> None:
    """Options that do not go together: one line, exit 2."""
    if factory_spec and (shapes or preset or stale_only or options_given(ctx) or activations or validate_spec):
        raise click.UsageError("MODULE:FACTORY captures the model's own problems and activations and validates on it: "
                               "not with problem options, --shapes, --preset, --stale-only, --activations or --validate")
    if samples is not None and not (factory_spec or preset):
        raise click.UsageError("--samples is the number of real calls kept per problem of MODULE:FACTORY")
    if stale_only and not config_path:
        raise click.UsageError("--stale-only re-tunes a tuned config: give it with --config")
    if validate_spec and stale_only:
        raise click.UsageError("--validate checks a whole tuning run; a re-tune validates again with the model and "
                               "budget the config records")
    if config_path and not stale_only:
        raise click.UsageError("--config goes with --stale-only")
    if sum(bool(x) for x in (shapes, preset, options_given(ctx))) > 1:
        raise click.UsageError("give problem options, --shapes or --preset, not more than one")
    if max_loss_change is not None and not validate_spec and not preset and not factory_spec:
        raise click.UsageError("--max-loss-change is checked by running the model: give --validate MODULE:FACTORY")
    for name in ("batches", "metric_spec", "max_metric_drop"):
        if _given(ctx, name) and not validate_spec and not preset and not factory_spec:
            flag = {"batches": "--batches", "metric_spec": "--metric", "max_metric_drop": "--max-metric-drop"}[name]
            raise click.UsageError(f"{flag} goes with the model's validation: give --validate MODULE:FACTORY")
    if activations and (preset or stale_only):
        raise click.UsageError("--activations goes with --shapes or problem options (a preset captures its own; a "
                               "re-tune reads the file each entry was tuned on)")


def _run_and_report(problems: list[Problem], earlier: Any, kwargs: dict[str, Any], drops: list[str], out: str,
                    plot_path: str | None) -> None:
    """Run tune() (or retune() over `earlier`) with progress bars; print a line per problem, write the config."""
    from attn_tune.staleness import changes, local_devices
    from attn_tune.tuner.plot import plot_config
    from attn_tune.tuner.retune import retune
    from attn_tune.tuner.storage import StorageError, redact
    from attn_tune.tuner.tune import tune

    progress = _TrialProgress(enabled=True)
    results: list[tuple[Problem, Any, str]] = []

    def on_result(problem: Problem, entry: Any, note: str) -> None:
        progress.close()
        progress.problem = None
        results.append((problem, entry, note))

    storage = kwargs["storage"]
    started = time.monotonic()
    try:
        run = dict(kwargs, on_trial=progress, on_result=on_result)
        config = retune(earlier, problems, **run) if earlier is not None else tune(problems, **run)
    except KeyboardInterrupt:
        progress.close()
        click.echo(f"Interrupted: finished trials are kept in {redact(storage)}; run the same command to resume.", err=True)
        sys.exit(130)
    except Exception as exc:
        if type(exc).__module__.split(".")[0] != "sqlalchemy":
            raise
        progress.close()  # the server went away mid-run: one redacted line, no traceback that could carry the URL
        raise StorageError(f"storage {redact(storage)} failed: {type(exc).__name__}: "
                           f"{redact(' '.join(str(exc).split()))[:200]}") from None
    progress.close()
    here = local_devices()  # a merged config's other machines' entries are not what this run wrote
    final = {e.problem: e for e in config.entries if not any(c.what == "device" for c in changes(e, config.device, here))}
    for problem, entry, note in results:  # a loss budget may have chosen again: the entry written is the one shown
        if entry is not None and problem not in final:
            click.echo(f"{problem.describe()}: sdpa (the default: {entry.choice['variant']} was dropped for the loss budget)")
        else:
            click.echo(_summary(problem, final.get(problem, entry), note))
    for line in drops:
        click.echo(line)
    if not config.entries and not config.validation:  # (a loss budget may drop every entry: that is an answer)
        raise AttnTuneError("no problem got a choice; nothing written")
    if config.validation:
        from attn_tune.cli.validate_command import summary_line

        click.echo(f"validate {config.validation.get('factory')}: " + summary_line(config.validation))
    config.save(out)
    click.echo(_time_summary(config.entries, problems, [note for _, _, note in results], time.monotonic() - started))
    click.echo(f"wrote {out} ({len(config.entries)} entries; trials in {redact(storage)})")
    if plot_path:
        plot_config(config, plot_path)
        click.echo(f"wrote {plot_path}")
