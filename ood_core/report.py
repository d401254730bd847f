"""Tables (rich, pandas) and exports (CSV, parquet, TOML config, self-contained HTML report)."""

from __future__ import annotations

import datetime as dt
import html
import io
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import plotly.io as pio
from rich import box
from rich.console import Console
from rich.table import Table

from ood_core.layer_ids import layers_text
from ood_core.metrics import Metric, bootstrap


def score_label(score: Any, layers: Sequence[Any], multiline: bool = True) -> str:
    """``'KNN(k=15)'`` plus its layers: ``'\\n↳ 1-11'`` (or ``' @ 1-11'`` on one line)."""
    if not layers:
        return repr(score)
    return (
        f"{score!r}\n↳ {layers_text(layers)}" if multiline else f"{score!r} @ {layers_text(layers)}"
    )


class SummaryTable(Table):
    """A rich ``Table`` that also prints well with ``print`` / ``str`` (plain text, no colours)."""

    def __str__(self) -> str:
        console = Console(file=io.StringIO(), width=120, color_system=None, record=True)
        console.print(self)
        return console.export_text().rstrip("\n")


def summary_table(
    evals: np.ndarray,
    *,
    scores_and_layers: Sequence[tuple[Any, Sequence[Any]]],
    oods_title: Sequence[str] | None = None,
    metrics: Sequence[Metric],
    baseline: int | None = None,
    show: bool = True,
    digits: int = 3,
) -> SummaryTable:
    """Rich table as in the reference library: a row per score (with a "↳ layers" line), a column
    per OoD set, ``m1 / m2`` cells. The best value of each metric per column is green; the
    ``baseline`` row (index) is underlined and values beating it are bold. Printed if ``show``;
    the returned table prints as plain text with ``print(...)`` too."""
    evals = np.asarray(evals)
    n_scores, n_oods, n_metrics = evals.shape
    titles = list(oods_title) if oods_title is not None else [f"OoD {i + 1}" for i in range(n_oods)]
    table = SummaryTable(
        title=f"Evaluation of {n_scores} scores against {n_oods} OoD sets and {n_metrics} metrics:\n"
        + " / ".join(repr(m) for m in metrics),
        box=box.HEAVY_HEAD,
        show_lines=True,
    )
    table.add_column("Scores\n↳ Recorded layers")
    for j, t in enumerate(titles):
        table.add_column(f"OoD {j + 1}:\n{t}", justify="center")
    best = np.nanmax(evals, axis=0) if n_scores else evals
    for i, (score, layers) in enumerate(scores_and_layers):
        cells = []
        for j in range(n_oods):
            parts = []
            for k in range(n_metrics):
                v = evals[i, j, k]
                text = f"{v:.{digits}f}"
                if baseline is not None and i != baseline and v > evals[baseline, j, k]:
                    text = f"[bold]{text}[/bold]"
                if n_scores > 1 and v == best[j, k]:
                    text = f"[green]{text}[/green]"
                parts.append(text)
            cells.append(" / ".join(parts))
        style = "underline" if baseline is not None and i == baseline else None
        table.add_row(score_label(score, layers), *cells, style=style)
    if show:
        Console().print(table)
    return table


def results_frame(
    evals: np.ndarray,
    *,
    scores_and_layers: Sequence[tuple[Any, Sequence[Any]]],
    oods_title: Sequence[str] | None = None,
    metrics: Sequence[Metric],
    confs_ind: Any = None,
    confs_oods: Sequence[Any] | None = None,
    n_boot: int = 0,
    level: float = 0.95,
    seed: int = 0,
) -> pd.DataFrame:
    """Tidy table: one row per (score, layers, OoD set, metric) with ``value`` and, when
    ``n_boot > 0`` and confidences are given, percentile-bootstrap ``ci_low`` / ``ci_high``."""
    evals = np.asarray(evals)
    titles = (
        list(oods_title)
        if oods_title is not None
        else [f"OoD {j + 1}" for j in range(evals.shape[1])]
    )
    rows = []
    for i, (score, layers) in enumerate(scores_and_layers):
        for j, title in enumerate(titles):
            for k, metric in enumerate(metrics):
                lo = hi = np.nan
                if n_boot > 0 and confs_ind is not None and confs_oods is not None:
                    res = bootstrap(
                        metric,
                        np.asarray(confs_ind)[i],
                        np.asarray(confs_oods[j])[i],
                        n_boot=n_boot,
                        level=level,
                        seed=seed,
                        name=repr(score),
                    )
                    lo, hi = res.low, res.high
                rows.append(
                    {
                        "score": repr(score),
                        "layers": layers_text(layers),
                        "ood": title,
                        "metric": repr(metric),
                        "value": float(evals[i, j, k]),
                        "ci_low": lo,
                        "ci_high": hi,
                    }
                )
    return pd.DataFrame(rows)


