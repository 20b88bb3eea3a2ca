"""`attn-tune tune | show | merge | plot` through click's CliRunner, on tiny real CPU problems."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from attn_tune import Problem
from attn_tune import tuned_config as config_module
from attn_tune.cli.main import cli
from attn_tune.tuned_config import load_config
from tests import runtime_helpers

TINY = ["--seq-len", "32,64", "--heads", "2", "--head-dim", "8", "--causal", "--trials", "4", "--seed", "0"]


def run(*args: str):
    return CliRunner().invoke(cli, [str(a) for a in args], prog_name="attn-tune")


@pytest.fixture(scope="module")
def tuned(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tune")
    out = folder / "tuned.json"
    result = run("tune", *TINY, "--out", out, "--plot", folder / "report.png")
    assert result.exit_code == 0, result.output
    return out


@pytest.mark.slow
def test_tune_writes_config_plot_and_a_summary_line_per_problem(tuned: Path) -> None:
    config = load_config(tuned)
    assert [e.problem.q_len for e in config.entries] == [32, 64]
    assert (tuned.parent / "tuned.optuna.db").exists()  # the default storage: an SQLite file beside the output
    png = (tuned.parent / "report.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    result = run("tune", *TINY, "--out", tuned)  # resumed: the studies are complete, nothing new is sampled
    lines = result.stdout.splitlines()
    assert lines[0].startswith("b1 h2 q32 d8 float32 cpu causal: ") and "x sdpa's" in lines[0] and "4 trials" in lines[0]
    assert lines[-1].startswith(f"wrote {tuned} (2 entries")
    _assert_parts_add_up(lines[-2])


def _assert_parts_add_up(line: str) -> None:
    """'time: T s: tuning 2 problems A s (F s of it in first calls ...), ..., setting up and writing B s': the parts
    sum to the whole, and first calls are a part of tuning."""
    import re

    assert line.startswith("time: "), line
    total = float(re.match(r"time: (\d+\.\d) s: ", line).group(1))
    parts = [float(x) for x in re.findall(r"(?:model|problems?|re-choices|writing) (\d+\.\d) s", line)]
    first = float(re.search(r"\((\d+\.\d) s of it in first calls", line).group(1))
    tuning = float(re.search(r"tuning \d+ problems? (\d+\.\d) s", line).group(1))
    assert len(parts) >= 2 and abs(sum(parts) - total) <= 0.05 * len(parts) + 1e-9, line
    assert first <= tuning + 0.05, line


@pytest.mark.slow
def test_show_table_and_json(tuned: Path) -> None:
    table = run("show", tuned)
    assert table.exit_code == 0
    assert table.stdout.splitlines()[1].split()[:3] == ["PROBLEM", "VARIANT", "PARAMS"]
    assert "b1 h2 q64 d8 float32 cpu causal" in table.stdout
    data = json.loads(run("show", tuned, "--json").stdout)
    assert data["format"] == "attn-tune/config" and len(data["entries"]) == 2


@pytest.mark.slow
def test_merge_keeps_each_entry_device(tuned: Path, tmp_path: Path) -> None:
    other = json.loads(tuned.read_text())
    other["device"] = {"type": "cuda", "name": "NVIDIA H100 80GB HBM3", "capability": "9.0"}
    for entry in other["entries"]:
        entry["problem"]["device"] = "cuda"
    (tmp_path / "gpu.json").write_text(json.dumps(other))
    result = run("merge", tuned, tmp_path / "gpu.json", "--out", tmp_path / "all.json")
    assert result.exit_code == 0, result.output
    merged = load_config(tmp_path / "all.json")
    assert merged.device["type"] == "mixed"
    assert sorted(e.device["type"] for e in merged.entries) == ["cpu", "cpu", "cuda", "cuda"]
    assert "NVIDIA H100 80GB HBM3" in run("show", tmp_path / "all.json").stdout


@pytest.mark.slow
def test_plot_command(tuned: Path, tmp_path: Path) -> None:
    result = run("plot", tuned, "--out", tmp_path / "r.png")
    assert result.exit_code == 0 and (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_tune_from_a_shapes_file(tmp_path: Path) -> None:
    shapes = [{"batch": 1, "heads": 2, "q_len": 16, "head_dim": 8, "kv_heads": 1, "window": 4}]
    (tmp_path / "shapes.json").write_text(json.dumps(shapes))
    result = run("tune", "--shapes", tmp_path / "shapes.json", "--trials", "3", "--out", tmp_path / "t.json")
    assert result.exit_code == 0, result.output
    (entry,) = load_config(tmp_path / "t.json").entries
    assert entry.problem.kv_heads == 1 and entry.problem.window == 4


@pytest.mark.parametrize(
    "content,fragment",
    [
        ("{not json", "is not valid JSON"),
        (json.dumps({"format": "something/else", "version": 1}), "not an attn-tune config"),
        (json.dumps({"format": "attn-tune/config", "version": 7, "entries": [], "device": {}}), "version 7 is newer"),
        (json.dumps({"format": "attn-tune/config", "version": 1, "device": {}, "entries": [{"problem": {}}]}),
         "malformed config entry 0"),
    ],
)
def test_corrupt_or_foreign_config_is_one_line(tmp_path: Path, content: str, fragment: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(content)
    for args in (["show", path], ["plot", path, "--out", tmp_path / "x.png"], ["merge", path, "--out", tmp_path / "m.json"]):
        result = run(*args)
        assert result.exit_code == 2
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and fragment in lines[0], lines
    assert not (tmp_path / "x.png").exists() and not (tmp_path / "m.json").exists()


@pytest.mark.parametrize(
    "args,fragment",
    [
        (["--memory-budget", "lots"], "is not a size"),
        (["--objective", "speed"], "'speed' is not one of"),
        (["--trials", "0"], "0 is not in the range"),
        (["--preset", "quick", "--seq-len", "64"], "not more than one"),
        (["--storage", "nosuchdb://user:hunter2@host/db"], "cannot open storage nosuchdb://user:***@host/db"),
        (["--shapes", "/nonexistent/shapes.json"], "cannot read /nonexistent/shapes.json"),
        (["--out", "/nonexistent/folder/t.json"], "does not exist"),
        (["--variant", "chunkd"], "unknown variant 'chunkd'; did you mean chunked"),
    ],
)
def test_tune_bad_input_is_one_line_and_writes_nothing(tmp_path: Path, args, fragment) -> None:
    problem = [] if args[0] in ("--shapes", "--preset") else ["--seq-len", "16", "--heads", "2", "--head-dim", "8"]
    result = run("tune", *problem, "--out", tmp_path / "t.json", *args)
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0] and "hunter2" not in result.stderr
    assert not (tmp_path / "t.json").exists()


@pytest.mark.slow
def test_tune_variant_option_restricts_the_pool(tmp_path: Path) -> None:
    out = tmp_path / "t.json"
    result = run("tune", "--seq-len", "64", "--heads", "2", "--head-dim", "8", "--trials", "3", "--variant", "sdpa",
                 "--variant", "chunked", "--out", out)
    assert result.exit_code == 0, result.output
    (entry,) = load_config(out).entries
    assert {c["variant"] for c in entry.candidates} == {"sdpa", "chunked"}


@pytest.mark.parametrize("fails_at", ["fsync", "replace"])
def test_a_write_that_fails_midway_leaves_the_old_config_whole_and_no_temporary_file(tmp_path: Path, monkeypatch,
                                                                                     fails_at: str) -> None:
    """Disk full after the bytes were written (fsync), or the rename refused: the old config is untouched."""
    path = tmp_path / "tuned.json"
    old = runtime_helpers.config([runtime_helpers.entry(Problem(batch=1, heads=2, q_len=64, head_dim=16), "sdpa")])
    old.save(path)
    before = path.read_bytes()

    def fail(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(config_module.os, fails_at, fail)
    new = runtime_helpers.config([runtime_helpers.entry(Problem(batch=1, heads=2, q_len=128, head_dim=16), "chunked",
                                                        {"chunk": 32})])
    with pytest.raises(OSError, match="No space left"):
        new.save(path)
    monkeypatch.undo()
    assert path.read_bytes() == before and load_config(path).entries[0].problem.q_len == 64
    assert [p.name for p in tmp_path.iterdir()] == ["tuned.json"]


def test_the_plot_always_draws_the_choice_even_when_its_knobs_were_not_the_fastest_trial() -> None:
    """The head-to-head chose block=64 although block=128's one trial was faster: both bars, the choice marked."""
    from attn_tune.tuner.plot import bar_rows

    chosen = runtime_helpers.entry(Problem(batch=1, heads=2, q_len=64, head_dim=16), "window-chunked", {"block": 64})
    chosen.measured = {"latency_ms": 2.0, "peak_bytes": 1000, "rel_error": 1e-7}
    chosen.candidates = [
        {"variant": "sdpa", "params": {}, "status": "ok", "latency_ms": 4.0, "peak_bytes": 2000, "rel_error": 0.0},
        {"variant": "window-chunked", "params": {"block": 128}, "status": "ok", "latency_ms": 1.9, "peak_bytes": 900,
         "rel_error": 1e-7},
        {"variant": "window-chunked", "params": {"block": 64}, "status": "ok", "latency_ms": 2.1, "peak_bytes": 1000,
         "rel_error": 1e-7},
    ]
    rows = [(c["variant"], c["params"], marked) for c, marked in bar_rows(chosen)]
    assert rows == [("sdpa", {}, False), ("window-chunked", {"block": 64}, True),
                    ("window-chunked", {"block": 128}, False)]


