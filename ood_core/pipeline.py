"""A whole evaluation run from a declarative config: what the CLI and the dashboard both call.

A :class:`RunConfig` names the model (hub reference + entry), the InD data (calibration and test
splits, sizes, seed), the scores with their parameters and layers, the OoD scenarios
(perturbations of the InD test set and real OoD datasets) and the metrics. It round-trips through
TOML (``to_toml`` / ``from_toml``): the dashboard exports it and ``ood-lens run`` replays it.

:func:`run` returns a :class:`RunResult` (confidences, metrics, tidy tables, timings). It reuses a
:class:`RunCache` across calls: models and datasets are loaded once, fitted scores and their
confidences are cached per (model, data, score, layers), so changing one score's parameter
recomputes only that score.
"""

from __future__ import annotations

import time
import tomllib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import tomli_w
import torch
from torch import nn

from ood_core import data as data_mod
from ood_core import hub
from ood_core.diagnostics import about, collect
from ood_core.engine import Engine, predicted_confidence
from ood_core.eval import compute_metrics
from ood_core.metrics import DEFAULT_METRICS, Metric, parse_metric
from ood_core.perturbations import make_perturbation
from ood_core.recorder import LayerId, iter_layer_ids
from ood_core.report import confidences_frame, results_frame, score_label
from ood_core.scores import make_score
from ood_core.scores.base import BaseScore

StageProgress = Callable[[str, float], None]
"""``progress(stage label, fraction done in [0, 1])``."""


@dataclass
class ScoreSpec:
    """One score: registry name, constructor parameters, layer ids (``"d-i"`` strings)."""

    name: str
    params: dict[str, Any] = field(default_factory=dict)
    layers: list[str] = field(default_factory=list)

    def build(self) -> BaseScore:
        """The score object. TOML has no null: the string ``"None"`` stands for ``None``."""
        params = {k: (None if v == "None" else v) for k, v in self.params.items()}
        return make_score(self.name, **params)

    def layer_ids(self) -> tuple[LayerId, ...]:
        return tuple(iter_layer_ids(self.layers))

    def key(self) -> tuple:
        return (self.name, tuple(sorted((k, repr(v)) for k, v in self.params.items())), self.layer_ids())


@dataclass
class ScenarioSpec:
    """A perturbation of the InD test images (``kind`` + params) or a real dataset (``dataset``)."""

    kind: str | None = None
    params: dict[str, Any] = field(default_factory=dict)
    dataset: str | None = None
    split: str = "test"
    config: str | None = None
    title: str | None = None

    def __post_init__(self) -> None:
        if (self.kind is None) == (self.dataset is None):
            raise ValueError("A scenario is either a perturbation (kind=...) or a dataset (dataset=...).")

    def describe(self) -> str:
        if self.title:
            return self.title
        if self.kind is not None:
            return make_perturbation(self.kind, **self.params).describe()
        if self.dataset in data_mod.BUNDLED:
            return data_mod.BUNDLED[self.dataset]["title"]
        return f"{self.dataset} ({self.split})"

    def key(self) -> tuple:
        return (self.kind, tuple(sorted((k, repr(v)) for k, v in self.params.items())),
                self.dataset, self.split, self.config)  # fmt: skip