def confidences_frame(
    confs_ind: Any,
    confs_oods: Sequence[Any],
    *,
    score_names: Sequence[str],
    oods_title: Sequence[str],
) -> pd.DataFrame:
    """Long table of raw confidences: score, dataset ("InD" or an OoD title), sample, confidence."""
    frames = []
    for dataset, confs in [("InD", confs_ind), *zip(oods_title, confs_oods, strict=True)]:
        arr = np.asarray(confs, dtype=np.float64)
        for i, name in enumerate(score_names):
            frames.append(
                pd.DataFrame(
                    {
                        "score": name,
                        "dataset": dataset,
                        "sample": np.arange(arr.shape[1]),
                        "confidence": arr[i],
                    }
                )
            )
    return pd.concat(frames, ignore_index=True)


REPORT_CSS = (
    "body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1400px;padding:0 1em}"
    ".table-wrap{max-width:100%;overflow-x:auto}"
    "table{border-collapse:collapse;width:100%;table-layout:auto;font-size:13px}"
    "td,th{border:1px solid #ccc;padding:3px 6px;overflow-wrap:break-word;word-break:normal;"
    "hyphens:none}"
    "th{background:#f3f3f3;position:sticky;top:0}"
    "td{text-align:right}td:first-child{text-align:left}"
    ".figure{margin-bottom:1.5em}"
    "nav.toc{columns:2;font-size:14px;margin-bottom:1em}nav.toc a{text-decoration:none}"
    "pre{background:#f6f6f6;padding:.8em;overflow-x:auto;font-size:12px}"
    "@media print{body{max-width:none;margin:0;font-size:11px}nav.toc{display:none}"
    "th{position:static}h2{break-after:avoid}.table-wrap,.figure,pre,tr{break-inside:avoid}"
    ".table-wrap{overflow:visible}table{font-size:10px}}"
)
"""The report's style: tables that wrap at word boundaries (never inside a word), a table of
contents on screen, and a print layout (a browser's "Save as PDF" gives a clean document)."""


def html_report(
    title: str,
    figures: Sequence[tuple[str, go.Figure]],
    tables: Sequence[tuple[str, pd.DataFrame]] = (),
    notes: str = "",
    lead_tables: int = 0,
    problems: list[str] | None = None,
    texts: Sequence[tuple[str, str]] = (),
) -> str:
    """A self-contained HTML page (plotly.js inlined once; no external URLs): works offline.

    Reads like the dashboard: the first ``lead_tables`` tables (e.g. warnings, a headline
    table) first, then the figures, then the other (long) tables, which wrap to the page width
    (a horizontal scroll bar only for what cannot wrap).

    A figure that cannot be drawn never costs the page: its place says so, and a "Figures not
    drawn" list at the top names each figure and why (``problems``: those found by the caller
    while building the figures; the ones found here are appended to it). ``texts``: titled
    preformatted blocks (e.g. the run's configuration) at the end. Every section is listed in a
    table of contents at the top."""
    problems = [] if problems is None else problems
    toc: list[str] = []

    def heading(name: str) -> str:
        toc.append(name)
        return f"<h2 id='s{len(toc)}'>{html.escape(name)}</h2>"

    def table_html(name: str, frame: pd.DataFrame) -> list[str]:
        body = frame.to_html(index=False, float_format=lambda v: f"{v:.4f}", na_rep="")
        return [heading(name), f"<div class='table-wrap'>{body}</div>"]

    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'>",
        "<meta name='viewport' content='width=device-width, initial-scale=1'>",
        f"<title>{html.escape(title)}</title>",
        f"<style>{REPORT_CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f"<p>Generated by ood-lens on {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC. "
        "Confidence: higher = more in-distribution; OoD is the positive class of every ROC metric; "
        "metric values in [0, 1], higher is better.</p>",
    ]
    if notes:
        parts.append(f"<p>{html.escape(notes)}</p>")
    for name, frame in tables[:lead_tables]:
        parts += table_html(name, frame)
    lead_at = len(parts)
    js_included = False
    for k, (name, fig) in enumerate(figures):
        parts.append(heading(name))
        try:
            fig = go.Figure(fig).update_layout(autosize=True, width=None)
            body = pio.to_html(
                fig,
                include_plotlyjs=not js_included,
                full_html=False,
                include_mathjax=False,
                div_id=f"figure-{k}",
                default_width="100%",
                config={"responsive": True, "displaylogo": False},
            )
        except Exception as exc:  # noqa: BLE001 - one figure must never cost the report
            problems.append(figure_problem(name, exc))
            parts.append(f"<p class='figure-failed'>{html.escape(problems[-1])}</p>")
            continue
        js_included = True
        parts.append(f"<div class='figure'>{body}</div>")
    for name, frame in tables[lead_tables:]:
        parts += table_html(name, frame)
    for name, text in texts:
        parts += [heading(name), f"<pre>{html.escape(text)}</pre>"]
    if toc:
        links = "".join(
            f"<li><a href='#s{k}'>{html.escape(n)}</a></li>" for k, n in enumerate(toc, 1)
        )
        parts.insert(
            lead_at - len(tables[:lead_tables]) * 2, f"<nav class='toc'><ol>{links}</ol></nav>"
        )
        lead_at += 1
    if problems:
        items = "".join(f"<li>{html.escape(p)}</li>" for p in problems)
        parts.insert(lead_at, f"<h2>Figures not drawn</h2><ul class='figure-failed'>{items}</ul>")
    parts.append("</body></html>")
    return "\n".join(parts)


