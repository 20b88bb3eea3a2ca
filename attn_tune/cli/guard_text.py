"""The guard's figures as people read them: the loss change and metric drop with their intervals, a config's
validation record in one line, a re-choice in one line. `tune`, `validate` and `show` all print through here."""

from __future__ import annotations

import statistics
from typing import Any

from attn_tune.cli.render import named, table

__all__ = ["change_text", "loss_line", "metric_line", "summary_line", "not_run_text", "fine_tune_lines", "calls_table",
           "rechoice_line", "rechoices"]


def change_text(change: float, interval: Any, batches: int, percent: bool = True) -> str:
    """'+0.48% (95% CI +0.30% to +0.66%, 6 batches)', or '+0.48% (one batch, so no interval: ...)'; `percent`
    False: plain numbers ('+0.0037 (95% CI ...)')."""
    fmt = "{:+.2%}" if percent else "{:+.4f}"
    if batches < 2 or not interval:
        return f"{fmt.format(change)} (one batch, so no interval: this one figure decides)"
    return (f"{fmt.format(change)} (95% CI {fmt.format(interval[0])} to {fmt.format(interval[1])}, "
            f"{batches} batches)")


def loss_line(validation: Any) -> str:
    """The model's figures in one line: output error, and the loss with exact attention and with the config (after
    a training guard's paired fine-tune: the exact fine-tune served exact, the config's served with the config)."""
    trained = " after the paired fine-tune" if getattr(validation, "tuned_run", None) is not None else ""
    line = f"model{trained}: output rel error {validation.output_error:.2e}"
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
    trained = "after the paired fine-tune, " if v.get("fine_tune") else ""
    unseen = not_run_text(v.get("entries_not_run") or [])
    return (f"{trained}loss exact {v['loss_exact']:.4f}, tuned {v['loss_tuned']:.4f}, change {change}{metric}; "
            f"output rel error {v['output_rel_error']:.2e}; {v['approximate_calls']} of {v['calls']} calls "
            f"approximate{unseen}")


def not_run_text(unrun: list[str]) -> str:
    """'; 1 of the config's entries never ran in it (...)': what a validation says of entries it did not check."""
    if not unrun:
        return ""
    training = ": training entries are checked by training, validate --training" \
        if any("training" in u.split() for u in unrun) else ""
    return (f"; {len(unrun)} of the config's entries never ran in it ({', '.join(unrun[:3])}"
            f"{', ...' if len(unrun) > 3 else ''}{training})")


def fine_tune_lines(v: dict[str, Any]) -> list[str]:
    """A training guard's record (`v["fine_tune"]`) in lines: the two fine-tunes' step time and peak memory; that
    they trained alike where no entry served the training step; the config's fine-tune served with exact attention.
    No lines for an inference validation."""
    run = v.get("fine_tune")
    if not run:
        return []
    exact, tuned, speed = run["exact"], run["tuned"], run.get("step_speedup")
    faster = "" if not speed else f", {speed['ratio']:.2f}x as fast [{speed['low']:.2f}-{speed['high']:.2f}]"
    if speed and speed["low"] <= 1.0 <= speed["high"]:  # the medians alone could read either way
        faster = f", no difference measured ({speed['ratio']:.2f}x [{speed['low']:.2f}-{speed['high']:.2f}])"
    step = "" if not exact.get("step_ms") else \
        f": step {exact['step_ms']:.1f} ms exact, {tuned['step_ms']:.1f} ms with the config{faster}"
    lines = [f"fine-tune {run['steps']} steps ({run['optimizer']}, lr {run['learning_rate']:g}, seed {run['seed']}) "
             f"from the factory's weights{step}; step peak memory {exact['peak_bytes'] / 2**20:.1f} MiB exact, "
             f"{tuned['peak_bytes'] / 2**20:.1f} MiB with the config"]
    if run.get("calls_served_by_entries") == 0:
        lines.append("no entry of the config served the training step's calls: both fine-tunes trained with exact "
                     "attention, so only how the held-out batches were served differs")
    served = run.get("served_exact")
    if served and served.get("loss_change") is not None:
        batches = v.get("batches", 1)
        metric = "" if served.get("metric_drop") is None else (
            f", {served['metric']} drop "
            f"{change_text(served['metric_drop'], served.get('metric_drop_interval'), batches, False)}")
        lines.append("the config's fine-tune served with exact attention: loss change "
                     f"{change_text(served['loss_change'], served.get('loss_change_interval'), batches)}{metric}")
    return lines


def calls_table(validation: Any) -> str:
    rows = []
    for c in validation.calls:
        params = ",".join(f"{k}={v}" for k, v in c.params.items())
        rows.append((c.number, c.problem.describe(), c.variant + (f"({params})" if params else ""), c.rule,
                     f"{c.rel_error:.1e}"))
    return table(("CALL", "PROBLEM", "VARIANT", "RULE", "REL ERR"), rows)


def rechoice_line(record: dict[str, Any], guard: Any) -> str:
    """A re-choice as `tune` prints it: which budget broke, the entry with the worst call, what replaced it."""
    from attn_tune.tuner.guard import broken_budgets

    now, before = record["now"], named(record["variant"], record["params"])
    then = "sdpa serves it" if now is None else \
        f"chosen again with errors below it: {named(now['variant'], now['params'])} replaces {before}"
    broken = " and ".join(broken_budgets(record, guard, "_before").values()) or "over budget"
    return (f"validate: {broken}; {before} for {record['problem']} had the worst call "
            f"(error {record['worst_call_error']:.2e}): {then}")


def rechoices(validation: dict[str, Any]) -> str:
    """A config's re-choices as `show` prints them after its validation line: '; over the loss budget, PROBLEM:
    local(local_window=16) -> local(local_window=32)' for each."""
    from attn_tune.tuner.guard import broken_budgets, guard_from_record

    guard = guard_from_record(validation)

    def choice(record: dict[str, Any] | None) -> str:
        return "dropped" if record is None else named(record["variant"], record.get("params"))

    def over(record: dict[str, Any]) -> str:
        broken = broken_budgets(record, guard, "_before") if guard is not None else {}
        return {("loss",): "the loss budget", ("metric",): "the metric budget"}.get(
            tuple(broken), "the loss and metric budgets" if broken else "budget")

    return "".join(f"; over {over(d)}, {d['problem']}: {choice(d)} -> {choice(d.get('now'))}"
                   for d in validation.get("dropped") or ())
