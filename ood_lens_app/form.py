"""Form values (session state) to a :class:`~ood_core.config.RunConfig`.

Every function reads a state mapping (``st.session_state`` in the app, a dict in tests) and
returns values plus problems as messages for the user; nothing here draws.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, MutableMapping, Sequence
from typing import Any

from ood_core.config import EXECUTION_DEFAULTS, RunConfig, ScenarioSpec, ScoreSpec
from ood_core.devices import DeviceError, check_amp, ray_available, resolve_device
from ood_core.metrics import parse_metric
from ood_core.perturbations import PERTURBATIONS
from ood_core.scores import get_score_class, make_score
from ood_lens_app import estimates
from ood_lens_app.layers import LayerChoices, sync_score_layers
from ood_lens_app.state import (
    AMP_OFF,
    SEED,
    param_key,
    param_sweep_key,
    param_sweep_values_key,
    pert_owner,
    score_layer_key,
    sweep_key,
)
from ood_lens_app.widgets import initial_value, is_text_float, none_key

METRIC_CHOICES = [
    repr(parse_metric(m))
    for m in (
        "AUC(max_fpr=0.2)",
        "TPR(max_fpr=0.05)",
        "AUC()",
        "TNR(min_tpr=0.95)",
        "AUC(max_fpr=0.05)",
        "TPR(max_fpr=0.01)",
        "TNR(min_tpr=0.99)",
        "AUC(kind='convex_hull')",
        "MCC()",
        "AUPR(positive='ood')",
        "AUPR(positive='ind')",
        "DetectionError()",
    )
]
"""Metrics offered in the Metrics multiselect (any other can be typed)."""

Problems = dict[str, list[str]]
"""Messages per place: a score name, ``"scenarios"``, ``"metrics"``, ``"execution"`` or
``"run"``."""
RAY_HINT = "Ray is not installed here: pip install 'ood-lens[ray]' to run on Ray actors."
"""Why the executor choice is disabled on a machine without Ray."""


# ---------------------------------------------------------------------------- parameters
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


def _same(value: Any, default: Any) -> bool:
    if isinstance(value, list | tuple) and isinstance(default, list | tuple):
        return tuple(value) == tuple(default)
    return bool(value == default)


def param_values(
    state: Mapping[str, Any],
    owner: str,
    descs: Sequence[Mapping[str, Any]],
    keep_defaults: bool = False,
) -> tuple[dict[str, Any], list[str]]:
    """Parameter values of ``owner`` read from ``state``: only those differing from their
    default (and the required ones) unless ``keep_defaults``; plus parse problems as messages."""
    out: dict[str, Any] = {}
    problems: list[str] = []
    for desc in descs:
        name = desc["name"]
        key, nkey = param_key(owner, name), none_key(owner, name)
        if key not in state and nkey not in state:
            if desc.get("required"):
                out[name] = desc["default"]
            continue
        if desc.get("nullable") and state.get(nkey, desc.get("default") is None):
            value: Any = None
        else:
            raw = state.get(key, initial_value(dict(desc)))
            try:
                if desc["type"] == "list":
                    value = parse_list_param(str(raw))
                elif is_text_float(dict(desc)):
                    value = float(str(raw).strip())
                else:
                    value = raw
            except ValueError as exc:
                problems.append(f"{owner}: parameter '{name}': {exc}")
                continue
        if keep_defaults or desc.get("required") or not _same(value, desc.get("default")):
            out[name] = value
    return out, problems


# ---------------------------------------------------------------------------- scores
SWEEPABLE = ("int", "float", "choice")
"""Parameter types a score's parameter sweep may take values of."""


def param_sweep(
    state: Mapping[str, Any], name: str, descs: Sequence[Mapping[str, Any]]
) -> tuple[str | None, list[Any], list[str]]:
    """Score ``name``'s parameter sweep: ``(parameter or None, its values, problems)``; without
    a sweep the values are ``[None]`` (one point: the parameters as set)."""
    swept = str(state.get(param_sweep_key(name), "") or "")
    if not swept:
        return None, [None], []
    desc = next((d for d in descs if d["name"] == swept and d["type"] in SWEEPABLE), None)
    if desc is None:
        return None, [None], [f"{name}: '{swept}' is not a parameter it can sweep."]
    text = str(state.get(param_sweep_values_key(name), "") or "")
    try:
        values = parse_list_param(text) or []
    except ValueError as exc:
        return None, [None], [f"{name}: sweep of '{swept}': {exc}"]
    if desc["type"] == "int":
        values = [int(v) if isinstance(v, float) and v.is_integer() else v for v in values]
    if len(values) < 2:  # noqa: PLR2004
        return (
            None,
            [None],
            [f"{name}: give at least two values to sweep '{swept}' over, e.g. 5, 15, 50."],
        )
    if len({repr(v) for v in values}) < len(values):
        return None, [None], [f"{name}: the values to sweep '{swept}' over repeat: {text}."]
    return swept, values, []


