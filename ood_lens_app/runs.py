"""Run, replay and export: a RunConfig through :func:`ood_core.pipeline.run` with the session's
cache and loaded model / data; uploaded configs read back; a result's downloads."""

from __future__ import annotations

import io
import logging
import tempfile
import time
import traceback
from collections.abc import Callable, MutableMapping
from pathlib import Path
from typing import Any

import pandas as pd
from torch import nn

from ood_core import data as data_mod
from ood_core import pipeline
from ood_core.pipeline import RunCache, RunConfig, RunResult
from ood_lens_app.errors import is_expected, run_message

LOG = logging.getLogger("ood_lens.app")


def run_cache(state: MutableMapping[str, Any]) -> RunCache:
    """The session's RunCache (created on first use)."""
    if "run_cache" not in state:
        state["run_cache"] = RunCache()
    return state["run_cache"]


def share_loaded(
    cache: RunCache,
    config: RunConfig,
    load_model: Callable[[str, str], nn.Module],
    load_dataset: Callable[[str, str, str | None], data_mod.ImageDataset],
) -> None:
    """Put the model and the full datasets of ``config``, as the dashboard loaded them (policy
    checked, trusted, cached per process), into ``cache`` so the run loads nothing itself."""
    key = (config.model_repo, config.model_entry)
    if key not in cache.models:
        cache.models[key] = load_model(*key)
    needed = [
        (config.ind_dataset, config.calibration_split, None),
        (config.ind_dataset, config.test_split, None),
    ]
    needed += [(sc.dataset, sc.split, sc.config) for sc in config.scenarios if sc.dataset]
    for source, split, conf in needed:
        full = (source, split, None, 0, conf)
        if full not in cache.datasets:
            cache.datasets[full] = load_dataset(source, split, conf)


def run_summary(result: RunResult, seconds: float, when: str) -> dict[str, Any]:
    """What the sidebar shows of the last run."""
    return {
        "when": when,
        "seconds": seconds,
        "accuracy": result.accuracy,
        "n_scores": len(result.score_names),
        "n_oods": len(result.ood_titles),
    }


def execute_run(config: RunConfig) -> RunResult | None:
    """Run ``config`` with a progress bar; store the result (or the error) in session state."""
    import streamlit as st

    from ood_lens_app import loaders

    ss = st.session_state
    cache = run_cache(ss)
    bar = st.progress(0.0, text="Starting...")

    def progress(stage: str, frac: float) -> None:
        bar.progress(min(1.0, max(0.0, float(frac))), text=stage)

    t0 = time.perf_counter()
    try:
        share_loaded(cache, config, loaders.load_model, loaders.load_dataset)
        result = pipeline.run(config, cache, progress)
    except Exception as exc:  # noqa: BLE001 - the page shows the message, never a traceback
        if not is_expected(exc):
            LOG.error("Run failed:\n%s", traceback.format_exc())
        bar.empty()
        ss["run_error"] = run_message(exc)
        return None
    bar.empty()
    ss["result"] = result
    ss["run_error"] = None
    ss["last_run"] = run_summary(result, time.perf_counter() - t0, time.strftime("%H:%M:%S"))
    return result


# ---------------------------------------------------------------------------- replay
def parse_uploaded_config(data: bytes) -> tuple[RunConfig | None, str | None]:
    """A run config from an uploaded TOML file, or ``(None, message)`` saying what is wrong."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return None, "The file is not UTF-8 text; upload the config.toml that ood-lens exported."
    try:
        config = RunConfig.from_toml(text)
    except ValueError as exc:  # tomllib.TOMLDecodeError is a ValueError too
        return None, f"Invalid run config: {exc}"
    if not config.scores or not config.scenarios:
        return None, "The config lists no scores or no scenarios; nothing to run."
    return config, None


def describe_config(config: RunConfig) -> str:
    """One line: model, data, how many scores and scenarios."""
    return (
        f"{config.model_entry} from {config.model_repo} · {config.ind_dataset} · "
        f"{len(config.scores)} score(s) × {len(config.scenarios)} scenario(s)"
    )


# ---------------------------------------------------------------------------- exports
def export_bundle(result: RunResult) -> dict[str, bytes]:
    """metrics.csv, confidences.parquet, report.html, config.toml of ``result``
    (:func:`ood_core.pipeline.export` into a temporary folder); only the report when the config
    cannot be written. No Streamlit calls: download buttons run it outside the script."""
    try:
        with tempfile.TemporaryDirectory(prefix="ood-lens-") as tmp:
            paths = pipeline.export(result, tmp)
            return {name: Path(p).read_bytes() for name, p in paths.items()}
    except (TypeError, ValueError):  # e.g. a None parameter TOML cannot hold: report only
        from ood_core.report import html_report

        page = html_report(
            "ood-lens report",
            pipeline.result_figures(result),
            [("Metrics", pipeline.metrics_wide(result)), ("All values", result.frame)],
        )
        return {"report": page.encode("utf-8")}


def config_toml(result: RunResult) -> tuple[str | None, str | None]:
    """The run config as TOML, or None and why it cannot be written."""
    try:
        return result.config.to_toml(), None
    except (TypeError, ValueError) as exc:
        return None, f"The run config cannot be written as TOML ({exc}); a parameter set to None?"


def parquet_bytes(frame: pd.DataFrame) -> bytes:
    """``frame`` as parquet file bytes."""
    buf = io.BytesIO()
    frame.to_parquet(buf, index=False)
    return buf.getvalue()
