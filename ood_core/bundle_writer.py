"""An export bundle written (the writer beside :mod:`ood_core.bundle`, the reader): a
:class:`~ood_core.runner.RunResult` as metrics.csv, confidences.parquet, config.toml, a
self-contained report.html and run.json (:func:`export`), with the report's figures
(:func:`result_figures`), its metric tables (:func:`metric_tables`, one per metric) and the
operating points a review reads (:mod:`ood_core.operating_points`).
"""

from __future__ import annotations

import hashlib
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from ood_core import data as data_mod
from ood_core.metrics import plain_metric_name
from ood_core.operating_points import operating_point_table
from ood_core.runner import RunResult


def result_figures(result: RunResult, problems: list[str] | None = None) -> list[tuple[str, Any]]:
    """The report's figures: summary grid, one histogram per score, one ROC per scenario.

    ``problems``: when given, a figure that fails is left out and its failure (which figure,
    why: :func:`ood_core.report.figure_problem`) appended there, so the other figures and the
    numbers are kept; without it the error propagates."""
    from ood_core import plots
    from ood_core.report import figure_problem

    def summary() -> Any:
        return plots.summary_plot(
            result.confs_ind,
            result.confs_oods,
            scores_and_layers=result.scores_and_layers,
            oods_title=result.ood_titles,
        )

    def histogram(i: int, name: str) -> Any:
        series = {"InD": result.confs_ind[i]} | {
            t: c[i] for t, c in zip(result.ood_titles, result.confs_oods, strict=True)
        }
        return plots.histogram_figure(series, title=name)

    def roc(t: str, c: Any) -> Any:
        curves = {n: (result.confs_ind[i], c[i]) for i, n in enumerate(result.score_names)}
        return plots.roc_figure(curves, title=f"InD vs {t}")

    def passing(i: int, name: str) -> Any:
        from ood_core.metrics import threshold_for_acceptance
        from ood_core.operating_points import undetected

        t = threshold_for_acceptance(result.confs_ind[i], REPORT_ACCEPTANCE)
        images, captions = [], []
        for title, confs, imgs in zip(
            result.ood_titles, result.confs_oods, result.ood_images, strict=True
        ):
            for k in undetected(confs[i], t, k=4):
                images.append(imgs[int(k)].float().cpu().numpy())
                captions.append(f"{title} · {float(confs[i][int(k)]):.3g}")
        if not images:
            return None
        return plots.image_grid_figure(np.stack(images), captions, title=name)

    builders: list[tuple[str, Callable[[], Any]]] = [("Summary", summary)]
    for i, name in enumerate(result.score_names):
        builders.append((f"Confidences: {name}", lambda i=i, name=name: histogram(i, name)))
    for t, c in zip(result.ood_titles, result.confs_oods, strict=True):
        builders.append((f"ROC: InD vs {t}", lambda t=t, c=c: roc(t, c)))
    if len(getattr(result, "ood_images", ())) == len(result.ood_titles):
        for i, name in enumerate(result.score_names):
            builders.append(
                (
                    f"Passing undetected at {REPORT_ACCEPTANCE:.0%} InD acceptance: {name} "
                    "(the most confident OoD images per set, with their confidence)",
                    lambda i=i, name=name: passing(i, name),
                )
            )
    figs = []
    for title, build in builders:
        if problems is None:
            fig = build()
            if fig is not None:
                figs.append((title, fig))
            continue
        try:
            fig = build()
        except Exception as exc:  # noqa: BLE001 - one figure must never cost the others
            problems.append(figure_problem(title, exc))
            continue
        if fig is not None:  # None: nothing to draw (no OoD image passes)
            figs.append((title, fig))
    return figs


def metrics_wide(result: RunResult) -> pd.DataFrame:
    """Wide metric table: a row per score, a column per (OoD set, metric)."""
    wide = result.frame.assign(
        score=result.frame["score"] + result.frame["layers"].map(lambda s: f" @ {s}" if s else "")
    ).pivot_table(index="score", columns=["ood", "metric"], values="value", sort=False)
    wide.columns = [f"{o} | {m}" for o, m in wide.columns]
    return wide.reset_index()


REPORT_ACCEPTANCE = 0.95
"""The InD acceptance of the report's operating points and undetected images."""


def _percent_text(table: pd.DataFrame) -> pd.DataFrame:
    """Percent columns written with one decimal (the report's tables print floats with four)."""
    cols = [c for c in table.columns if c.endswith("(%)") and table[c].dtype.kind == "f"]
    return table.assign(**{c: table[c].map(lambda v: f"{v:.1f}") for c in cols})


def metric_tables(result: RunResult) -> list[tuple[str, pd.DataFrame]]:
    """One table per metric: a row per score, a column per OoD set (narrow enough for a page;
    the wide all-metric table of earlier reports had 1 + metrics x sets columns)."""
    frame = result.frame.assign(
        score=result.frame["score"] + result.frame["layers"].map(lambda s: f" @ {s}" if s else "")
    )
    out = []
    metrics = list(dict.fromkeys(frame["metric"]))
    metrics.sort(key=lambda m: m != "AUC()")  # the headline metric first (a stable sort)
    for metric in metrics:
        part = frame[frame["metric"] == metric]
        wide = part.pivot_table(index="score", columns="ood", values="value", sort=False)
        plain = plain_metric_name(metric)
        title = metric if plain == metric else f"{plain} ({metric})"
        out.append((f"{title} per OoD set", wide.reset_index().rename_axis(columns=None)))
    return out


