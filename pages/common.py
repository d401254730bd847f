"""Shared state, caching, widgets and run logic of the dashboard pages (UI only).

Every page calls :func:`init_state` first, so any page works when it is opened first (or run
alone by ``AppTest``). Computation goes through :mod:`ood_core`; this module only turns session
state into ``ood_core`` calls and their results into widgets.

Session state
-------------
* canonical choices: ``model_repo``, ``model_entry``, ``ind_source``, ``ind_config``,
  ``cal_split``, ``test_split``, ``layers`` (list of ``"d-i"`` ids), ``result`` (the last
  :class:`~ood_core.pipeline.RunResult`), ``run_cache`` (one :class:`RunCache` per session, so a
  parameter change recomputes only that score);
* widget values live under keys starting with ``w.``; :func:`init_state` re-assigns them on
  every rerun so they survive page switches (Streamlit drops the state of widgets that are not
  rendered).
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import os
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import streamlit as st
import torch

from ood_core import data as data_mod
from ood_core import explore, hub, pipeline
from ood_core.data import DataUnavailableError
from ood_core.hub import HubUnavailableError
from ood_core.metrics import DEFAULT_METRICS, parse_metric
from ood_core.perturbations import PERTURBATIONS
from ood_core.pipeline import RunCache, RunConfig, RunResult, ScenarioSpec, ScoreSpec
from ood_core.policy import SourcePolicy
from ood_core.scores import get_score_class

LOG = logging.getLogger("ood_lens.app")

PAGE_MODEL = "pages/1_model_data.py"
PAGE_LAYERS = "pages/2_layers.py"
PAGE_SCORES = "pages/3_scores.py"
PAGE_RESULTS = "pages/4_results.py"

SEED = 0
def _default_n() -> int:
    try:
        return max(1, int(os.environ.get("OOD_LENS_DEFAULT_N", "") or 1000))
    except ValueError:
        return 1000


DEFAULT_N = _default_n()
DEFAULT_LAYERS = ["1-11", "1-12"]
DEFAULT_SCORES = ["Softmax", "GradNorm", "Gram", "KNN"]
DEFAULT_SCORE_LAYERS = {"GradNorm": ["1-12"], "Gram": ["1-5", "1-11", "1-12"], "KNN": ["1-11"]}
DEFAULT_SCORE_PARAMS = {"KNN": {"k": 15}}
DEFAULT_PERTURBATIONS = ["vertical_flip", "darker", "uniform_noise"]
DEFAULT_PERTURBATION_PARAMS = {"darker": {"factor": 0.5}}
DEFAULT_OOD_DATASETS = ["mnist"]
METRIC_CHOICES = [repr(parse_metric(m)) for m in (
    "AUC(max_fpr=0.2)", "TPR(max_fpr=0.05)", "AUC()", "TNR(min_tpr=0.95)", "AUC(max_fpr=0.05)",
    "TPR(max_fpr=0.01)", "TNR(min_tpr=0.99)", "AUC(kind='convex_hull')", "MCC()",
    "AUPR(positive='ood')", "AUPR(positive='ind')", "DetectionError()",
)]  # fmt: skip
MODEL_SOURCES = ["Bundled", "GitHub (torch.hub)", "Local hub directory"]
DATA_SOURCES = ["Bundled", "Local file", "Hugging Face"]
EXPECTED_ERRORS = (HubUnavailableError, DataUnavailableError, ValueError)


# ---------------------------------------------------------------------------- state
def init_state() -> None:
    """Defaults for every key the pages read (idempotent), and widget-state persistence."""
    ss = st.session_state
    defaults: dict[str, Any] = {
        "model_repo": "bundled", "model_entry": "tiniest", "ind_source": "fashion_mnist",
        "ind_config": None, "cal_split": "calibration", "test_split": "test",
        "layers": list(DEFAULT_LAYERS), "layers_version": 0, "result": None,
        "model_error": None, "data_error": None, "run_error": None, "last_run": None,
        "score_layers_src": {}, "w.n_cal": DEFAULT_N, "w.n_test": DEFAULT_N,
        "w.model_src": MODEL_SOURCES[0], "w.bundled_entry": "tiniest", "w.gh_repo": "",
        "w.gh_entry": "", "w.local_dir": "", "w.local_entry": "", "w.data_src": DATA_SOURCES[0],
        "w.bundled_data": "fashion_mnist", "w.data_path": "", "w.hf_id": "", "w.hf_config": "",
        "w.hf_cal_split": "train", "w.hf_test_split": "test",
        "w.scores": list(DEFAULT_SCORES), "w.perts": list(DEFAULT_PERTURBATIONS),
        "w.ood_bundled": list(DEFAULT_OOD_DATASETS), "w.ood_extra": "", "w.ood_extra_config": "",
        "w.ood_extra_split": "test", "w.metrics": [repr(m) for m in DEFAULT_METRICS],
        "w.metric_custom": "", "w.n_boot": 0, "w.baseline": "Softmax",
    }  # fmt: skip
    if "initialised" not in ss:
        for name, layers in DEFAULT_SCORE_LAYERS.items():
            defaults[f"w.L.{name}"] = list(layers)
            defaults["score_layers_src"][name] = tuple(DEFAULT_LAYERS)
        for name, params in DEFAULT_SCORE_PARAMS.items():
            for p, v in params.items():
                defaults[f"w.p.{name}.{p}"] = v
        for kind, params in DEFAULT_PERTURBATION_PARAMS.items():
            for p, v in params.items():
                defaults[f"w.p.pert:{kind}.{p}"] = v
        ss["initialised"] = True
    for key, value in defaults.items():
        if key not in ss:
            ss[key] = value
    for key in list(ss.keys()):  # keep widget values across pages
        if isinstance(key, str) and key.startswith("w."):
            ss[key] = ss[key]


def run_cache() -> RunCache:
    """The session's RunCache, its model/dataset slots shared with the process-wide caches."""
    ss = st.session_state
    if "run_cache" not in ss:
        ss["run_cache"] = RunCache()
    return ss["run_cache"]


