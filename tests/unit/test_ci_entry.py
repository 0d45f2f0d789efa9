""".ci/run runs the project's own test command, whatever the calling shell exported."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_ci_run_drops_pytest_options_from_the_environment(tmp_path: Path) -> None:
    # A stand-in `make` first on PATH reports what it was given and what it inherited.
    fake = tmp_path / "make"
    fake.write_text(
        '#!/usr/bin/env bash\necho "args=$* addopts=${PYTEST_ADDOPTS-unset} pytest_args=${PYTEST_ARGS-unset}"\n'
    )
    fake.chmod(0o755)
    env = {
        **os.environ,
        "PATH": f"{tmp_path}:{os.environ['PATH']}",
        "PYTEST_ADDOPTS": "-m 'not cluster'",
        "PYTEST_ARGS": "tests/unit",
    }
    proc = subprocess.run(
        ["bash", str(REPO / ".ci" / "run")], env=env, capture_output=True, text=True, timeout=30, check=True
    )
    assert proc.stdout.strip() == "args=test addopts=unset pytest_args=unset"
