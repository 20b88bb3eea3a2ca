"""Real third-party plugin packages, pip-installed during the run, seen through the `attn_tune` entry point."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # pip installs a package, then runs attn-tune in subprocesses

PLUGINS = Path(__file__).resolve().parent / "plugins"


@pytest.fixture(scope="module")
def plugin_site(tmp_path_factory) -> Path:
    """The example and broken plugin packages installed into a private directory (the venv stays untouched)."""
    target = tmp_path_factory.mktemp("site")
    for package in ("attn_tune_example", "attn_tune_broken"):
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
             "--no-index", "--target", str(target), str(PLUGINS / package)],
            check=True, capture_output=True, text=True,
        )
    return target


def _attn_tune(site: Path, *args: str, disable: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    env.pop("ATTN_TUNE_DISABLE_PLUGINS", None)
    if disable is not None:
        env["ATTN_TUNE_DISABLE_PLUGINS"] = disable
    return subprocess.run([sys.executable, "-m", "attn_tune", *args], capture_output=True, text=True, env=env)


def test_installed_plugin_shows_with_its_version_and_broken_one_is_reported(plugin_site) -> None:
    run = _attn_tune(plugin_site, "plugins", "--json")
    assert run.returncode == 0, run.stderr
    plugins = {p["name"]: p for p in json.loads(run.stdout)}
    example, broken = plugins["example"], plugins["broken"]
    assert (example["package"], example["version"], example["variants"], example["error"]) == (
        "attn-tune-example", "0.3.1", ["einsum-example"], None
    )
    assert example["hooks"] == ["attn_tune_variants"]
    assert broken["package"] == "attn-tune-broken" and "libmissingkernel.so" in broken["error"]
    assert plugins["attn_tune.families.dense"]["variants"] == ["dense"]  # the rest still load


def test_plugin_variant_is_listed_and_benchmarked(plugin_site) -> None:
    listed = {v["name"]: v for v in json.loads(_attn_tune(plugin_site, "list", "--json").stdout)}
    assert listed["einsum-example"]["plugin"] == "example" and listed["einsum-example"]["available"]
    run = _attn_tune(plugin_site, "bench", "--json", "--seq-len", "32", "--heads", "2", "--head-dim", "8",
                     "--causal", "--min-time", "0", "--variant", "einsum-example")
    assert run.returncode == 0, run.stderr
    (result,) = json.loads(run.stdout)
    assert result["status"] == "ok" and result["measured"]["rel_error"] < 1e-5


def test_plain_text_plugins_table_shows_the_error(plugin_site) -> None:
    run = _attn_tune(plugin_site, "plugins")
    line = next(l for l in run.stdout.splitlines() if l.startswith("broken"))
    assert "ERROR import failed: ImportError: libmissingkernel.so" in line


@pytest.mark.parametrize("disable,gone", [("example", {"example"}), ("example,broken", {"example", "broken"}), ("all", {"example", "broken"})])
def test_disable_env_keeps_entry_point_plugins_out(plugin_site, disable, gone) -> None:
    plugins = {p["name"]: p for p in json.loads(_attn_tune(plugin_site, "plugins", "--json", disable=disable).stdout)}
    assert {n for n, p in plugins.items() if p["disabled"]} == gone
    assert all(plugins[n]["variants"] == [] and plugins[n]["error"] is None for n in gone)
    listed = {v["name"] for v in json.loads(_attn_tune(plugin_site, "list", "--json", disable=disable).stdout)}
    assert ("einsum-example" in listed) == ("example" not in gone)
    assert "dense" in listed
