"""The score interface shared by every confidence score, and its timer.

Conventions
-----------
* A score maps inputs ``x`` to ``(logits, conformity)``; ``conformity`` has shape
  ``(n, n_classes)`` and is **higher for more in-distribution** inputs. Evaluation uses the
  conformity at the predicted class (argmax of the logits). Scores that give one value per sample
  repeat it over classes.
* ``mode`` post-processes the per-class conformity ``c``: ``raw`` keeps it; ``diff`` gives
  ``c_k - max_{j != k} c_j``; ``ratio`` gives ``c_k / max_{j != k} c_j``.
* ``act_norm``: when set to ``p``, every recorded activation is divided by its per-sample p-norm
  (over all non-batch dims) before the score sees it.

How a score plugs into the single-pass engine (:mod:`ood_core.engine`)
----------------------------------------------------------------------
* ``extract(logits, activations) -> {name: tensor (batch, ...)}`` turns one batch of recorded
  activations (``{layer_id: tensor}``, already ``act_norm``-ed) into small per-sample features.
  It runs inside the shared, gradient-free forward pass.
* Scores that need gradients set ``needs_param_grad`` or return True from ``needs_input_grad``,
  and scores that need forward passes on modified inputs set ``own_pass = True``; they implement
  ``extract_own(recorder, x)`` instead and get their own batched passes.
* ``_fit(features, logits, labels)`` calibrates on the concatenated calibration features;
  ``_conformity(features, logits)`` returns ``(n, n_classes)`` or ``(n,)``.
"""

from __future__ import annotations

import copy
import inspect
import warnings
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import torch
from rich.console import Console
from rich.table import Table
from torch import Tensor, nn

from ood_core.budget import Estimates, estimating
from ood_core.core import Features, LayerId, Timed
from ood_core.evaluation import Evaluation
from ood_core.layer_ids import layer_text, layers_text
from ood_core.params import Param, fmt_value
from ood_core.recorder import Recorder

MODE_PARAM = Param(
    "mode",
    "choice",
    "raw",
    choices=("raw", "diff", "ratio"),
    help="raw: conformity as is; diff: minus the best other class; ratio: over the best other class.",
)
ACT_NORM_HELP = (
    "Divide each sample's activations by their p-norm before use (any non-zero p, inf "
    "included, as the reference; None: keep them)."
)


class NotFittedError(RuntimeError):
    """The score was used before :meth:`BaseScore.fit`."""


class ScoreTimer:
    """Durations of a score's calibration and inference calls, newest first in the report."""

    def __init__(self, owner: BaseScore) -> None:
        self.owner = owner
        self.entries: list[tuple[str, int, float]] = []

    def add(self, operation: str, n_samples: int, seconds: float) -> None:
        self.entries.append((operation, int(n_samples), float(seconds)))

    def table(self) -> Table:
        table = Table(
            title=f"ScoreTimer report for\n{self.owner!r}",
            caption="Entries are listed from newest to oldest",
        )
        for col in ("Operation", "# samples", "Duration"):
            table.add_column(col)
        for op, n, sec in reversed(self.entries):
            table.add_row(op, str(n), _fmt_duration(sec))
        return table

    @property
    def report(self) -> None:
        """Print the table of operations (newest first) to the terminal."""
        Console().print(self.table())

    def to_frame(self) -> Any:
        import pandas as pd

        return pd.DataFrame(self.entries, columns=["operation", "n_samples", "seconds"])


def _fmt_duration(seconds: float) -> str:
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("μs", 1e-6)):
        if seconds >= scale or unit == "μs":
            return f"{seconds / scale:.4g} {unit}"
    return f"{seconds:.3g} s"  # pragma: no cover


def postprocess_conformity(conformity: Tensor, mode: str) -> Tensor:
    """Apply ``mode`` (raw / diff / ratio) to an ``(n, n_classes)`` conformity tensor."""
    if mode == "raw" or conformity.shape[1] < 2:
        return conformity
    top2 = conformity.topk(2, dim=1).values
    is_top = conformity == top2[:, :1]
    best_other = torch.where(is_top, top2[:, 1:2], top2[:, :1])
    if mode == "diff":
        return conformity - best_other
    if mode == "ratio":
        return conformity / best_other
    raise ValueError(f"Unsupported mode: {mode!r}")


