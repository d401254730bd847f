"""A whole evaluation run of a :class:`~ood_core.config.RunConfig`: what the CLI and the
dashboard both call.

:func:`run` returns a :class:`RunResult` (confidences, metrics, tidy tables, timings). It reuses a
:class:`RunCache` across calls: models and datasets are loaded once, fitted scores and their
confidences are cached per (model, data, score, layers), so changing one score's parameter
recomputes only that score. A run fits the scores not fitted yet (:func:`_fit_missing`), scores
each dataset with the scores whose confidences are not cached yet (:func:`_score_missing`), then
computes the metrics and tables (:func:`_assemble`).

Execution (``[execution]`` of the config) never changes what is computed, only where: the model
is moved to the resolved device (:func:`ood_core.devices.resolve_device`; a copy per device in
the :class:`RunCache`, the loaded CPU model is never moved), the forward passes run under the
chosen autocast (``amp``), and executor ``"ray"`` runs them on Ray actors that rebuild the model
from its hub spec (:func:`model_factory`). The device and AMP are part of the cache keys'
model identity (:meth:`~ood_core.config.RunConfig.model_key`: they change the numbers), the
executor is not. :attr:`RunResult.execution` and :attr:`RunResult.environment` record where and
how a run was computed (the bundle's ``run.json`` keeps them).
"""

from __future__ import annotations

import atexit
import copy
import dataclasses
import functools
import secrets
import shutil
import socket
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from ood_core import data as data_mod
from ood_core import hub, streams
from ood_core.config import IND_TITLE, RunConfig
from ood_core.core import Progress, ScoreProgress, predicted_confidence, select_output
from ood_core.devices import check_amp, environment_info, ray_available, resolve_device
from ood_core.diagnostics import about, collect
from ood_core.engine import Engine, FeatureCache
from ood_core.eval import compute_metrics
from ood_core.evaluation import Evaluation
from ood_core.layer_ids import LayerId
from ood_core.metrics import Metric
from ood_core.perturbations import make_perturbation
from ood_core.recorder import Recorder
from ood_core.report import confidences_frame, results_frame, score_label
from ood_core.scores.base import BaseScore
from ood_core.store import FeatureStore

StageProgress = Callable[[str, float], None]
"""``progress(stage label, fraction done in [0, 1])``."""


