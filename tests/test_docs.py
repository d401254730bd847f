"""README stays true: the two commands first, every registered score, recorded accuracies."""

from __future__ import annotations

import json
from pathlib import Path

from ood_core.scores import SCORES

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_readme_opens_with_the_two_commands():
    block = README.split("```")[1]
    lines = [line.split("#")[0].strip() for line in block.splitlines()[1:] if line.strip()]
    assert lines == ["./dev app", "./dev test"]
    ci = (ROOT / ".ci" / "run").read_text()
    assert "./dev test" in ci


def test_readme_lists_every_registered_score():
    missing = [name for name in SCORES if f"| `{name}` |" not in README]
    assert not missing, f"README's score table lacks {missing}"


def test_readme_reports_the_recorded_accuracies():
    for name, rec in json.loads((ROOT / "assets/hub/models.json").read_text()).items():
        assert f"| `{name}` |" in README
        assert f"{100 * rec['test_accuracy']:.2f} %" in README, name