FIT_KINDS = {
    "none": "nothing to fit",
    "logits": "fitted on the calibration logits only",
    "streaming": "mergeable statistics accumulated batch by batch (memory independent of n)",
    "two-pass": "statistics of the calibration features, then a second pass over them",
    "class-rows": "the calibration features grouped by class, spilled to disk past 64 MiB; the "
    "fit reads one class at a time (exact per-class quantiles): memory of the largest class",
    "bank": "keeps the calibration features (a neighbour bank, exact quantiles): n x D",
    "own-pass": "runs its own passes over the calibration inputs (gradients, modified inputs)",
}
"""How a score fits (:attr:`BaseScore.fit_kind`), with what its memory grows."""


class BaseScore:
    """Base class of every confidence score (see the module docstring for the conventions).

    Subclasses declare ``params`` (constructor arguments, validated and exposed as attributes),
    ``family``, ``reference`` (paper), ``needs_fit``, ``layer_rule`` and implement the hooks.
    """

    family: ClassVar[str] = "other"
    reference: ClassVar[str] = ""
    params: ClassVar[tuple[Param, ...]] = ()
    needs_fit: ClassVar[bool] = True
    needs_param_grad: ClassVar[bool] = False
    layer_rule: ClassVar[str] = "none"
    """``none``: logits only, layers ignored; ``any``: one or more recorded layers;
    ``params``: layers that hold parameters (gradients are taken w.r.t. them)."""
    max_layers: ClassVar[int | None] = None
    suggested_layers: ClassVar[tuple[str, ...]] = ("penultimate",)
    """Default layers as :meth:`Recorder.quick_picks` keys (``logits``, ``penultimate``,
    ``blocks``; ``last_block`` = the last of the blocks), used by the CLI and the dashboard."""
    default_act_norm: ClassVar[float | None] = None
    normalises_concatenation: ClassVar[bool] = False
    """True for scores that read their layers as one concatenated vector (as the reference's
    ``activations(concatenate=True)``): the engine then hands them raw activations and the score
    applies ``act_norm`` to the concatenation itself (with
    :func:`ood_core.core.normalise_activation`); otherwise each layer is normalised on its own."""

    def __init__(self, **kwargs: Any) -> None:
        name = type(self).__name__
        declared = {p.name: p for p in self.all_params()}
        unknown = sorted(set(kwargs) - set(declared))
        if unknown:
            raise ValueError(f"{name}: unknown parameter(s) {unknown}; expected {sorted(declared)}")
        missing = [p.name for p in declared.values() if p.required and p.name not in kwargs]
        if missing:
            raise ValueError(
                f"{name}: missing required parameter(s) {missing}, e.g. {name}("
                + ", ".join(f"{m}={declared[m].default!r}" for m in missing)
                + ")"
            )
        self.values: dict[str, Any] = {
            p.name: p.validate(kwargs.get(p.name, p.default), name) for p in declared.values()
        }
        self._given = {k for k in kwargs if k in declared}
        self.timer = ScoreTimer(self)
        self.layers: tuple[LayerId, ...] = ()
        self.fitted = False
        self.fit_warnings: list[str] = []
        """:class:`~ood_core.diagnostics.OodLensWarning` messages of the last fit."""
        self.fit_notes: list[str] = []
        """What the last fit chose or measured that a run should report but that is no problem
        (e.g. an approximate neighbour index and its measured recall), set by ``_fit``."""
        self.recorder_: Recorder | None = None
        """The network's Recorder this score is bound to (by :meth:`bind`), None before."""
        self.n_classes: int | None = None
        self.check_params()

    # ------------------------------------------------------------------ declared parameters
    @classmethod
    def all_params(cls) -> tuple[Param, ...]:
        """The score's own parameters, then ``act_norm`` and ``mode``."""
        act = Param(
            "act_norm",
            "float",
            cls.default_act_norm,
            nonzero=True,
            allow_inf=True,
            nullable=True,
            help=ACT_NORM_HELP,
        )
        return (*cls.params, act, MODE_PARAM)

    @classmethod
    def describe_params(cls) -> list[dict[str, Any]]:
        """Machine-readable parameter list (name, type, default, range, help...) for UIs."""
        return [p.as_dict() for p in cls.all_params()]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "fit_kind" not in cls.__dict__ and not cls.needs_fit:
            cls.fit_kind = "none"
        # help(), IDEs and inspect.signature see the declared parameters, not **kwargs
        cls.__signature__ = inspect.Signature(
            [
                inspect.Parameter(
                    p.name,
                    inspect.Parameter.KEYWORD_ONLY,
                    default=inspect.Parameter.empty if p.required else p.default,
                )
                for p in cls.all_params()
            ]
        )

    def check_params(self) -> None:
        """Cross-parameter validation hook (raise ValueError with a clear message)."""

    def __getattr__(self, item: str) -> Any:
        values = self.__dict__.get("values")
        if values is not None and item in values:
            return values[item]
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {item!r}")

    def __setattr__(self, key: str, value: Any) -> None:
        values = self.__dict__.get("values")
        if values is not None and key in values:
            param = next(p for p in self.all_params() if p.name == key)
            values[key] = param.validate(value, type(self).__name__)
            self._given.add(key)
            if key not in ("mode",):  # changing mode keeps the fit (it is pure post-processing)
                self.__dict__["fitted"] = False
            return
        super().__setattr__(key, value)

    def config(self) -> dict[str, Any]:
        """``{"name": class name, **params}``: rebuild with :func:`ood_core.scores.make_score`."""
        return {"name": type(self).__name__, **{k: _plain(v) for k, v in self.values.items()}}

    def __repr__(self) -> str:
        shown = [
            k
            for k in self.values
            if k in self._given or next(p for p in self.all_params() if p.name == k).required
        ]
        inner = ", ".join(f"{k}={_repr_value(self.values[k])}" for k in shown)
        return f"{type(self).__name__}({inner})"

    def full_repr(self) -> str:
        inner = ", ".join(f"{k}={_repr_value(v)}" for k, v in sorted(self.values.items()))
        return f"{type(self).__name__}({inner})"

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other.values == self.values  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash(
            (
                type(self).__name__,
                tuple(sorted((k, _plain_hashable(v)) for k, v in self.values.items())),
            )
        )

    # ------------------------------------------------------------------ layers
    def check_layers(
        self, layers: Sequence[LayerId], recorder: Recorder | None = None
    ) -> tuple[LayerId, ...]:
        """Validate the layers this score is given, with messages that say what it accepts; with a
        recorder, return them in network (call) order without duplicates, as the reference library
        records them (per-layer parameters such as ``weights`` follow that order)."""
        name = type(self).__name__
        layers = tuple(layers)
        if recorder is not None:
            # As the reference library records them: duplicates dropped, network (call) order.
            order = {lid: i for i, lid in enumerate(recorder.layer_ids)}
            layers = tuple(
                sorted({recorder.check_layer(layer) for layer in layers}, key=order.__getitem__)
            )
        if self.layer_rule == "none":
            return ()
        if not layers:
            raise ValueError(self._no_layers_message(recorder))
        if self.max_layers is not None and len(layers) > self.max_layers:
            raise ValueError(f"{name} takes at most {self.max_layers} layer(s); got {len(layers)}.")
        if self.layer_rule == "params" and recorder is not None:
            for layer in layers:
                module = recorder.info(layer).module
                if not any(p.requires_grad for p in module.parameters()):
                    raise ValueError(
                        f"{name} needs layers holding parameters; {layer_text(layer)} "
                        f"({recorder.layer_name(layer)}) has none."
                    )
        return layers

    def _no_layers_message(self, recorder: Recorder | None) -> str:
        """Why no layer was given: the layers to give, or (with a recorder) why this network
        has none this score accepts, in the words of its own check on the last Linear layer."""
        name = type(self).__name__
        text = f"{name} reads internal activations: give it at least one layer id"
        if recorder is None:
            return text + ", e.g. the penultimate features."
        defaults = type(self).default_layers(recorder)
        if defaults:
            return text + f", e.g. {layers_text(defaults)} (its default layers on this network)."
        linear = [
            lid
            for lid in recorder.layer_ids[1:]
            if isinstance(recorder.info(lid).module, nn.Linear)
        ]
        probe = type(self)(**{p.name: p.default for p in self.all_params() if p.required})
        for lid in (linear or recorder.layer_ids[1:])[-1:]:
            try:
                probe.check_layers((lid,), recorder)
            except ValueError as exc:
                return f"{name} accepts no layer of this network: {exc}"
        return f"{name} accepts no layer of this network."

    @classmethod
    def default_layers(cls, recorder: Recorder) -> tuple[LayerId, ...]:
        """Sensible default layers for this score on ``recorder``'s network, in network order:
        its ``suggested_layers`` quick picks that the score accepts (:meth:`allowed_layers`;
        ``last_block`` is the last accepted block), at most ``max_layers`` (the deepest); when
        none is accepted, the last accepted penultimate layer, block or head, in that order.
        Empty for logits-only scores, or when the score accepts none of the quick picks (it then
        refuses when fitted, naming the reason)."""
        if cls.layer_rule == "none":
            return ()
        picks = recorder.quick_picks()
        allowed = set(cls.allowed_layers(recorder))
        picks = {key: [lid for lid in ids if lid in allowed] for key, ids in picks.items()}
        picks["last_block"] = picks["blocks"][-1:]
        out = {lid for key in cls.suggested_layers for lid in picks.get(key, [])}
        for key in ("penultimate", "blocks", "logits"):
            if out:
                break
            out = set(picks[key][-1:])
        chosen = tuple(lid for lid in recorder.layer_ids if lid in out)
        return chosen[-cls.max_layers :] if cls.max_layers else chosen

    suggest_layers = default_layers  # the former name

    @classmethod
    def allowed_layers(cls, recorder: Recorder) -> list[LayerId]:
        """The layers of ``recorder``'s network this score can read (one at a time): none for
        logits-only scores; layers holding trainable parameters for ``layer_rule="params"``;
        otherwise every layer below the network that the score's own :meth:`check_layers`
        accepts (e.g. only layers that feed the classifier head, for activation shaping)."""
        if cls.layer_rule == "none":
            return []
        probe = cls(**{p.name: p.default for p in cls.all_params() if p.required})
        allowed = []
        for lid in recorder.layer_ids[1:]:
            try:
                probe.check_layers((lid,), recorder)
            except ValueError:
                continue
            allowed.append(lid)
        return allowed

    def check_calibration(self, n_samples: int, class_counts: Sequence[int] | None = None) -> None:
        """Raise ``ValueError`` (naming the score, the parameter and the remedy) when
        ``n_samples`` calibration samples (``class_counts`` per class, when known) cannot fit
        this score; called before any forward pass. Default: neighbour scores need ``k`` (their
        ``k`` or JTLA's ``test["k"]``) <= ``n_samples``."""
        k = self.values.get("k")
        test = self.values.get("test")
        if k is None and isinstance(test, dict):
            k = test.get("k")
        if isinstance(k, int) and k > n_samples:
            raise ValueError(
                f"{self!r}: k={k} neighbours but only {n_samples} calibration samples; "
                f"use k <= {n_samples} or more calibration data."
            )

    def resource_estimates(
        self,
        recorder: Recorder,
        n_samples: int,
        layers: Sequence[LayerId] | None = None,
        class_counts: Sequence[int] | None = None,
    ) -> Estimates:
        """The pre-flight memory estimates of fitting this score on ``n_samples`` calibration
        samples of ``recorder``'s network, on ``layers`` (default: its own), without computing
        anything: the very :class:`~ood_core.budget.Need` s its :meth:`check_calibration` checks
        before a fit (run on a bound copy of the score under
        :func:`~ood_core.budget.estimating`; this score is left as it is), plus the warnings
        those checks raise (``notes``). Raises what binding and :meth:`check_calibration` raise
        for a choice that cannot run (a layer it does not read, a pooling that does not apply,
        ``k`` above ``n_samples``, a covariance too large to compute...)."""
        probe = copy.copy(self)
        probe.__dict__["values"] = dict(self.values)
        probe.__dict__["_given"] = set(self._given)
        probe.bind(recorder, self.layers if layers is None else layers)
        with estimating() as out, warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            probe.check_calibration(n_samples, list(class_counts) if class_counts else None)
        out.notes.extend(str(w.message) for w in caught)
        return out

    def estimate_bytes(
        self, recorder: Recorder, n_samples: int, layers: Sequence[LayerId] | None = None
    ) -> int | None:
        """The largest of :meth:`resource_estimates` in bytes, e.g. a neighbour bank or a
        covariance (None when this score estimates nothing: nothing it holds grows with the
        calibration set or the layers beyond the shared forward pass)."""
        peak = self.resource_estimates(recorder, n_samples, layers).peak
        return None if peak is None else int(peak.n_bytes)

    # ------------------------------------------------------------------ engine hooks
    @property
    def needs_input_grad(self) -> bool:
        return False

    own_pass: ClassVar[bool] = False
    """True for scores that run extra forward passes on modified inputs (no gradients)."""

    @property
    def needs_grad(self) -> bool:
        return self.needs_param_grad or self.needs_input_grad

    @property
    def needs_own_pass(self) -> bool:
        """Whether the score runs its own batched passes (``extract_own``) instead of reading the
        shared gradient-free pass."""
        return self.needs_grad or self.own_pass

    extract_params: ClassVar[tuple[str, ...] | None] = None
    """The parameters :meth:`extract` reads (``act_norm`` always counts): the features cached
    for one value set serve every other value of the remaining parameters (e.g. KNN's ``k``).
    None (the safe default): every parameter but ``mode``."""
    extract_reads_fit: ClassVar[bool] = False
    """True for scores whose :meth:`extract` reads fitted state (ReAct's thresholds at
    inference): their features are never cached."""

    def feature_key(self) -> str | None:
        """Identity of this score's per-sample features for a given network, layers and data
        (:class:`~ood_core.engine.FeatureKey`): the class and the parameters :meth:`extract`
        reads; None when they cannot be cached (:attr:`extract_reads_fit`)."""
        cls = type(self)
        if cls.extract_reads_fit:
            return None
        if cls.extract is BaseScore.extract and not self.needs_own_pass:
            return "none"  # no features at all: any such score shares the (empty) entry
        if cls.extract_params is None:
            names = sorted(set(self.values) - {"mode"})
        else:
            names = sorted({*cls.extract_params, "act_norm"})
        return f"{cls.__name__}(" + ", ".join(f"{k}={self.values[k]!r}" for k in names) + ")"

    def extract(self, logits: Tensor, activations: dict[LayerId, Tensor]) -> Features:
        """Per-sample features of one batch (inside the shared no-grad pass). Default: none."""
        return {}

    fit_kind: ClassVar[str] = "bank"
    """How the score fits with its default parameters (a :data:`FIT_KINDS` key; ``"none"`` for
    a score with ``needs_fit = False`` unless it says otherwise); README's score table lists it.
    :meth:`streams_fit` says whether this instance streams."""

    fit_note: ClassVar[str] = ""
    """When another parameter value changes how the score fits (README's score table)."""

    def streams_fit(self) -> bool:
        """Whether this instance fits from streaming statistics (:meth:`fit_state`, updated by
        the engine batch by batch, then :meth:`fit_from_state`) instead of whole features."""
        return False

    def fit_state(self) -> Any:
        """A new, empty streaming state with ``update(features, logits, labels)`` and
        ``merge(other)`` (see :mod:`ood_core.scores.statistics`)."""
        raise NotImplementedError(f"{type(self).__name__} does not fit from streaming statistics")

    def _fit_from_state(self, state: Any, logits: Tensor, labels: Tensor) -> None:
        raise NotImplementedError(f"{type(self).__name__} does not fit from streaming statistics")

    def extract_own(self, recorder: Recorder, x: Tensor) -> Features:
        """Per-sample features of one batch for scores with their own passes (gradients or
        modified inputs); ``recorder.net`` is the network, ``x`` the batch on its device."""
        raise NotImplementedError(f"{type(self).__name__} does not run its own passes")

    def _fit(self, features: Features, logits: Tensor, labels: Tensor) -> None:
        """Calibrate on calibration features. Default: nothing to fit."""

    def _conformity(self, features: Features, logits: Tensor) -> Tensor:
        raise NotImplementedError

    def conformity_from_features(self, features: Features, logits: Tensor) -> Tensor:
        """``(n, n_classes)`` conformity (mode applied) from already extracted features."""
        if self.needs_fit and not self.fitted:
            raise NotFittedError(f"{self!r} is not fitted: call fit() or eval.fit_scores() first.")
        conf = self._conformity(features, logits)
        if conf.ndim == 1:
            conf = conf[:, None].expand(-1, logits.shape[1])
        return postprocess_conformity(conf, self.mode)

    def fit_features(self, features: Features, logits: Tensor, labels: Tensor | None) -> None:
        """Calibrate from extracted features (labels default to the predictions)."""
        self._guarded_fit(lambda lab: self._fit(features, logits, lab), logits, labels)

    def fit_from_state(self, state: Any, logits: Tensor, labels: Tensor | None) -> None:
        """Calibrate from a streaming state filled over the calibration set (see
        :meth:`streams_fit`; labels default to the predictions)."""
        self._guarded_fit(lambda lab: self._fit_from_state(state, logits, lab), logits, labels)

    def _guarded_fit(self, fit: Any, logits: Tensor, labels: Tensor | None) -> None:
        """Run ``fit(labels)``; a fit that fails or is interrupted leaves the score as it was."""
        if labels is None:
            labels = logits.argmax(1)
        labels = labels.to(logits.device).long()
        if len(labels) != len(logits):
            raise ValueError(
                f"{self!r}: {len(logits)} calibration samples but {len(labels)} labels."
            )
        before = dict(self.__dict__)
        try:
            self.n_classes = logits.shape[1]
            fit(labels)
            self.fitted = True
        except BaseException:  # failed or interrupted (Ctrl-C, a Streamlit rerun): as it was
            self.__dict__.clear()
            self.__dict__.update(before)
            raise

    def bind(self, recorder: Recorder, layers: Sequence[LayerId]) -> None:
        """Bind the score to a network: validate ``layers`` (:meth:`check_layers`, which also
        derives per-network state such as head weights) and remember the recorder. Called once
        per fit by :class:`~ood_core.evaluation.Evaluation`."""
        self.layers = self.check_layers(layers, recorder)
        self.recorder_ = recorder

    # ------------------------------------------------------------------ seed-style API
    def fit(
        self,
        rnet: Recorder | torch.nn.Module,
        calib_data: Tensor,
        calib_labels: Tensor | None = None,
        *,
        layers: Sequence[LayerId] | None = None,
        batch_size: int | None = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> BaseScore:
        """Calibrate on in-distribution data. ``rnet``: a :class:`Recorder` whose recorded
        layers this score reads (as in the reference library), or a plain net with ``layers``."""
        evaluation = Evaluation.for_net(rnet, calib_data[:1])
        if layers is None:
            layers = rnet.recording if isinstance(rnet, Recorder) else ()
        self.layers = tuple(layers)
        evaluation.fit([self], calib_data, calib_labels, batch_size=batch_size, progress=progress)
        return self

    def __call__(self, x: Tensor, *, batch_size: int | None = None) -> tuple[Tensor, Tensor]:
        """``(logits (n, C), conformity (n, C))`` for inputs ``x`` (needs a prior :meth:`fit`)."""
        if self.recorder_ is None:
            if self.needs_fit or self.layers:
                raise NotFittedError(f"{self!r} is not fitted: call fit(rnet, calib_data) first.")
            raise NotFittedError(f"{self!r} has no network: call fit(net, calib_data) first.")
        ((logits, conf),) = Evaluation(self.recorder_).confidences([self], x, batch_size=batch_size)
        return logits, conf


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _plain_hashable(value: Any) -> Any:
    return tuple(value) if isinstance(value, list | tuple) else value


def _repr_value(value: Any) -> str:
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, tuple):
        return "[" + ", ".join(_repr_value(v) for v in value) + "]"
    return fmt_value(value)


__all__ = [
    "BaseScore",
    "Features",
    "NotFittedError",
    "ScoreTimer",
    "Timed",
    "postprocess_conformity",
]
