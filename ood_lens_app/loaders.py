"""Model and dataset loading for the dashboard: checked against the server's source policy
(:mod:`ood_core.policy`), cached per process, plus the bundled model list, layer tables and test
predictions built on them.

The ``st.cache_*`` functions are thin; what they compute is in plain functions
(:func:`merge_entries`, :func:`predict`, :func:`ood_lens_app.layers.layer_choices`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import streamlit as st
import torch
from torch import nn

from ood_core import data as data_mod
from ood_core import hub, runner
from ood_core.core import OutputKey, predicted_classes, select_output
from ood_core.engine import FeatureCache
from ood_core.hub import HubUnavailableError
from ood_core.policy import SourcePolicy
from ood_lens_app.layers import LayerChoices, layer_choices


# ---------------------------------------------------------------------------- policy and trust
def source_policy() -> SourcePolicy:
    """The sources this server allows: all on loopback; in network mode (``server.address`` not
    loopback) only those enabled by ``OOD_LENS_ALLOW``, local paths under ``OOD_LENS_DATA_ROOTS``."""
    return SourcePolicy.from_env(st.get_option("server.address"))


def repo_trusted(repo: str, trusted: Sequence[str] = ()) -> bool:
    """Bundled, or in ``trusted`` (the repos whose trust box was ticked in this session)."""
    return hub.is_bundled(repo) or repo in trusted


# ---------------------------------------------------------------------------- models and data
def load_model(repo: str, entry: str, trust_repo: bool | None = None) -> nn.Module:
    """Checked against :func:`source_policy`, then cached per (repo, entry, trust); ``trust_repo``
    None means: trusted if bundled or ticked earlier in this session."""
    source_policy().check_model_repo(repo)
    if trust_repo is None:
        trust_repo = repo_trusted(repo, st.session_state.get("trusted_repos", ()))
    return _load_model(repo, entry, trust_repo)


@st.cache_resource(show_spinner="Loading model...", max_entries=8)
def _load_model(repo: str, entry: str, trust_repo: bool) -> nn.Module:
    return hub.load_model(repo, entry, trust_repo=trust_repo)


def load_dataset(source: str, split: str, config: str | None = None) -> data_mod.ImageDataset:
    """Checked against :func:`source_policy` (local paths confined to its data roots), cached
    per content: a local file or folder rewritten in place (even with its mtime kept) is
    loaded again (:func:`ood_core.data.source_fingerprint`)."""
    policy = source_policy()
    policy.check_data_source(source)
    roots = policy.load_roots()
    fingerprint = data_mod.source_fingerprint(source, roots)
    return _load_dataset(source, split, config, roots, fingerprint)


@st.cache_resource(show_spinner="Loading data...", max_entries=12)
def _load_dataset(
    source: str,
    split: str,
    config: str | None,
    roots: tuple[str, ...] | None,
    fingerprint: str | None = None,
) -> data_mod.ImageDataset:
    return data_mod.load(source, split, config, roots=roots)


@st.cache_resource(show_spinner=False)
def shared_features() -> FeatureCache:
    """The feature cache of this dashboard process, shared by all its sessions, so that it
    survives a reload (F5 starts a new session): 1 GiB in memory, then a feature store on disk
    removed when the process exits. Its keys name content (model key, data key with the
    datasets' fingerprints) and it is thread-safe, so two sessions never see each other's
    stale features."""
    return FeatureCache(store=runner.session_store())


def model_for_run() -> nn.Module:
    """The session's current model, read through its chosen output (``model_output``,
    :func:`ood_core.core.select_output`)."""
    ss = st.session_state
    return select_output(load_model(ss["model_repo"], ss["model_entry"]), ss.get("model_output"))


def dataset(split_key: str) -> data_mod.ImageDataset:
    """The full InD split named by state key ``split_key`` (``"cal_split"`` or ``"test_split"``)."""
    ss = st.session_state
    return load_dataset(ss["ind_source"], ss[split_key], ss["ind_config"])


# ---------------------------------------------------------------------------- bundled models
def merge_entries(
    entries: Sequence[Mapping[str, Any]], records: Mapping[str, Mapping[str, Any]]
) -> list[dict[str, Any]]:
    """Bundled entry points (``{"name", "doc"}``, hub order) with their recorded test accuracy;
    when the hub cannot list them, the entries of the training records."""
    rows = [dict(e) for e in entries] or [{"name": n, "doc": ""} for n in records]
    for row in rows:
        row["accuracy"] = (records.get(row["name"]) or {}).get("test_accuracy")
    return rows


@st.cache_data(show_spinner=False, ttl=60)
def bundled_entries() -> list[dict[str, Any]]:
    """Entry points of the bundled hub with their docstring line and recorded accuracy."""
    try:
        entries = hub.list_entries("bundled")
    except HubUnavailableError:
        entries = []
    try:
        records = hub.bundled_records()
    except (OSError, ValueError):
        records = {}
    return merge_entries(entries, records)


# ---------------------------------------------------------------------------- layers
@st.cache_data(show_spinner="Reading the layer table...", max_entries=16)
def _layer_choices(
    repo: str, entry: str, shape: tuple[int, ...], output: OutputKey | None = None
) -> LayerChoices:
    # a fixed random image in [0, 1]: the head and feature checks compare values, which an
    # all-zero example can make equal by accident
    example = torch.rand(1, *shape, generator=torch.Generator().manual_seed(0))
    return layer_choices(select_output(load_model(repo, entry), output), example)


def current_layer_choices() -> LayerChoices:
    """Layer table and quick picks of the current model, traced on the InD images' shape."""
    ss = st.session_state
    calib = dataset("cal_split")
    shape = tuple(calib.sample_shape)
    return _layer_choices(ss["model_repo"], ss["model_entry"], shape, ss.get("model_output"))


# ---------------------------------------------------------------------------- predictions
@st.cache_data(show_spinner="Computing the model's accuracy...", max_entries=16)
def test_predictions(
    repo: str,
    entry: str,
    source: str,
    split: str,
    config: str | None,
    n: int,
    seed: int,
    output: OutputKey | None = None,
) -> np.ndarray:
    """Predicted classes of the test subset a run scores (``n`` samples drawn with ``seed``),
    the model read through ``output``."""
    net = select_output(load_model(repo, entry), output)
    test = load_dataset(source, split, config).subset(n, seed)
    return predicted_classes(net, test.images)
