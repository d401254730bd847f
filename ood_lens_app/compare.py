"""Two saved runs compared by score identity, not by label.

A score's **identity** in a run is its class, its layers and its position among that run's scores
of the same class and layers: ``KNN(k=15) @ 1-11`` in run A and ``KNN(k=50) @ 1-11`` in run B
are one score whose parameter changed (identity ``KNN @ 1-11``), and the second ``KNN @ 1-11`` of
a sweep pairs with the other run's second (``KNN @ 1-11 #2``). A layer change makes another
identity (another place in the network), listed as a change of the configuration.

:func:`compare` pairs the metric rows of two runs by (identity, OoD set, metric) and gives
``B - A`` for every pair, ordered by score (first appearance), layers in network order (``1-3``
before ``1-10``) and position; :func:`config_changes` lists what differs between the two
configurations in words; :func:`roc_inputs` / :func:`roc_styles` overlay the runs' ROC curves,
one colour per identity (the same in A and B), one dash per run. No Streamlit here.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import pandas as pd

from ood_core import plots
from ood_core.config import RunConfig, ScoreSpec
from ood_core.layer_ids import LayerId, parse_layer_ids

KEYS = ["score", "layers", "ood", "metric"]
"""The columns a metric row is named by in a run's frame."""
COLUMNS = ["score", "layers", "setting", "ood", "metric", "A", "B", "B - A", "changed"]
"""Columns of :func:`compare`: ``score`` (the identity without its layers), ``layers``,
``setting`` (the score as each run names it: ``KNN(k=15) → KNN(k=50)`` when its parameters
changed), ``A``, ``B``, ``B - A`` (NaN where one run lacks the row) and ``changed`` (the setting
differs, one run lacks the row, or the value moved by more than :data:`SAME`)."""
SAME = 1e-12
"""Values closer than this are the same (:func:`compare`'s ``changed``)."""
RUN_DASHES = {"A": "solid", "B": "dash"}
"""Line dash of each compared run's ROC curves (the colour is the score's identity)."""


def score_class(label: str) -> str:
    """The class name in a score label: ``"KNN(k=15)"`` -> ``"KNN"``."""
    return label.split("(", 1)[0].strip()


def _layers(text: Any) -> str:
    """A metric frame's ``layers`` cell as text (``""`` for logit scores: NaN or None there)."""
    return "" if text is None or text != text else str(text)


def layer_order(text: str) -> tuple[LayerId, ...]:
    """``"1-5, 1-11"`` -> ``((1, 5), (1, 11))``: layers sorted as the network orders them."""
    return tuple(parse_layer_ids(p for p in text.split(",") if p.strip()))


def identities(scores: Iterable[tuple[str, str]]) -> dict[tuple[str, str], str]:
    """``{(label, layers text): identity}`` for a run's scores in their order: ``"KNN @ 1-11"``,
    ``"Softmax"``, and ``"KNN @ 1-11 #2"`` for the second score of that class and layers."""
    seen: Counter[tuple[str, str]] = Counter()
    out: dict[tuple[str, str], str] = {}
    for label, layers in dict.fromkeys(scores):
        base = (score_class(label), layers)
        seen[base] += 1
        text = f"{base[0]} @ {layers}" if layers else base[0]
        out[(label, layers)] = text if seen[base] == 1 else f"{text} #{seen[base]}"
    return out


def _frame_identities(metrics: pd.DataFrame) -> pd.DataFrame:
    """A run's metric rows with ``identity`` and text ``layers`` columns."""
    rows = metrics[[*KEYS, "value"]].copy()
    rows["layers"] = [_layers(v) for v in rows["layers"]]
    ids = identities(zip(rows["score"], rows["layers"], strict=True))
    rows["identity"] = [ids[k] for k in zip(rows["score"], rows["layers"], strict=True)]
    return rows