def figure_problem(name: str, exc: BaseException) -> str:
    """The one-line message of a figure that could not be drawn: which one, and why."""
    return f"Figure '{name}' could not be drawn ({type(exc).__name__}: {exc})."


def write_bundle(
    out_dir: str | Path,
    *,
    metrics_frame: pd.DataFrame,
    confidences: pd.DataFrame,
    report_html: str | Callable[[], str],
    config_toml: str | None = None,
    run_info: dict[str, Any] | Callable[[], dict[str, Any]] | None = None,
    force: bool = False,
    protect: Sequence[str | Path] = (),
) -> dict[str, Path]:
    """Write ``metrics.csv``, ``confidences.parquet`` (and ``config.toml``), then ``report.html``,
    then ``run.json`` last (``run_info`` plus ``status``, ``warnings`` and each file's size and
    sha256), into a new folder renamed to ``out_dir`` at the end
    (:func:`ood_core.outdir.write_atomic`).

    The numbers come first and never depend on the report: ``report_html`` may be a function,
    called once they are written; if it fails, ``report.html`` says why, the failure is added to
    run.json's ``warnings`` and the bundle is still written. ``run_info`` may be a function too
    (called last, so it can hold what the report found).

    An existing non-empty ``out_dir`` is refused unless ``force`` and it is an earlier ood-lens
    bundle (then replaced once the new folder is complete); links are never written through;
    files in ``protect`` are never touched. Raises :class:`~ood_core.outdir.OutputDirError` (a
    ``ValueError``)."""
    import hashlib
    import io
    import json

    from ood_core.outdir import write_atomic

    names = {
        "metrics": "metrics.csv",
        "confidences": "confidences.parquet",
        "report": "report.html",
    }
    if config_toml is not None:
        names["config"] = "config.toml"
    names["run"] = "run.json"

    def files():
        digests: dict[str, dict[str, Any]] = {}

        def emit(name: str, data: bytes) -> tuple[str, bytes]:
            digests[name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
            return name, data

        yield emit("metrics.csv", metrics_frame.to_csv(index=False).encode("utf-8"))
        buf = io.BytesIO()
        confidences.to_parquet(buf, index=False)
        yield emit("confidences.parquet", buf.getvalue())
        if config_toml is not None:
            yield emit("config.toml", config_toml.encode("utf-8"))
        failed: list[str] = []
        try:
            page = report_html() if callable(report_html) else report_html
        except Exception as exc:  # noqa: BLE001 - the report must never cost the numbers
            failed.append(
                f"report.html could not be drawn ({type(exc).__name__}: {exc}); metrics.csv, "
                "confidences.parquet and config.toml hold every number."
            )
            page = (
                "<!DOCTYPE html><html><head><meta charset='utf-8'><title>ood-lens report</title>"
                f"</head><body><h1>ood-lens report</h1><p>{html.escape(failed[0])}</p>"
                "</body></html>"
            )
        yield emit("report.html", page.encode("utf-8"))
        extra = (run_info() if callable(run_info) else run_info) or {}
        info = {
            "status": "complete",
            **extra,
            "written_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "files": digests,
        }
        if failed:
            info["warnings"] = [*info.get("warnings", []), *failed]
        yield "run.json", (json.dumps(info, indent=2, default=str) + "\n").encode("utf-8")

    out = write_atomic(out_dir, files(), force=force, protect=protect)
    return {kind: out / name for kind, name in names.items()}
