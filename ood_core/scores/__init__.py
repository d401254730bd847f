"""Confidence scores (conformity: higher = more in-distribution) and their registry.

Every score is a :class:`BaseScore`: parameters are constructor arguments with defaults, validated
with clear errors and described by ``describe_params()`` for UIs. ``SCORES`` maps names to
classes; :func:`list_scores` describes them (family, layers, fitting, gradients, paper).
"""

from __future__ import annotations

from typing import Any

from ood_core.scores import (
    gradients,
    gram,
    knn,
    logits,
    mahalanobis,
    misc,
    neighbours,
    rankfeat,
    shaping,
)
from ood_core.scores.base import BaseScore, NotFittedError, ScoreTimer, postprocess_conformity
from ood_core.scores.gradients import *  # noqa: F403
from ood_core.scores.gram import Gram
from ood_core.scores.knn import KNN
from ood_core.scores.logits import *  # noqa: F403
from ood_core.scores.logits import BaselineClassif
from ood_core.scores.mahalanobis import *  # noqa: F403
from ood_core.scores.misc import *  # noqa: F403
from ood_core.scores.neighbours import *  # noqa: F403
from ood_core.scores.rankfeat import RankFeat
from ood_core.scores.shaping import *  # noqa: F403

_FAMILY_MODULES = (logits, gradients, gram, knn, mahalanobis, shaping, rankfeat, neighbours, misc)
SCORES: dict[str, type[BaseScore]] = {
    cls.__name__: cls
    for module in _FAMILY_MODULES
    for cls in getattr(module, "SCORES", ())
}
ALIASES = {"BaselineClassif": "Softmax", "MaxLogit": "Logit"}


def register_score(cls: type[BaseScore]) -> type[BaseScore]:
    """Class decorator adding a user-defined score to the registry (and so to the dashboard)."""
    if not (isinstance(cls, type) and issubclass(cls, BaseScore)):
        raise TypeError(f"{cls!r} is not a BaseScore subclass")
    SCORES[cls.__name__] = cls
    return cls


def get_score_class(name: str) -> type[BaseScore]:
    name = ALIASES.get(name, name)
    if name not in SCORES:
        raise ValueError(f"Unknown score '{name}'; available: {', '.join(sorted(SCORES))}.")
    return SCORES[name]


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
        rows.append({
            "name": name,
            "family": cls.family,
            "layers": cls.layer_rule,
            "max_layers": cls.max_layers,
            "needs_fit": cls.needs_fit,
            "gradients": _gradients(cls),
            "reference": cls.reference,
            "doc": (cls.__doc__ or "").strip().split("\n\n")[0].replace("\n", " "),
            "params": cls.describe_params(),
        })  # fmt: skip
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
    per score with its family, layers, gradients, parameters (``*``: required, the value shown is
    then a suggestion; ``act_norm`` and ``mode`` are common to all) and paper."""
    lines = ["| score | family | layers | gradients | parameters (defaults; * = required) | paper |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for row in list_scores():
        layers = _LAYER_TEXT[row["layers"]]
        if row["max_layers"] is not None and row["layers"] == "any":
            layers += f" (max {row['max_layers']})"
        params = [p for p in row["params"] if p["name"] not in ("act_norm", "mode")]
        text = ", ".join(f"`{p['name']}={_default_text(p['default'])}`" + ("*" if p["required"] else "")
                         for p in params) or "—"  # fmt: skip
        act = next(p for p in row["params"] if p["name"] == "act_norm")["default"]
        if act is not None:
            text += f", `act_norm={act!r}`"
        lines.append(f"| `{row['name']}` | {row['family']} | {layers} | {row['gradients']} | {text} "
                     f"| {row['reference']} |")  # fmt: skip
    return "\n".join(lines)


__all__ = [
    "SCORES", "BaseScore", "NotFittedError", "ScoreTimer", "list_scores", "make_score",
    "register_score", "get_score_class", "postprocess_conformity", "scores_markdown",
    "BaselineClassif", "KNN", "Gram",
    "RankFeat",
    *SCORES,
]  # fmt: skip
