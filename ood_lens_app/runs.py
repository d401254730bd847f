"""Run, replay and export: a RunConfig through :func:`ood_core.runner.run` with the session's
cache and loaded model / data; every run saved to the run store (:mod:`ood_lens_app.run_store`)
and named in the URL (``?run=ID``); a saved run or config replayed into every widget; the
run status (running / cancelled); uploaded configs read back; a result's downloads.

Session keys set here: ``run_id`` (the saved run on screen), ``result_request`` (the config
that made the result, before sizes were lowered to the data), ``run_status`` (``"running"``
while a run is in progress; ``"cancelled"`` when a later script run found it never finished),
``run_request`` (the config of the last run started), ``pending_settings`` (a config to put
into the widgets at the start of the next script run), ``store_error``, ``trust_request`` (a
saved run waiting for its trust box: ``{"run_id", "repo"}``), ``own_pending`` (the
:mod:`~ood_lens_app.in_flight` token of the last Run this session started).

Trust: a run or a saved run whose model comes from a non-bundled hub repository runs that
repository's code only when the person ticked its trust box in this session (``trusted_repos``);
a saved run or bundle never grants trust itself (:func:`restore_run`)."""

from __future__ import annotations

import dataclasses
import io
import logging
import tempfile
import time
import traceback
from collections.abc import Callable, Mapping, MutableMapping
from pathlib import Path
from typing import Any

import pandas as pd
from torch import nn

from ood_core import bundle as bundle_mod
from ood_core import bundle_writer, hub, runner
from ood_core import data as data_mod
from ood_core.config import RunConfig, example_config
from ood_core.devices import DeviceError, resolve_device
from ood_core.perturbations import PERTURBATIONS
from ood_core.runner import RunCache, RunResult
from ood_core.scores import get_score_class
from ood_lens_app import in_flight, run_folders, run_store
from ood_lens_app import layers as layers_mod
from ood_lens_app import state as state_mod
from ood_lens_app.errors import is_expected, run_message
from ood_lens_app.widgets import initial_value, is_text_float, none_key

LOG = logging.getLogger("ood_lens.app")


def run_cache(state: MutableMapping[str, Any]) -> RunCache:
    """The session's RunCache (created on first use). Its feature cache is the process's
    (:func:`ood_lens_app.loaders.shared_features`): after a reload, a parameter change refits
    from the features the previous session extracted, with no forward pass."""
    if "run_cache" not in state:
        from ood_lens_app import loaders  # streamlit's resource cache, only when running

        state["run_cache"] = RunCache(features=loaders.shared_features())
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
        "forward_calls": result.execution.get("forward_calls"),
        "own_pass_scores": list(result.execution.get("own_pass_scores") or []),
    }


def demo_config() -> RunConfig:
    """The bundled demo: :func:`ood_core.config.example_config` at the session's default
    sizes (``OOD_LENS_DEFAULT_N``)."""
    cfg = example_config()
    return dataclasses.replace(
        cfg,
        n_calibration=state_mod.default_n(cfg.n_calibration),
        n_test=state_mod.default_n(cfg.n_test),
    )


def execute_run(
    config: RunConfig,
    save: bool = True,
    restore_settings: bool = False,
    run_id: str | None = None,
    compute: Callable[[RunCache, Callable[[str, float], None]], RunResult] | None = None,
) -> RunResult | None:
    """:func:`_execute_run`, registered in :mod:`ood_lens_app.in_flight` and named in the URL
    (``?pending=TOKEN``) while it runs, so that a page reloaded meanwhile learns what became of
    it (:func:`ood_lens_app.layout.run_notices`)."""
    import streamlit as st

    ss = st.session_state
    token = in_flight.start(time.strftime("%H:%M:%S"))
    ss["own_pending"] = token
    st.query_params[in_flight.URL_KEY] = token
    try:
        result = _execute_run(config, save, restore_settings, run_id, compute)
    finally:  # also when the script is stopped (a BaseException): the registry says so
        if ss.get("run_status") == "done":
            in_flight.finish(token, ss.get("run_id"))
        elif ss.get("run_status") == "failed":
            in_flight.finish(token, error=ss.get("run_error") or "the run failed")
        else:
            in_flight.interrupt(token)
    if st.query_params.get(in_flight.URL_KEY) == token:
        del st.query_params[in_flight.URL_KEY]
    return result


