""".ci/postgres.sh on a machine with no PostgreSQL and no way to install it: it says so and CI goes on to the suite."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_postgres_script_without_a_server_lets_the_suite_run(tmp_path) -> None:
    """Sourced under .ci/run's `set -euo pipefail`, with no server under the prefix and no apt-get on PATH."""
    tools = tmp_path / "bin"  # only what the no-server path needs: no apt-get, no PostgreSQL binaries
    tools.mkdir()
    for tool in ("ls", "sort", "tail", "id"):
        (tools / tool).symlink_to(shutil.which(tool))
    empty = tmp_path / "no-postgresql"
    empty.mkdir()
    script = "set -euo pipefail; source .ci/postgres.sh; echo \"suite runs; url=${ATTN_TUNE_TEST_POSTGRES_URL:-unset}\""
    env = {"PATH": str(tools), "ATTN_TUNE_PG_PREFIX": str(empty), "HOME": os.environ.get("HOME", "/tmp")}
    done = subprocess.run([shutil.which("bash"), "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["no PostgreSQL server available: the distributed-tuning tests will skip",
                                        "suite runs; url=unset"]