def test_a_loss_budgets_line_names_the_knob_it_replaced() -> None:
    from attn_tune.cli.guard_text import rechoice_line
    from attn_tune.tuner.job import Guard

    lines = [rechoice_line({"problem": "b1 h4 q2048 d32 float32 cpu causal", "variant": "local",
                            "params": {"local_window": 128}, "worst_call_error": 0.31, "loss_change_before": 0.0101,
                            "now": {"variant": "local", "params": {"local_window": 256}}},
                           Guard(factory="m:f", max_loss_change=0.01))]
    assert lines == ["validate: loss change +1.01% is over +1.00%; local(local_window=128) for b1 h4 q2048 d32 float32 "
                     "cpu causal had the worst call (error 3.10e-01): chosen again with errors below it: "
                     "local(local_window=256) replaces local(local_window=128)"]


@pytest.mark.slow
def test_merge_refuses_conflicting_choices_unless_told_which_to_keep(tuned: Path, tmp_path: Path) -> None:
    other = json.loads(tuned.read_text())
    other["entries"][0]["choice"] = {"variant": "sdpa-math", "params": {}}
    (tmp_path / "other.json").write_text(json.dumps(other))
    refused = run("merge", tuned, tmp_path / "other.json", "--out", tmp_path / "all.json")
    assert refused.exit_code == 2 and not (tmp_path / "all.json").exists()
    assert "choose differently for" in refused.output and "--prefer" in refused.output
    assert len(refused.output.strip().splitlines()) == 1
    for prefer, winner in (("first", json.loads(tuned.read_text())["entries"][0]["choice"]["variant"]),
                           ("last", "sdpa-math")):
        result = run("merge", tuned, tmp_path / "other.json", "--out", tmp_path / "all.json", "--prefer", prefer)
        assert result.exit_code == 0 and f"kept {winner}" in result.stderr, result.output
        assert load_config(tmp_path / "all.json").entries[0].choice["variant"] == winner