@dataclass
class RunCache:
    """Models, datasets, fitted scores and confidences reused across runs (keyed by config)."""

    models: dict[tuple, nn.Module] = field(default_factory=dict)
    datasets: dict[tuple, data_mod.ImageDataset] = field(default_factory=dict)
    fitted: dict[tuple, BaseScore] = field(default_factory=dict)
    confidences: dict[tuple, np.ndarray] = field(default_factory=dict)
    warnings: dict[tuple, list[str]] = field(default_factory=dict)
    """OodLensWarning messages per confidences key (fit warnings live on the fitted scores)."""
    features: FeatureCache = field(default_factory=FeatureCache)
    """Extracted features per (model, dataset, score layers, extraction): a changed or added score is fitted and
    scored from them without any forward pass."""
    recorders: dict[tuple, Recorder] = field(default_factory=dict)
    """One traced :class:`Recorder` per (model, input shape), kept here, never on the model."""

    def recorder(self, model_key: tuple, net: nn.Module, example: torch.Tensor) -> Recorder:
        """The Recorder of ``net`` for inputs shaped like ``example`` (traced once); ``net`` is
        what :func:`load_inputs` gives (the output view of a config's ``output``) and
        ``model_key`` is :meth:`~ood_core.config.RunConfig.model_key`."""
        key = (model_key, id(net), tuple(example.shape[1:]))
        if key not in self.recorders:
            for stale in [k for k in self.recorders if k[0] == model_key]:  # a reloaded model
                del self.recorders[stale]
            self.recorders[key] = Evaluation.for_net(net, example).recorder
        return self.recorders[key]

    def network(self, config: RunConfig) -> nn.Module | None:
        """The loaded (CPU) network of ``config`` read through its ``output`` (None if not
        loaded)."""
        net = self.models.get((config.model_repo, config.model_entry))
        return None if net is None else select_output(net, config.output)

    def model(
        self,
        repo: str,
        entry: str,
        trust_repo: bool = False,
        device: torch.device | None = None,
    ) -> nn.Module:
        """``entry`` of hub repository ``repo``, loaded once (on the CPU, key ``(repo, entry)``)
        and, for another ``device``, copied there once (key ``(repo, entry, "cuda:0")``): the
        loaded model, which the dashboard shares between sessions, is never moved. Trust is
        checked on every call, cached or not: a repository other than the bundled one needs
        ``trust_repo=True`` from this caller (else :class:`~ood_core.hub.UntrustedRepoError`),
        whoever loaded it first."""
        hub.require_trust(repo, trust_repo)
        key = (repo, entry)
        if key not in self.models:
            self.models[key] = hub.load_model(repo, entry, trust_repo=trust_repo)
        net = self.models[key]
        if device is None or _on_device(net, device):
            return net
        moved = (repo, entry, str(device))
        if moved not in self.models:
            self.models[moved] = copy.deepcopy(net).to(device).eval()
        return self.models[moved]

    def dataset(
        self, source: str, split: str, n: int | None, seed: int, config: str | None = None
    ) -> data_mod.ImageDataset:
        """The dataset ``source`` (subset ``n`` drawn with ``seed``), loaded once. A local file or
        folder whose content changed since (checked by content fingerprint, so a rewrite that
        kept the mtime counts) is loaded again, with the data roots it was loaded under, and
        everything computed from cached data (fits, confidences, activations) is dropped."""
        key = (source, split, n, seed, config)
        full_key = (source, split, None, 0, config)
        full = self.datasets.get(full_key)
        if full is not None and data_mod.is_stale(full):
            for k in [k for k in self.datasets if k[0] == source]:
                del self.datasets[k]
            self.fitted.clear()
            self.confidences.clear()
            self.warnings.clear()
            self.features.clear()
            self.datasets[full_key] = data_mod.load(
                source, split, config, roots=full.meta.get("roots")
            )
        if key not in self.datasets:
            if full_key not in self.datasets:
                self.datasets[full_key] = data_mod.load(source, split, config)
            self.datasets[key] = self.datasets[full_key].subset(n, seed)
        return self.datasets[key]


def _on_device(net: nn.Module, device: torch.device) -> bool:
    """Whether every parameter and buffer of ``net`` is on ``device`` (a net without any is)."""
    tensors = [*net.parameters(), *net.buffers()]
    return all(t.device == device for t in tensors)


def load_network(repo: str, entry: str, trust_repo: bool, output: int | str | None) -> nn.Module:
    """``entry`` of hub repository ``repo`` read through ``output``: what a Ray actor builds
    (module level, so that :func:`model_factory`'s partial pickles by name). The hub's trust
    check applies as everywhere (:func:`ood_core.hub.load_model`): a non-bundled repository
    loads only with ``trust_repo=True``, given by the person who started the run."""
    return select_output(hub.load_model(repo, entry, trust_repo=trust_repo), output)


def model_factory(config: RunConfig) -> Callable[[], nn.Module]:
    """A picklable callable building ``config``'s network (:func:`load_network` over its
    repository, entry, trust and output): one model copy per Ray actor, rebuilt from the hub
    spec, never the hooked module pickled."""
    return functools.partial(
        load_network, config.model_repo, config.model_entry, config.trust_repo, config.output
    )


class ExecutionError(ValueError):
    """An ``[execution]`` setting this machine cannot honour (e.g. executor ``"ray"`` without
    Ray installed); the message says what to do."""


def check_execution(config: RunConfig) -> tuple[torch.device, str | None]:
    """The resolved device and the checked AMP of ``config`` on this machine, once its executor
    is found available; :class:`~ood_core.devices.DeviceError` or :class:`ExecutionError`
    (both ``ValueError``) otherwise. Called by :func:`run` before anything is loaded."""
    device = resolve_device(config.device)
    amp = check_amp(config.amp, device)
    if config.executor == "ray" and not ray_available():
        raise ExecutionError(
            "executor \"ray\" needs Ray and ood_core.ray_engine: pip install 'ood-lens[ray]' "
            '(or use executor = "local")'
        )
    return device, amp


