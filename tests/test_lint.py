"""The code is clean under the linter the project chose (ruff; the rule set and why are in pyproject.toml's
[tool.ruff] sections), so a change that breaks a rule fails `make test`, as a change that crosses an app boundary
fails tests/test_boundaries.py."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ruff_finds_nothing():
    proc = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "--output-format", "concise", "."],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, f"ruff check . (fix these, or argue a rule change in pyproject.toml):\n" \
                                 f"{proc.stdout}{proc.stderr}"


def test_the_linter_checks_every_app():
    """A rule set that silently skips a package would make the test above pass for nothing."""
    proc = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "--show-files", "."],
                          cwd=ROOT, capture_output=True, text=True, check=True)
    checked = {Path(line).resolve().relative_to(ROOT).parts[0] for line in proc.stdout.split() if line.endswith(".py")}
    assert {"midtune", "train", "eval", "analysis", "compare", "tests", ".ci"} <= checked