def check_score(
    name: str,
    params: Mapping[str, Any],
    layers: Sequence[str],
    n_calibration: int | None = None,
    allowed_layers: Sequence[str] | None = None,
) -> list[str]:
    """Problems with a score specification, as messages (empty list: fine).

    Builds the score (its own parameter validation), then checks the layers against the score's
    rule (``allowed_layers``: what :func:`ood_lens_app.layers.layer_options` gives) and the
    calibration size against the score's own :meth:`~ood_core.scores.base.BaseScore.check_calibration`.
    """
    problems: list[str] = []
    try:
        cls = get_score_class(name)
        score = make_score(name, **params)
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
        try:  # the score's own rule (e.g. k <= the calibration size)
            score.check_calibration(n_calibration)
        except ValueError as exc:
            problems.append(str(exc))
    return problems


def score_specs(
    state: MutableMapping[str, Any],
    choices: LayerChoices,
    n_cal: int | None,
) -> tuple[list[ScoreSpec], Problems]:
    """ScoreSpecs of the chosen scores (a layer sweep gives one spec per layer) and the problems
    found per score name. Brings each score's layers in step with the Layers page first."""
    specs: list[ScoreSpec] = []
    problems: Problems = {}
    for name in state["w.scores"]:
        cls = get_score_class(name)
        options = sync_score_layers(state, name, cls.layer_rule, cls.max_layers, choices)
        params, probs = param_values(state, name, cls.describe_params())
        layers = list(state.get(score_layer_key(name), [])) if cls.layer_rule != "none" else []
        sweep = bool(state.get(sweep_key(name), False)) and len(layers) > 1
        swept, values, sweep_probs = param_sweep(state, name, cls.describe_params())
        probs += sweep_probs
        for group in [[lid] for lid in layers] if sweep else [layers]:
            for value in values:
                point = dict(params) if swept is None else dict(params) | {swept: value}
                probs += [
                    p
                    for p in check_score(name, point, group, n_cal, options or None)
                    if p not in probs
                ]
                specs.append(ScoreSpec(name, point, list(group)))
        if not probs:  # what the fit would refuse before any pass keeps Run disabled too
            probs += estimates.score_refusals(name, params, layers, sweep)
        if probs:
            problems[name] = probs
    return specs, problems


# ---------------------------------------------------------------------------- scenarios, metrics
def scenario_specs(state: Mapping[str, Any]) -> tuple[list[ScenarioSpec], list[str]]:
    """Perturbation scenarios (parameters checked by building them), bundled OoD datasets and
    the optional extra dataset; plus problems."""
    specs: list[ScenarioSpec] = []
    problems: list[str] = []
    for kind in state["w.perts"]:
        cls = PERTURBATIONS[kind]
        params, probs = param_values(state, pert_owner(kind), [p.as_dict() for p in cls.params])
        problems += probs
        try:
            cls(**params)
        except ValueError as exc:
            problems.append(str(exc))
            continue
        specs.append(ScenarioSpec(kind=kind, params=params))
    specs += [ScenarioSpec(dataset=name, split="test") for name in state["w.ood_bundled"]]
    extra = str(state["w.ood_extra"]).strip()
    if extra:
        specs.append(
            ScenarioSpec(
                dataset=extra,
                split=str(state["w.ood_extra_split"]).strip() or "test",
                config=str(state["w.ood_extra_config"]).strip() or None,
            )
        )
    return specs, problems


def metric_list(state: Mapping[str, Any]) -> tuple[list[str], list[str]]:
    """The chosen metrics plus the ';'-separated typed ones (canonical text, no duplicates)."""
    metrics = list(state["w.metrics"])
    problems = []
    for text in (t.strip() for t in str(state["w.metric_custom"]).split(";")):
        if not text:
            continue
        try:
            metrics.append(repr(parse_metric(text)))
        except ValueError as exc:
            problems.append(str(exc))
    return list(dict.fromkeys(metrics)), problems


