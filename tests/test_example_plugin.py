"""examples/attn-tune-nystrom, a separate package, pip-installed for real into a throwaway folder on PYTHONPATH
(never into the environment running the suite, where the README may already have installed it): its own tests
(using the conformance kit) pass, the CLI lists it with its version, a tune with --max-error measures it within its
error, and once the folder is gone the environment lists what it listed before."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # pip installs a package, then runs attn-tune in subprocesses

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "attn-tune-nystrom"


def _env(target: Path | None) -> dict[str, str]:
    paths = [str(target)] if target else []
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths + [p for p in [os.environ.get("PYTHONPATH")] if p])}


def _attn_tune(*args: str, target: Path | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "attn_tune", *args], capture_output=True, text=True, cwd=cwd,
                          env=_env(target))


def _names(command: str, target: Path | None = None) -> set[str]:
    return {item["name"] for item in json.loads(_attn_tune(command, "--json", target=target).stdout)}


@pytest.fixture(scope="module")
def target(tmp_path_factory) -> Path:
    """attn-tune-nystrom installed by pip into a fresh folder (removed with the test's temporary files)."""
    folder = tmp_path_factory.mktemp("nystrom-site")
    run = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                          "--no-index", "--target", str(folder), str(EXAMPLE)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    return folder


def test_round_trip(target, tmp_path) -> None:
    plugins = {p["name"]: p for p in json.loads(_attn_tune("plugins", "--json", target=target).stdout)}
    assert (plugins["nystrom"]["package"], plugins["nystrom"]["version"]) == ("attn-tune-nystrom", "0.1.0")
    assert plugins["nystrom"]["variants"] == ["nystrom"] and plugins["nystrom"]["error"] is None
    listed = {v["name"]: v for v in json.loads(_attn_tune("list", "--json", target=target).stdout)}
    assert listed["nystrom"]["family"] == "low-rank" and listed["nystrom"]["exact"] is False

    own_tests = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"],
                               capture_output=True, text=True, cwd=EXAMPLE, env=_env(target))
    assert own_tests.returncode == 0, own_tests.stdout[-2000:]
    assert _attn_tune("check", "nystrom", target=target).returncode == 0

    out = tmp_path / "tuned.json"
    run = _attn_tune("tune", "--seq-len", "2048", "--heads", "2", "--head-dim", "32", "--max-error", "5",
                     "--variant", "sdpa", "--variant", "nystrom", "--trials", "5", "--seed", "0", "--out", str(out),
                     target=target)
    assert run.returncode == 0, run.stderr
    (entry,) = json.loads(out.read_text())["entries"]
    measured = [c for c in entry["candidates"] if c["variant"] == "nystrom" and c.get("rel_error") is not None]
    ok = [c for c in measured if c["status"] == "ok"]
    assert ok and all(0 < c["rel_error"] <= 5 for c in ok), entry["candidates"]  # approximate, within max_error
    assert all(c["status"] == "excluded" for c in measured if c["rel_error"] > 5)
    assert entry["choice"]["variant"] in ("sdpa", "nystrom") and entry["max_error"] == 5  # who wins is the CPU's call


def test_gone_with_its_folder(target) -> None:
    before = _names("list"), _names("plugins")  # this environment on its own (the README may have installed it)
    shutil.rmtree(target)
    assert (_names("list", target), _names("plugins", target)) == before
    if "nystrom" not in before[0]:
        run = _attn_tune("check", "nystrom", target=target)
        assert run.returncode == 2 and "unknown variant 'nystrom'" in run.stderr