@pytest.mark.slow
def test_show_why_on_a_stale_config_says_so_in_one_clean_line(tuned: Path, tmp_path: Path) -> None:
    stale = json.loads(tuned.read_text())
    for entry in stale["entries"]:
        entry["measured_with"]["torch"] = "2.0.0"
    (tmp_path / "stale.json").write_text(json.dumps(stale))
    result = run("show", tmp_path / "stale.json", "--why", "--seq-len", "64", "--heads", "2", "--head-dim", "16")
    assert result.exit_code == 0, result.output
    (line,) = result.stderr.strip().splitlines()
    assert "were measured under other conditions" in line and "warn" not in line.lower()


def test_export_from_a_missing_sqlite_file_creates_nothing(tmp_path: Path) -> None:
    result = run("export", "--storage", f"sqlite:///{tmp_path / 'nope.db'}", "--out", tmp_path / "t.json")
    assert result.exit_code == 2 and "does not exist" in result.output
    assert not (tmp_path / "nope.db").exists() and not (tmp_path / "t.json").exists()


@pytest.mark.slow
def test_long_waits_show_progress_on_a_terminal_and_the_time_line_adds_up(tmp_path: Path, monkeypatch) -> None:
    """Trials and the head-to-head's rounds as they go (stderr, a terminal only); the closing time line's parts."""
    from attn_tune.cli import progress

    monkeypatch.setattr(progress, "on_terminal", lambda: True)
    result = run("tune", "--seq-len", "32", "--heads", "2", "--head-dim", "8", "--trials", "3", "--seed", "0",
                 "--out", tmp_path / "tuned.json")
    assert result.exit_code == 0, result.output
    assert "b1 h2 q32 d8 float32 cpu: trials" in result.stderr and "3/3" in result.stderr
    assert "b1 h2 q32 d8 float32 cpu: head-to-head rounds" in result.stderr
    _assert_parts_add_up(result.stdout.splitlines()[-2])
    monkeypatch.setattr(progress, "on_terminal", lambda: False)  # piped: the same run prints no progress at all
    again = run("tune", "--seq-len", "32", "--heads", "2", "--head-dim", "8", "--trials", "3", "--seed", "0",
                "--out", tmp_path / "piped.json", "--storage", f"sqlite:///{tmp_path / 'piped.db'}")
    assert again.exit_code == 0 and again.stderr == "", again.stderr