def _execute_run(
    config: RunConfig,
    save: bool = True,
    restore_settings: bool = False,
    run_id: str | None = None,
    compute: Callable[[RunCache, Callable[[str, float], None]], RunResult] | None = None,
) -> RunResult | None:
    """Run ``config`` with a progress bar; store the result (or the error) in session state.

    ``save``: write it to the run store and put its id in the URL (``run_id``: the id of the
    saved run being shown again instead). ``restore_settings``: put ``config`` into every widget
    at the next script run (a replayed or reopened config). ``compute(cache, progress)``: how
    the result is obtained (default: :func:`ood_core.runner.run` of ``config``).
    ``run_status`` is ``"running"`` during the call, so a run cut short by leaving the page is
    reported as cancelled (:func:`check_cancelled`)."""
    import streamlit as st

    from ood_lens_app import loaders

    ss = st.session_state
    cache = run_cache(ss)
    bar = st.progress(0.0, text="Starting...")

    def progress(stage: str, frac: float) -> None:
        elapsed = time.perf_counter() - t0
        bar.progress(min(1.0, max(0.0, float(frac))), text=f"{stage} · {elapsed:.0f} s")

    config = with_session_trust(ss, config)
    ss["run_request"] = config
    ss["run_status"] = "running"
    ss["run_started"] = time.strftime("%H:%M:%S")
    t0 = time.perf_counter()
    try:
        share_loaded(cache, config, loaders.load_model, loaders.load_dataset)
        if compute is None:
            result = runner.run(config, cache, progress)
        else:
            result = compute(cache, progress)
    except Exception as exc:  # noqa: BLE001 - the page shows the message, never a traceback
        if not is_expected(exc):
            LOG.error("Run failed:\n%s", traceback.format_exc())
        bar.empty()
        ss["run_error"] = run_message(exc)
        ss["run_status"] = "failed"
        return None
    bar.empty()
    ss["result"] = result
    ss["result_request"] = config
    ss["run_error"] = None
    ss["last_run"] = run_summary(result, time.perf_counter() - t0, time.strftime("%H:%M:%S"))
    if save:
        run_id = save_result(ss, result)
    ss["run_id"] = run_id
    if run_id:
        st.query_params["run"] = run_id
    elif "run" in st.query_params:
        del st.query_params["run"]
    if restore_settings:
        ss["pending_settings"] = config
    ss["run_status"] = "done"
    return result


def save_result(state: MutableMapping[str, Any], result: RunResult) -> str | None:
    """Save ``result`` to the run store; its id, or None (and ``store_error`` says why)."""
    try:
        run_id = run_store.save(result, run_store.runs_dir(), background=True)
    except run_store.StoreError as exc:  # "not saved: <reason>; set OOD_LENS_RUNS to ..."
        state["store_error"] = str(exc)
        return None
    except (OSError, TypeError, ValueError) as exc:
        state["store_error"] = f"This run was not saved to the run store: {exc}"
        return None
    state["store_error"] = None
    return run_id


def check_saved(state: MutableMapping[str, Any]) -> str | None:
    """Whether the run on screen was really saved (waits for its background save): when it was
    not, its id is forgotten (never shown as "Saved as", never restored from the URL) and
    ``store_error`` says why; returns ``store_error`` (None: nothing to report)."""
    run_id = state.get("run_id")
    if run_id:
        problem = run_store.save_error(run_id)
        if problem:
            state["run_id"], state["restore_tried"] = None, run_id
        state["store_error"] = problem
    return state.get("store_error")


def check_cancelled(state: MutableMapping[str, Any]) -> None:
    """At the start of a script run: a run still marked running never finished (the user left
    the page, which stops the script): mark it cancelled."""
    if state.get("run_status") == "running":
        state["run_status"] = "cancelled"


def repo_trusted(state: Mapping[str, Any], repo: str) -> bool:
    """Bundled, or ticked in its trust box in this session (``trusted_repos``)."""
    return hub.is_bundled(repo) or repo in state.get("trusted_repos", ())


def with_session_trust(state: Mapping[str, Any], config: RunConfig) -> RunConfig:
    """``config`` with ``trust_repo`` as this session's person decided (:func:`repo_trusted`):
    the only source of trust in the dashboard."""
    return dataclasses.replace(config, trust_repo=repo_trusted(state, config.model_repo))


def trust_refusal(run_id: str, repo: str) -> str:
    """What the dashboard says when a saved run names a repository not trusted in this session."""
    return (
        f"Saved run {run_id} uses a model from the hub repository '{repo}', which is not "
        "bundled: opening it runs that repository's code (hubconf.py and the model) on this "
        "machine. A saved run or bundle never grants trust: tick the trust box naming the "
        "repository to open it."
    )