# ---------------------------------------------------------------------------- cached loading
def source_policy() -> SourcePolicy:
    """The sources this server allows: all on loopback; in network mode (``server.address`` not
    loopback) only those enabled by ``OOD_LENS_ALLOW``, local paths under ``OOD_LENS_DATA_ROOTS``."""
    return SourcePolicy.from_env(st.get_option("server.address"))


def repo_trusted(repo: str) -> bool:
    """Bundled, or trusted with the page's checkbox earlier in this session."""
    return hub.is_bundled(repo) or repo in st.session_state.get("trusted_repos", ())


def load_model(repo: str, entry: str, trust_repo: bool | None = None) -> torch.nn.Module:
    """Checked against :func:`source_policy`, then cached per (repo, entry, trust); ``trust_repo``
    None means :func:`repo_trusted`."""
    source_policy().check_model_repo(repo)
    return _load_model(repo, entry, repo_trusted(repo) if trust_repo is None else trust_repo)


@st.cache_resource(show_spinner="Loading model...", max_entries=8)
def _load_model(repo: str, entry: str, trust_repo: bool) -> torch.nn.Module:
    return hub.load_model(repo, entry, trust_repo=trust_repo)


def load_dataset(source: str, split: str, config: str | None = None) -> data_mod.ImageDataset:
    """Checked against :func:`source_policy` (local paths confined to its data roots), cached."""
    policy = source_policy()
    policy.check_data_source(source)
    return _load_dataset(source, split, config, policy.load_roots())


@st.cache_resource(show_spinner="Loading data...", max_entries=12)
def _load_dataset(source: str, split: str, config: str | None,
                  roots: tuple[str, ...] | None) -> data_mod.ImageDataset:  # fmt: skip
    return data_mod.load(source, split, config, roots=roots)