def compare(a_metrics: pd.DataFrame, b_metrics: pd.DataFrame) -> pd.DataFrame:
    """Two runs' metric frames paired by (score identity, OoD set, metric): :data:`COLUMNS`."""
    a, b = _frame_identities(a_metrics), _frame_identities(b_metrics)
    on = ["identity", "ood", "metric"]
    left = a.rename(columns={"value": "A", "score": "score_A", "layers": "layers_A"})
    right = b.rename(columns={"value": "B", "score": "score_B", "layers": "layers_B"})
    out = left.merge(right, on=on, how="outer", sort=False)
    classes = list(dict.fromkeys(score_class(s) for s in [*a["score"], *b["score"]]))
    oods = list(dict.fromkeys([*a["ood"], *b["ood"]]))
    metrics = list(dict.fromkeys([*a["metric"], *b["metric"]]))
    out["layers"] = out["layers_A"].fillna(out["layers_B"])
    label_a, label_b = out["score_A"].fillna(""), out["score_B"].fillna("")
    out["setting"] = [
        x if x == y else (f"{x} → {y}" if x and y else (x or y))
        for x, y in zip(label_a, label_b, strict=True)
    ]
    out["score"] = [i.split(" @ ", 1)[0] + _nth(i) if " @ " in i else i for i in out["identity"]]
    out["B - A"] = out["B"] - out["A"]
    moved = ~(out["B - A"].abs() <= SAME)  # NaN (one run lacks the row) counts as moved
    out["changed"] = (label_a != label_b) | moved
    position = [
        (
            classes.index(score_class(s)),
            layer_order(layers),
            _nth(i),
            oods.index(o),
            metrics.index(m),
        )
        for s, layers, i, o, m in zip(
            label_a.where(label_a != "", label_b),
            out["layers"],
            out["identity"],
            out["ood"],
            out["metric"],
            strict=True,
        )
    ]
    out = out.iloc[sorted(range(len(out)), key=position.__getitem__)]
    return out[COLUMNS].reset_index(drop=True)


def _nth(identity: str) -> str:
    """``" #2"`` of ``"KNN @ 1-11 #2"``, else ``""``."""
    tail = identity.rsplit(" #", 1)
    return f" #{tail[1]}" if len(tail) == 2 and tail[1].isdigit() else ""  # noqa: PLR2004


def compare_text(diff: pd.DataFrame, digits: int = 3) -> pd.DataFrame:
    """:func:`compare` as shown: values with ``digits`` decimals, ``"not in A"`` / ``"not in
    B"`` (``"-"`` for the difference) where only one run has the row; without ``changed``."""
    out = diff.drop(columns=["changed"], errors="ignore").copy()
    for column, missing in (("A", "not in A"), ("B", "not in B")):
        out[column] = [f"{v:.{digits}f}" if v == v else missing for v in diff[column]]
    out["B - A"] = [f"{v:+.{digits}f}" if v == v else "-" for v in diff["B - A"]]
    return out


