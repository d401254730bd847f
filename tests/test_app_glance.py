"""Read at a glance (issue 11): fixed scenario / score colours, the headline table, the gallery's
box selection by x-range, the heatmap in network order, timings split, the HTML report layout
(no Streamlit running)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from ood_core import plots
from ood_core.report import html_report
from ood_lens_app import result_views as rv


# ---------------------------------------------------------------------------- palettes
def test_scenario_colours_fixed_and_stable() -> None:
    a = plots.scenario_colors(["flip", "noise", "mnist"])
    b = plots.scenario_colors(["flip", "noise", "mnist"])
    assert a == b and a["InD"] == plots.SCENARIO_PALETTE[0] == plots.scenario_color(0)
    assert len(set(a.values())) == 4  # all different
    assert plots.scenario_colors(["InD", "flip"])["flip"] == a["flip"]  # InD listed or not
    assert plots.scenario_colors(["x"])["InD"] == a["InD"]  # InD always the same
    many = plots.scenario_colors([f"s{j}" for j in range(20)])
    assert plots.SCENARIO_PALETTE[0] not in [many[f"s{j}"] for j in range(20)]  # never InD green


def test_a_scenario_keeps_its_colour_in_any_set_of_scenarios() -> None:
    demo = plots.scenario_colors(["Vertical flip", "Darker", "Uniformly random", "MNIST digits"])
    other = plots.scenario_colors(["MNIST digits", "Gaussian noise (std=0.2)"])
    alone = plots.scenario_colors(["Rotation (degrees=30)", "Pixel shuffle", "MNIST digits"])
    assert demo["MNIST digits"] == other["MNIST digits"] == alone["MNIST digits"]
    assert plots.scenario_colors(["Darker (factor=0.2)"])["Darker (factor=0.2)"] == demo["Darker"]
    assert list(demo.values()) == plots.SCENARIO_PALETTE[:5]  # the demo's look is unchanged
    # every built-in scenario has its own colour, all different from each other
    from ood_core import data, perturbations

    titles = [p["title"] for p in perturbations.list_perturbations()]
    titles += [d["title"] for d in data.list_bundled()]
    assert set(titles) <= set(plots.KNOWN_SCENARIOS), set(titles) - set(plots.KNOWN_SCENARIOS)
    colours = plots.scenario_colors(list(plots.KNOWN_SCENARIOS))
    assert len(set(colours.values())) == len(plots.KNOWN_SCENARIOS) + 1
    # unknown titles: stable across calls, distinct within a run while colours remain
    mine = [f"my set {j}" for j in range(5)]
    assert plots.scenario_colors(mine) == plots.scenario_colors(mine)
    assert len(set(plots.scenario_colors(mine).values())) == 6


def test_score_colours_separate_palette_and_lookup() -> None:
    names = ["Softmax()", "KNN(k=15) @ 1-11", "Gram() @ 1-5, 1-11"]
    colors = plots.score_colors(names)
    assert colors == plots.score_colors(names)
    assert list(colors.values()) == plots.SCORE_PALETTE[:3]
    assert not set(plots.SCORE_PALETTE) & set(plots.SCENARIO_PALETTE)
    assert plots.score_color(colors, "KNN(k=15)") == colors["KNN(k=15) @ 1-11"]  # timings
    assert plots.score_color(colors, "Nope()") is None


class _Named:
    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


def _trace_colors(fig, attr: str) -> dict[str, str]:
    out = {}
    for t in fig.data:
        if t.name and (t.showlegend is None or t.showlegend):
            out[t.name] = getattr(t, attr).color
    return out


def test_every_chart_uses_the_same_colours() -> None:
    rng = np.random.default_rng(0)
    ind, ood1, ood2 = rng.random(50), rng.random(50) - 0.3, rng.random(50) - 0.5
    titles = ["flip", "noise"]
    sc = plots.scenario_colors(titles)
    hist = plots.histogram_figure({"InD": ind, "flip": ood1, "noise": ood2})
    assert _trace_colors(hist, "marker") == {
        "InD": sc["InD"],
        "flip": sc["flip"],
        "noise": sc["noise"],
    }
    names = ["Softmax()", "KNN(k=5) @ 1-2"]
    colors = plots.score_colors(names)
    roc = plots.roc_figure(
        {n: (ind, ood1) for n in names}, operating_points={names[1]: (0.1, 0.5)}, colors=colors
    )
    lines = {t.name: t.line.color for t in roc.data if t.mode == "lines" and t.name}
    assert lines == colors
    marker = next(t for t in roc.data if t.mode == "markers")
    assert marker.marker.color == colors[names[1]]  # the operating point takes its score's colour
    timings = pd.DataFrame(
        {
            "score": ["Softmax()", "KNN(k=5)", "KNN(k=5)"],
            "operation": ["inference: InD", "calibration", "inference: flip"],
            "seconds": [0.1, 0.2, 0.3],
        }
    )
    fig = plots.timings_figure(timings, colors=colors)
    by_op = {t.name.split()[0]: dict(zip(t.y, t.marker.color, strict=True)) for t in fig.data}
    assert by_op["inference"] == {"Softmax()": colors["Softmax()"], "KNN(k=5)": colors[names[1]]}
    assert by_op["calibration"] == {"KNN(k=5)": colors[names[1]]}
    assert fig.data[1].x[1] == pytest.approx(0.3)
    # the report's summary grid: same scenario and score colours, two legends
    grid = plots.summary_plot(
        np.stack([ind, ind]),
        [np.stack([ood1, ood1]), np.stack([ood2, ood2])],
        scores_and_layers=[(_Named("Softmax()"), []), (_Named("KNN(k=5)"), [(1, 2)])],
        oods_title=titles,
    )
    hist_colors = {t.name: t.marker.color for t in grid.data if t.type == "histogram"}
    assert hist_colors == sc
    roc_colors = {t.name: t.line.color for t in grid.data if t.type == "scatter" and t.name}
    assert roc_colors == plots.score_colors(["Softmax()", "KNN(k=5) @ 1-2"])


def test_subplot_titles_are_wrapped() -> None:
    label = "Gram(order=3) @ 1-5, 1-11, 1-12, 1-13"
    wrapped = plots.wrap_label(label, 20)
    assert wrapped.startswith("Gram(order=3)<br>@ ")
    assert all(len(line) <= 22 for line in wrapped.split("<br>"))
    assert wrapped.replace("<br>", " ").replace(",  ", ", ") == label.replace(" @ ", " @ ")


# ---------------------------------------------------------------------------- headline table
def _result(n_boot: int = 100) -> SimpleNamespace:
    rows = []
    for score, layers in (("Softmax()", ""), ("KNN(k=5)", "1-2")):
        for ood, base in (("A", 0.6), ("B", 0.8)):
            for metric, shift in (("AUC()", 0.1), ("TPR(max_fpr=0.05)", 0.0)):
                v = base + shift + (0.05 if layers else 0.0)
                ci = (v - 0.02, v + 0.04) if n_boot else (np.nan, np.nan)
                rows.append(
                    {
                        "score": score,
                        "layers": layers,
                        "ood": ood,
                        "metric": metric,
                        "value": v,
                        "ci_low": ci[0],
                        "ci_high": ci[1],
                    }
                )
    return SimpleNamespace(
        frame=pd.DataFrame(rows),
        ood_titles=["A", "B"],
        metrics=[],
        config=SimpleNamespace(baseline=0, n_boot=n_boot),
    )


def test_headline_table_equals_the_metrics_frame() -> None:
    result = _result()
    head = rv.headline_table(result, "AUC()")
    assert list(head.values.columns) == ["A", "B", "mean"]
    assert list(head.values.index) == ["Softmax()", "KNN(k=5) @ 1-2"]
    frame = result.frame[result.frame["metric"] == "AUC()"]
    for _, row in frame.iterrows():
        label = row["score"] + (f" @ {row['layers']}" if row["layers"] else "")
        assert head.values.at[label, row["ood"]] == row["value"]
    assert head.values.at["Softmax()", "mean"] == pytest.approx((0.7 + 0.9) / 2)
    assert head.text.at["Softmax()", "A"] == "0.700 ± 0.030" and head.has_intervals
    assert head.text.at["Softmax()", "mean"] == "0.800"
    assert head.baseline_label == "Softmax()"
    plain = rv.headline_table(_result(n_boot=0), "TPR(max_fpr=0.05)")
    assert not plain.has_intervals and plain.text.at["KNN(k=5) @ 1-2", "B"] == "0.850"


def test_headline_metric_defaults_to_auroc() -> None:
    from ood_core.metrics import AUC, TPR

    assert rv.headline_metric(SimpleNamespace(metrics=[TPR(0.05), AUC()])) == "AUC()"
    assert rv.headline_metric(SimpleNamespace(metrics=[TPR(0.05)])) == repr(TPR(0.05))


# ---------------------------------------------------------------------------- selections
def test_box_selects_exactly_the_samples_in_its_x_range() -> None:
    # 10 bins over [0, 1]: the box [0.04, 0.26] holds the centres of bars 0-2 (0.05, 0.15,
    # 0.25), so Plotly's centre rule reports those bars (InD 0.0 ... 0.29, outside the box too)
    # while the box's x-range holds exactly 0.05, 0.11, 0.12, 0.21
    ind = np.array([0.0, 0.05, 0.11, 0.12, 0.21, 0.29, 0.5, 1.0])
    ood = np.array([0.03, 0.06, 0.255, 0.27, 0.9])
    series = {"InD": ind, "OoD": ood}
    plotly_points = [
        {"curve_number": c, "x": x} for c in (0, 1) for x in (0.05, 0.15, 0.25)
    ]  # what Plotly reports
    sel = {"points": plotly_points, "box": [{"x": [0.26, 0.04], "y": [0, 9]}]}
    out = rv.selection_to_indices(sel, series, nbins=10)
    assert out["InD"].tolist() == [1, 2, 3, 4]
    assert out["OoD"].tolist() == [1, 2]
    by_centre = rv.selection_to_indices({"points": plotly_points}, series, nbins=10)
    assert by_centre["InD"].tolist() == [0, 1, 2, 3, 4, 5]  # the centre rule: 2 too many
    lo, hi = 0.04, 0.26
    for name, a in series.items():
        expected = np.flatnonzero((a >= lo) & (a <= hi))
        np.testing.assert_array_equal(out[name], expected)


def test_box_members_clip_infinite_values() -> None:
    a = np.array([-np.inf, 0.0, 0.5, 1.0, np.inf])
    (idx,) = rv.box_members([a], 0.9, 2.0, nbins=10)
    assert idx.tolist() == [3, 4]  # +inf is drawn at the right edge


def test_name_choice_follows_the_score_by_name() -> None:
    state: dict = {}
    assert rv.name_choice(state, "w.s", ["a", "b", "c"]) == 0
    state["w.s"] = 2  # the user picks "c"
    assert rv.name_choice(state, "w.s", ["a", "b", "c"]) == 2
    assert rv.name_choice(state, "w.s", ["c", "a"]) == 0  # a re-run reordered the scores
    assert rv.name_choice(state, "w.s", ["a", "b"]) == 0  # "c" is gone: the default
    state["w.s"] = 1
    assert rv.name_choice(state, "w.s", ["x", "b"]) == 1  # "b" kept


# ---------------------------------------------------------------------------- layers, timings
def test_heatmap_in_network_order_with_layer_names() -> None:
    class Rec:
        layer_ids = [(0, 1), (1, 1), (1, 2), (1, 3), (1, 10), (1, 11), (2, 1)]

        def layer_name(self, lid: tuple) -> str:
            return f"m{lid[0]}_{lid[1]}"

    rec = Rec()
    score = SimpleNamespace(recorder_=rec)
    pairs = [(score, ((1, 11),)), (score, ((1, 3),)), (score, ((1, 10),)), (score, ((2, 1),))]
    order, labels = rv.layer_columns(pairs)
    assert order == ["1-3", "1-10", "1-11", "2-1"]  # not string order
    assert labels["1-11"] == "1-11 · m1_11"
    frame = pd.DataFrame(
        {
            "score": ["KNN"] * 4,
            "layers": ["1-11", "1-3", "1-10", "2-1"],
            "value": [0.4, 0.1, 0.3, 0.9],
        }
    )
    fig = plots.heatmap_figure(frame, x_order=order, x_labels=labels)
    assert list(fig.data[0].x) == [labels[o] for o in order]
    assert list(fig.data[0].z[0]) == [0.1, 0.3, 0.4, 0.9]


def test_timings_split_shared_forward_pass() -> None:
    t = pd.DataFrame(
        {
            "score": ["A", "B", "A"],
            "operation": ["calibration", "calibration", "inference: InD"],
            "seconds": [1.0, 2.0, 0.5],
        }
    )
    same, split = rv.timings_parts(t)
    assert not split and same.equals(t)
    parts, split = rv.timings_parts(t.assign(shared_seconds=[0.4, 0.4, 0.3]))
    assert split
    fwd = parts[parts["score"] == plots.FORWARD_PART].set_index("operation")["seconds"]
    assert fwd.to_dict() == pytest.approx({"calibration": 0.8, "inference: InD": 0.3})
    own = parts[parts["score"] != plots.FORWARD_PART]["seconds"].tolist()
    assert own == pytest.approx([0.6, 1.6, 0.2])
    assert parts["seconds"].sum() == pytest.approx(t["seconds"].sum())


def test_ood_captions_show_the_predicted_class() -> None:
    caps = rv.confidence_captions(
        np.array([0.5, 0.25]), [1, 0], names=["cat", "dog"], predicted=[0, 1]
    )
    assert caps == ["→ cat<br>0.25", "→ dog<br>0.5"]


# ---------------------------------------------------------------------------- report
def test_report_figures_before_long_tables_and_tables_fit_the_width() -> None:
    fig = plots.histogram_figure({"InD": np.arange(5.0)})
    wide = pd.DataFrame({f"scenario {j} | AUC()": [0.5] for j in range(20)})
    page = html_report(
        "r", [("Figure", fig)], [("Warnings", wide.iloc[:, :1]), ("All", wide)], lead_tables=1
    )
    assert page.index("Warnings") < page.index("figure-0") < page.index(">All</h2>")
    assert "table-wrap" in page and "width:100%" in page and "overflow-x:auto" in page


def test_axis_numbers_are_written_out_never_with_si_prefixes() -> None:
    """A density of 6e-4 and confidences of 2e13 read ``0.0006`` / ``20,000,000,000,000``, not
    Plotly's ``600µ`` / ``20T``: every figure's axes say so."""
    rng = np.random.default_rng(0)
    big = {"InD": rng.normal(2e13, 1e12, 200), "flip": rng.normal(1e13, 1e12, 200)}
    figures = [
        plots.histogram_figure(big),
        plots.roc_figure({"s": (big["InD"], big["flip"])}),
    ]
    for fig in figures:
        for axis in (fig.layout.xaxis, fig.layout.yaxis):
            assert axis.exponentformat == "none" and axis.separatethousands is True


def test_warnings_are_grouped_per_score() -> None:
    messages = [
        "DeepMahalanobis @ 1-11: covariance ill-conditioned ...: try inverse='pinv'",
        "KNN @ 1-11: k = 50 is 17% of the 300 calibration samples ...",
        "DeepMahalanobis @ 1-5: covariance ill-conditioned ...",
        "DeepMahalanobis @ 1-11: covariance ill-conditioned ...: try inverse='pinv'",  # repeated
        "Gram: no calibration sample deviates from its class band ...",
        "The test sets tie on 40% of their confidences; AUROC counts ties as half",
    ]
    assert rv.grouped_warnings(messages) == {
        "DeepMahalanobis": [
            "@ 1-11: covariance ill-conditioned ...: try inverse='pinv'",
            "@ 1-5: covariance ill-conditioned ...",
        ],
        "KNN": ["@ 1-11: k = 50 is 17% of the 300 calibration samples ..."],
        "Gram": ["no calibration sample deviates from its class band ..."],
        "Run": ["The test sets tie on 40% of their confidences; AUROC counts ties as half"],
    }
    assert rv.grouped_warnings([]) == {}


def test_many_scores_keep_distinct_colours_and_their_plot_height() -> None:
    names = [f"KNN(k={k}) @ 1-11" for k in range(30)]
    colors = plots.score_colors(names)
    assert len(set(colors.values())) == 30  # a 30-point sweep: no colour repeats
    assert not set(colors.values()) & set(plots.SCENARIO_PALETTE)
    assert list(colors.values())[:10] == plots.SCORE_PALETTE  # the first ten as before
    # 13 legend entries below a ROC: the figure grows, the plot keeps its 300 px
    assert plots.height_for_legend(13) - plots.height_for_legend(1) == 22 * (7 - 1)
    assert plots.height_for_legend(13, plot_px=300) - 22 * 7 - 90 == 300