@st.cache_data(show_spinner=False, ttl=60)
def bundled_entries() -> list[dict[str, Any]]:
    """Entry points of the bundled hub with their docstring line and recorded accuracy."""
    try:
        entries = hub.list_entries("bundled")
    except HubUnavailableError:  # fall back on the training records
        entries = []
    try:
        records = hub.bundled_records()
    except (OSError, ValueError):
        records = {}
    if not entries:
        entries = [{"name": n, "doc": ""} for n in (records or {"tiniest": {}, "resnet_small": {}})]
    for e in entries:
        e["accuracy"] = records.get(e["name"], {}).get("test_accuracy")
    return entries


def model_for_run() -> torch.nn.Module:
    ss = st.session_state
    return load_model(ss["model_repo"], ss["model_entry"])


def dataset(split_key: str) -> data_mod.ImageDataset:
    """The full InD split ``split_key`` ("cal_split" or "test_split")."""
    ss = st.session_state
    return load_dataset(ss["ind_source"], ss[split_key], ss["ind_config"])


@st.cache_data(show_spinner="Reading the layer table...", max_entries=16)
def layer_table(repo: str, entry: str, shape: tuple[int, ...]) -> pd.DataFrame:
    from ood_core.engine import Engine

    net = load_model(repo, entry)
    return Engine.for_net(net, torch.zeros(1, *shape)).recorder.layer_table()


def current_layer_table() -> pd.DataFrame:
    ss = st.session_state
    calib = dataset("cal_split")
    return layer_table(ss["model_repo"], ss["model_entry"], tuple(calib.sample_shape))


@st.cache_data(show_spinner="Computing the model's accuracy...", max_entries=16)
def test_predictions(repo: str, entry: str, source: str, split: str, config: str | None,
                     n: int, seed: int) -> np.ndarray:  # fmt: skip
    net = load_model(repo, entry)
    test = load_dataset(source, split, config).subset(n, seed)
    return explore.predict(net, test.images)


# ---------------------------------------------------------------------------- page helpers
def guard(body: Callable[[], None]) -> None:
    """Run a page body; expected errors become ``st.error`` with their message, anything else a
    short ``st.error`` (the traceback goes to the server log, never to the page)."""
    try:
        body()
    except EXPECTED_ERRORS as exc:
        st.error(f"{exc}", icon=":material/error:")
    except Exception as exc:  # noqa: BLE001 - pages must never show raw tracebacks
        LOG.error("Unexpected error in a page:\n%s", traceback.format_exc())
        st.error(
            f"Something went wrong: {type(exc).__name__}: {exc}. Check your choices on the "
            "previous pages (model, data, layers, score parameters) and try again; the details "
            "are in the server log.", icon=":material/error:",
        )  # fmt: skip


def header(title: str, help_text: str) -> None:
    st.title(title)
    st.caption(help_text)


def go_to(page: str, label: str) -> None:
    """Switch page (when running under st.navigation) or offer a link."""
    try:
        st.switch_page(page)
    except st.errors.StreamlitAPIException:
        st.info(f"Open **{label}** from the sidebar.")


def next_link(page: str, label: str) -> None:
    """A link to the next page (nothing when the page runs outside st.navigation)."""
    with contextlib.suppress(st.errors.StreamlitAPIException):
        st.page_link(page, label=label, icon=":material/arrow_forward:")


def fmt_layers(layers: list[str]) -> str:
    return ", ".join(layers) if layers else "none"