def restore_run(
    run_id: str, trust: bool = False, folder: run_folders.RunFolder | None = None
) -> RunResult | None:
    """Show saved run ``run_id`` again: its config into every widget and its result read back
    from its bundle (:func:`ood_core.bundle.to_result`: nothing fitted or scored; the images
    drawn again through the session's cache and checked against the bundle's fingerprint).

    ``folder``: a run store or bundle folder computed elsewhere (opened read-only on the Runs
    page, checked by :func:`ood_lens_app.run_folders.check_folder`; not named in the URL);
    None: this dashboard's store, and the run is named in the URL. A run whose model
    repository is not bundled and not trusted in this session opens only with ``trust=True``
    (its trust box ticked: :func:`restore_trust_prompt`); until then nothing is loaded or
    changed, ``trust_request`` names the run, its folder and the repository, and
    ``run_error`` says why."""
    import streamlit as st

    ss = st.session_state
    if folder is None:
        ss["restore_tried"] = run_id
    ss.pop("trust_request", None)
    try:
        if folder is None:
            stored = run_store.load(run_store.runs_dir(), run_id)
        else:
            stored = run_folders.load_run(folder, run_id)
    except (OSError, ValueError, KeyError) as exc:
        where = "" if folder is None else f" from {folder.path}"
        ss["run_error"] = f"Cannot open saved run {run_id}{where}: {exc}"
        return None
    where = {} if folder is None else {"folder": folder}
    return _restore(stored, trust, where, run_id if folder is None else None)


def _restore(
    stored: run_store.StoredRun, trust: bool, where: dict[str, Any], url_id: str | None
) -> RunResult | None:
    """Open ``stored`` (``where``: its folder when not in this dashboard's store; ``url_id``:
    the id the URL names, None for a run from elsewhere) once its repository is trusted."""
    import streamlit as st

    ss = st.session_state
    run_id = stored.run_id
    repo = stored.config.model_repo
    if not repo_trusted(ss, repo):
        if not trust:
            ss["trust_request"] = {"run_id": run_id, "repo": repo, **where}
            ss["run_error"] = trust_refusal(run_id, repo)
            return None
        ss["trusted_repos"] = list(dict.fromkeys([*ss.get("trusted_repos", []), repo]))
    apply_config(ss, stored.config)

    def read_back(cache: RunCache, progress: Callable[[str, float], None]) -> RunResult:
        progress(f"Opening saved run {run_id}", 0.1)
        return bundle_mod.to_result(stored.bundle, cache, trust_repo=repo_trusted(ss, repo))

    return execute_run(
        stored.config, save=False, restore_settings=False, run_id=url_id, compute=read_back
    )


def restore_trust_key(repo: str) -> str:
    """State key of the trust box of a saved run's repository (not a ``w.`` key: never kept)."""
    return f"trust_open.{repo.strip()}"


def restore_trust_prompt() -> RunResult | None:
    """While a saved run waits for trust (``trust_request``, see :func:`restore_run`): the
    refusal and a trust box naming the repository, unticked; ticking it opens the run (its
    result, or None and ``run_error``)."""
    import streamlit as st

    ss = st.session_state
    request = ss.get("trust_request")
    if not request:
        return None
    run_id, repo = request["run_id"], request["repo"]
    st.error(trust_refusal(run_id, repo), icon=":material/gpp_maybe:")
    ticked = st.checkbox(
        f"I trust `{repo.replace('`', '')}`: open saved run {run_id}, which runs its code "
        "(hubconf.py and the model) on this machine",
        key=restore_trust_key(repo),
        value=False,
        help="Only the bundled models are trusted without asking. Tick this only for a "
        "repository whose code you would run yourself.",
    )
    if not ticked:
        return None
    result = restore_run(run_id, trust=True, folder=request.get("folder"))
    if result is None:
        st.error(ss["run_error"], icon=":material/error:")
    return result


def sync_url(state: MutableMapping[str, Any], params: MutableMapping[str, Any]) -> str | None:
    """At the start of a script run: the run id the URL asks for when it is not the one on
    screen (to restore), else None after putting the on-screen id into the URL."""
    asked = params.get("run")
    current = state.get("run_id")
    if asked and asked != current and asked != state.get("restore_tried"):
        return str(asked)
    if current and asked != current:
        params["run"] = current
    return None


# ---------------------------------------------------------------------------- settings
def _widget_value(desc: Mapping[str, Any], value: Any) -> Any:
    if desc["type"] == "list":
        return "" if value is None else ", ".join(str(v) for v in value)
    if is_text_float(dict(desc)):
        return str(value)
    return value


def _apply_params(
    state: MutableMapping[str, Any],
    owner: str,
    descs: list[dict[str, Any]],
    params: Mapping[str, Any],
) -> None:
    for desc in descs:
        name = desc["name"]
        value = params.get(name, desc.get("default"))
        if desc.get("nullable"):
            state[none_key(owner, name)] = value is None
        state[state_mod.param_key(owner, name)] = (
            initial_value(dict(desc)) if value is None else _widget_value(desc, value)
        )


