"""The command line through click's CliRunner, and once as a real subprocess."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner

import attn_tune
from attn_tune import Variant, hookimpl
from attn_tune.cli.main import cli
from attn_tune.families.dense import dense_attention
from attn_tune.registry import pm

TINY = ["--seq-len", "16,32", "--heads", "2", "--head-dim", "8", "--min-time", "0"]
NO_SUCH_DEVICE = "cuda:64" if torch.cuda.is_available() else "cuda"


def run(*args: str):
    return CliRunner().invoke(cli, list(args), prog_name="attn-tune")


def test_list_table_and_json() -> None:
    result = run("list")
    assert result.exit_code == 0
    assert result.output.splitlines()[0].split() == ["VARIANT", "FAMILY", "EXACT", "HERE"]
    records = {r["name"]: r for r in json.loads(run("list", "--json").output)}
    assert records["dense"]["available"] and records["dense"]["plugin"] == "attn_tune.families.dense"
    assert records["flash-attn"]["available"] == (attn_tune.availability(attn_tune.get_variant("flash-attn")) is None)


def test_list_for_a_problem_says_why_not() -> None:
    records = {r["name"]: r for r in json.loads(run("list", "--json", "--seq-len", "64", "--causal").output)}
    (cell,) = records["sdpa-cudnn"]["problems"]
    assert cell["problem"]["causal"] and "CUDA only" in cell["reason"]
    assert records["dense"]["problems"][0]["reason"] is None
    table = run("list", "--seq-len", "64", "--causal").output
    assert "problem: b1 h8 q64 d64 float32 cpu causal" in table


def test_temporary_plugin_shows_in_list() -> None:
    class Temp:
        @hookimpl
        def attn_tune_variants(self):
            return [Variant(name="cli-temp", family="dense", fn=dense_attention, exact=True)]

    pm.register(Temp(), name="cli-temp-plugin")
    try:
        line = next(l for l in run("list").output.splitlines() if l.startswith("cli-temp"))
        assert line.split()[:4] == ["cli-temp", "dense", "yes", "available"]
        plugins = {p["name"]: p for p in json.loads(run("plugins", "--json").output)}
        assert plugins["cli-temp-plugin"]["variants"] == ["cli-temp"]
    finally:
        pm.unregister(name="cli-temp-plugin")


def test_plugins_json_lists_builtins_with_version() -> None:
    plugins = {p["name"]: p for p in json.loads(run("plugins", "--json").output)}
    sdpa = plugins["attn_tune.families.sdpa"]
    assert sdpa["package"] == "attn-tune" and sdpa["version"] == attn_tune.__version__ and sdpa["builtin"]
    assert sdpa["hooks"] == ["attn_tune_variants"] and "sdpa-flash" in sdpa["variants"]


def test_bench_json_measures_and_explains() -> None:
    result = run("bench", "--json", *TINY, "--variant", "sdpa", "--variant", "dense", "--variant", "sdpa-efficient")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert [(r["problem"]["q_len"], r["variant"]) for r in rows] == [
        (16, "sdpa"), (16, "dense"), (16, "sdpa-efficient"), (32, "sdpa"), (32, "dense"), (32, "sdpa-efficient")
    ]
    by = {(r["problem"]["q_len"], r["variant"]): r for r in rows}
    assert by[(16, "sdpa")]["latency_vs_sdpa"] == 1.0
    assert by[(32, "dense")]["status"] == "ok" and by[(32, "dense")]["measured"]["rel_error"] < 1e-5
    if not torch.cuda.is_available():
        assert by[(16, "sdpa-efficient")]["status"] == "unsupported" and "CUDA only" in by[(16, "sdpa-efficient")]["reason"]


def test_bench_table_for_people() -> None:
    result = run("bench", *TINY, "--variant", "sdpa", "--variant", "flash-attn")
    assert result.exit_code == 0, result.output
    assert "problem: b1 h2 q16 d8 float32 cpu" in result.stdout
    assert "vs sdpa" in result.stdout and "1.00x" in result.stdout


@pytest.mark.parametrize(
    "args,fragment",
    [
        (["bench", "--variant", "sdpa-flsh"], "unknown variant 'sdpa-flsh'; did you mean sdpa-flash"),
        (["bench", "--heads", "6", "--kv-heads", "4"], "heads (6) must be a multiple of kv_heads (4)"),
        (["bench", "--seq-len", "0"], "q_len must be positive"),
        (["bench", "--head-dim", "-8"], "head_dim must be positive"),
        (["list", "--batch", "2,0"], "batch must be positive"),
        (["bench", "--dtype", "float8"], "'float8' is not one of"),
        (["bench", "--seq-len", "1,x"], "not a comma-separated list of integers"),
        (["bench", "--seq-len", "512,,"], "'512,,' has an empty item"),
        (["bench", "--batch", ",2"], "',2' has an empty item"),
        (["bench", "--seq-len", ","], "give at least one integer"),
        (["bench", "--device", NO_SUCH_DEVICE], NO_SUCH_DEVICE),
        (["bench", "--window", "2", "--seq-len", "64", "--kv-len", "8"], "would see no key"),
        (["frobnicate"], "No such command"),
    ],
)
def test_bad_input_is_one_line_and_exit_code_2(args, fragment) -> None:
    result = run(*args)
    assert result.exit_code == 2
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0] and lines[0].startswith("Error: ")


@pytest.mark.slow
def test_real_subprocess_json_and_clean_stderr() -> None:
    cmd = [sys.executable, "-m", "attn_tune", "bench", "--json", "--training", *TINY, "--variant", "chunked"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    rows = json.loads(done.stdout)
    assert [r["status"] for r in rows] == ["ok", "ok"]
    assert done.stderr == ""  # no profiler USDT lines, no xformers warning, no progress bar with --json
    bad = subprocess.run([sys.executable, "-m", "attn_tune", "bench", "--seq-len", "-1"], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.strip() == "Error: q_len must be positive, got -1"


def test_version_and_help() -> None:
    assert run("--version").output.strip().endswith(attn_tune.__version__)
    assert "bench" in run("--help").output and "--seq-len" in run("bench", "--help").output


def test_list_says_a_variant_that_serves_nothing_on_this_machine_does_not_run_here() -> None:
    """Importable is not enough: a kernel refusing every problem on this machine's devices is not "available"."""
    class Temp:
        @hookimpl
        def attn_tune_variants(self):
            return [Variant(name="cli-elsewhere", family="flash", fn=dense_attention, exact=True,
                            supports=lambda p: "runs on a TPU only")]

    pm.register(Temp(), name="cli-elsewhere-plugin")
    try:
        line = next(l for l in run("list").output.splitlines() if l.startswith("cli-elsewhere"))
        assert "not on this machine" in line and "runs on a TPU only" in line and "available" not in line
        record = next(r for r in json.loads(run("list", "--json").output) if r["name"] == "cli-elsewhere")
        assert record["available"] and not record["runs_here"] and "TPU" in record["reason_here"]
    finally:
        pm.unregister(name="cli-elsewhere-plugin")
    result = run("list", "--device", NO_SUCH_DEVICE, "--seq-len", "64")  # as bench: no such device here
    assert result.exit_code == 2 and "asked for, but" in result.output