def sidebar() -> None:
    """Current model / data / layers / run status, and short help (shown on every page)."""
    ss = st.session_state
    with st.sidebar:
        st.markdown("### Current setup")
        repo = ss["model_repo"]
        st.markdown(f"**Model:** `{ss['model_entry']}` ({'bundled hub' if repo == 'bundled' else repo})")
        title = data_mod.BUNDLED.get(ss["ind_source"], {}).get("title", ss["ind_source"])
        st.markdown(f"**InD data:** {title}  \n{ss['w.n_cal']} calibration / {ss['w.n_test']} test")
        st.markdown(f"**Layers:** {fmt_layers(ss['layers'])}")
        last = ss.get("last_run")
        if last:
            st.markdown(f"**Last run:** {last['when']} · {last['seconds']:.1f} s  \n"
                        f"accuracy {last['accuracy']:.1%} · {last['n_scores']} scores × "
                        f"{last['n_oods']} OoD sets")  # fmt: skip
        else:
            st.markdown("**Last run:** none yet")
        with st.expander("Help", icon=":material/help:"):
            st.markdown(
                "1. **Model & data**: classifier and in-distribution (InD) data.\n"
                "2. **Layers**: click rows to pick the layers scores read.\n"
                "3. **Scores & scenarios**: detectors, their parameters, OoD sets; **Run**.\n"
                "4. **Results**: histograms, ROC, metrics, thresholds, images, export.\n\n"
                "Confidence: higher = more in-distribution. A sample is flagged OoD when its "
                "confidence ≤ threshold; OoD is the positive class of every metric."
            )


# ---------------------------------------------------------------------------- parameters
def _param_key(owner: str, name: str) -> str:
    return f"w.p.{owner}.{name}"


def _inclusive(desc: dict[str, Any], side: str) -> bool:
    rng = str(desc.get("range", ""))
    if side == "low":
        return rng.startswith("[") or rng.startswith(">=")
    return rng.endswith("]") or rng.startswith("<=")


def _is_text_float(desc: dict[str, Any]) -> bool:
    d = desc.get("default")
    return desc["type"] == "float" and isinstance(d, float) and not math.isfinite(d)


def _fallback_number(desc: dict[str, Any]) -> float | int:
    low, high = desc.get("low"), desc.get("high")
    if low is not None:
        v = low if _inclusive(desc, "low") else (low + 1 if desc["type"] == "int" else low + 1.0)
        return v if high is None else min(v, high)
    return 1


def _initial(desc: dict[str, Any]) -> Any:
    d = desc.get("default")
    t = desc["type"]
    if t == "list":
        return "" if d is None else ", ".join(str(v) for v in d)
    if _is_text_float(desc):
        return str(d)
    if t == "float":
        return float(_fallback_number(desc) if d is None else d)
    if t == "int":
        return int(_fallback_number(desc) if d is None else d)
    if t == "choice" and d is None:
        return desc["choices"][0]
    if t == "str" and d is None:
        return ""
    return d


