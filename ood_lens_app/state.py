"""Session state of the dashboard: its keys and their defaults, taken from the example run
(:func:`ood_core.config.example_config`) so the dashboard and ``ood-lens example-config`` start
from the same evaluation.

Every page calls :func:`init_state` first, so any page works when it is opened first (or run
alone by ``AppTest``).

Keys
----
* canonical choices: ``model_repo``, ``model_entry``, ``model_output`` (the element of the
  model's output holding the logits: None, an index or a key; typed in ``w.model_output``,
  :func:`ood_core.core.parse_output`), ``ind_source``, ``ind_config``,
  ``cal_split``, ``test_split``, ``layers`` (the Layers page selection, ``"d-i"`` ids),
  ``result`` (the last :class:`~ood_core.runner.RunResult`), ``run_cache`` (one
  :class:`~ood_core.runner.RunCache` per session, so a parameter change recomputes only that
  score), ``score_layers_src`` (per score, the Layers page selection its layers were derived
  from), ``trusted_repos``;
* widget values live under keys starting with ``w.`` (:func:`param_key`,
  :func:`score_layer_key`, :func:`sweep_key` name the generated ones; ``w.exec_*`` hold the
  ``[execution]`` settings: executor, workers, address, device, amp); :func:`init_state`
  re-assigns them on every rerun so they survive page switches (Streamlit drops the state of
  widgets that are not rendered).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, MutableMapping
from typing import Any

from ood_core import data as data_mod
from ood_core.config import RunConfig, example_config
from ood_core.core import output_text
from ood_core.layer_ids import layer_text, parse_layer_id

MODEL_SOURCES = ["Bundled", "GitHub (torch.hub)", "Local hub directory"]
DATA_SOURCES = ["Bundled", "Local file", "Hugging Face"]
ENV_DEFAULT_N = "OOD_LENS_DEFAULT_N"
"""Environment variable overriding the default calibration / test sizes."""
SEED = example_config().seed
"""Subset seed of every run (calibration subset: ``SEED``, test subset: ``SEED + 1``)."""
WIDGET_PREFIX = "w."
AMP_OFF = "off"
"""The AMP widget's value for full precision (``[execution] amp = false``)."""


def param_key(owner: str, name: str) -> str:
    """State key of parameter ``name`` of ``owner`` (a score name or :func:`pert_owner`)."""
    return f"w.p.{owner}.{name}"


def pert_owner(kind: str) -> str:
    """The parameter owner of perturbation ``kind``."""
    return f"pert:{kind}"


def score_layer_key(name: str) -> str:
    """State key of score ``name``'s layer choice."""
    return f"w.L.{name}"


def sweep_key(name: str) -> str:
    """State key of score ``name``'s "each layer separately" checkbox."""
    return f"w.sweep.{name}"


def param_sweep_key(name: str) -> str:
    """State key of the parameter score ``name`` sweeps (``""``: none)."""
    return f"w.psweep.{name}"


def param_sweep_values_key(name: str) -> str:
    """State key of the values (text, comma-separated) score ``name``'s parameter sweep takes."""
    return f"w.psweepv.{name}"


def trust_key(repo: str) -> str:
    """State key of the trust checkbox of hub repository ``repo``."""
    return f"w.trust.{repo.strip()}"


def default_n(fallback: int | None, env: Mapping[str, str] | None = None) -> int | None:
    """``OOD_LENS_DEFAULT_N`` when it is a whole number >= 1, else ``fallback``."""
    text = (os.environ if env is None else env).get(ENV_DEFAULT_N, "").strip()
    try:
        n = int(text)
    except ValueError:
        return fallback
    return n if n >= 1 else fallback


def layer_sort_key(lid: str) -> tuple[int, int]:
    """``"1-11"`` -> ``(1, 11)``, so ``"1-5"`` sorts before ``"1-11"``."""
    depth, _, index = str(lid).partition("-")
    try:
        return int(depth), int(index)
    except ValueError:
        return (1 << 30, 1 << 30)


def written_layer(layer: Any) -> str:
    """A layer id in the one written form (``"1-11"``); text that is no layer id stays as is,
    so that the page can name it in its error."""
    try:
        return layer_text(parse_layer_id(layer))
    except ValueError:
        return str(layer)


def initial_layers(config: RunConfig) -> list[str]:
    """The Layers page's first selection: every layer the config's scores read, by (depth,
    index). Their own layer choices stay as the config gives them until this selection changes."""
    layers = {written_layer(lid) for spec in config.scores for lid in spec.layers}
    return sorted(layers, key=layer_sort_key)


def default_baseline(config: RunConfig | None = None) -> str:
    """Name of the config's baseline score (its first score when it names none; ``"-"`` when it
    has no score)."""
    cfg = example_config() if config is None else config
    names = [spec.name for spec in cfg.scores]
    base = cfg.baseline
    if isinstance(base, int) and 0 <= base < len(names):
        return names[base]
    if isinstance(base, str) and base in names:
        return base
    return names[0] if names else "-"


