"""Plain metric names (``Metric.plain_name``): what a reader knows, beside the formal label."""

from __future__ import annotations

import pytest

from ood_core.metrics import AUC, METRICS, TNR, TPR, parse_metric, plain_metric_name


@pytest.mark.parametrize(
    ("label", "plain"),
    [
        ("AUC()", "AUROC"),
        ("AUC(max_fpr=0.2)", "partial AUROC, FPR <= 20%"),
        ("AUC(min_fpr=0.1, max_fpr=0.3)", "partial AUROC, FPR 10% to 30%"),
        ("TPR(max_fpr=0.05)", "TPR at 5% FPR"),
        ("TPR(min_tnr=0.95)", "TPR at 5% FPR"),  # the same constraint, the same name
        ("TNR(min_tpr=0.95)", "TNR at 95% TPR"),
        ("TNR(max_fnr=0.025)", "TNR at 97.5% TPR"),
        ("AUC(kind='convex_hull')", "AUROC (convex hull)"),
        ("AUPR()", "AUPR, OoD positive"),
        ("not a metric", "not a metric"),
    ],
)
def test_plain_names(label: str, plain: str) -> None:
    assert plain_metric_name(label) == plain


def test_every_registered_metric_has_a_plain_name_and_keeps_its_label() -> None:
    for cls in METRICS.values():
        metric = cls() if cls not in (TPR, TNR) else cls(**{next(iter(_bound(cls))): 0.95})
        assert metric.plain_name and parse_metric(repr(metric)) == metric
    assert AUC().name == "AUC()"  # the key everywhere (CSV, config, caches) is unchanged


def _bound(cls: type) -> dict[str, float]:
    return {"min_tnr": 0.95} if cls is TPR else {"min_tpr": 0.95}