def new_run_id(when: float | None = None) -> str:
    """A run's id: local time to the microsecond and 6 random hex digits
    (``YYYYmmdd-HHMMSS-uuuuuu-xxxxxx``, the run store's form)."""
    us = time.time_ns() // 1000 if when is None else int(round(when * 1e6))
    seconds, micro = divmod(us, 1_000_000)
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(seconds))
    return f"{stamp}-{micro:06d}-{secrets.token_hex(3)}"


def execution_record(
    config: RunConfig, device: torch.device, amp: str | None, run_id: str
) -> dict[str, Any]:
    """Where and how a run is computed (``RunResult.execution``, run.json's ``execution``):
    executor, workers (1 for the local executor), address (``""``: a local Ray or none), the
    resolved device and the config's spec, AMP, the host name and the run id (:func:`run` adds
    ``startup_seconds``: the seconds Ray took to start here, 0 when none was started, and
    ``forward_calls``: the batched forward calls of the shared passes, 0 when every feature came
    from the cache, and ``own_pass_scores``: the scores that ran their own passes)."""
    ray = config.executor == "ray"
    return {
        "executor": config.executor,
        "workers": config.workers if ray else 1,
        "address": config.address if ray else "",
        "device": str(device),
        "device_spec": config.device,
        "amp": amp,
        "host": socket.gethostname(),
        "run_id": run_id,
    }


SESSION_STORE_BYTES = 8 * 2**30
"""Disk a session's feature store may take (least recently used entries go first)."""


def session_store(max_bytes: int = SESSION_STORE_BYTES) -> FeatureStore:
    """A feature store in a fresh temporary folder, deleted when the process exits: where a
    long-lived :class:`RunCache` (the dashboard's) spills features past its memory budget.
    Per process on purpose: a model key names a loaded network, not its weights, and streams
    and hub datasets have no fingerprint, so entries must not outlive the process that loaded
    them."""
    root = tempfile.mkdtemp(prefix="ood-lens-features-")
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    return FeatureStore(root, max_bytes)


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
    notes: list[str] = field(default_factory=list)
    """What the run adjusted or chose, e.g. a sample size above the data's, lowered to it, or an
    approximate neighbour index and its measured recall (each score's ``fit_notes``)."""
    restored_from: str | None = None
    """The bundle folder when read back by :func:`ood_core.bundle.to_result` (its scores are
    then bound to the network but not fitted); None for a result computed here."""
    execution: dict[str, Any] = field(default_factory=dict)
    """Where and how it was computed (:func:`execution_record`: executor, workers, address,
    device, device_spec, amp, host, run_id); empty for a bundle written before it was kept."""
    environment: dict[str, str] = field(default_factory=dict)
    """The versions and machine it was computed with
    (:func:`ood_core.devices.environment_info`)."""

    def confidences_frame(self) -> pd.DataFrame:
        return confidences_frame(
            self.confs_ind,
            self.confs_oods,
            score_names=self.score_names,
            oods_title=self.ood_titles,
        )


def _data_key(cfg: RunConfig, fingerprints: tuple[str | None, ...] = ()) -> tuple:
    """What a run's data is cached under: the config's data section and the content
    fingerprints of the datasets read (:attr:`RunInputs.fingerprints`), so that a cache shared
    across sessions never serves features of a file rewritten since."""
    return (
        cfg.ind_dataset,
        cfg.calibration_split,
        cfg.test_split,
        cfg.n_calibration,
        cfg.n_test,
        cfg.seed,
        cfg.streaming,
        fingerprints,
    )


