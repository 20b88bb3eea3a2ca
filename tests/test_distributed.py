"""Tuning beyond one process: workers sharing studies on PostgreSQL, a killed worker, export, passwords.

The tests that need a server read its URL from ATTN_TUNE_TEST_POSTGRES_URL (`.ci/run` starts one) and skip with
that reason otherwise; several workers on an SQLite storage are refused in one line (tested here without a
server). The URL's password must never show.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import optuna
import pytest
from click.testing import CliRunner

import attn_tune
from attn_tune import Problem
from attn_tune.cli.main import cli
from attn_tune.tuned_config import device_info
from attn_tune.tuner.storage import HEARTBEAT_ENV, open_storage, redact
from attn_tune.tuner.workers import STORAGE_ENV
from tests.distributed_fakes import LOG_ENV, SECONDS_ENV
from tests.jobs import job

URL = os.environ.get("ATTN_TUNE_TEST_POSTGRES_URL")
needs_server = pytest.mark.skipif(not URL, reason="no PostgreSQL server: set ATTN_TUNE_TEST_POSTGRES_URL (.ci/run does)")
ROOT = Path(__file__).resolve().parent.parent
PROBLEM = Problem(batch=1, heads=2, q_len=4096, head_dim=16)  # sdpa, dense and 7 chunk sizes: 9 points
POOL = ["sdpa", "dense", "chunked"]


@pytest.fixture
def clean_db():
    """An empty storage: every study dropped before the test."""
    storage = open_storage(URL)
    for name in optuna.get_all_study_names(storage):
        optuna.delete_study(study_name=name, storage=storage)
    return storage


@pytest.fixture
def shared(clean_db):
    """(URL, opened storage) of the empty server storage that several worker processes share."""
    return URL, clean_db


def _password(url: str) -> str:
    return url.split("://", 1)[1].split("@", 1)[0].split(":", 1)[1]


def _job(index: int) -> str:
    return json.dumps({
        "problems": [PROBLEM.to_dict()], "variants": POOL, "trials": 20, "seed": 0,
        "measure": "tests.distributed_fakes:logged_measure", "measure_kwargs": {}, "objective": "latency",
        "max_error": None, "memory_budget": None, "index": index,
    })


def _start_worker(index: int, env: dict[str, str]) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "attn_tune.tuner.workers"], stdin=subprocess.PIPE,
                            stderr=subprocess.PIPE, cwd=ROOT, env=env, text=True)
    proc.stdin.write(_job(index))
    proc.stdin.close()
    return proc


def _log_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _point(entry: dict) -> str:
    return json.dumps([entry["variant"], entry["params"]], sort_keys=True)


def _study(storage) -> optuna.Study:
    (name,) = optuna.get_all_study_names(storage)
    return optuna.load_study(study_name=name, storage=storage)


def _assert_every_trial_accounted_for(study: optuna.Study) -> None:
    done = [t for t in study.trials if t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)]
    assert len(done) == 9, [(t.number, t.state) for t in study.trials]
    assert len({json.dumps(t.params, sort_keys=True) for t in done}) == 9  # each point finished exactly once
    for t in study.trials:
        assert t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED,
                           optuna.trial.TrialState.FAIL), (t.number, t.state)
        if t.state == optuna.trial.TrialState.FAIL:
            assert study.user_attrs[f"failure:{t.number}"]["reason"], t.number


@pytest.mark.slow
@needs_server
def test_three_workers_share_one_study_without_measuring_twice(shared, tmp_path) -> None:
    url, storage = shared
    log = tmp_path / "measure.log"
    env = {**os.environ, STORAGE_ENV: url, LOG_ENV: str(log), SECONDS_ENV: "0.3"}
    workers = [_start_worker(i, env) for i in range(3)]
    for w in workers:
        assert w.wait(timeout=120) == 0, w.stderr.read()
    study = _study(storage)
    _assert_every_trial_accounted_for(study)
    calls = _log_lines(log)
    done = Counter(_point(c) for c in calls if c["event"] == "done")
    assert len(done) == 9 and set(done.values()) == {1}  # no point measured twice
    assert len({c["pid"] for c in calls}) >= 2  # the work was really shared


@pytest.mark.slow
@needs_server
def test_a_worker_killed_mid_trial_is_retried_and_the_study_finishes(shared, tmp_path) -> None:
    url, storage = shared
    log = tmp_path / "measure.log"
    env = {**os.environ, STORAGE_ENV: url, LOG_ENV: str(log), SECONDS_ENV: "1.0", HEARTBEAT_ENV: "1"}
    workers = [_start_worker(i, env) for i in range(3)]
    victim = None
    deadline = time.time() + 60
    while victim is None and time.time() < deadline:  # a worker that has started a trial and not finished it
        calls = _log_lines(log)
        started = {c["pid"]: c for c in calls if c["event"] == "start"}
        finished = {c["pid"] for c in calls if c["event"] == "done"}
        victim = next((w for w in workers if w.pid in started and w.pid not in finished), None)
        time.sleep(0.05)
    assert victim is not None
    killed_point = _point(started[victim.pid])
    victim.send_signal(signal.SIGKILL)
    for w in workers:
        w.wait(timeout=120)
    assert victim.returncode == -signal.SIGKILL
    survivors = [w for w in workers if w is not victim]
    assert all(w.returncode == 0 for w in survivors), [w.stderr.read() for w in survivors]

    study = _study(storage)
    _assert_every_trial_accounted_for(study)
    failed = [t for t in study.trials if t.state == optuna.trial.TrialState.FAIL
              and "heartbeats" in study.user_attrs[f"failure:{t.number}"]["reason"]]
    assert len(failed) == 1
    retried = [t for t in study.trials if t.system_attrs.get("failed_trial") == failed[0].number]
    assert len(retried) == 1 and retried[0].state == optuna.trial.TrialState.COMPLETE
    assert json.dumps([retried[0].params["variant"], {k.split(":", 1)[1]: v for k, v in retried[0].params.items()
                                                      if ":" in k}], sort_keys=True) == killed_point
    done = Counter(_point(c) for c in _log_lines(log) if c["event"] == "done")
    assert len(done) == 9 and set(done.values()) == {1}


@pytest.mark.slow
@needs_server
def test_workers_option_tunes_and_export_writes_the_config(shared, tmp_path) -> None:
    url, storage = shared
    runner = CliRunner()
    result = runner.invoke(cli, ["tune", "--seq-len", "128", "--heads", "2", "--head-dim", "16", "--variant", "sdpa",
                                 "--variant", "chunked", "--variant", "dense", "--storage", url, "--workers", "3",
                                 "--out", str(tmp_path / "tuned.json")])
    assert result.exit_code == 0, result.output
    study = _study(storage)
    assert sum(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials) == 4  # sdpa, dense, chunk 32, 64
    exported = runner.invoke(cli, ["export", "--storage", url, "--out", str(tmp_path / "exported.json")])
    assert exported.exit_code == 0, exported.output
    tuned = attn_tune.load_config(tmp_path / "tuned.json")
    again = attn_tune.load_config(tmp_path / "exported.json")
    assert [e.problem for e in again.entries] == [e.problem for e in tuned.entries]
    assert again.entries[0].choice == tuned.entries[0].choice
    password = _password(url)
    for text in (result.output, exported.output, (tmp_path / "tuned.json").read_text(),
                 (tmp_path / "exported.json").read_text(), json.dumps(study.user_attrs), study.study_name,
                 json.dumps([t.user_attrs | t.system_attrs for t in study.trials], default=str)):
        assert password not in text


@needs_server
def test_export_merges_devices_and_the_runtime_picks_this_one(clean_db, tmp_path) -> None:
    """Entries from two device kinds land in one config; on this machine the runtime uses this machine's."""
    here = device_info("cpu")
    problem = Problem(batch=1, heads=2, q_len=64, head_dim=16)
    for device, variant in ((here, "chunked"), ({"type": "cpu", "name": "Other CPU @ 1GHz", "threads": 64}, "dense")):
        study = optuna.create_study(study_name=f"attn-tune/latency/cpu:{device['name']}/x", storage=clean_db)
        study.set_user_attr("device", device)
        study.set_user_attr("entry", {"problem": problem.to_dict(), "measured": {"latency_ms": 1.0},
                                      "choice": {"variant": variant, "params": {"chunk": 32} if variant == "chunked" else {}}})
    optuna.create_study(study_name="attn-tune/latency/cpu:x/unfinished", storage=clean_db)
    result = CliRunner().invoke(cli, ["export", "--storage", URL, "--out", str(tmp_path / "all.json")])
    assert result.exit_code == 0, result.output
    assert "skipped attn-tune/latency/cpu:x/unfinished" in result.output
    config = attn_tune.load_config(tmp_path / "all.json")
    assert config.device["type"] == "mixed" and len(config.entries) == 2
    import torch

    with attn_tune.use_config(tmp_path / "all.json"):
        q = torch.randn(1, 2, 64, 16)
        assert attn_tune.explain(q, q, q).variant == "chunked"


