"""What `attn-tune tune` shows while and after it runs: progress on a terminal, a line per problem's choice, the
guard's re-choices and verdict, where the time went; then the config (and report) written."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any, Callable

import click

from attn_tune.cli.guard_text import fine_tune_lines, rechoice_line, summary_line
from attn_tune.cli.progress import Progress
from attn_tune.cli.render import counted, mib, named, versus_default
from attn_tune.errors import AttnTuneError
from attn_tune.problem import Problem
from attn_tune.tuner.listener import TuneListener

__all__ = ["TuneReport", "run_and_report"]


class TuneReport(TuneListener):
    """The command's listener: progress on a terminal (trials, head-to-head rounds, the guard's batches); results
    and re-choices kept for the end; the run's wall time split into consecutive phases, so its parts add up."""

    def __init__(self, guard: Any) -> None:
        self.guard = guard
        self.batches_why: str | None = None  # how many batches the guard ran and why, when the job did not say
        self.progress = Progress()
        self.results: list[tuple[Problem, Any, str]] = []
        self.rechoices: list[str] = []
        self.started = self._since = time.monotonic()
        self.phases: dict[str, float] = {}
        self._phase = "other"

    def phase(self, name: str) -> None:
        """From now on the time goes to `name` (until the next phase)."""
        now = time.monotonic()
        self.phases[self._phase] = self.phases.get(self._phase, 0.0) + now - self._since
        self._phase, self._since = name, now

    def trial(self, problem: Problem, done: int, total: int) -> None:
        self.phase("tuning")
        self.progress(f"{problem.describe()}: trials", done, total)

    def step(self, what: str, done: int, total: int) -> None:
        if self._phase != "tuning":  # the guard's model runs, and its re-choices' head-to-heads
            self.phase("guard")
        self.progress(what, done, total)

    def result(self, problem: Problem, entry: Any, note: str) -> None:
        self.progress.close()
        self.phase("guard" if self.guard is not None else "other")
        self.results.append((problem, entry, note))

    def rechosen(self, record: dict[str, Any]) -> None:
        self.rechoices.append(rechoice_line(record, self.guard))

    def close(self) -> None:
        self.progress.close()
        self.phase("other")


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


def _time_summary(report: TuneReport, entries: list[Any], tuned: list[Problem], notes: list[str]) -> str:
    """Where the run's time went, in parts that add up to the whole: capturing the model, tuning (and of it, first
    calls: compiling, building masks), the guard's model runs and re-choices, the rest; problems cut short."""
    report.phase("other")
    parts, total = report.phases, time.monotonic() - report.started
    first = sum(e.tuning["first_calls_s"] for e in entries if e.problem in set(tuned) and e.tuning)
    shown = [f"capturing the model {parts['capture']:.1f} s"] if "capture" in parts else []
    shown.append(f"tuning {counted(len(tuned), 'problem')} {parts.get('tuning', 0.0):.1f} s "
                 f"({first:.1f} s of it in first calls: compiling, building masks)")
    if "guard" in parts:
        shown.append(f"the guard's model runs and re-choices {parts['guard']:.1f} s")
    shown.append(f"setting up and writing {parts.get('other', 0.0):.1f} s")
    cut = sum(note.startswith("cut short") for note in notes)
    line = f"time: {total:.1f} s: " + ", ".join(shown)
    return line + (f"; {cut} cut short by the time limit" if cut else "")


def run_and_report(run: Callable[[TuneReport], Any], problems: list[Problem], report: TuneReport, storage: str | None,
                   out: str, plot_path: str | None) -> None:
    """Run `run(report)` (a tune or a re-tune) with progress bars; print a line per problem, write the config."""
    from attn_tune.staleness import changes, local_devices
    from attn_tune.tuner.plot import plot_config
    from attn_tune.tuner.storage import StorageError, redact

    report.phase("other")
    try:
        config = run(report)
    except KeyboardInterrupt:
        report.close()
        click.echo(f"Interrupted: finished trials are kept in {redact(storage)}; run the same command to resume.", err=True)
        sys.exit(130)
    except Exception as exc:
        report.close()  # any error's line starts on its own line, not after a progress bar
        if type(exc).__module__.split(".")[0] != "sqlalchemy":
            raise
        # the server went away mid-run: one redacted line, no traceback that could carry the URL
        raise StorageError(f"storage {redact(storage)} failed: {type(exc).__name__}: "
                           f"{redact(' '.join(str(exc).split()))[:200]}") from None
    report.close()
    here = local_devices()  # a merged config's other machines' entries are not what this run wrote
    final = {e.problem: e for e in config.entries if not any(c.what == "device" for c in changes(e, config.device, here))}
    for problem, entry, note in report.results:  # a budget may have chosen again: the entry written is the one shown
        if entry is not None and problem not in final:
            click.echo(f"{problem.describe()}: sdpa (the default: {entry.choice['variant']} was dropped for the loss budget)")
        else:
            click.echo(_summary(problem, final.get(problem, entry), note))
    for line in report.rechoices:
        click.echo(line)
    if not config.entries and not config.validation:  # (a budget may drop every entry: that is an answer)
        raise AttnTuneError("no problem got a choice; nothing written")
    if config.validation:
        if report.batches_why:
            click.echo(report.batches_why)
        click.echo(f"validate {config.validation.get('factory')}: " + summary_line(config.validation))
        for line in fine_tune_lines(config.validation):
            click.echo(line)
    config.save(out)
    click.echo(_time_summary(report, config.entries, problems, [note for _, _, note in report.results]))
    click.echo(f"wrote {out} ({counted(len(config.entries), 'entry', 'entries')}; trials in {redact(storage)})")
    if plot_path:
        plot_config(config, plot_path)
        click.echo(f"wrote {plot_path}")
    if (config.validation or {}).get("fine_tune"):  # the two fine-tunes' loss curves, named after the config
        from attn_tune.tuner.plot_fine_tune import plot_fine_tune

        curves = str(Path(out).with_suffix(".fine-tune.png"))
        plot_fine_tune(config.validation, curves)
        click.echo(f"wrote {curves}")
