"""The code stays mechanically formatted and lint-clean: ``ruff format`` and ``ruff check`` run
as part of the test command (``./dev test``), so CI checks them too."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "args", [["format", "--check", "."], ["check", "."]], ids=["format", "lint"]
)
def test_ruff(args):
    done = subprocess.run(
        [sys.executable, "-m", "ruff", *args], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, (
        f"ruff {' '.join(args)} (run it to fix):\n{done.stdout}{done.stderr}"
    )