def param_widgets(owner: str, descs: list[dict[str, Any]]) -> None:
    """Widgets generated from ``describe_params()``-style dicts (values kept in session state)."""
    ss = st.session_state
    cols = st.columns(2)
    for i, desc in enumerate(descs):
        key = _param_key(owner, desc["name"])
        ss.setdefault(key, _initial(desc))
        none_key = f"{key}.none"
        help_text = f"{desc.get('help', '')} Allowed: {desc.get('range', '')}.".strip()
        with cols[i % 2]:
            disabled = False
            if desc.get("nullable"):
                ss.setdefault(none_key, desc.get("default") is None)
                st.checkbox(f"{desc['name']}: None", key=none_key,
                            help=f"Use None for {desc['name']} ({desc.get('help', '')})")  # fmt: skip
                disabled = bool(ss[none_key])
            label = desc["name"]
            t = desc["type"]
            if t == "bool":
                st.checkbox(label, key=key, help=help_text, disabled=disabled)
            elif t == "choice":
                opts = list(desc["choices"])
                if ss[key] not in opts:
                    ss[key] = opts[0]
                st.selectbox(label, opts, key=key, help=help_text, disabled=disabled)
            elif t in ("str", "list") or _is_text_float(desc):
                st.text_input(label, key=key, help=help_text + (" Comma-separated or JSON list."
                              if t == "list" else ""), disabled=disabled)  # fmt: skip
            elif t == "int":
                lo = int(desc["low"]) if desc.get("low") is not None else None
                hi = int(desc["high"]) if desc.get("high") is not None else None
                if lo is not None and not _inclusive(desc, "low"):
                    lo += 1
                if hi is not None and not _inclusive(desc, "high"):
                    hi -= 1
                value = int(ss[key]) if isinstance(ss[key], int | float) else _initial(desc)
                ss[key] = min(max(value, lo if lo is not None else value), hi if hi is not None else value)
                st.number_input(label, min_value=lo, max_value=hi, step=1, key=key, help=help_text,
                                disabled=disabled)  # fmt: skip
            else:  # float
                lo = float(desc["low"]) if desc.get("low") is not None and _inclusive(desc, "low") else None
                hi = float(desc["high"]) if desc.get("high") is not None and _inclusive(desc, "high") else None
                value = float(ss[key]) if isinstance(ss[key], int | float) else float(_initial(desc))
                if lo is not None:
                    value = max(value, lo)
                if hi is not None:
                    value = min(value, hi)
                ss[key] = value
                scale = abs(value) if value else 1.0
                step = 10.0 ** math.floor(math.log10(scale)) / 10 if scale > 0 else 0.01
                st.number_input(label, min_value=lo, max_value=hi, step=step, format="%g", key=key,
                                help=help_text, disabled=disabled)  # fmt: skip


def param_values(owner: str, descs: list[dict[str, Any]], keep_defaults: bool = False
                 ) -> tuple[dict[str, Any], list[str]]:  # fmt: skip
    """Parameter values from session state: only those differing from their default (and the
    required ones) unless ``keep_defaults``; plus parse problems as messages."""
    ss = st.session_state
    out: dict[str, Any] = {}
    problems: list[str] = []
    for desc in descs:
        key = _param_key(owner, desc["name"])
        if key not in ss and f"{key}.none" not in ss:
            if desc.get("required"):
                out[desc["name"]] = desc["default"]
            continue
        if desc.get("nullable") and ss.get(f"{key}.none", desc.get("default") is None):
            value: Any = None
        else:
            raw = ss.get(key, _initial(desc))
            try:
                if desc["type"] == "list":
                    value = explore.parse_list_param(str(raw))
                elif _is_text_float(desc):
                    value = float(str(raw).strip())
                else:
                    value = raw
            except ValueError as exc:
                problems.append(f"{owner}: parameter '{desc['name']}': {exc}")
                continue
        default = desc.get("default")
        same = (tuple(value) == tuple(default) if isinstance(value, list | tuple)
                and isinstance(default, list | tuple) else value == default)  # fmt: skip
        if keep_defaults or desc.get("required") or not same:
            out[desc["name"]] = value
    return out, problems


# ---------------------------------------------------------------------------- scores & layers
def score_layer_key(name: str) -> str:
    return f"w.L.{name}"


def sync_score_layers(name: str, table: pd.DataFrame) -> list[str]:
    """Keep a score's layer choice in step with the Layers page: when the global selection
    changed since the score's layers were set (or they are invalid for this model), reset them
    to the selection filtered by the score's rule. Returns the allowed options."""
    ss = st.session_state
    cls = get_score_class(name)
    options = explore.layer_options(table, cls.layer_rule)
    key = score_layer_key(name)
    src = ss["score_layers_src"]
    current = tuple(ss["layers"])
    stored = ss.get(key)
    invalid = stored is None or any(lid not in options for lid in stored)
    if src.get(name) != current or invalid:
        ss[key] = explore.default_layers(ss["layers"], table, cls.layer_rule, cls.max_layers)
        src[name] = current
    return options