def test_counts_read_as_english_one_entry_is_not_one_entries(tmp_path: Path) -> None:
    """`show` and `merge` of a one-entry config: '1 entry', '1 config'; two: '2 entries'."""
    path = tmp_path / "one.json"
    runtime_helpers.config([runtime_helpers.entry(Problem(batch=1, heads=2, q_len=64, head_dim=16), "sdpa")]).save(path)
    shown = run("show", path)
    assert shown.exit_code == 0 and f"{path}: 1 entry, cpu" in shown.stdout
    merged = run("merge", path, "--out", tmp_path / "merged.json")
    assert merged.exit_code == 0 and "(1 entry from 1 config)" in merged.stdout
    two = runtime_helpers.config([runtime_helpers.entry(Problem(batch=1, heads=2, q_len=n, head_dim=16), "sdpa")
                                  for n in (64, 128)])
    two.save(tmp_path / "two.json")
    assert ": 2 entries, cpu" in run("show", tmp_path / "two.json").stdout


def test_the_docs_show_why_example_finds_an_entry_of_the_main_jobs_config(tmp_path: Path) -> None:
    """docs/tuning.md's `show --why` line, run against a config of the quick preset's problems (the bundled LM's
    and the window one), answers with an entry, not the default policy (it once asked about heads the job never tunes)."""
    import re
    import shlex

    from attn_tune.tuner.presets import PRESETS

    line = next(line for line in (Path(__file__).parents[1] / "docs" / "tuning.md").read_text().splitlines()
                if line.startswith("attn-tune show tuned.json --why"))
    args = shlex.split(line.split("#")[0])[1:]
    lm_call = Problem(batch=1, heads=4, q_len=2048, head_dim=32, causal=True)
    problems = [lm_call, *PRESETS["quick"].problems]
    runtime_helpers.config([runtime_helpers.entry(p, "sdpa") for p in problems]).save(tmp_path / "tuned.json")
    result = run(*[str(tmp_path / "tuned.json") if a == "tuned.json" else a for a in args])
    assert result.exit_code == 0, result.output
    assert re.search(r"\[(own|nearest)-entry\]", result.stdout) and "[default]" not in result.stdout, result.stdout
