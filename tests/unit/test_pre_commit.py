"""The pre-commit hooks run what CI's `make lint typecheck` runs, and the config is valid."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]


def make_recipe(target: str) -> list[str]:
    """The commands of a Makefile target, with $(VENV) spelled .venv."""
    lines = (REPO / "Makefile").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if re.match(rf"^{target}:", line))
    recipe = []
    for line in lines[start + 1 :]:
        if not line.startswith("\t"):
            break
        recipe.append(line.strip().replace("$(VENV)", ".venv"))
    return recipe


def hook_entries() -> dict[str, str]:
    config = yaml.safe_load((REPO / ".pre-commit-config.yaml").read_text())
    return {hook["id"]: hook["entry"] for repo in config["repos"] for hook in repo["hooks"]}


def test_every_lint_and_typecheck_command_of_make_is_a_hook() -> None:
    entries = set(hook_entries().values())
    for command in make_recipe("lint") + make_recipe("typecheck"):
        tool, _, args = command.partition(" ")
        # ruff runs on the staged files (--force-exclude keeps the project's excludes); mypy on everything.
        wanted = command if tool.endswith("mypy") else f"{tool} {args.removesuffix(' .')} --force-exclude"
        assert wanted in entries, f"`{command}` (make) has no hook; hooks: {sorted(entries)}"


def test_the_config_is_valid_for_pre_commit() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "pre_commit", "validate-config", ".pre-commit-config.yaml"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
