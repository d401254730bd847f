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


def _code_block_after(heading: str) -> str:
    section = README.split(heading, 1)[1]
    return section.split("```python", 1)[1].split("```", 1)[0]


def test_readme_custom_score_example_runs_and_registers(tmp_path):
    import torch

    from ood_core.evaluation import Evaluation
    from ood_core.scores import SCORES

    ns: dict = {}
    exec(compile(_code_block_after("## Adding your own score"), "README", "exec"), ns)
    try:
        assert "MeanActivation" in SCORES
        net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3)).eval()
        x = torch.rand(20, 1, 2, 2)
        score = ns["MeanActivation"](scale=2.0)
        score.layers = ((1, 1),)
        eng = Evaluation.for_net(net, x)
        eng.fit([score], x)
        ((_, conf),) = eng.confidences([score], x)
        m = x.flatten(1).mean(1).double()
        torch.testing.assert_close(conf[:, 0], -2.0 * (m - m.mean()).abs())
    finally:
        SCORES.pop("MeanActivation", None)


def test_readme_headless_api_examples_run(capsys):
    section = README.split("## Headless API", 1)[1].split("### Conventions", 1)[0]
    blocks = [b.split("```", 1)[0] for b in section.split("```python")[1:]]
    assert len(blocks) == 2
    ns: dict = {}
    for block in blocks:
        exec(compile(block, "README", "exec"), ns)
    out = capsys.readouterr().out
    assert "Evaluation of 4 scores against 3 OoD sets and 2 metrics" in out
    assert ns["evals"].shape == (4, 3, 2) and ns["conformity"].shape == (1000, 10)
    assert ns["evals"][3, 2, 0] > 0.2  # KNN vs MNIST, AUC(max_fpr=0.2): chance is 0.1


def test_readme_score_table_is_the_registry():
    from ood_core.scores import scores_markdown

    assert scores_markdown() in README, "regenerate with `ood-lens scores --markdown`"