# ---------------------------------------------------------------------- configurations
def _flat(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out |= _flat(v, f"{key}.")
        else:
            out[key] = v
    return out


def _show(value: Any) -> str:
    if value is None:
        return "not set"
    if isinstance(value, str):
        return value
    return json.dumps(value, separators=(", ", ": "), default=str)


def _spec_identities(specs: list[ScoreSpec]) -> dict[str, ScoreSpec]:
    ids = identities((s.name, ", ".join(s.layers)) for s in specs)
    # identities() collapses equal (name, layers) keys: number the specs themselves
    seen: Counter[tuple[str, str]] = Counter()
    out: dict[str, ScoreSpec] = {}
    for s in specs:
        key = (s.name, ", ".join(s.layers))
        seen[key] += 1
        base = ids[key]
        out[base if seen[key] == 1 else f"{base} #{seen[key]}"] = s
    return out


def config_changes(a: RunConfig, b: RunConfig) -> list[str]:
    """What differs from configuration ``a`` to ``b``, one line each: a setting (``data.
    n_calibration: 1000 → 2000``), a score's parameter (``KNN @ 1-11: k 15 → 50``; a parameter
    left to its default reads ``default``), a score only one run has (``only in B: KNN @
    1-5``). Empty when the two configurations are the same."""
    da, db = a.to_dict(), b.to_dict()
    sa, sb = _spec_identities(a.scores), _spec_identities(b.scores)
    da.pop("scores"), db.pop("scores")
    fa, fb = _flat(da), _flat(db)
    lines = [
        f"{k}: {_show(fa.get(k))} → {_show(fb.get(k))}"
        for k in dict.fromkeys([*fa, *fb])
        if fa.get(k) != fb.get(k)
    ]
    for ident in dict.fromkeys([*sa, *sb]):
        if ident not in sb:
            lines.append(f"only in A: {ident}{_params_text(sa[ident])}")
        elif ident not in sa:
            lines.append(f"only in B: {ident}{_params_text(sb[ident])}")
        else:
            pa, pb = sa[ident].params, sb[ident].params
            for k in dict.fromkeys([*pa, *pb]):
                if pa.get(k, "default") != pb.get(k, "default"):
                    va, vb = (_show(p[k]) if k in p else "default" for p in (pa, pb))
                    lines.append(f"{ident}: {k} {va} → {vb}")
    return lines


def _params_text(spec: ScoreSpec) -> str:
    if not spec.params:
        return ""
    return " (" + ", ".join(f"{k}={_show(v)}" for k, v in spec.params.items()) + ")"


# ---------------------------------------------------------------------- ROC overlay
def common_scenarios(a: pd.DataFrame, b: pd.DataFrame) -> list[str]:
    """OoD sets both runs scored (``confidences`` frames; the first run's order)."""
    other = set(b["dataset"])
    return [d for d in dict.fromkeys(a["dataset"]) if d != "InD" and d in other]


def _curve_label(label: str) -> tuple[str, str]:
    """A confidences frame's score (``"KNN(k=15) @ 1-11"``) as ``(label, layers)``."""
    score, _, layers = label.partition(" @ ")
    return score, layers


def roc_inputs(
    runs: Mapping[str, pd.DataFrame], ood: str
) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], dict[str, str]]:
    """``({"<run> · <score>": (InD confidences, OoD confidences)}, {curve: identity})`` on
    scenario ``ood`` for every score of every run (``runs``: name -> confidences frame), for
    :func:`ood_core.plots.roc_figure` and :func:`roc_styles`."""
    curves: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    ids: dict[str, str] = {}
    for name, conf in runs.items():
        labels = list(dict.fromkeys(conf["score"]))
        run_ids = identities(_curve_label(s) for s in labels)
        for score in labels:
            rows = conf[conf["score"] == score]
            ind = rows.loc[rows["dataset"] == "InD", "confidence"].to_numpy(np.float64)
            ood_c = rows.loc[rows["dataset"] == ood, "confidence"].to_numpy(np.float64)
            if len(ind) and len(ood_c):
                curves[f"{name} · {score}"] = (ind, ood_c)
                ids[f"{name} · {score}"] = run_ids[_curve_label(score)]
    return curves, ids


def roc_styles(curve_ids: Mapping[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    """Colours and dashes of the overlaid curves (:func:`roc_inputs`): one colour per score
    identity (a score whose parameter changed keeps its colour), one dash per run
    (:data:`RUN_DASHES`)."""
    palette = plots.score_colors(list(dict.fromkeys(curve_ids.values())))
    colors = {n: palette[i] for n, i in curve_ids.items()}
    dashes = {n: RUN_DASHES.get(n.split(" · ", 1)[0], "dot") for n in curve_ids}
    return colors, dashes


__all__ = [
    "COLUMNS",
    "RUN_DASHES",
    "common_scenarios",
    "compare",
    "compare_text",
    "config_changes",
    "identities",
    "layer_order",
    "roc_inputs",
    "roc_styles",
    "score_class",
]
