"""examples/attn-tune-nystrom, a separate package, pip-installed into this environment for real: its own tests
(using the conformance kit) pass, the CLI lists it with its version, a tune with --max-error picks it where it wins,
and after `pip uninstall` it is gone."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "attn-tune-nystrom"


def _pip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True)


def _attn_tune(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "attn_tune", *args], capture_output=True, text=True, cwd=cwd)


@pytest.fixture(scope="module")
def installed():
    if _pip("show", "attn-tune-nystrom").returncode == 0:
        pytest.fail("attn-tune-nystrom is already installed here: the round trip needs a clean environment")
    run = _pip("install", "--quiet", "--no-deps", "--no-build-isolation", "--no-index", str(EXAMPLE))
    assert run.returncode == 0, run.stderr
    try:
        yield
    finally:
        _pip("uninstall", "--yes", "attn-tune-nystrom")


def test_round_trip(installed, tmp_path) -> None:
    plugins = {p["name"]: p for p in json.loads(_attn_tune("plugins", "--json").stdout)}
    assert (plugins["nystrom"]["package"], plugins["nystrom"]["version"]) == ("attn-tune-nystrom", "0.1.0")
    assert plugins["nystrom"]["variants"] == ["nystrom"] and plugins["nystrom"]["error"] is None
    listed = {v["name"]: v for v in json.loads(_attn_tune("list", "--json").stdout)}
    assert listed["nystrom"]["family"] == "low-rank" and listed["nystrom"]["exact"] is False

    own_tests = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"],
                               capture_output=True, text=True, cwd=EXAMPLE)
    assert own_tests.returncode == 0, own_tests.stdout[-2000:]
    assert _attn_tune("check", "nystrom").returncode == 0

    out = tmp_path / "tuned.json"
    run = _attn_tune("tune", "--seq-len", "2048", "--heads", "2", "--head-dim", "32", "--max-error", "5",
                     "--variant", "sdpa", "--variant", "nystrom", "--trials", "5", "--seed", "0", "--out", str(out))
    assert run.returncode == 0, run.stderr
    (entry,) = json.loads(out.read_text())["entries"]
    assert entry["choice"]["variant"] == "nystrom", entry["candidates"]
    assert 0 < entry["measured"]["rel_error"] <= 5


def test_gone_after_uninstall(installed) -> None:
    assert _pip("uninstall", "--yes", "attn-tune-nystrom").returncode == 0
    listed = {v["name"] for v in json.loads(_attn_tune("list", "--json").stdout)}
    assert "nystrom" not in listed and "dense" in listed
    assert "nystrom" not in {p["name"] for p in json.loads(_attn_tune("plugins", "--json").stdout)}
    run = _attn_tune("check", "nystrom")
    assert run.returncode == 2 and "unknown variant 'nystrom'" in run.stderr