@dataclass
class RunInputs:
    """What a config's run reads: the network (read through the config's ``output``,
    :func:`~ood_core.core.select_output`), the calibration and InD test sets, the OoD
    inputs (one tensor per scenario, in config order) and their titles; the sample sizes actually
    used (None = all) and notes on sizes lowered to what the data holds."""

    net: nn.Module
    calib: data_mod.ImageDataset | streams.StreamedSet
    ind: data_mod.ImageDataset
    oods: list[torch.Tensor]
    titles: list[str]
    n_calibration: int | None
    n_test: int | None
    notes: list[str]
    fingerprints: tuple[str | None, ...] = ()
    """Content fingerprints (``meta["fingerprint"]``, None where a source has none, e.g. a
    stream or a hub dataset) of the calibration, InD test and OoD datasets, in that order."""


def load_inputs(
    config: RunConfig, cache: RunCache, device: torch.device | None = None
) -> RunInputs:
    """Load the model (on ``device``; None: where it loads, the CPU) and draw the data of a
    validated ``config`` through ``cache``: the same config (same seed) always draws the same
    samples. The data stay on the CPU (the engine moves each batch)."""
    notes: list[str] = []
    net = select_output(
        cache.model(config.model_repo, config.model_entry, config.trust_repo, device),
        config.output,
    )
    n_cal, n_test = config.n_calibration, config.n_test
    if config.streaming:  # the calibration set as a stream: never whole in memory
        calib, ind, notes = streams.streamed_split(
            config.ind_dataset,
            config.calibration_split,
            config.test_split,
            n_cal,
            n_test,
            config.seed,
        )
        n_test = len(ind) if n_test is not None else None
    elif config.calibration_split == config.test_split or data_mod.is_single_source(
        config.ind_dataset
    ):
        # one pool of samples: calibration and test subsets are drawn disjointly
        full = cache.dataset(config.ind_dataset, config.test_split, None, 0)
        calib, ind = full.split_disjoint(config.n_calibration, config.n_test, config.seed)
    else:
        calib = cache.dataset(
            config.ind_dataset, config.calibration_split, config.n_calibration, config.seed
        )
        ind = cache.dataset(config.ind_dataset, config.test_split, config.n_test, config.seed + 1)
        for key, n, got, split in (
            ("n_calibration", n_cal, calib, config.calibration_split),
            ("n_test", n_test, ind, config.test_split),
        ):
            if n is not None and n > len(got):
                notes.append(
                    f"[data] {key} = {n} is more than the {len(got)} samples of "
                    f"{config.ind_dataset!r} split {split!r}: used all {len(got)} (the "
                    f"exported config.toml records {key} = {len(got)})"
                )
        n_cal = len(calib) if n_cal is not None else None
        n_test = len(ind) if n_test is not None else None
    hub.check_compatible(
        net, calib.sample_shape, len(calib.class_names), name=f"Model '{config.model_entry}'"
    )
    oods, titles = [], []
    prints = [_fingerprint(calib), _fingerprint(ind)]
    for j, sc in enumerate(config.scenarios):
        if sc.kind is not None:
            oods.append(make_perturbation(sc.kind, **sc.params)(ind.images))
        else:
            # n_test as actually used for the InD set, so that a replay of the exported config
            # (which records it) draws the same OoD samples
            ds = cache.dataset(sc.dataset, sc.split, n_test, config.seed + 2, sc.config)
            if ds.sample_shape != ind.sample_shape:
                raise ValueError(
                    f"OoD dataset '{sc.describe()}' has images of shape {ds.sample_shape} "
                    f"but the InD data has {ind.sample_shape}; pick a compatible set."
                )
            if n_test is not None and n_test > len(ds):
                notes.append(
                    f"[[scenarios]] #{j + 1} ({sc.describe()}): n_test = {n_test} is "
                    f"more than its {len(ds)} samples: used all {len(ds)}"
                )
            oods.append(ds.images)
            prints.append(_fingerprint(ds))
        titles.append(sc.describe())
    return RunInputs(net, calib, ind, oods, titles, n_cal, n_test, notes, tuple(prints))


def _fingerprint(ds: object) -> str | None:
    meta = getattr(ds, "meta", None) or {}
    return meta.get("fingerprint")