@dataclass
class RunConfig:
    """Everything a run needs; see the module docstring and ``ood-lens example-config``."""

    model_repo: str = "bundled"
    model_entry: str = "tiniest"
    ind_dataset: str = "fashion_mnist"
    calibration_split: str = "calibration"
    test_split: str = "test"
    n_calibration: int | None = 1000
    n_test: int | None = 1000
    seed: int = 0
    scores: list[ScoreSpec] = field(default_factory=list)
    scenarios: list[ScenarioSpec] = field(default_factory=list)
    metrics: list[str] = field(default_factory=lambda: [repr(m) for m in DEFAULT_METRICS])
    baseline: int | None = 0
    n_boot: int = 0
    batch_size: int | None = None

    def metric_objects(self) -> list[Metric]:
        return [parse_metric(m) for m in self.metrics]

    # ---------------------------------------------------------------- TOML round trip
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        out: dict[str, Any] = {
            "model": {"repo": d["model_repo"], "entry": d["model_entry"]},
            "data": {k: d[k] for k in ("ind_dataset", "calibration_split", "test_split", "seed")},
            "evaluation": {"metrics": d["metrics"], "n_boot": d["n_boot"]},
            "scores": [{k: v for k, v in s.items() if v not in ({}, [])}
                       | {"layers": s["layers"], "params": _toml_safe(s["params"])}
                       for s in d["scores"]],
            "scenarios": [{k: v for k, v in s.items() if v not in (None, {})} for s in d["scenarios"]],
        }  # fmt: skip
        for key in ("n_calibration", "n_test"):
            if d[key] is not None:
                out["data"][key] = d[key]
        if d["baseline"] is not None:
            out["evaluation"]["baseline"] = d["baseline"]
        if d["batch_size"] is not None:
            out["evaluation"]["batch_size"] = d["batch_size"]
        return out

    def to_toml(self) -> str:
        header = ("# ood-lens run configuration: replay with `ood-lens run THIS_FILE --out DIR`.\n"
                  "# Layer ids are torchinfo's depth-index ('1-11' = depth 1, index 11).\n\n")  # fmt: skip
        return header + tomli_w.dumps(self.to_dict())

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunConfig:
        known = {"model", "data", "evaluation", "scores", "scenarios"}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"Unknown section(s) {sorted(unknown)} in the config; expected {sorted(known)}.")
        model, data, ev = d.get("model", {}), d.get("data", {}), d.get("evaluation", {})
        try:
            return cls(
                model_repo=model.get("repo", "bundled"), model_entry=model.get("entry", "tiniest"),
                ind_dataset=data.get("ind_dataset", "fashion_mnist"),
                calibration_split=data.get("calibration_split", "calibration"),
                test_split=data.get("test_split", "test"), n_calibration=data.get("n_calibration"),
                n_test=data.get("n_test"), seed=data.get("seed", 0),
                scores=[ScoreSpec(**s) for s in d.get("scores", [])],
                scenarios=[ScenarioSpec(**s) for s in d.get("scenarios", [])],
                metrics=ev.get("metrics", [repr(m) for m in DEFAULT_METRICS]),
                baseline=ev.get("baseline"), n_boot=ev.get("n_boot", 0),
                batch_size=ev.get("batch_size"),
            )  # fmt: skip
        except TypeError as exc:
            raise ValueError(f"Invalid config entry: {exc}") from exc

    @classmethod
    def from_toml(cls, text: str) -> RunConfig:
        return cls.from_dict(tomllib.loads(text))


def _toml_safe(params: dict[str, Any]) -> dict[str, Any]:
    """TOML has no null and no tuples: ``None`` -> ``"None"``, tuples -> lists."""
    return {k: "None" if v is None else (list(v) if isinstance(v, tuple) else v)
            for k, v in params.items()}  # fmt: skip


def example_config() -> RunConfig:
    """The seed tutorial's workload on the bundled default, plus real MNIST digits."""
    return RunConfig(
        scores=[
            ScoreSpec("Softmax"),
            ScoreSpec("GradNorm", layers=["1-12"]),
            ScoreSpec("Gram", layers=["1-5", "1-11", "1-12"]),
            ScoreSpec("KNN", {"k": 15}, ["1-11"]),
        ],
        scenarios=[
            ScenarioSpec(kind="vertical_flip"),
            ScenarioSpec(kind="darker", params={"factor": 0.5}),
            ScenarioSpec(kind="uniform_noise"),
            ScenarioSpec(dataset="mnist"),
        ],
    )


# ---------------------------------------------------------------------- caching + results
@dataclass
class RunCache:
    """Models, datasets, fitted scores and confidences reused across runs (keyed by config)."""

    models: dict[tuple, nn.Module] = field(default_factory=dict)
    datasets: dict[tuple, data_mod.ImageDataset] = field(default_factory=dict)
    fitted: dict[tuple, BaseScore] = field(default_factory=dict)
    confidences: dict[tuple, np.ndarray] = field(default_factory=dict)
    warnings: dict[tuple, list[str]] = field(default_factory=dict)
    """OodLensWarning messages per confidences key (fit warnings live on the fitted scores)."""

    def model(self, repo: str, entry: str) -> nn.Module:
        key = (repo, entry)
        if key not in self.models:
            self.models[key] = hub.load_model(repo, entry)
        return self.models[key]

    def dataset(self, source: str, split: str, n: int | None, seed: int, config: str | None = None) -> data_mod.ImageDataset:
        key = (source, split, n, seed, config)
        if key not in self.datasets:
            full_key = (source, split, None, 0, config)
            if full_key not in self.datasets:
                self.datasets[full_key] = data_mod.load(source, split, config)
            self.datasets[key] = self.datasets[full_key].subset(n, seed)
        return self.datasets[key]