def default_state(
    config: RunConfig | None = None,
    env: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Every key a page reads, with its value in a new session (``config``: the example run)."""
    cfg = example_config() if config is None else config
    bundled_data = next(iter(data_mod.BUNDLED))
    ind_bundled = cfg.ind_dataset in data_mod.BUNDLED
    ood_bundled = [
        sc.dataset
        for sc in cfg.scenarios
        if sc.dataset in data_mod.BUNDLED and sc.split == "test" and sc.config is None
    ]
    extra = next((sc for sc in cfg.scenarios if sc.dataset and sc.dataset not in ood_bundled), None)
    names = list(dict.fromkeys(spec.name for spec in cfg.scores))
    bundled_model = cfg.model_repo == "bundled"
    return {
        "model_repo": cfg.model_repo,
        "model_entry": cfg.model_entry,
        "model_output": cfg.output,
        "ind_source": cfg.ind_dataset,
        "ind_config": None,
        "cal_split": cfg.calibration_split,
        "test_split": cfg.test_split,
        "layers": initial_layers(cfg),
        "layers_version": 0,
        "result": None,
        "model_error": None,
        "output_error": None,
        "data_error": None,
        "run_error": None,
        "last_run": None,
        "score_layers_src": {},
        "w.n_cal": default_n(cfg.n_calibration, env),
        "w.n_test": default_n(cfg.n_test, env),
        "w.model_src": MODEL_SOURCES[0] if bundled_model else MODEL_SOURCES[1],
        "w.bundled_entry": cfg.model_entry if bundled_model else "",
        "w.gh_repo": "" if bundled_model else cfg.model_repo,
        "w.gh_entry": "" if bundled_model else cfg.model_entry,
        "w.local_dir": "",
        "w.local_entry": "",
        "w.model_output": output_text(cfg.output),
        "w.data_src": DATA_SOURCES[0] if ind_bundled else DATA_SOURCES[2],
        "w.bundled_data": cfg.ind_dataset if ind_bundled else bundled_data,
        "w.data_path": "",
        "w.hf_id": "" if ind_bundled else cfg.ind_dataset,
        "w.hf_config": "",
        "w.hf_cal_split": cfg.calibration_split if not ind_bundled else "train",
        "w.hf_test_split": cfg.test_split,
        "w.scores": names,
        "w.perts": list(dict.fromkeys(sc.kind for sc in cfg.scenarios if sc.kind)),
        "w.ood_bundled": list(dict.fromkeys(ood_bundled)),
        "w.ood_extra": extra.dataset if extra else "",
        "w.ood_extra_config": (extra.config or "") if extra else "",
        "w.ood_extra_split": extra.split if extra else "test",
        "w.metrics": list(cfg.metrics),
        "w.metric_custom": "",
        "w.n_boot": cfg.n_boot,
        "w.baseline": default_baseline(cfg),
        "w.exec_executor": cfg.executor,
        "w.exec_workers": cfg.workers,
        "w.exec_address": cfg.address,
        "w.exec_device": cfg.device,
        "w.exec_amp": cfg.amp or AMP_OFF,
    }


def example_choices(config: RunConfig | None = None) -> dict[str, Any]:
    """Per-score layers and score / perturbation parameters of the example run, set once per
    session (later they are the user's), with the selection the layers were derived from."""
    cfg = example_config() if config is None else config
    out: dict[str, Any] = {}
    src: dict[str, tuple[str, ...]] = {}
    selection = tuple(initial_layers(cfg))
    for spec in cfg.scores:
        if spec.layers:
            out[score_layer_key(spec.name)] = [str(lid) for lid in spec.layers]
            src[spec.name] = selection
        for name, value in spec.params.items():
            out[param_key(spec.name, name)] = value
    for sc in cfg.scenarios:
        if sc.kind:
            for name, value in sc.params.items():
                out[param_key(pert_owner(sc.kind), name)] = value
    out["score_layers_src"] = src
    return out


def init_state(
    state: MutableMapping[str, Any] | None = None, config: RunConfig | None = None
) -> None:
    """Fill in missing keys (idempotent) and keep widget values across pages.

    ``state`` defaults to ``st.session_state``; ``config`` to the example run."""
    if state is None:
        import streamlit as st

        state = st.session_state
    if "initialised" not in state:
        for key, value in example_choices(config).items():
            state.setdefault(key, value)
        state["initialised"] = True
    for key, value in default_state(config).items():
        if key not in state:
            state[key] = value
    for key in list(state.keys()):  # re-assigning keeps a widget's value when it is not drawn
        if isinstance(key, str) and key.startswith(WIDGET_PREFIX):
            state[key] = state[key]
