"""Small pure computations behind the dashboard's interactive views (no Streamlit here).

Conventions (as everywhere in ood-lens): a confidence is higher for more in-distribution inputs;
a sample is **rejected** (flagged OoD) when ``confidence <= threshold`` and **accepted**
otherwise. OoD is the positive class, so ``TPR`` = OoD rejection rate and ``FPR`` = InD rejection
rate = ``1 - InD acceptance``.

* thresholds and confusion counts: :func:`threshold_for_acceptance`, :func:`confusion`,
  :func:`operating_point`;
* galleries: :func:`extreme_indices`, and :func:`histogram_bins` / :func:`selection_to_indices`
  to map a Plotly histogram selection back to sample indices;
* model / layer helpers for the pages: :func:`predict`, :func:`layer_quick_picks`,
  :func:`layer_options`, :func:`default_layers`;
* score / parameter helpers: :func:`parse_list_param`, :func:`check_score`,
  :func:`heatmap_frame`.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

__all__ = [
    "Confusion", "check_score", "confusion", "default_layers", "extreme_indices",
    "heatmap_frame", "histogram_bins", "layer_options", "layer_quick_picks", "operating_point",
    "interval_columns", "parse_list_param", "predict", "score_labels", "selection_to_indices",
    "threshold_for_acceptance",
]  # fmt: skip


def _arr(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.float64).ravel()


# ---------------------------------------------------------------------------- thresholds
def threshold_for_acceptance(conf_ind: Any, acceptance: float) -> float:
    """The largest threshold that still accepts at least ``acceptance`` of the InD samples.

    Samples with ``confidence <= threshold`` are rejected, so the returned ``t`` rejects at most
    ``floor((1 - acceptance) * n)`` InD samples; tied values are rejected together, so with ties
    the attained acceptance can be above the target (never below). ``acceptance=1`` returns a
    value just below the smallest confidence (nothing rejected). NaNs are ignored.
    """
    if not 0.0 <= float(acceptance) <= 1.0:
        raise ValueError(f"acceptance must be in [0, 1], got {acceptance!r}")
    c = _arr(conf_ind)
    c = np.sort(c[~np.isnan(c)])
    if c.size == 0:
        raise ValueError("threshold_for_acceptance needs at least one InD confidence.")
    allowed = math.floor((1.0 - float(acceptance)) * c.size + 1e-9)
    below = float(np.nextafter(c[0], -np.inf)) if np.isfinite(c[0]) else -np.inf
    if allowed <= 0:
        return below
    uniq = np.unique(c)
    rejected = np.searchsorted(c, uniq, side="right")  # count(conf <= u)
    ok = uniq[rejected <= allowed]
    return float(ok[-1]) if ok.size else below


@dataclass(frozen=True)
class Confusion:
    """Counts at one threshold: InD / OoD samples accepted (conf > t) or rejected (conf <= t)."""

    threshold: float
    ind_accepted: int
    ind_rejected: int
    ood_accepted: int
    ood_rejected: int

    @property
    def ind_acceptance(self) -> float:
        """Fraction of InD samples accepted (1 - FPR)."""
        n = self.ind_accepted + self.ind_rejected
        return self.ind_accepted / n if n else float("nan")

    @property
    def ood_rejection(self) -> float:
        """Fraction of OoD samples rejected (TPR, OoD being the positive class)."""
        n = self.ood_accepted + self.ood_rejected
        return self.ood_rejected / n if n else float("nan")

    @property
    def fpr(self) -> float:
        return 1.0 - self.ind_acceptance

    @property
    def tpr(self) -> float:
        return self.ood_rejection

    def matrix(self) -> pd.DataFrame:
        """2 x 2 counts: rows true InD / OoD, columns accepted (as InD) / rejected (as OoD)."""
        return pd.DataFrame(
            [[self.ind_accepted, self.ind_rejected], [self.ood_accepted, self.ood_rejected]],
            index=["InD", "OoD"], columns=["accepted", "rejected"],
        )  # fmt: skip


def confusion(conf_ind: Any, conf_ood: Any, threshold: float) -> Confusion:
    """Accepted / rejected counts of InD and OoD confidences at ``threshold`` (NaN = rejected)."""
    ind, ood = _arr(conf_ind), _arr(conf_ood)
    ind_acc = int(np.sum(ind > threshold))
    ood_acc = int(np.sum(ood > threshold))
    return Confusion(float(threshold), ind_acc, int(ind.size - ind_acc), ood_acc,
                     int(ood.size - ood_acc))  # fmt: skip


def operating_point(conf_ind: Any, conf_ood: Any, threshold: float) -> tuple[float, float]:
    """``(FPR, TPR)`` of the rule "reject when confidence <= threshold" (a point on the ROC)."""
    c = confusion(conf_ind, conf_ood, threshold)
    return c.fpr, c.tpr


# ---------------------------------------------------------------------------- galleries
def extreme_indices(conf: Any, k: int, most: bool = True) -> np.ndarray:
    """Indices of the ``k`` most (``most=True``) or least confident samples, most extreme first.

    Stable on ties (lower index first); NaNs are never returned.
    """
    c = _arr(conf)
    valid = np.flatnonzero(~np.isnan(c))
    order = np.argsort(-c[valid] if most else c[valid], kind="stable")
    return valid[order[: max(0, int(k))]]


def histogram_bins(arrays: Sequence[Any], nbins: int = 60) -> tuple[float, float, float]:
    """``(lo, hi, size)`` of the shared bins :func:`ood_core.plots.histogram_figure` draws
    (finite range of all arrays; infinite values are clipped to its edges)."""
    vals = [a[np.isfinite(a)] for a in (_arr(x) for x in arrays)]
    vals = np.concatenate(vals) if vals else np.zeros(0)
    if vals.size == 0:
        lo, hi = 0.0, 1.0
    else:
        lo, hi = float(vals.min()), float(vals.max())
        if not hi > lo:
            lo, hi = lo - 0.5, hi + 0.5
    return lo, hi, (hi - lo) / nbins


def selection_to_indices(selection: Mapping[str, Any] | None, series: Mapping[str, Any],
                         nbins: int = 60) -> dict[str, np.ndarray]:  # fmt: skip
    """Map a Streamlit/Plotly histogram selection back to sample indices per dataset.

    ``series`` is the ``{dataset: confidences}`` mapping the histogram was drawn from (trace
    ``i`` = ``i``-th dataset). Selected bars (``points`` with ``curve_number`` and ``x`` = bin
    centre, or ``point_numbers`` = sample indices) select the samples of that dataset falling in
    the bar's bin; Plotly reports the bars inside a box selection as points too. Only when no
    bar is reported does a box select the samples of every dataset whose (clipped) confidence
    lies in its x-range. Returns ``{dataset: sorted unique indices}`` (empty datasets omitted).
    """
    if not selection:
        return {}
    names = list(series)
    arrays = [_arr(series[n]) for n in names]
    lo, hi, size = histogram_bins(arrays, nbins)
    clipped = [np.clip(np.nan_to_num(a, nan=lo), lo, hi) for a in arrays]
    found: dict[str, set[int]] = {n: set() for n in names}
    n_points = 0
    for point in selection.get("points", []) or []:
        curve = point.get("curve_number")
        if curve is None or not 0 <= int(curve) < len(names):
            continue
        name = names[int(curve)]
        numbers = point.get("point_numbers")
        if numbers:
            found[name].update(int(i) for i in numbers if 0 <= int(i) < arrays[int(curve)].size)
            n_points += 1
            continue
        x = point.get("x")
        if x is None:
            continue
        n_points += 1
        k = min(nbins - 1, max(0, math.floor((float(x) - lo) / size))) if size > 0 else 0
        left = lo + k * size
        c = clipped[int(curve)]
        hit = (c >= left) & (c < left + size) if k < nbins - 1 else (c >= left)
        found[name].update(np.flatnonzero(hit).tolist())
    if n_points == 0:
        for box in selection.get("box", []) or []:
            xs = [float(v) for v in box.get("x", []) if v is not None]
            if len(xs) < 2:
                continue
            x0, x1 = min(xs), max(xs)
            for n, c in zip(names, clipped, strict=True):
                found[n].update(np.flatnonzero((c >= x0) & (c <= x1)).tolist())
    return {n: np.array(sorted(v), dtype=np.int64) for n, v in found.items() if v}


# ---------------------------------------------------------------------------- model
def predict(net: nn.Module, images: torch.Tensor, batch_size: int = 512) -> np.ndarray:
    """Predicted classes ``(N,)`` (argmax of the logits), batched, without gradients."""
    param = next(net.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None else torch.float32
    out = []
    was_training = net.training
    net.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(images), batch_size):
                x = images[start : start + batch_size].to(device=device, dtype=dtype)
                out.append(net(x).argmax(1).cpu())
    finally:
        net.train(was_training)
    return torch.cat(out).numpy() if out else np.zeros(0, dtype=np.int64)


# ---------------------------------------------------------------------------- layers
_POOL_HINTS = ("Pool", "pool")
_BLOCK_TYPES = ("Block", "Sequential", "Stage", "ModuleList")
_BLOCK_NAME = re.compile(r"^(layer|stage|block|blocks|features)[._]?\d*$", re.IGNORECASE)


def _is_block(row: pd.Series) -> bool:
    kind = str(row["type"])
    if "Norm" in kind:
        return False
    return any(h in kind for h in _BLOCK_TYPES) or bool(_BLOCK_NAME.match(str(row.get("name", ""))))


def layer_quick_picks(table: pd.DataFrame) -> dict[str, list[str]]:
    """Quick layer selections from a :meth:`Recorder.layer_table`:

    * ``"logits"``: the last ``Linear`` layer;
    * ``"pooled"``: the last pooling layer (the penultimate features of most classifiers);
    * ``"blocks"``: depth-1 layers whose type name contains Block / Sequential / Stage, or whose
      module name is ``layer<n>`` / ``stage<n>`` / ``block<n>`` (norm layers excluded).

    A pick is an empty list when the network has no such layer.
    """
    rows = table[table["depth"] > 0]
    linear = rows[rows["type"] == "Linear"]
    pools = rows[rows["type"].map(lambda t: any(h in t for h in _POOL_HINTS))]
    depth1 = rows[rows["depth"] == 1]
    blocks = depth1[depth1.apply(_is_block, axis=1)] if len(depth1) else depth1
    return {
        "logits": [str(linear["id"].iloc[-1])] if len(linear) else [],
        "pooled": [str(pools["id"].iloc[-1])] if len(pools) else [],
        "blocks": [str(i) for i in blocks["id"]],
    }


def layer_options(table: pd.DataFrame, rule: str) -> list[str]:
    """Layer ids a score with ``layer_rule`` ``rule`` may use: none for ``"none"``; layers
    holding parameters (their own or their children's, what gradients can be taken of) for
    ``"params"``; every layer but the whole network for ``"any"``."""
    if rule == "none":
        return []
    rows = table[table["depth"] > 0]
    if rule == "params":
        rows = rows[rows["params"] > 0]
    return [str(i) for i in rows["id"]]


def default_layers(selected: Sequence[str], table: pd.DataFrame, rule: str,
                   max_layers: int | None = None) -> list[str]:  # fmt: skip
    """The Layers-page selection filtered for a score: allowed by its rule, at most
    ``max_layers`` (keeping the last ones, the deepest features). If nothing is left, fall back
    to the quick picks (pooled features, else logits) that the rule allows."""
    allowed = layer_options(table, rule)
    if not allowed:
        return []
    keep = [lid for lid in selected if lid in allowed]
    if not keep:
        picks = layer_quick_picks(table)
        keep = [lid for lid in (picks["pooled"] if rule != "params" else []) + picks["logits"]
                if lid in allowed][:1]  # fmt: skip
    if max_layers is not None:
        keep = keep[-max_layers:]
    return keep


# ---------------------------------------------------------------------------- scores
def parse_list_param(text: str) -> list[Any] | None:
    """Parse a list parameter typed by a user: JSON (``[1, 2]``, ``["a", "b"]``), or commas
    (``1, 2`` / ``bits:5, median:2``); numbers become numbers. Empty or ``None`` -> ``None``."""
    text = (text or "").strip()
    if text in ("", "None", "none", "null"):
        return None
    if text.startswith("["):
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"cannot read {text!r} as a JSON list: {exc.msg}") from None
        if not isinstance(value, list):
            raise ValueError(f"{text!r} is not a list")
        return value
    out: list[Any] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        try:
            out.append(int(part))
        except ValueError:
            try:
                out.append(float(part))
            except ValueError:
                out.append(part.strip("'\""))
    return out


def check_score(name: str, params: Mapping[str, Any], layers: Sequence[str],
                n_calibration: int | None = None, allowed_layers: Sequence[str] | None = None
                ) -> list[str]:  # fmt: skip
    """Problems with a score specification, as messages (empty list: fine).

    Builds the score (its own parameter validation), then checks the layers against the score's
    rule (``allowed_layers``: what :func:`layer_options` gives) and that neighbour counts
    (``k``) do not exceed the calibration size.
    """
    from ood_core.scores import get_score_class, make_score

    problems: list[str] = []
    try:
        cls = get_score_class(name)
        make_score(name, **params)
    except (ValueError, TypeError) as exc:
        return [str(exc)]
    if cls.layer_rule != "none":
        if not layers:
            problems.append(f"{name} reads internal activations: choose at least one layer.")
        if cls.max_layers is not None and len(layers) > cls.max_layers:
            problems.append(f"{name} takes at most {cls.max_layers} layer(s); got {len(layers)}.")
        if allowed_layers is not None:
            bad = [lid for lid in layers if lid not in allowed_layers]
            if bad:
                what = "layers holding parameters" if cls.layer_rule == "params" else "known layers"
                problems.append(f"{name} needs {what}; not allowed: {', '.join(bad)}.")
    if n_calibration is not None:
        for key in ("k",):
            k = params.get(key)
            if isinstance(k, int) and k > n_calibration:
                problems.append(f"{name}: {key}={k} neighbours but only {n_calibration} "
                                "calibration samples; lower k or use more calibration data.")  # fmt: skip
    return problems


def heatmap_frame(frame: pd.DataFrame, metric: str, ood: str | None = None) -> pd.DataFrame:
    """Rows of the tidy results ``frame`` for one ``metric`` (and one OoD set, or all of them,
    the heatmap then averaging over OoD sets), restricted to scores that ran on at least two
    different layer sets; empty when there are none."""
    sub = frame[frame["metric"] == metric]
    if ood is not None:
        sub = sub[sub["ood"] == ood]
    n_layers = sub.groupby("score")["layers"].nunique()
    keep = n_layers[n_layers >= 2].index
    return sub[sub["score"].isin(keep)].reset_index(drop=True)


def score_labels(frame: pd.DataFrame) -> pd.Series:
    """Row labels of :func:`ood_core.pipeline.metrics_wide`: ``score`` plus ``' @ layers'``."""
    return frame["score"] + frame["layers"].map(lambda s: f" @ {s}" if s else "")


def interval_columns(frame: pd.DataFrame, digits: int = 3) -> pd.DataFrame:
    """Bootstrap intervals of the tidy results ``frame`` as text columns
    ``'<ood> | <metric> CI'`` = ``'[low, high]'``, one row per score label (index ``score``);
    empty when the frame has no intervals (``n_boot == 0``)."""
    if "ci_low" not in frame or frame["ci_low"].isna().all():
        return pd.DataFrame()
    sub = frame.assign(label=score_labels(frame),
                       col=frame["ood"] + " | " + frame["metric"] + " CI",
                       text=[f"[{lo:.{digits}f}, {hi:.{digits}f}]" if np.isfinite(lo) else ""
                             for lo, hi in zip(frame["ci_low"], frame["ci_high"], strict=True)])  # fmt: skip
    out = sub.pivot_table(index="label", columns="col", values="text", aggfunc="first", sort=False)
    out.columns.name = None
    out.index.name = "score"
    return out
