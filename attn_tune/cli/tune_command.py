"""`attn-tune tune`: the options (problems, a preset, a stale config) made into one tuning job and run as `tune()` or
`retune()`; the job's own values are checked where it is made, the rest by `tune()`. Help texts show the job's
defaults, read from it."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any, Callable

import click

from attn_tune.cli.group import cli
from attn_tune.cli.options import batches_help, options_given, problem_options, problems_from_options
from attn_tune.cli.render import counted
from attn_tune.errors import AttnTuneError, InvalidProblem, users_code
from attn_tune.problem import Problem
from attn_tune.tuner.job import CAPTURED_SAMPLES, FINE_TUNE_STEPS, OBJECTIVES, RETUNE_EFFORT, Search, TuneJob, default_text
from attn_tune.tuner.presets import PRESETS

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


def _capture_for_factory(spec: str, samples: int, activations: str, progress: Callable[..., None],
                         training: bool) -> list[Problem]:
    """The factory's model, run once as it is (SDPA patched for the run; a training step when `training`): its
    problems, and `samples` real calls of each kept in `activations`. A model that fails, or makes no call
    attn-tune sees, is one line."""
    from attn_tune.activations import save_activations
    from attn_tune.runtime.capture import NO_CALLS, capture_activations, counting_calls, load_factory

    factory = load_factory(spec)
    if training:  # the guard fine-tunes on the factory's training batches: a factory without them is refused first
        from attn_tune.tuner.fine_tune import training_factory

        training_factory(factory, spec)
    try:
        with counting_calls(lambda n: progress(f"capturing {spec}: attention calls", n)):
            captured, kept = users_code(spec, lambda: capture_activations(factory, samples, training=training))
    finally:
        progress.close()  # an error's line starts on its own line
    if not captured:
        raise AttnTuneError(f"{spec} {NO_CALLS}; nothing written")
    save_activations(activations, kept, source=spec)
    step = "a training step of " if training else ""
    click.echo(f"captured {counted(len(captured), 'problem')} of {step}{spec}, up to {samples} real calls each")
    return captured


_QUICK = PRESETS["quick"]
_QUICK_JOB = _QUICK.job
# option parameter -> the job field it sets (when given); every default lives in attn_tune.tuner.job
_JOB_OPTIONS = {
    "trials": "trials", "max_error": "max_error", "memory_budget": "memory_budget", "objective": "objective",
    "storage": "storage", "workers": "workers", "seed": "seed", "timeout": "timeout",
    "problem_timeout": "problem_timeout", "activations": "activations", "validate_spec": "factory",
    "batches": "batches", "metric_spec": "metric", "max_loss_change": "max_loss_change",
    "max_metric_drop": "max_metric_drop", "fine_tune_steps": "fine_tune_steps", "learning_rate": "learning_rate",
}


@cli.command("tune")
@click.argument("factory_spec", metavar="[MODULE:FACTORY]", required=False)
@problem_options
@click.option("--shapes", type=click.Path(dir_okay=False), help="A JSON list of problems (e.g. from `attn-tune capture`).")
@click.option("--preset", type=click.Choice(sorted(PRESETS)),
              help=f"A named tuning job: quick = {_QUICK.description}.")
@click.option("--trials", type=click.IntRange(min=1), default=None,
              help="Trials per problem. " + default_text("trials", stale_only=RETUNE_EFFORT.trials,
                                                         quick=_QUICK_JOB.effort.trials))
@click.option("--max-error", type=click.FloatRange(min=0), default=None,
              help="Let approximate variants take part within this relative error per call (a search filter). "
                   + default_text("max_error", quick=_QUICK_JOB.search.max_error))
@click.option("--memory-budget", type=ByteSize(), default=None, help="Never choose a candidate whose peak memory exceeds this (2GiB, 512MB).")
@click.option("--objective", type=click.Choice(OBJECTIVES), default=None,
              help="What the choice minimises: latency, peak memory, or balanced (the fastest point of the Pareto "
                   "front of both). " + default_text("objective"))
@click.option("--storage", default=None, help="Optuna storage URL (sqlite:///..., postgresql://user@host/db). [default: an SQLite file beside --out]")
@click.option("--workers", type=click.IntRange(min=1), default=None,
              help="Processes measuring trials at once, sharing each study through the storage. "
                   + default_text("workers"))
@click.option("--seed", type=int, default=None, help="Seed of the sampler, for reproducible searches.")
@click.option("--variant", "variant_names", multiple=True, metavar="NAME", help="Only these variants take part (repeatable).")
@click.option("--out", type=click.Path(dir_okay=False), default="tuned.json", show_default=True, help="Where the tuned config goes.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), default=None, help="Also draw the report PNG here. [MODULE:FACTORY and presets: the config's name with .report.png, "
                   "tuned.report.png for tuned.json]")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None, help="With --stale-only: the tuned config to bring up to date.")
@click.option("--stale-only", is_flag=True, help="Re-tune only the --config entries measured under other versions or devices (and problems it lacks), each with the search and guard the config records; keep the rest.")
@click.option("--timeout", type=_SECONDS, default=None, help="Seconds for the whole run: no trial starts after it; each problem keeps its best so far.")
@click.option("--problem-timeout", type=_SECONDS, default=None, help="Seconds for one problem, likewise.")
@click.option("--activations", type=click.Path(dir_okay=False), default=None,
              help="Real q, k, v from `attn-tune capture --activations`: each candidate's error is the worst over them.")
@click.option("--validate", "validate_spec", metavar="MODULE:FACTORY", default=None,
              help="Then run the factory's model with exact attention and with the config; record the loss change.")
@click.option("--max-loss-change", type=click.FloatRange(min=0), default=None,
              help="With --validate or MODULE:FACTORY: until the loss rises by at most this (relative: 0.01 is 1%), "
                   "choose the approximate entry with the worst call again with smaller errors (a safer knob, or "
                   "exact). " + default_text("max_loss_change", quick=_QUICK_JOB.guard.max_loss_change))
@click.option("--samples", type=click.IntRange(min=1), default=None,
              help=f"With MODULE:FACTORY: real calls kept per problem to measure errors on. [default: {CAPTURED_SAMPLES}]")
@click.option("--batches", type=click.IntRange(min=1), default=None,
              help=batches_help("Held-out batches the budgets are checked on (the factory takes `batches`); the loss "
                                "change's 95% interval must lie within the budget.", quick=_QUICK_JOB.guard.batches))
@click.option("--metric", "metric_spec", metavar="MODULE:FN", default=None,
              help="With the model's validation: a task metric fn(outputs, targets) -> number, higher is better "
                   "(else the factory's fourth item).")
@click.option("--max-metric-drop", type=click.FloatRange(min=0), default=None,
              help="With the model's validation: the metric may drop by at most this (its interval's upper end), "
                   "as the loss budget. " + default_text("max_metric_drop", quick=_QUICK_JOB.guard.max_metric_drop))
@click.option("--fine-tune-steps", type=click.IntRange(min=1), default=None,
              help="Guard by training: fine-tune the factory's model this many steps with exact attention and with "
                   "the config (same batches, seed, optimizer; the factory takes split='train'), then compare "
                   f"held-out loss and metric. [default: {FINE_TUNE_STEPS} when the problems tuned are training ones "
                   "(MODULE:FACTORY --training, --shapes of a training capture), else the guard runs inference]")
@click.option("--learning-rate", type=click.FloatRange(min=0, min_open=True), default=None,
              help="The fine-tune's AdamW learning rate (with --fine-tune-steps, or MODULE:FACTORY --training). "
                   + default_text("learning_rate"))
@click.pass_context
def tune_command(ctx: click.Context, factory_spec: str | None, shapes: str | None, preset: str | None,
                 variant_names: tuple[str, ...], out: str, plot_path: str | None, config_path: str | None,
                 stale_only: bool, samples: int | None, **options: Any) -> None:
    """Search variants and knobs per problem by measuring them; write the tuned config.

    With MODULE:FACTORY (a function returning (model, example_inputs[, targets])), the model runs unchanged: its
    attention problems and a few real calls of each are captured, tuned, and validated end to end (the report
    beside the config: tuned.report.png for tuned.json). With --training it captures a training step, tunes forward
    + backward, and guards by fine-tuning (--fine-tune-steps). --preset quick is this applied to the bundled LM.
    """
    from attn_tune.activations import check_against
    from attn_tune.cli.tune_report import TuneReport, run_and_report
    from attn_tune.measurement.inputs import load_captured
    from attn_tune.registry import get_variant
    from attn_tune.tuner.guard import batches_text, guard_batches
    from attn_tune.tuner.storage import default_storage_url
    from attn_tune.tuner.tune import tune

    given = {field: value for name, field in _JOB_OPTIONS.items() if (value := options.pop(name)) is not None}
    _refuse_conflicts(ctx, factory_spec, shapes, preset, stale_only, config_path, given, samples)
    if not Path(out).resolve().parent.is_dir():
        raise click.BadParameter(f"folder {Path(out).parent} does not exist", param_hint="'--out'")
    if variant_names:
        given["variants"] = tuple(get_variant(name) for name in variant_names)
    job, problems = _base_job(preset, stale_only), list(PRESETS[preset].problems) if preset else []
    factory_spec = factory_spec or (job.guard.factory if preset and job.guard else None)
    if factory_spec:
        plot_path = plot_path or report_path(out)
        given.update(factory=factory_spec, activations=str(Path(out).with_suffix(".activations.safetensors")))
    job = job.updated(**{"storage": default_storage_url(out), **given})
    report = TuneReport(job.guard)
    if job.guard is not None and job.guard.batches is None:  # the count the guard runs, and why, said with its result
        report.batches_why = batches_text(job.guard)
        job = job.updated(batches=guard_batches(job.guard))
    if stale_only:
        wanted = _problems(shapes, options) if shapes or options_given(ctx) else []
        _retune(config_path, wanted, job, set(given), out, plot_path)
        return
    written = None  # a file this run made, removed if the run fails: nothing half-written
    if factory_spec:
        written = None if Path(job.search.activations).exists() else Path(job.search.activations)
        count = samples or (PRESETS[preset].samples if preset else CAPTURED_SAMPLES)
        report.phase("capture")
        problems = _capture_for_factory(factory_spec, count, job.search.activations, report.progress,
                                        options["training"]) + problems
    else:
        problems = _problems(shapes, options)
        if shapes and job.search.activations:  # tune() checks this too; here the message can name the file
            check_against(load_captured(job.search.activations), problems, job.search.activations,
                          f"the problems of {shapes}")
    try:
        run_and_report(lambda listener: tune(problems, job, listener=listener), problems, report,
                       job.execution.storage, out, plot_path)
    except BaseException:
        if written is not None:
            written.unlink(missing_ok=True)
        raise


def report_path(out: str) -> str:
    """Where the report of a config goes unless --plot says: beside it, named after it, so a second tune into
    another file keeps the first's report."""
    return str(Path(out).with_suffix(".report.png"))


