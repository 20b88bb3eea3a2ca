"""What `attn-tune tune` shows while and after it runs: a progress bar per problem, a line per problem's choice, the
guard's re-choices and verdict, where the time went; then the config (and report) written."""

from __future__ import annotations

import sys
import time
from typing import Any, Callable

import click

from attn_tune.cli.guard_text import rechoice_line, summary_line
from attn_tune.cli.render import counted, mib, named, versus_default
from attn_tune.errors import AttnTuneError
from attn_tune.problem import Problem
from attn_tune.tuner.listener import TuneListener

__all__ = ["TuneReport", "run_and_report"]


class TuneReport(TuneListener):
    """The command's listener: one progress bar per problem on stderr; results and re-choices kept for the end."""

    def __init__(self, guard: Any) -> None:
        self.guard, self.problem, self.bar = guard, None, None
        self.results: list[tuple[Problem, Any, str]] = []
        self.rechoices: list[str] = []

    def trial(self, problem: Problem, done: int, total: int) -> None:
        if problem != self.problem:
            self.close()
            self.problem = problem
            self.bar = click.progressbar(length=total, label=problem.describe(), file=sys.stderr, show_pos=True)
            self.bar.__enter__()
        self.bar.update(max(0, min(done, total) - self.bar.pos))

    def result(self, problem: Problem, entry: Any, note: str) -> None:
        self.close()
        self.problem = None
        self.results.append((problem, entry, note))

    def rechosen(self, record: dict[str, Any]) -> None:
        self.rechoices.append(rechoice_line(record, self.guard))

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


def run_and_report(run: Callable[[TuneReport], Any], problems: list[Problem], report: TuneReport, storage: str | None,
                   out: str, plot_path: str | None) -> None:
    """Run `run(report)` (a tune or a re-tune) with progress bars; print a line per problem, write the config."""
    from attn_tune.staleness import changes, local_devices
    from attn_tune.tuner.plot import plot_config
    from attn_tune.tuner.storage import StorageError, redact

    started = time.monotonic()
    try:
        config = run(report)
    except KeyboardInterrupt:
        report.close()
        click.echo(f"Interrupted: finished trials are kept in {redact(storage)}; run the same command to resume.", err=True)
        sys.exit(130)
    except Exception as exc:
        if type(exc).__module__.split(".")[0] != "sqlalchemy":
            raise
        report.close()  # the server went away mid-run: one redacted line, no traceback that could carry the URL
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
        click.echo(f"validate {config.validation.get('factory')}: " + summary_line(config.validation))
    config.save(out)
    click.echo(_time_summary(config.entries, problems, [note for _, _, note in report.results],
                             time.monotonic() - started))
    click.echo(f"wrote {out} ({counted(len(config.entries), 'entry', 'entries')}; trials in {redact(storage)})")
    if plot_path:
        plot_config(config, plot_path)
        click.echo(f"wrote {plot_path}")