def run(
    config: RunConfig, cache: RunCache | None = None, progress: StageProgress | None = None
) -> RunResult:
    """Load, fit, score and evaluate as ``config`` says (see the module docstring).

    ``config`` is validated first (:meth:`~ood_core.config.RunConfig.validate`,
    :class:`~ood_core.config.ConfigError`). Sample sizes above what the data holds are lowered to
    it: ``RunResult.notes`` says so and ``RunResult.config`` records the sizes actually used."""
    t0 = time.perf_counter()
    config = config.validate()
    device, amp = check_execution(config)  # before anything is loaded: fail fast
    # a one-off run keeps no features for later runs (memory stays that of the batch)
    cache = cache or RunCache(features=FeatureCache(max_bytes=0))
    say = progress or (lambda stage, frac: None)
    say("Loading model and data", 0.0)
    inputs = load_inputs(config, cache, device)
    model_key = config.model_key(str(device))
    recorder = cache.recorder(model_key, inputs.net, inputs.calib.source().example())
    engine = _executor(config, recorder, device, amp)
    try:
        evaluation = Evaluation(recorder, cache=cache.features, model_key=model_key, engine=engine)
        data_key = _data_key(config, inputs.fingerprints)
        base_key = (model_key, data_key)
        # one bar over the whole run: calibration (its images weigh as many test sets), then
        # each dataset scored, each stage's own fraction mapped into its share
        datasets = [(IND_TITLE, ("__ind__",), inputs.ind.images)] + [
            (t, sc.key(), x)
            for t, sc, x in zip(inputs.titles, config.scenarios, inputs.oods, strict=True)
        ]
        sizes = [int(inputs.n_calibration or 1)] + [len(x) for _, _, x in datasets]
        edges = np.concatenate([[0.0], np.cumsum(sizes) / max(1, sum(sizes))]) * 0.92 + 0.02
        share = [_within(say, float(edges[k]), float(edges[k + 1])) for k in range(len(sizes))]
        pairs, timings = _fit_missing(config, cache, evaluation, inputs.calib, share[0], base_key)
        # results are keyed by position (scenario identity), never by title
        confs: list[np.ndarray] = []
        for k, (title, dkey, x) in enumerate(datasets):
            stacked, rows = _score_missing(
                config, cache, evaluation, pairs, title, dkey, x, share[k + 1], base_key
            )
            confs.append(stacked)
            timings += rows
        forward_calls, own_passes = evaluation.forward_calls, list(evaluation.own_pass_scores)
    finally:
        if engine is not None and hasattr(engine, "close"):
            engine.close()  # the Ray actors (and a Ray started here) stop with the run
    startup = float(getattr(engine, "seconds_startup", 0.0))
    dkeys = [dkey for _, dkey, _ in datasets]
    result = _assemble(config, cache, inputs, pairs, dkeys, confs, timings, say, t0, base_key)
    result.execution = execution_record(config, device, amp, new_run_id())
    result.execution["startup_seconds"] = round(startup, 3)  # starting Ray here (0: none)
    result.execution["forward_calls"] = forward_calls  # 0: every feature came from the cache
    result.execution["own_pass_scores"] = own_passes  # never cached: their passes always run
    result.environment = environment_info(device)
    return result


def _within(say: StageProgress, lo: float, hi: float) -> StageProgress:
    """``say`` for one stage: its fraction in [0, 1] reported as ``lo + (hi - lo) * fraction``
    of the whole run (the dashboard's bar then only moves forward)."""
    return lambda stage, frac: say(stage, lo + (hi - lo) * min(1.0, max(0.0, frac)))


PASS_SHARE = 0.8
"""The share of a stage its forward pass gets on the progress bar (the scores' own work after
it gets the rest); a stage served from the feature cache gives the scores all of it."""


def _stage_progress(say: StageProgress, what: str) -> tuple[Progress, ScoreProgress]:
    """The progress callbacks of one stage (``what``: "Scoring MNIST"...): per batch of its
    forward pass ("forward pass, 3,200 of 5,000 images"), then per score's own work after it
    ("KNN @ 1-11 (2 of 5)"), the fraction of the stage only moving forward."""
    passed = [False]

    def on_batch(done: int, total: int) -> None:
        passed[0] = True
        total = max(total, done, 1)
        say(f"{what}: forward pass, {done:,} of {total:,} images", PASS_SHARE * done / total)

    def on_score(score: BaseScore, i: int, n: int) -> None:
        lo = PASS_SHARE if passed[0] else 0.0
        name = score_label(score, score.layers, multiline=False)
        say(f"{what}: {name} ({i + 1} of {n})", lo + (1.0 - lo) * i / max(1, n))

    return on_batch, on_score