def _base_job(preset: str | None, stale_only: bool) -> TuneJob:
    """The job the options change: the preset's, a re-tune's (fewer trials), or the defaults."""
    if preset:
        return PRESETS[preset].job
    return TuneJob(effort=RETUNE_EFFORT) if stale_only else TuneJob()


def _problems(shapes: str | None, options: dict[str, Any]) -> list[Problem]:
    if shapes:
        return _problems_from_shapes(shapes)
    return problems_from_options(options, check_devices=False)


def _retune(config_path: str, wanted: list[Problem], job: TuneJob, given: set[str], out: str,
            plot_path: str | None) -> None:
    """`--stale-only`: the config's stale entries (and `wanted` problems it lacks) tuned again with what they were
    tuned with; the search options given replace what the config records."""
    from attn_tune.cli.tune_report import TuneReport, run_and_report
    from attn_tune.tuned_config import load_config
    from attn_tune.tuner.guard import guard_from_record
    from attn_tune.tuner.retune import retune, stale_problems

    earlier = load_config(config_path)
    problems = stale_problems(earlier, wanted)
    if not problems:
        earlier.save(out)
        click.echo(f"nothing in {config_path} is stale and no problem is missing from it; wrote {out} unchanged")
        return
    search = given & {f.name for f in dataclasses.fields(Search)}
    run_and_report(lambda listener: retune(earlier, problems, job, given=search, listener=listener), problems,
                   TuneReport(guard_from_record(earlier.validation)), job.execution.storage, out, plot_path)