def provenance_frame(result: RunResult) -> pd.DataFrame:
    """Where and how ``result`` was computed, one ``setting, value`` row each: its execution
    record (executor, workers, address, device, AMP, host, run id) then its environment
    (versions, platform, device name)."""
    rows = [(k, "" if v is None else str(v)) for k, v in result.execution.items()]
    rows += [(k, str(v)) for k, v in result.environment.items()]
    return pd.DataFrame(rows, columns=["setting", "value"])


def export(
    result: RunResult,
    out_dir: Any,
    *,
    force: bool = False,
    config_path: str | Path | None = None,
) -> dict[str, Path]:
    """Write metrics.csv, confidences.parquet, config.toml, then a self-contained report.html
    and, last, run.json (status, versions, config sha256, timings, warnings, notes, files, and
    where and how the run was computed: ``execution``, ``environment``) into ``out_dir``.

    The numbers never depend on the figures: the report is drawn after they are written, a
    figure that fails is named in the report ("Figures not drawn": which figure and why) and in
    run.json's ``warnings``, and the bundle is still complete. The files go to a new sibling
    folder renamed into place at the end: an existing non-empty ``out_dir`` is refused unless
    ``force`` and it is an earlier ood-lens bundle (:class:`~ood_core.outdir.OutputDirError`),
    links are never written through, and ``config_path`` (the input config, hashed into
    run.json) is never touched. See :func:`ood_core.report.write_bundle`."""
    from ood_core import __version__
    from ood_core.report import html_report, write_bundle

    t0 = time.perf_counter()
    cfg = result.config
    problems: list[str] = []  # figures that could not be drawn

    def report_page() -> str:
        notes = (
            f"Model {cfg.model_entry} from {cfg.model_repo}; InD {cfg.ind_dataset} "
            f"({len(result.ind)} test samples, accuracy {result.accuracy:.2%}); "
            f"run time {result.seconds:.1f} s."
        )
        if result.execution:
            ex = result.execution
            notes += (
                f" Computed by the {ex.get('executor')} executor on {ex.get('device')}"
                + (f" with {ex['amp']} autocast" if ex.get("amp") else "")
                + (f" on host {ex['host']}" if ex.get("host") else "")
                + "."
            )
        lead: list[tuple[str, pd.DataFrame]] = []
        if result.warnings:
            lead.append(("Warnings", pd.DataFrame({"warning": result.warnings})))
        if result.notes:
            lead.append(("Notes", pd.DataFrame({"note": result.notes})))
        lead.append(
            (
                f"Operating points at {REPORT_ACCEPTANCE:.0%} InD acceptance (threshold set on "
                "the InD test samples; rejected = confidence <= threshold; Wilson intervals)",
                _percent_text(
                    operating_point_table(
                        result.score_names,
                        result.confs_ind,
                        result.confs_oods,
                        result.ood_titles,
                        REPORT_ACCEPTANCE,
                    )
                ),
            )
        )
        tables = [*lead, *metric_tables(result), ("All values", result.frame)]
        if result.execution or result.environment:
            tables.append(("Computed with", provenance_frame(result)))
        figures = result_figures(result, problems)
        sizes = (
            f"Calibration {cfg.n_calibration} samples, InD test {len(result.ind)}, seed "
            f"{cfg.seed}; run id {result.execution.get('run_id', 'not recorded')}."
        )
        return html_report(
            "ood-lens report",
            figures,
            tables,
            notes + " " + sizes,
            lead_tables=len(lead) + 1,  # and the headline metric's table
            problems=problems,
            texts=[("Configuration (replay with ood-lens run)", config_toml)],
        )

    config_toml = cfg.to_toml()
    source = Path(config_path).read_bytes() if config_path is not None else config_toml.encode()

    def run_info() -> dict[str, Any]:  # called last, once the report is drawn
        info = {
            "ood_lens_version": __version__,
            "torch_version": torch.__version__,
            "python_version": platform.python_version(),
            "config_source": str(config_path) if config_path is not None else None,
            "config_sha256": hashlib.sha256(source).hexdigest(),
            "timings": {
                "run_seconds": round(result.seconds, 3),
                "export_seconds": round(time.perf_counter() - t0, 3),
                "operations": result.timings.to_dict("records"),
            },
            "accuracy": result.accuracy,
            "ind_predictions": np.asarray(result.ind_predictions).astype(int).tolist(),
            "images_sha256": data_mod.images_sha256([result.ind.images, *result.ood_images]),
            "n_calibration": cfg.n_calibration,
            "n_test": len(result.ind),
            "warnings": [*result.warnings, *problems],
            "notes": result.notes,
        }
        if result.execution:  # where and how it was computed
            info["execution"] = result.execution
        if result.environment:
            info["environment"] = result.environment
        return info

    protect = [config_path] if config_path is not None else []
    return write_bundle(
        out_dir,
        metrics_frame=result.frame,
        confidences=result.confidences_frame(),
        report_html=report_page,
        config_toml=config_toml,
        run_info=run_info,
        force=force,
        protect=protect,
    )
