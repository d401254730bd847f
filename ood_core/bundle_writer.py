"""An export bundle written (the writer beside :mod:`ood_core.bundle`, the reader): a
:class:`~ood_core.runner.RunResult` as metrics.csv, confidences.parquet, config.toml, a
self-contained report.html and run.json (:func:`export`), with the report's figures
(:func:`result_figures`) and its wide metric table (:func:`metrics_wide`).
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

    builders: list[tuple[str, Callable[[], Any]]] = [("Summary", summary)]
    for i, name in enumerate(result.score_names):
        builders.append((f"Confidences: {name}", lambda i=i, name=name: histogram(i, name)))
    for t, c in zip(result.ood_titles, result.confs_oods, strict=True):
        builders.append((f"ROC: InD vs {t}", lambda t=t, c=c: roc(t, c)))
    figs = []
    for title, build in builders:
        if problems is None:
            figs.append((title, build()))
            continue
        try:
            figs.append((title, build()))
        except Exception as exc:  # noqa: BLE001 - one figure must never cost the others
            problems.append(figure_problem(title, exc))
    return figs


def metrics_wide(result: RunResult) -> pd.DataFrame:
    """Wide metric table: a row per score, a column per (OoD set, metric)."""
    wide = result.frame.assign(
        score=result.frame["score"] + result.frame["layers"].map(lambda s: f" @ {s}" if s else "")
    ).pivot_table(index="score", columns=["ood", "metric"], values="value", sort=False)
    wide.columns = [f"{o} | {m}" for o, m in wide.columns]
    return wide.reset_index()


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
        tables = [("Metrics", metrics_wide(result)), ("All values", result.frame)]
        if result.execution or result.environment:
            tables.append(("Computed with", provenance_frame(result)))
        if result.notes:
            tables.insert(0, ("Notes", pd.DataFrame({"note": result.notes})))
        if result.warnings:
            tables.insert(0, ("Warnings", pd.DataFrame({"warning": result.warnings})))
        figures = result_figures(result, problems)
        return html_report("ood-lens report", figures, tables, notes, problems=problems)

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