@dataclass
class RunResult:
    """Outputs of :func:`run`. Confidences are float64 ``(n_scores, n)`` arrays."""

    config: RunConfig
    scores_and_layers: list[tuple[BaseScore, tuple[LayerId, ...]]]
    score_names: list[str]
    ood_titles: list[str]
    confs_ind: np.ndarray
    confs_oods: list[np.ndarray]
    metrics: list[Metric]
    evals: np.ndarray
    frame: pd.DataFrame
    timings: pd.DataFrame
    ind: data_mod.ImageDataset
    ood_images: list[torch.Tensor]
    ind_predictions: np.ndarray
    accuracy: float
    seconds: float
    warnings: list[str] = field(default_factory=list)
    """:class:`~ood_core.diagnostics.OodLensWarning` messages: degenerate fits and tied sets."""

    def confidences_frame(self) -> pd.DataFrame:
        return confidences_frame(self.confs_ind, self.confs_oods, score_names=self.score_names,
                                 oods_title=self.ood_titles)  # fmt: skip


def _data_key(cfg: RunConfig) -> tuple:
    return (cfg.ind_dataset, cfg.calibration_split, cfg.test_split, cfg.n_calibration, cfg.n_test, cfg.seed)


def run(config: RunConfig, cache: RunCache | None = None, progress: StageProgress | None = None) -> RunResult:
    """Load, fit, score and evaluate as ``config`` says (see the module docstring)."""
    t0 = time.perf_counter()
    cache = cache or RunCache()
    say = progress or (lambda stage, frac: None)
    if not config.scores:
        raise ValueError("Choose at least one score.")
    if not config.scenarios:
        raise ValueError("Choose at least one OoD scenario (a perturbation or a dataset).")
    metrics = config.metric_objects()
    say("Loading model and data", 0.0)
    net = cache.model(config.model_repo, config.model_entry)
    if config.calibration_split == config.test_split or data_mod.is_single_source(config.ind_dataset):
        # one pool of samples: calibration and test subsets are drawn disjointly
        full = cache.dataset(config.ind_dataset, config.test_split, None, 0)
        calib, ind = full.split_disjoint(config.n_calibration, config.n_test, config.seed)
    else:
        calib = cache.dataset(config.ind_dataset, config.calibration_split, config.n_calibration,
                              config.seed)  # fmt: skip
        ind = cache.dataset(config.ind_dataset, config.test_split, config.n_test, config.seed + 1)
    hub.check_compatible(net, calib.sample_shape, len(calib.class_names),
                         name=f"Model '{config.model_entry}'")  # fmt: skip
    oods, titles = [], []
    for sc in config.scenarios:
        if sc.kind is not None:
            oods.append(make_perturbation(sc.kind, **sc.params)(ind.images))
        else:
            ds = cache.dataset(sc.dataset, sc.split, config.n_test, config.seed + 2, sc.config)
            if ds.sample_shape != ind.sample_shape:
                raise ValueError(f"OoD dataset '{sc.describe()}' has images of shape {ds.sample_shape} "
                                 f"but the InD data has {ind.sample_shape}; pick a compatible set.")  # fmt: skip
            oods.append(ds.images)
        titles.append(sc.describe())
    engine = Engine.for_net(net, calib.images[:1])
    model_key = (config.model_repo, config.model_entry)
    base_key = (model_key, _data_key(config))
    pairs: list[tuple[BaseScore, tuple[LayerId, ...]]] = []
    todo_fit: list[BaseScore] = []
    for spec in config.scores:
        key = (base_key, spec.key())
        score = cache.fitted.get(key)
        if score is None:
            score = spec.build()
            score.layers = score.check_layers(spec.layer_ids(), engine.recorder)
            todo_fit.append(score)
            cache.fitted[key] = score
        pairs.append((score, score.layers))
    timings = []
    if todo_fit:
        def fit_progress(done: int, total: int) -> None:
            say(f"Extracting + fitting {len(todo_fit)} score(s) on calibration data", done / total)

        try:
            engine.fit(todo_fit, calib.images, calib.labels, batch_size=config.batch_size, progress=fit_progress)
        except Exception:
            for spec in config.scores:
                cache.fitted.pop((base_key, spec.key()), None)
            raise
        for s in todo_fit:
            timings.append({"score": repr(s), "operation": "calibration", "seconds": s.timer.entries[-1][2]})
    datasets = [("InD", ("__ind__",), ind.images)] + [
        (t, sc.key(), x) for t, sc, x in zip(titles, config.scenarios, oods, strict=True)
    ]
    confs: dict[str, list[np.ndarray]] = {}
    for title, dkey, x in datasets:
        missing = [(i, s) for i, (s, _) in enumerate(pairs)
                   if (base_key, config.scores[i].key(), dkey) not in cache.confidences]  # fmt: skip
        if missing:
            def score_progress(done: int, total: int, title: str = title) -> None:
                say(f"Scoring {title}", done / total)

            with collect() as messages:
                per = engine.confidences([s for _, s in missing], x, batch_size=config.batch_size,
                                         progress=score_progress, dataset=title)  # fmt: skip
            if dkey == ("__ind__",):
                cache.confidences[(base_key, "predictions")] = per[0][0].argmax(1).cpu().numpy()
            for (i, s), (logits, conf) in zip(missing, per, strict=True):
                cache.confidences[(base_key, config.scores[i].key(), dkey)] = (
                    predicted_confidence(logits, conf).double().cpu().numpy())
                cache.warnings[(base_key, config.scores[i].key(), dkey)] = about(s, messages)
                timings.append({"score": repr(s), "operation": f"inference: {title}",
                                "seconds": s.timer.entries[-1][2]})  # fmt: skip
        confs[title] = [cache.confidences[(base_key, config.scores[i].key(), dkey)] for i in range(len(pairs))]
    say("Computing metrics", 0.95)
    names = [score_label(s, layers, multiline=False) for s, layers in pairs]
    confs_ind = np.stack(confs["InD"])
    confs_oods = [np.stack(confs[t]) for t in titles]
    evals = compute_metrics(confs_ind, confs_oods, metrics, score_names=names)
    frame = results_frame(evals, scores_and_layers=pairs, oods_title=titles, metrics=metrics,
                          confs_ind=confs_ind, confs_oods=confs_oods, n_boot=config.n_boot,
                          seed=config.seed)  # fmt: skip
    notes = [m for s, _ in pairs for m in s.fit_warnings] + [
        m for dkey in (d for _, d, _ in datasets) for spec in config.scores
        for m in cache.warnings.get((base_key, spec.key(), dkey), [])]  # fmt: skip
    pred = cache.confidences[(base_key, "predictions")]
    acc = float((pred == ind.labels.numpy()).mean())
    say("Done", 1.0)
    return RunResult(
        config=config, scores_and_layers=pairs, score_names=names, ood_titles=titles,
        confs_ind=confs_ind, confs_oods=confs_oods, metrics=metrics, evals=evals, frame=frame,
        timings=pd.DataFrame(timings, columns=["score", "operation", "seconds"]), ind=ind,
        ood_images=oods, ind_predictions=pred, accuracy=acc, seconds=time.perf_counter() - t0,
        warnings=list(dict.fromkeys(notes)),
    )  # fmt: skip



