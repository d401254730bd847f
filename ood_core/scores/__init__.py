"""Confidence scores (conformity: higher = more in-distribution) and their registry.

Every score is a :class:`BaseScore`: parameters are constructor arguments with defaults, validated
with clear errors and described by ``describe_params()`` for UIs. ``SCORES`` maps names to
classes; :func:`list_scores` describes them (family, layers, fitting, gradients, paper).
"""

from __future__ import annotations

from typing import Any

# Importing the family modules registers their scores (module order, then definition order).
from ood_core.scores.base import BaseScore, NotFittedError, ScoreTimer, postprocess_conformity
from ood_core.scores.gradients import GradNorm
from ood_core.scores.gram import Gram
from ood_core.scores.input_perturbation import FeatureSqueezing, Odds
from ood_core.scores.knn import KNN
from ood_core.scores.logits import (
    GEN,
    ODIN,
    BaselineClassif,
    Energy,
    Entropy,
    IsoMax,
    JointEnergy,
    KLMatching,
    Logit,
    Softmax,
    TemperatureScaling,
)
from ood_core.scores.mahalanobis import DeepMahalanobis, MultiMahalanobis, RelativeMahalanobis, ViM
from ood_core.scores.neighbours import JTLA, LID, DkNN, NNGuide, Trust
from ood_core.scores.rankfeat import RankFeat
from ood_core.scores.registry import SCORES, register_score
from ood_core.scores.shaping import ASH, DICE, SCALE, ReAct, fDBD

ALIASES = {"BaselineClassif": "Softmax", "MaxLogit": "Logit"}


def get_score_class(name: str) -> type[BaseScore]:
    """The registered class of ``name`` (or of an alias such as ``BaselineClassif``)."""
    return SCORES.get_class(ALIASES.get(name, name))


def make_score(name: str, **params: Any) -> BaseScore:
    """Build a score from its registry name and parameters (inverse of ``score.config()``)."""
    return get_score_class(name)(**params)


def _gradients(cls: type[BaseScore]) -> str:
    if cls.needs_param_grad:
        return "parameters"
    if cls.needs_input_grad is not BaseScore.needs_input_grad:
        return "inputs (when epsilon > 0)"
    return "no (extra forward passes)" if cls.own_pass else "no"


def list_scores() -> list[dict[str, Any]]:
    """One row per registered score: name, family, layer rule, fitting, gradients, paper, params."""
    rows = []
    for name, cls in SCORES.items():
        rows.append(
            {
                "name": name,
                "family": cls.family,
                "layers": cls.layer_rule,
                "max_layers": cls.max_layers,
                "needs_fit": cls.needs_fit,
                "fit_kind": cls.fit_kind + (f" ({cls.fit_note})" if cls.fit_note else ""),
                "gradients": _gradients(cls),
                "reference": cls.reference,
                "doc": (cls.__doc__ or "").strip().split("\n\n")[0].replace("\n", " "),
                "params": cls.describe_params(),
            }
        )
    return rows


_LAYER_TEXT = {"none": "logits only", "params": "layers with parameters", "any": "any layers"}


def _default_text(value: Any) -> str:
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, tuple):
        return repr(value)
    return repr(value) if not isinstance(value, float) or value != float("inf") else "inf"


def scores_markdown() -> str:
    """README's score table (``ood-lens scores --markdown``), built from the registry: one row
    per score with its family, layers, how it fits (:data:`~ood_core.scores.base.FIT_KINDS`),
    gradients, parameters (``*``: required, the value shown is
    then a suggestion; ``act_norm`` and ``mode`` are common to all) and paper."""
    lines = [
        "| score | family | layers | fit | gradients | parameters (defaults; * = required) "
        "| paper |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in list_scores():
        layers = _LAYER_TEXT[row["layers"]]
        if row["max_layers"] is not None and row["layers"] == "any":
            layers += f" (max {row['max_layers']})"
        params = [p for p in row["params"] if p["name"] not in ("act_norm", "mode")]
        text = (
            ", ".join(
                f"`{p['name']}={_default_text(p['default'])}`" + ("*" if p["required"] else "")
                for p in params
            )
            or "—"
        )
        act = next(p for p in row["params"] if p["name"] == "act_norm")["default"]
        if act is not None:
            text += f", `act_norm={act!r}`"
        lines.append(
            f"| `{row['name']}` | {row['family']} | {layers} | {row['fit_kind']} "
            f"| {row['gradients']} | {text} "
            f"| {row['reference']} |"
        )
    return "\n".join(lines)


__all__ = [
    "ALIASES",
    "SCORES",
    "BaseScore",
    "NotFittedError",
    "ScoreTimer",
    "get_score_class",
    "list_scores",
    "make_score",
    "postprocess_conformity",
    "register_score",
    "scores_markdown",
    "BaselineClassif",
    "Softmax",
    "Logit",
    "Energy",
    "JointEnergy",
    "Entropy",
    "GEN",
    "TemperatureScaling",
    "KLMatching",
    "ODIN",
    "IsoMax",
    "GradNorm",
    "Gram",
    "KNN",
    "DeepMahalanobis",
    "RelativeMahalanobis",
    "MultiMahalanobis",
    "ViM",
    "ReAct",
    "ASH",
    "SCALE",
    "DICE",
    "fDBD",
    "RankFeat",
    "DkNN",
    "LID",
    "Trust",
    "NNGuide",
    "JTLA",
    "FeatureSqueezing",
    "Odds",
]