def score_specs(table: pd.DataFrame, n_cal: int | None) -> tuple[list[ScoreSpec], dict[str, list[str]]]:
    """ScoreSpecs of the chosen scores (a layer sweep gives one spec per layer) and the problems
    found per score name."""
    ss = st.session_state
    specs: list[ScoreSpec] = []
    problems: dict[str, list[str]] = {}
    for name in ss["w.scores"]:
        cls = get_score_class(name)
        options = sync_score_layers(name, table)
        params, probs = param_values(name, cls.describe_params())
        layers = list(ss.get(score_layer_key(name), [])) if cls.layer_rule != "none" else []
        sweep = bool(ss.get(f"w.sweep.{name}", False)) and len(layers) > 1
        groups = [[lid] for lid in layers] if sweep else [layers]
        for group in groups:
            probs += [p for p in explore.check_score(name, params, group, n_cal, options or None)
                      if p not in probs]  # fmt: skip
            specs.append(ScoreSpec(name, dict(params), list(group)))
        if probs:
            problems[name] = probs
    return specs, problems


def scenario_specs() -> tuple[list[ScenarioSpec], list[str]]:
    ss = st.session_state
    specs: list[ScenarioSpec] = []
    problems: list[str] = []
    for kind in ss["w.perts"]:
        cls = PERTURBATIONS[kind]
        descs = [p.as_dict() for p in cls.params]
        params, probs = param_values(f"pert:{kind}", descs)
        problems += probs
        try:
            cls(**params)
        except ValueError as exc:
            problems.append(str(exc))
            continue
        specs.append(ScenarioSpec(kind=kind, params=params))
    for name in ss["w.ood_bundled"]:
        specs.append(ScenarioSpec(dataset=name, split="test"))
    extra = ss["w.ood_extra"].strip()
    if extra:
        specs.append(ScenarioSpec(dataset=extra, split=ss["w.ood_extra_split"].strip() or "test",
                                  config=ss["w.ood_extra_config"].strip() or None))  # fmt: skip
    return specs, problems


def metric_list() -> tuple[list[str], list[str]]:
    ss = st.session_state
    metrics = list(ss["w.metrics"])
    problems = []
    custom = ss["w.metric_custom"].strip()
    if custom:
        for text in (t.strip() for t in custom.split(";")):
            if not text:
                continue
            try:
                metrics.append(repr(parse_metric(text)))
            except ValueError as exc:
                problems.append(str(exc))
    return list(dict.fromkeys(metrics)), problems


def build_config() -> tuple[RunConfig | None, dict[str, list[str]]]:
    """A RunConfig from the session state, or None and the problems (per score / 'scenarios' /
    'metrics' / 'run')."""
    ss = st.session_state
    table = current_layer_table()
    n_cal, n_test = int(ss["w.n_cal"]), int(ss["w.n_test"])
    scores, problems = score_specs(table, n_cal)
    scenarios, sc_problems = scenario_specs()
    metrics, m_problems = metric_list()
    if sc_problems:
        problems["scenarios"] = sc_problems
    if m_problems:
        problems["metrics"] = m_problems
    if not scores:
        problems.setdefault("run", []).append("Choose at least one score.")
    if not scenarios:
        problems.setdefault("run", []).append("Choose at least one OoD scenario.")
    if not metrics:
        problems.setdefault("run", []).append("Choose at least one metric.")
    if problems:
        return None, problems
    names = [s.name for s in scores]
    baseline = names.index(ss["w.baseline"]) if ss["w.baseline"] in names else 0
    config = RunConfig(
        model_repo=ss["model_repo"], model_entry=ss["model_entry"], ind_dataset=ss["ind_source"],
        calibration_split=ss["cal_split"], test_split=ss["test_split"], n_calibration=n_cal,
        n_test=n_test, seed=SEED, scores=scores, scenarios=scenarios, metrics=metrics,
        baseline=baseline, n_boot=int(ss["w.n_boot"]),
    )  # fmt: skip
    return config, {}