def apply_config(state: MutableMapping[str, Any], config: RunConfig) -> None:
    """Put ``config`` into every widget: model (and its output), data, sizes, Layers page selection, scores with
    their parameters, layers and layer sweeps, scenarios with their parameters, metrics,
    bootstrap, baseline. Call before the widgets are drawn in a script run."""
    defaults = state_mod.default_state(config, env={})
    skip = {
        "result",
        "model_error",
        "output_error",
        "data_error",
        "run_error",
        "last_run",
        "layers_version",
    }
    for key, value in defaults.items():
        if key not in skip and key != "score_layers_src":
            state[key] = value
    state["w.metric_custom"] = ""
    state.setdefault("layers_version", 0)
    layers_mod.set_selection(state, state_mod.initial_layers(config))
    selection = tuple(state["layers"])
    src = dict(state.get("score_layers_src", {}))
    by_name: dict[str, list[Any]] = {}
    for spec in config.scores:
        by_name.setdefault(spec.name, []).append(spec)
    for name, specs in by_name.items():
        layer_ids = list(dict.fromkeys(str(lid) for spec in specs for lid in spec.layers))
        state[state_mod.score_layer_key(name)] = layer_ids
        state[state_mod.sweep_key(name)] = len(layer_ids) > 1 and all(
            len(s.layers) == 1 for s in specs
        )
        src[name] = selection
        descs = get_score_class(name).describe_params()
        swept, values = _swept_param(specs, descs)
        state[state_mod.param_sweep_key(name)] = swept or ""
        state[state_mod.param_sweep_values_key(name)] = ", ".join(map(str, values))
        params = {k: v for k, v in specs[0].params.items() if k != swept}
        _apply_params(state, name, descs, params)
    state["score_layers_src"] = src
    for sc in config.scenarios:
        if sc.kind:
            descs = [p.as_dict() for p in PERTURBATIONS[sc.kind].params]
            _apply_params(state, state_mod.pert_owner(sc.kind), descs, sc.params)


def _swept_param(specs: list[Any], descs: list[dict[str, Any]]) -> tuple[str | None, list[Any]]:
    """The one parameter a config's specs of one score vary (a parameter sweep), with its
    values in order; ``(None, [])`` when none or several vary."""
    defaults = {d["name"]: d.get("default") for d in descs}
    full = [defaults | dict(s.params) for s in specs]
    varying = [k for k in defaults if len({repr(p.get(k)) for p in full}) > 1]
    if len(varying) != 1:
        return None, []
    return varying[0], list(dict.fromkeys(p[varying[0]] for p in full))


def _full_params(descs: list[dict[str, Any]], params: Mapping[str, Any]) -> dict[str, Any]:
    out = {d["name"]: d.get("default") for d in descs} | dict(params)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}


def settings_key(config: RunConfig) -> dict[str, Any]:
    """What decides a run's numbers, comparable across a form-built and a saved config:
    parameters with their defaults filled in, the baseline by name, the device as resolved
    here and AMP (in the model key); never the executor (it computes the same numbers)."""
    scores = [
        (s.name, _full_params(get_score_class(s.name).describe_params(), s.params), list(s.layers))
        for s in config.scores
    ]
    scenarios = [
        (
            sc.kind,
            _full_params([p.as_dict() for p in PERTURBATIONS[sc.kind].params], sc.params)
            if sc.kind
            else {},
            sc.dataset,
            sc.split,
            sc.config,
        )
        for sc in config.scenarios
    ]
    return dict(
        model=config.model_key(_resolved(config.device)),
        data=(config.ind_dataset, config.calibration_split, config.test_split),
        sizes=(config.n_calibration, config.n_test, config.seed),
        scores=[(n, p, [str(lid) for lid in layer]) for n, p, layer in scores],
        scenarios=scenarios,
        metrics=list(config.metrics),
        n_boot=config.n_boot,
        baseline=state_mod.default_baseline(config),
    )


def _resolved(spec: str) -> str:
    """The device ``spec`` resolves to here (``"auto"`` and ``"cpu"`` are the same on a CPU
    machine), or the spec itself when this machine does not have it."""
    try:
        return str(resolve_device(spec))
    except DeviceError:
        return spec


def same_settings(a: RunConfig | None, b: RunConfig | None) -> bool:
    """Whether two configs compute the same run (:func:`settings_key`)."""
    if a is None or b is None:
        return a is b
    return settings_key(a) == settings_key(b)


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
    (:func:`ood_core.bundle_writer.export` into a temporary folder); only the report when the config
    cannot be written. No Streamlit calls: download buttons run it outside the script."""
    try:
        with tempfile.TemporaryDirectory(prefix="ood-lens-") as tmp:
            paths = bundle_writer.export(result, tmp)
            return {name: Path(p).read_bytes() for name, p in paths.items()}
    except (TypeError, ValueError):  # e.g. a None parameter TOML cannot hold: report only
        from ood_core.report import html_report

        page = html_report(
            "ood-lens report",
            bundle_writer.result_figures(result),
            [("Metrics", bundle_writer.metrics_wide(result)), ("All values", result.frame)],
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