def _executor(config: RunConfig, recorder: Recorder, device: torch.device, amp: str | None) -> Any:
    """The engine running ``config``'s passes: None for the local executor in full precision
    (:class:`Evaluation`'s own engine), an :class:`~ood_core.engine.Engine` under AMP, or a
    :class:`~ood_core.ray_engine.RayEngine` (one model per actor from :func:`model_factory`;
    on CUDA, a local Ray shares this machine's GPUs among the workers, a cluster gives each
    worker one)."""
    if config.executor == "ray":
        from ood_core.ray_engine import RayEngine  # Ray is optional: imported only when used

        gpus = 0.0
        if device.type == "cuda":
            local = not config.address
            gpus = min(1.0, torch.cuda.device_count() / config.workers) if local else 1.0
        return RayEngine(
            recorder,
            model_factory(config),
            address=config.address,
            workers=config.workers,
            device=str(device),
            amp=amp,
            gpus_per_worker=gpus,
        )
    if amp is not None:
        return Engine(recorder, amp=amp)
    return None


def _fit_missing(
    config: RunConfig,
    cache: RunCache,
    evaluation: Evaluation,
    calib: data_mod.ImageDataset | streams.StreamedSet,
    say: StageProgress,
    base_key: tuple,
) -> tuple[list[tuple[BaseScore, tuple[LayerId, ...]]], list[dict[str, Any]]]:
    """The (score, layers) of each of ``config.scores``, in order, and a calibration timing row
    per score fitted: fitted scores come from ``cache``, the others are built, bound and fitted
    on ``calib`` together (one pass), then cached under ``base_key`` (model key with the
    device and AMP, data key) and the score's key."""
    pairs: list[tuple[BaseScore, tuple[LayerId, ...]]] = []
    todo_fit: list[BaseScore] = []
    for spec in config.scores:
        score = cache.fitted.get((base_key, spec.key()))
        if score is None:
            score = spec.build()
            score.bind(evaluation.recorder, spec.layer_ids())
            todo_fit.append(score)
        pairs.append((score, score.layers))
    timings: list[dict[str, Any]] = []
    if not todo_fit:
        return pairs, timings

    on_batch, on_score = _stage_progress(say, f"Calibration ({len(todo_fit)} score(s) to fit)")
    evaluation.fit(  # streamed from the stored pixels: never all converted to floats at once
        todo_fit,
        calib.source(),
        calib.labels,
        batch_size=config.batch_size,
        progress=on_batch,
        data_key=(base_key[1], "__calibration__"),
        on_score=on_score,
    )
    # cached only once fitted: a run that fails or is interrupted (Ctrl-C, a Streamlit
    # rerun: BaseExceptions) leaves no half-fitted score behind
    for spec, (score, _) in zip(config.scores, pairs, strict=True):
        cache.fitted.setdefault((base_key, spec.key()), score)
    for s, shared in zip(todo_fit, evaluation.last_shared_seconds, strict=True):
        timings.append(
            {
                "score": repr(s),
                "operation": "calibration",
                "seconds": s.timer.entries[-1][2],
                "shared_seconds": shared,
            }
        )
    return pairs, timings


