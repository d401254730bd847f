"""Choosing the model and the in-distribution data: what the Model & data page's inputs ask
for, and applying a choice (load it; on success make it current and reset the layer selection,
else keep the current one and the error message). Loaders are passed in, so these run and are
tested without Streamlit."""

from __future__ import annotations

from collections.abc import Callable, Mapping, MutableMapping, Sequence
from typing import Any

from ood_core import data as data_mod
from ood_core.core import parse_output
from ood_lens_app.errors import load_message
from ood_lens_app.layers import set_selection
from ood_lens_app.state import DATA_SOURCES, MODEL_SOURCES, trust_key

State = MutableMapping[str, Any]


def model_request(state: Mapping[str, Any]) -> tuple[str, str, bool | None]:
    """``(repo, entry, trust)`` the model inputs ask for; ``trust`` is the repo's trust box
    (None for the bundled hub, which needs none)."""
    src = state["w.model_src"]
    if src == MODEL_SOURCES[0]:
        return "bundled", state["w.bundled_entry"], None
    repo_key, entry_key = (
        ("w.gh_repo", "w.gh_entry") if src == MODEL_SOURCES[1] else ("w.local_dir", "w.local_entry")
    )
    repo = state[repo_key]
    return repo, state[entry_key], bool(state.get(trust_key(repo), False))


def apply_output(state: State, text: str) -> bool:
    """Read the Output field's ``text`` (:func:`ood_core.core.parse_output`: empty = the whole
    output, digits = an index, other text = a key); on success make it ``state["model_output"]``,
    else keep the current one and put a short message in ``state["output_error"]`` (the text
    stays in the field). The layer selection is kept: layer ids do not depend on the output.
    Returns whether it was read."""
    try:
        output = parse_output(text)
    except ValueError as exc:
        state["output_error"] = f"Output {str(text).strip()!r}: {exc}"
        return False
    state["output_error"] = None
    state["model_output"] = output
    return True


def bundled_splits(splits: Sequence[str]) -> tuple[str, str]:
    """Calibration and test splits of a bundled dataset (``calibration`` / ``test`` when it has
    them, else its first split)."""
    first = next(iter(splits))
    return (
        "calibration" if "calibration" in splits else first,
        "test" if "test" in splits else first,
    )


def data_request(state: Mapping[str, Any]) -> tuple[str, str, str, str | None]:
    """``(source, calibration split, test split, config)`` the data inputs ask for."""
    src = state["w.data_src"]
    if src == DATA_SOURCES[0]:
        name = state["w.bundled_data"]
        return (name, *bundled_splits(list(data_mod.BUNDLED[name]["splits"])), None)
    if src == DATA_SOURCES[1]:
        return state["w.data_path"].strip(), "test", "test", None
    return (
        state["w.hf_id"],
        state["w.hf_cal_split"].strip() or "train",
        state["w.hf_test_split"].strip() or "test",
        state["w.hf_config"].strip() or None,
    )


def reset_layers(state: State, picks: Callable[[], list[str]]) -> None:
    """After a model or data change: the selection becomes ``picks()`` (empty when the new
    model and data do not fit together: the page then shows why)."""
    try:
        selection = picks()
    except Exception:  # noqa: BLE001 - the page reports the incompatibility itself
        selection = []
    set_selection(state, selection)


def apply_model(
    state: State,
    repo: str,
    entry: str,
    trust: bool | None,
    load_model: Callable[..., Any],
    picks: Callable[[], list[str]],
) -> bool:
    """Load ``entry`` from ``repo`` (``load_model(repo, entry, trust_repo=trust)``); on success
    make it current (a ticked trust box is remembered for the session), else keep the current
    model and put the message in ``state["model_error"]``. Returns whether it loaded."""
    repo, entry = repo.strip(), entry.strip()
    if not repo or not entry:
        state["model_error"] = "Give both a repository and an entry point."
        return False
    try:
        load_model(repo, entry, trust_repo=trust)
    except Exception as exc:  # noqa: BLE001 - callbacks must never raise into the page
        state["model_error"] = load_message(exc, f"'{entry}' from '{repo}'")
        return False
    state["model_error"] = None
    if trust:
        state["trusted_repos"] = list(dict.fromkeys([*state.get("trusted_repos", []), repo]))
    if (repo, entry) != (state["model_repo"], state["model_entry"]):
        state["model_repo"], state["model_entry"] = repo, entry
        reset_layers(state, picks)
    return True


def apply_data(
    state: State,
    source: str,
    cal_split: str,
    test_split: str,
    config: str | None,
    load_dataset: Callable[..., Any],
    picks: Callable[[], list[str]],
) -> bool:
    """Load both splits of ``source``; on success make it the InD data, else keep the current
    data and put the message in ``state["data_error"]``. Returns whether it loaded."""
    source = source.strip()
    if not source:
        state["data_error"] = "Give a dataset (a file path or a Hugging Face id)."
        return False
    try:
        for split in dict.fromkeys((cal_split, test_split)):
            load_dataset(source, split, config).require_labels()  # InD data needs classes
    except Exception as exc:  # noqa: BLE001 - callbacks must never raise into the page
        state["data_error"] = load_message(exc, f"'{source}'")
        return False
    state["data_error"] = None
    new = (source, config, cal_split, test_split)
    if new != (state["ind_source"], state["ind_config"], state["cal_split"], state["test_split"]):
        state["ind_source"], state["ind_config"], state["cal_split"], state["test_split"] = new
        reset_layers(state, picks)
    return True


def fit_sizes(
    n_cal: int | None, n_test: int | None, cal_avail: int, test_avail: int, shared: bool
) -> tuple[int, int]:
    """Calibration / test sizes that the data can give: each in [1, its split's size] (empty =
    all); when both are drawn from one pool (``shared``: same split, or a single-file source)
    and together exceed it, they are scaled down in proportion so that they add up to it (a
    1,000-image file with the default 1,000 / 1,000 gives 500 / 500, never a Run refused)."""
    cal = max(1, min(int(n_cal or cal_avail), cal_avail))
    test = max(1, min(int(n_test or test_avail), test_avail))
    if shared and cal + test > cal_avail and cal_avail >= 2:
        cal = min(cal_avail - 1, max(1, round(cal_avail * cal / (cal + test))))
        test = cal_avail - cal
    return cal, test