def _share_loaded(cache: RunCache, config: RunConfig) -> None:
    """Put the process-wide cached model and full datasets into the session's RunCache."""
    key = (config.model_repo, config.model_entry)
    if key not in cache.models:
        cache.models[key] = load_model(*key)
    needed = [(config.ind_dataset, config.calibration_split, None),
              (config.ind_dataset, config.test_split, None)]
    needed += [(sc.dataset, sc.split, sc.config) for sc in config.scenarios if sc.dataset]
    for source, split, conf in needed:
        full = (source, split, None, 0, conf)
        if full not in cache.datasets:
            cache.datasets[full] = load_dataset(source, split, conf)


def execute_run(config: RunConfig) -> RunResult | None:
    """Run ``config`` with a progress bar; store the result (or the error) in session state."""
    ss = st.session_state
    cache = run_cache()
    bar = st.progress(0.0, text="Starting...")

    def progress(stage: str, frac: float) -> None:
        bar.progress(min(1.0, max(0.0, float(frac))), text=stage)

    t0 = time.perf_counter()
    try:
        _share_loaded(cache, config)
        result = pipeline.run(config, cache, progress)
    except EXPECTED_ERRORS as exc:
        bar.empty()
        ss["run_error"] = str(exc)
        return None
    except Exception as exc:  # noqa: BLE001
        LOG.error("Run failed:\n%s", traceback.format_exc())
        bar.empty()
        ss["run_error"] = f"The run failed: {type(exc).__name__}: {exc}"
        return None
    bar.empty()
    ss["result"] = result
    ss["run_error"] = None
    ss["last_run"] = {"when": time.strftime("%H:%M:%S"), "seconds": time.perf_counter() - t0,
                      "accuracy": result.accuracy, "n_scores": len(result.score_names),
                      "n_oods": len(result.ood_titles)}  # fmt: skip
    return result


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


def replay_section() -> None:
    """Upload a run config (exported here or written for ``ood-lens run``) and run it as is."""
    with st.expander("Replay a saved run config (TOML)", icon=":material/upload_file:"):
        up = st.file_uploader("Run config", type=["toml"], key="replay_file",
                              help="The config.toml of an export, or one written for `ood-lens run`.")
        if up is None:
            return
        config, error = parse_uploaded_config(up.getvalue())
        if error:
            st.error(error, icon=":material/error:")
            return
        st.caption(f"{config.model_entry} from {config.model_repo} · {config.ind_dataset} · "
                   f"{len(config.scores)} score(s) × {len(config.scenarios)} scenario(s)")
        if st.button("Replay this config", key="replay", icon=":material/replay:"):
            if execute_run(config) is None:
                st.error(st.session_state["run_error"], icon=":material/error:")
            else:
                go_to(PAGE_RESULTS, "Results")


# ---------------------------------------------------------------------------- exports
def export_bundle(result: RunResult) -> dict[str, bytes]:
    """metrics.csv, confidences.parquet, report.html, config.toml of ``result`` (pipeline.export
    into a temporary folder). No Streamlit calls: download buttons run it outside the script."""
    try:
        with tempfile.TemporaryDirectory(prefix="ood-lens-") as tmp:
            paths = pipeline.export(result, tmp)
            return {name: Path(p).read_bytes() for name, p in paths.items()}
    except (TypeError, ValueError):  # e.g. a None parameter TOML cannot hold: report only
        from ood_core.report import html_report

        page = html_report("ood-lens report", pipeline.result_figures(result),
                           [("Metrics", pipeline.metrics_wide(result)), ("All values", result.frame)])
        return {"report": page.encode("utf-8")}


def config_toml(result: RunResult) -> tuple[str | None, str | None]:
    """The run config as TOML, or None and why it cannot be written."""
    try:
        return result.config.to_toml(), None
    except (TypeError, ValueError) as exc:
        return None, f"The run config cannot be written as TOML ({exc}); a parameter set to None?"


def parquet_bytes(frame: pd.DataFrame) -> bytes:
    buf = io.BytesIO()
    frame.to_parquet(buf, index=False)
    return buf.getvalue()