def _score_missing(
    config: RunConfig,
    cache: RunCache,
    evaluation: Evaluation,
    pairs: list[tuple[BaseScore, tuple[LayerId, ...]]],
    title: str,
    dkey: tuple,
    x: torch.Tensor,
    say: StageProgress,
    base_key: tuple,
) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """The ``(n_scores, n)`` confidences of dataset ``x`` (``title``, cache key ``dkey``) and an
    inference timing row per score run: the scores whose confidences on it are not cached yet
    score it together (one pass), and their confidences and warnings are cached; the InD test
    set (``dkey == ("__ind__",)``) also caches the network's predictions."""
    timings: list[dict[str, Any]] = []
    missing = [
        (i, s)
        for i, (s, _) in enumerate(pairs)
        if (base_key, config.scores[i].key(), dkey) not in cache.confidences
    ]
    if missing:
        on_batch, on_score = _stage_progress(say, f"Scoring {title}")
        with collect() as messages:
            per = evaluation.confidences(
                [s for _, s in missing],
                x,
                batch_size=config.batch_size,
                progress=on_batch,
                dataset=title,
                data_key=(base_key[1], dkey),
                on_score=on_score,
            )
        if dkey == ("__ind__",):
            cache.confidences[(base_key, "predictions")] = per[0][0].argmax(1).cpu().numpy()
        shares = evaluation.last_shared_seconds
        for (i, s), (logits, conf), shared in zip(missing, per, shares, strict=True):
            cache.confidences[(base_key, config.scores[i].key(), dkey)] = (
                predicted_confidence(logits, conf).double().cpu().numpy()
            )
            cache.warnings[(base_key, config.scores[i].key(), dkey)] = about(s, messages)
            timings.append(
                {
                    "score": repr(s),
                    "operation": f"inference: {title}",
                    "seconds": s.timer.entries[-1][2],
                    "shared_seconds": shared,
                }
            )
    stacked = np.stack(
        [cache.confidences[(base_key, config.scores[i].key(), dkey)] for i in range(len(pairs))]
    )
    return stacked, timings


def _assemble(
    config: RunConfig,
    cache: RunCache,
    inputs: RunInputs,
    pairs: list[tuple[BaseScore, tuple[LayerId, ...]]],
    dkeys: list[tuple],
    confs: list[np.ndarray],
    timings: list[dict[str, Any]],
    say: StageProgress,
    t0: float,
    base_key: tuple,
) -> RunResult:
    """The :class:`RunResult`: metrics and tables from the confidences (``confs``: the InD test
    set's, then each scenario's; ``dkeys``: their cache keys), the warnings of the fits and of
    each dataset scored, the accuracy, and ``config`` with the sample sizes actually used;
    ``t0`` is when the run started; ``base_key`` what its numbers are cached under."""
    metrics = config.metric_objects()
    say("Computing metrics", 0.95)
    names = [score_label(s, layers, multiline=False) for s, layers in pairs]
    confs_ind, confs_oods = confs[0], confs[1:]
    evals = compute_metrics(confs_ind, confs_oods, metrics, score_names=names)
    frame = results_frame(
        evals,
        scores_and_layers=pairs,
        oods_title=inputs.titles,
        metrics=metrics,
        confs_ind=confs_ind,
        confs_oods=confs_oods,
        n_boot=config.n_boot,
        seed=config.seed,
    )
    warned = [m for s, _ in pairs for m in s.fit_warnings] + [
        m
        for dkey in dkeys
        for spec in config.scores
        for m in cache.warnings.get((base_key, spec.key(), dkey), [])
    ]
    pred = cache.confidences[(base_key, "predictions")]
    acc = float((pred == inputs.ind.labels.numpy()).mean())
    say("Done", 1.0)
    used = dataclasses.replace(config, n_calibration=inputs.n_calibration, n_test=inputs.n_test)
    return RunResult(
        config=used,
        scores_and_layers=pairs,
        score_names=names,
        ood_titles=inputs.titles,
        confs_ind=confs_ind,
        confs_oods=confs_oods,
        metrics=metrics,
        evals=evals,
        frame=frame,
        timings=pd.DataFrame(timings, columns=["score", "operation", "seconds", "shared_seconds"]),
        ind=inputs.ind,
        ood_images=inputs.oods,
        ind_predictions=pred,
        accuracy=acc,
        seconds=time.perf_counter() - t0,
        warnings=list(dict.fromkeys(warned)),
        notes=list(inputs.notes) + list(dict.fromkeys(m for s, _ in pairs for m in s.fit_notes)),
    )