def _refuse_conflicts(ctx: click.Context, factory_spec: str | None, shapes: str | None, preset: str | None,
                      stale_only: bool, config_path: str | None, given: dict[str, Any], samples: int | None) -> None:
    """Options that do not go together: one line, exit 2."""
    validate_spec, activations = given.get("factory"), given.get("activations")
    if factory_spec and (shapes or preset or stale_only or options_given(ctx, but=("training",)) or activations
                         or validate_spec):
        raise click.UsageError("MODULE:FACTORY captures the model's own problems and activations and validates on it: "
                               "not with problem options (but --training), --shapes, --preset, --stale-only, "
                               "--activations or --validate")
    if "learning_rate" in given and "fine_tune_steps" not in given and not ctx.params.get("training") and not shapes:
        raise click.UsageError("--learning-rate is the fine-tune's: give --fine-tune-steps N (or tune training "
                               "problems)")
    if samples is not None and not (factory_spec or preset):
        raise click.UsageError("--samples is the number of real calls kept per problem of MODULE:FACTORY")
    if stale_only and not config_path:
        raise click.UsageError("--stale-only re-tunes a tuned config: give it with --config")
    if stale_only and preset:
        raise click.UsageError("--stale-only re-tunes with the job the config records, not a preset's")
    if validate_spec and stale_only:
        raise click.UsageError("--validate checks a whole tuning run; a re-tune validates again with the model and "
                               "budget the config records")
    if config_path and not stale_only:
        raise click.UsageError("--config goes with --stale-only")
    if sum(bool(x) for x in (shapes, preset, options_given(ctx))) > 1:
        raise click.UsageError("give problem options, --shapes or --preset, not more than one")
    flags = {"max_loss_change": "--max-loss-change", "batches": "--batches", "metric": "--metric",
             "max_metric_drop": "--max-metric-drop", "fine_tune_steps": "--fine-tune-steps",
             "learning_rate": "--learning-rate"}
    for name, flag in flags.items():
        if name in given and not validate_spec and not preset and not factory_spec:
            what = "is checked by running the model" if name == "max_loss_change" else "goes with the model's validation"
            raise click.UsageError(f"{flag} {what}: give --validate MODULE:FACTORY")
    if activations and (preset or stale_only):
        raise click.UsageError("--activations goes with --shapes or problem options (a preset captures its own; a "
                               "re-tune reads the file each entry was tuned on)")
