"""Seed-API evaluation pipeline: shapes, tables, plots, and the seed tutorial end to end."""

from __future__ import annotations

import runpy
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_curve

from ood_core.eval import (
    AUC,
    TPR,
    compute_confidence,
    compute_metrics,
    fit_scores,
    results_frame,
    summary,
    summary_plot,
    summary_table,
)
from ood_core.scores import KNN, Energy, Softmax

ROOT = Path(__file__).resolve().parents[1]


def sklearn_pauc(conf_ind: np.ndarray, conf_ood: np.ndarray, max_fpr: float) -> float:
    """Partial AUC over FPR in [0, max_fpr] divided by max_fpr, from sklearn's ROC points
    (OoD positive, score = -confidence), linearly interpolated at max_fpr."""
    y = np.r_[np.zeros(len(conf_ind)), np.ones(len(conf_ood))]
    fpr, tpr, _ = roc_curve(y, -np.r_[conf_ind, conf_ood], drop_intermediate=False)
    stop = np.searchsorted(fpr, max_fpr, side="right")
    xs = np.r_[fpr[:stop], max_fpr]
    ys = np.r_[tpr[:stop], tpr[stop - 1]]  # staircase: no credit for the next vertical jump
    # pessimistic staircase: area = sum over steps of width * tpr before the step
    return float(np.sum(np.diff(xs) * ys[:-1]) / max_fpr)


def sklearn_tpr_at(conf_ind: np.ndarray, conf_ood: np.ndarray, max_fpr: float) -> float:
    y = np.r_[np.zeros(len(conf_ind)), np.ones(len(conf_ood))]
    fpr, tpr, _ = roc_curve(y, -np.r_[conf_ind, conf_ood], drop_intermediate=False)
    return float(tpr[fpr <= max_fpr + 1e-12].max())


@pytest.fixture(scope="module")
def toy():
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Flatten(), torch.nn.Linear(16, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3)
    ).eval()
    calib = torch.rand(80, 1, 4, 4)
    ind = torch.rand(50, 1, 4, 4)
    oods = (ind * 3, torch.rand(40, 1, 4, 4) - 0.5)
    return net, calib, ind, oods


def test_shapes_and_values_match_sklearn(toy):
    net, calib, ind, oods = toy
    pairs = ((Softmax(), []), (Energy(), []), (KNN(k=5), [(1, 3)]))
    fitted = fit_scores(pairs, net, calib, progress=False, input_range=(-0.5, 3))  # toy OoD sets
    confs_ind, confs_oods = compute_confidence(fitted, ind=ind, oods=oods, progress=False)
    assert confs_ind.shape == (3, 50) and [c.shape for c in confs_oods] == [(3, 50), (3, 40)]
    assert confs_ind.dtype == torch.float64
    metrics = (AUC(max_fpr=0.2), TPR(max_fpr=0.05), AUC())
    evals = compute_metrics(confs_ind, confs_oods, metrics)
    assert evals.shape == (3, 2, 3)
    for i in range(3):
        for j in range(2):
            a, b = confs_ind[i].numpy(), confs_oods[j][i].numpy()
            assert evals[i, j, 0] == pytest.approx(sklearn_pauc(a, b, 0.2), abs=1e-9)
            assert evals[i, j, 1] == pytest.approx(sklearn_tpr_at(a, b, 0.05), abs=1e-9)
    # the Softmax row equals the maximum softmax probability computed by hand
    with torch.no_grad():
        msp = torch.softmax(net(ind).double(), 1).max(1).values
    torch.testing.assert_close(confs_ind[0], msp)