def test_tables_fit_the_terminal_and_json_keeps_every_word() -> None:
    result = CliRunner(env={"COLUMNS": "100"}).invoke(cli, ["list"], prog_name="attn-tune")
    assert result.exit_code == 0 and max(len(line) for line in result.output.splitlines()) <= 100
    reasons = [r["reason_here"] for r in json.loads(run("list", "--json").output) if r["reason_here"]]
    assert reasons and max(len(r) for r in reasons) > 0  # whole, not cut
    assert not any(r.endswith("...") for r in reasons)


def test_the_pages_messages_point_to_are_in_the_docs() -> None:
    """An error that sends the user to a page of the docs names one that exists (here: a loss budget for a model
    with no loss)."""
    import re
    from pathlib import Path

    from attn_tune.tuner.validator import NoLoss, Validator

    root = Path(__file__).resolve().parents[1]
    readme = (root / "README.md").read_text()
    validator = Validator(lambda: (torch.nn.Identity(), (torch.randn(2, 3),)), "identity")
    with pytest.raises(NoLoss) as raised:
        validator.require_loss()
    cited = re.findall(r"\((docs/[\w-]+\.md)\)", str(raised.value))
    assert cited and all((root / c).is_file() for c in cited), cited
    assert "../shared" not in readme  # a user's clone has no such folder: the design document is docs/design.md
    assert (Path(__file__).resolve().parents[1] / "docs" / "design.md").is_file()