@pytest.mark.slow
@needs_server
def test_password_from_the_environment(clean_db, tmp_path) -> None:
    password = _password(URL)
    bare = URL.replace(f":{password}@", "@")
    env = {**os.environ, "PGPASSWORD": password}
    out = subprocess.run([sys.executable, "-m", "attn_tune", "tune", "--seq-len", "64", "--heads", "2", "--head-dim",
                          "16", "--variant", "sdpa", "--storage", bare, "--out", str(tmp_path / "t.json")],
                         capture_output=True, text=True, env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert password not in out.stdout + out.stderr + (tmp_path / "t.json").read_text()


@pytest.mark.parametrize(
    "url, message",
    [
        ("postgresql://bob:hunter2secret@127.0.0.1:1/nodb", "cannot open storage postgresql://bob:***@127.0.0.1:1/nodb"),
        ("notaurl://bob:hunter2secret@x", "cannot open storage notaurl://bob:***@x"),
        ("sqlite:////no/such/folder/tuned.db", "cannot open storage sqlite:////no/such/folder"),
        ("postgresql://h/db?user=bob&password=hunter2secret", "cannot open storage postgresql://h/db?user=bob&password=***"),
    ],
    ids=["unreachable-server", "unknown-scheme", "sqlite-bad-path", "password-in-query"],
)
@pytest.mark.parametrize("command", ["tune", "export"])
def test_bad_storage_is_one_line_exit_2_nothing_written(tmp_path, url, message, command) -> None:
    args = ["--storage", url, "--out", str(tmp_path / "out.json")]
    if command == "tune":
        args = ["tune", "--seq-len", "64", "--heads", "2", "--head-dim", "16", "--variant", "sdpa", *args]
    else:
        args = ["export", *args]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2
    assert message in result.output and "hunter2secret" not in result.output + (result.stderr_bytes or b"").decode()
    assert len(result.output.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []  # no config, no storage file, no temporary file


def test_redaction() -> None:
    assert redact("postgresql+psycopg://u:p@ss@h:5432/db") == "postgresql+psycopg://u:***@h:5432/db"
    assert redact("postgresql://h/db?user=u&password=pw&sslmode=require") == \
        "postgresql://h/db?user=u&password=***&sslmode=require"
    assert redact("sqlite:///tuned.optuna.db") == "sqlite:///tuned.optuna.db"
    assert redact("error at postgresql://u@h/db") == "error at postgresql://u@h/db"


def test_workers_need_a_storage() -> None:
    with pytest.raises(attn_tune.AttnTuneError, match="several workers share a study through a storage"):
        attn_tune.tune([PROBLEM], job(workers=2, storage=None))


def test_workers_on_an_sqlite_storage_are_refused_in_one_line_before_anything_runs(tmp_path) -> None:
    """SQLite has no row locks: a queued trial could go to two workers (seen: a point measured twice), and a worker
    killed mid-write stalled the others past two minutes on a loaded machine. So --workers needs a server."""
    with pytest.raises(attn_tune.AttnTuneError, match="several workers need a server storage"):
        attn_tune.tune([PROBLEM], job(workers=2, storage=f"sqlite:///{tmp_path / 's.db'}"))
    result = CliRunner().invoke(cli, ["tune", "--seq-len", "64", "--heads", "2", "--head-dim", "16", "--workers", "2",
                                      "--out", str(tmp_path / "tuned.json")])  # the default storage is SQLite
    assert result.exit_code == 2 and "several workers need a server storage" in result.output
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "tuned.json").exists()