def result_figures(result: RunResult) -> list[tuple[str, Any]]:
    """The report's figures: summary grid, one histogram per score, one ROC per scenario."""
    from ood_core import plots

    figs = [("Summary", plots.summary_plot(result.confs_ind, result.confs_oods,
                                           scores_and_layers=result.scores_and_layers,
                                           oods_title=result.ood_titles))]  # fmt: skip
    for i, name in enumerate(result.score_names):
        series = {"InD": result.confs_ind[i]} | {
            t: c[i] for t, c in zip(result.ood_titles, result.confs_oods, strict=True)}
        figs.append((f"Confidences: {name}", plots.histogram_figure(series, title=name)))
    for t, c in zip(result.ood_titles, result.confs_oods, strict=True):
        curves = {n: (result.confs_ind[i], c[i]) for i, n in enumerate(result.score_names)}
        figs.append((f"ROC: InD vs {t}", plots.roc_figure(curves, title=f"InD vs {t}")))
    return figs


def metrics_wide(result: RunResult) -> pd.DataFrame:
    """Wide metric table: a row per score, a column per (OoD set, metric)."""
    wide = result.frame.assign(score=result.frame["score"] + result.frame["layers"].map(
        lambda s: f" @ {s}" if s else "")).pivot_table(index="score", columns=["ood", "metric"],
                                                       values="value", sort=False)  # fmt: skip
    wide.columns = [f"{o} | {m}" for o, m in wide.columns]
    return wide.reset_index()


def export(result: RunResult, out_dir: Any) -> dict[str, Any]:
    """Write metrics.csv, confidences.parquet, config.toml and a self-contained report.html."""
    from ood_core.report import html_report, write_bundle

    cfg = result.config
    notes = (f"Model {cfg.model_entry} from {cfg.model_repo}; InD {cfg.ind_dataset} "
             f"({len(result.ind)} test samples, accuracy {result.accuracy:.2%}); "
             f"run time {result.seconds:.1f} s.")  # fmt: skip
    tables = [("Metrics", metrics_wide(result)), ("All values", result.frame)]
    if result.warnings:
        tables.insert(0, ("Warnings", pd.DataFrame({"warning": result.warnings})))
    page = html_report("ood-lens report", result_figures(result), tables, notes)
    return write_bundle(out_dir, metrics_frame=result.frame, confidences=result.confidences_frame(),
                        report_html=page, config_toml=cfg.to_toml())  # fmt: skip
