"""Pre-flight resource estimates beside each chosen score on the Scores page.

What is shown is :meth:`ood_core.scores.base.BaseScore.resource_estimates`: the very numbers a
fit checks before any forward pass (a neighbour bank, a covariance, per-sample gradients, Gram
matrices...), computed from the network's layer table without running anything. A large
estimate is shown as a caption (``"≈ 3.2 GB for 1,000 calibration samples: ..."``), one beyond
the memory limit as a warning, and a choice the fit would refuse (a pooling that does not apply,
a covariance too large to compute) as an error, all before Run.

The recorder is traced once per (model, input shape) on the same fixed example as the layer
table (:func:`ood_lens_app.loaders.current_layer_choices`) and kept by Streamlit; estimating
itself runs no forward pass.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import streamlit as st
import torch
from torch import nn

from ood_core.budget import fmt_gb, memory_limit
from ood_core.recorder import Recorder
from ood_core.scores import make_score

SHOWN_FROM = 100e6
"""Estimates of at least this many bytes are shown beside a score (smaller ones say nothing)."""


@dataclass(frozen=True)
class ScoreEstimate:
    """The largest pre-flight estimate of one score specification (over its layer groups):
    ``n_bytes`` (None: nothing estimated), what it is and its remedy, the memory ``limit`` it is
    checked against (and where that comes from), the checks' warnings (``notes``) and the
    refusal the fit would raise (``error``)."""

    n_samples: int
    n_bytes: float | None = None
    what: str = ""
    remedy: str = ""
    limit: float = float("inf")
    limit_source: str = ""
    notes: tuple[str, ...] = field(default_factory=tuple)
    error: str | None = None

    @property
    def over_limit(self) -> bool:
        return self.n_bytes is not None and self.n_bytes > self.limit


def estimate_score(
    name: str,
    params: Mapping[str, Any],
    layer_groups: Sequence[Sequence[Any]],
    recorder: Recorder,
    n_samples: int,
) -> ScoreEstimate:
    """The estimate of score ``name`` (with ``params``) fitted on ``n_samples`` calibration
    samples, on each of ``layer_groups`` (one group, or one per layer for a layer sweep)."""
    peak, notes = None, []
    try:
        score = make_score(name, **dict(params))
        for layers in layer_groups or [[]]:
            est = score.resource_estimates(recorder, n_samples, list(layers))
            notes += [n for n in est.notes if n not in notes]
            if est.peak is not None and (peak is None or est.peak.n_bytes > peak.n_bytes):
                peak = est.peak
    except (ValueError, TypeError) as exc:
        return ScoreEstimate(n_samples, notes=tuple(notes), error=str(exc))
    if peak is None:
        return ScoreEstimate(n_samples, notes=tuple(notes))
    limit, source = memory_limit(peak.device)
    return ScoreEstimate(
        n_samples, peak.n_bytes, peak.what, peak.remedy, limit, source, tuple(notes)
    )


def estimate_messages(est: ScoreEstimate) -> list[tuple[str, str]]:
    """``[(kind, text)]`` to show for an estimate, kind ``"caption"``, ``"warning"`` or
    ``"error"`` (nothing for a small estimate)."""
    out: list[tuple[str, str]] = []
    if est.error:
        out.append(("error", f"Run will refuse this choice: {est.error}"))
        return out
    if est.n_bytes is not None and (est.n_bytes >= SHOWN_FROM or est.over_limit):
        text = f"≈ {fmt_gb(est.n_bytes)} for {est.n_samples:,} calibration samples ({est.what})"
        if est.over_limit:
            out.append(
                (
                    "warning",
                    f"{text}: more than the {fmt_gb(est.limit)} available ({est.limit_source}), "
                    f"so Run will refuse it; {est.remedy}.",
                )
            )
        else:
            out.append(("caption", text))
    out += [("warning", note) for note in est.notes]
    return out


# ---------------------------------------------------------------------------- the page's recorder
@st.cache_resource(show_spinner=False, max_entries=8)
def _recorder(repo: str, entry: str, shape: tuple[int, ...], _net: nn.Module) -> Recorder:
    example = torch.rand(1, *shape, generator=torch.Generator().manual_seed(0))
    return Recorder(_net, input_data=example)


def current_recorder() -> tuple[Recorder, int] | None:
    """The current model's Recorder (traced once per model and image shape, as the layer table)
    and the calibration size of the form (every sample when unset); None when unavailable."""
    from ood_lens_app import loaders

    ss = st.session_state
    try:
        calib = loaders.dataset("cal_split")
        net = loaders.load_model(ss["model_repo"], ss["model_entry"])
        rec = _recorder(ss["model_repo"], ss["model_entry"], tuple(calib.sample_shape), net)
    except Exception:  # noqa: BLE001 - the page shows loading errors elsewhere
        return None
    n = ss.get("w.n_cal")
    return rec, min(len(calib), int(n)) if n is not None else len(calib)


def _current_estimate(
    name: str, params: Mapping[str, Any], layers: Sequence[str], sweep: bool
) -> ScoreEstimate | None:
    got = current_recorder()
    if got is None:
        return None
    rec, n = got
    groups = [[lid] for lid in layers] if sweep and len(layers) > 1 else [list(layers)]
    return estimate_score(name, params, groups, rec, n)


def score_messages(
    name: str, params: Mapping[str, Any], layers: Sequence[str], sweep: bool
) -> list[tuple[str, str]]:
    """What the Scores page shows beside score ``name`` (see :func:`estimate_messages`)."""
    est = _current_estimate(name, params, layers, sweep)
    return estimate_messages(est) if est is not None else []


def score_refusals(
    name: str, params: Mapping[str, Any], layers: Sequence[str], sweep: bool
) -> list[str]:
    """What the fit of this choice would refuse before any forward pass (a pooling that does
    not apply, a covariance too large, an estimate over the memory limit), as the problem that
    keeps Run disabled; empty when the fit would start (or no recorder is available)."""
    est = _current_estimate(name, params, layers, sweep)
    if est is None or not (est.error or est.over_limit):
        return []
    return [text for kind, text in estimate_messages(est) if kind != "caption"][:1]


__all__ = [
    "SHOWN_FROM",
    "ScoreEstimate",
    "current_recorder",
    "estimate_messages",
    "estimate_score",
    "score_messages",
    "score_refusals",
]