def test_table_plot_frame_and_summary(toy):
    net, calib, ind, oods = toy
    pairs = ((Softmax(), []), (KNN(k=5), [(1, 3)]))
    fitted = fit_scores(pairs, net, calib, progress=False, input_range=(-0.5, 3))  # toy OoD sets
    confs_ind, confs_oods = compute_confidence(
        fitted, ind=ind, oods=oods, oods_title=("x3", "shift"), progress=False
    )
    metrics = (AUC(max_fpr=0.2), TPR(max_fpr=0.05))
    evals = compute_metrics(confs_ind, confs_oods, metrics)
    table = summary_table(
        evals,
        scores_and_layers=pairs,
        oods_title=("x3", "shift"),
        metrics=metrics,
        baseline=0,
        show=False,
    )
    assert table.row_count == 2 and len(table.columns) == 3
    assert "↳ 1-3" in table.columns[0]._cells[1]
    cell = table.columns[1]._cells[1]
    assert f"{evals[1, 0, 0]:.3f}" in cell
    fig = summary_plot(confs_ind, confs_oods, scores_and_layers=pairs, oods_title=("x3", "shift"))
    kinds = [t.type for t in fig.data]
    assert kinds.count("histogram") == 2 * 3  # 2 scores x (InD + 2 OoD sets)
    assert (
        sum(
            1 for t in fig.data if t.type == "scatter" and t.name in ("Softmax()", "KNN(k=5) @ 1-3")
        )
        == 4
    )
    frame = results_frame(
        evals,
        scores_and_layers=pairs,
        oods_title=("x3", "shift"),
        metrics=metrics,
        confs_ind=confs_ind,
        confs_oods=confs_oods,
        n_boot=50,
    )
    assert len(frame) == 2 * 2 * 2 and (frame["ci_low"] <= frame["value"] + 1e-12).all()
    out = summary(
        confs_ind,
        confs_oods,
        scores_and_layers=pairs,
        oods_title=("x3", "shift"),
        metrics=metrics,
        topk=1,
        baseline=0,
        show=False,
    )
    assert out["table"].row_count in (1, 2) and out["evals"].shape == (2, 2, 2)


def test_bad_inputs_are_explained(toy):
    net, calib, ind, oods = toy
    with pytest.raises(ValueError, match=r"\(score, layers\) pairs"):
        fit_scores([Softmax()], net, calib)
    fitted = fit_scores(((Softmax(), []),), net, calib, progress=False)
    with pytest.raises(ValueError, match="2 OoD sets but 1 titles"):
        compute_confidence(fitted, ind=ind, oods=oods, oods_title=("a",), progress=False)
    with pytest.raises(ValueError, match="NaN in confidences of 'Softmax"):
        compute_metrics(
            np.array([[np.nan, 1.0]]), [np.array([[0.0, 1.0]])], (AUC(),), score_names=["Softmax()"]
        )


@pytest.mark.slow
def test_seed_tutorial_runs_on_ood_core_and_matches_sklearn(capsys):
    import matplotlib

    try:
        ns = runpy.run_path(str(ROOT / "examples" / "seed_tutorial.py"))
        # the tutorial's rcParams["figure.figsize"] = (15, 9) line is honoured
        assert (ns["fig"].layout.width, ns["fig"].layout.height) == (1500, 900)
    finally:
        matplotlib.rcdefaults()
    out = capsys.readouterr().out
    assert "Evaluation of 4 scores against 3 OoD sets and 2 metrics" in out
    assert "Currently recording: None" in out and "ScoreTimer report" in out
    evals, ci, co = ns["evals"], ns["confs_ind"].numpy(), [c.numpy() for c in ns["confs_oods"]]
    assert evals.shape == (4, 3, 2)
    for i in range(4):
        for j in range(3):
            assert evals[i, j, 0] == pytest.approx(sklearn_pauc(ci[i], co[j][i], 0.2), abs=1e-9)
            assert evals[i, j, 1] == pytest.approx(sklearn_tpr_at(ci[i], co[j][i], 0.05), abs=1e-9)
    # sanity on real data: every score beats chance on uniform noise; for AUC(max_fpr=0.2)
    # (area over FPR in [0, 0.2] divided by 0.2) chance is 0.1
    assert (evals[:, 2, 0] > 0.2).all()


def test_summary_table_prints_well_with_print(capsys):
    from ood_core.eval import summary_table
    from ood_core.metrics import AUC, TPR
    from ood_core.scores import KNN, Softmax

    evals = np.array([[[0.91, 0.5]], [[0.875, 0.25]]])  # 2 scores x 1 OoD set x 2 metrics
    pairs = [(Softmax(), []), (KNN(k=3), [(1, 11)])]
    table = summary_table(
        evals,
        scores_and_layers=pairs,
        oods_title=["MNIST"],
        metrics=[AUC(), TPR(max_fpr=0.05)],
        show=False,
    )
    text = str(table)
    print(table)
    assert capsys.readouterr().out.strip() == text
    assert "object at 0x" not in text
    assert "0.910 / 0.500" in text and "0.875 / 0.250" in text and "↳ 1-11" in text


def test_summary_plot_ignores_matplotlib_defaults():
    import matplotlib

    from ood_core.scores import Softmax

    matplotlib.rcdefaults()
    ind, ood = np.random.default_rng(0).random((2, 1, 50))
    fig = summary_plot(ind, [ood], scores_and_layers=[(Softmax(), [])])
    assert fig.layout.width is None  # the default figsize: Plotly's own autosize
