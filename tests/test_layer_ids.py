"""One written notation for layer ids ("1-11", torchinfo's) in every table, CSV, label and
message; every entry point reads it back, as well as the tuple and "(1, 11)" forms."""

from __future__ import annotations

import re
import warnings

import numpy as np
import pandas as pd
import pytest

from ood_core.bundle_writer import export
from ood_core.config import RunConfig, ScenarioSpec, ScoreSpec, relabelled
from ood_core.diagnostics import OodLensWarning, degenerate
from ood_core.layer_ids import layer_text, layers_text, parse_layer_id, parse_layer_ids
from ood_core.recorder import Recorder
from ood_core.runner import RunCache, run

WRITTEN = re.compile(r"^\d+-\d+$")


@pytest.mark.parametrize("form", ["1-11", "(1, 11)", " 1 - 11 ", "(1,11)", [1, 11], (1, 11)])
def test_every_form_reads_back_to_the_tuple(form) -> None:
    assert parse_layer_id(form) == (1, 11)
    assert layer_text(parse_layer_id(form)) == "1-11"


@pytest.mark.parametrize("bad", ["1", "1-2-3", "a-b", (1,), (1, 2, 3), (1.0, 2), (True, 1), None])
def test_what_is_no_layer_id_is_refused_naming_the_form(bad) -> None:
    with pytest.raises(ValueError, match=r'"1-5" or \(1, 5\)'):
        parse_layer_id(bad)


def test_round_trip_and_lists() -> None:
    ids = [(0, 1), (1, 5), (2, 38)]
    assert layers_text(ids) == "0-1, 1-5, 2-38"
    assert parse_layer_ids(layers_text(ids).split(", ")) == ids


def test_recorder_table_and_messages_write_d_i(net, data) -> None:
    x, _ = data
    rec = Recorder(net, input_data=x[:1])
    table = rec.layer_table()
    assert table["id"].map(bool).all() and table["id"].str.match(WRITTEN).all()
    assert parse_layer_ids(table["id"]) == list(rec.layer_ids)
    rec.record((1, 1))
    assert "Currently recording: 1-1\n" in repr(rec)
    with pytest.raises(ValueError, match=r"Unknown layer id 1-99 .*depth 1: 1-1 to 1-\d+"):
        rec.check_layer("1-99")


def test_warnings_name_the_layer_in_the_same_notation() -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        message = degenerate("KNN", "a problem", "a remedy", layer=(1, 11))
    assert message == "KNN @ 1-11: a problem: a remedy"
    assert caught[0].category is OodLensWarning


def test_results_csv_confidences_and_labels_use_d_i(tmp_path) -> None:
    cfg = RunConfig(
        n_calibration=120,
        n_test=60,
        scores=[ScoreSpec("Softmax"), ScoreSpec("KNN", {"k": 5}, [[1, 5], "(1, 11)"])],
        metrics=["AUC()"],
        scenarios=[ScenarioSpec(kind="vertical_flip")],
    )
    result = run(cfg, RunCache())
    assert result.score_names == ["Softmax()", "KNN(k=5) @ 1-5, 1-11"]
    files = export(result, tmp_path / "out")
    csv = pd.read_csv(files["metrics"])
    layers = set(csv["layers"].dropna())
    assert layers == {"1-5, 1-11"}
    confs = pd.read_parquet(files["confidences"])
    assert "KNN(k=5) @ 1-5, 1-11" in set(confs["score"])
    assert "(1, " not in files["report"].read_text()
    assert np.isfinite(result.evals).all()


def test_labels_of_earlier_exports_still_name_the_baseline() -> None:
    assert relabelled("KNN(k=5) @ (1, 5), (1, 11)") == "KNN(k=5) @ 1-5, 1-11"
    assert relabelled("KNN(k=5) @ 1-11") == "KNN(k=5) @ 1-11"
    assert relabelled("Softmax()") == "Softmax()"