def execution_options(state: Mapping[str, Any]) -> dict[str, Any]:
    """What the Execution widgets offer on this machine: ``devices`` (auto, cpu and one
    ``cuda:N`` per GPU: no CUDA choice without CUDA), ``amps`` (off, bf16, and fp16 only with
    CUDA), ``executors`` and whether the executor choice is ``executor_disabled`` (no Ray here
    and the local executor chosen), with its ``hint``. A value restored from a run computed
    elsewhere (``cuda`` on a CPU machine) stays offered, so that the form shows it and says why
    it cannot run (:func:`execution_values`)."""
    from ood_core.devices import available_devices

    devices = available_devices()
    amps = [AMP_OFF, "bf16"] + (["fp16"] if any(d.startswith("cuda") for d in devices) else [])
    device = str(state.get("w.exec_device", "auto"))
    amp = str(state.get("w.exec_amp", AMP_OFF))
    executor = str(state.get("w.exec_executor", "local"))
    has_ray = ray_available()
    return {
        "devices": devices + ([device] if device not in devices else []),
        "amps": amps + ([amp] if amp not in amps else []),
        "executors": ["local", "ray"],
        "executor_disabled": not has_ray and executor == "local",
        "hint": None if has_ray else RAY_HINT,
    }


def execution_values(state: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """The ``[execution]`` settings of the form (``w.exec_*``; workers and address only with
    executor ``"ray"``) and what this machine cannot honour: a device it does not have, fp16
    without CUDA, the Ray executor without Ray installed."""
    executor = str(state.get("w.exec_executor", EXECUTION_DEFAULTS["executor"]))
    ray = executor == "ray"
    amp = state.get("w.exec_amp", AMP_OFF)
    values = {
        "executor": executor,
        "workers": int(state.get("w.exec_workers", 2)) if ray else EXECUTION_DEFAULTS["workers"],
        "address": str(state.get("w.exec_address", "")).strip() if ray else "",
        "device": str(state.get("w.exec_device", EXECUTION_DEFAULTS["device"])),
        "amp": None if amp in (None, AMP_OFF) else str(amp),
    }
    problems: list[str] = []
    try:
        check_amp(values["amp"], resolve_device(values["device"]))
    except DeviceError as exc:
        problems.append(f"Execution: {exc}.")
    if ray and not ray_available():
        problems.append(
            "Execution: the Ray executor needs Ray (pip install 'ood-lens[ray]'); choose local."
        )
    return values, problems


def pick_baseline(current: str, chosen: Sequence[str], preferred: str) -> str:
    """The baseline score: ``current`` if still chosen, else ``preferred`` (the example run's
    baseline) if chosen, else the first chosen score; ``"-"`` when none is chosen."""
    if current in chosen:
        return current
    if not chosen:
        return "-"
    return preferred if preferred in chosen else chosen[0]


def n_samples(value: Any) -> int | None:
    """A size widget's value as a run size (None: every sample)."""
    return None if value is None else int(value)


# ---------------------------------------------------------------------------- the run config
def build_config(
    state: MutableMapping[str, Any],
    choices: LayerChoices,
) -> tuple[RunConfig | None, Problems]:
    """A RunConfig from the form, or None and the problems (per score / ``"scenarios"`` /
    ``"metrics"`` / ``"execution"`` / ``"run"``). ``choices``: the current network's layers."""
    n_cal, n_test = n_samples(state["w.n_cal"]), n_samples(state["w.n_test"])
    scores, problems = score_specs(state, choices, n_cal)
    scenarios, sc_problems = scenario_specs(state)
    metrics, m_problems = metric_list(state)
    execution, ex_problems = execution_values(state)
    if ex_problems:
        problems["execution"] = ex_problems
    if sc_problems:
        problems["scenarios"] = sc_problems
    if m_problems:
        problems["metrics"] = m_problems
    for missing, what in ((scores, "score"), (scenarios, "OoD scenario"), (metrics, "metric")):
        if not missing:
            problems.setdefault("run", []).append(f"Choose at least one {what}.")
    if state.get("output_error"):  # the model's Output field holds text that is no choice
        problems.setdefault("run", []).append(state["output_error"])
    if problems:
        return None, problems
    names = [s.name for s in scores]
    baseline = names.index(state["w.baseline"]) if state["w.baseline"] in names else 0
    config = RunConfig(
        model_repo=state["model_repo"],
        model_entry=state["model_entry"],
        output=state.get("model_output"),
        ind_dataset=state["ind_source"],
        calibration_split=state["cal_split"],
        test_split=state["test_split"],
        n_calibration=n_cal,
        n_test=n_test,
        seed=SEED,
        scores=scores,
        scenarios=scenarios,
        metrics=metrics,
        baseline=baseline,
        n_boot=int(state["w.n_boot"]),
        **execution,
    )
    return config, {}
