"""Input-perturbation scores: how the prediction moves when the input is squeezed
(``FeatureSqueezing``) or noised (``Odds``). Both run extra forward passes on modified inputs
(``own_pass``). Defaults compute what the reference library (scio) computes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from functools import partial
from typing import Any

import torch
from torch import Tensor

from ood_core.budget import (
    check_budget,
    forward_bytes_per_sample,
    net_device_dtype,
    numel,
    per_sample_numel,
)
from ood_core.diagnostics import degenerate
from ood_core.engine import Engine
from ood_core.params import Param
from ood_core.recorder import Recorder
from ood_core.scores.aggregation import AGGREGATIONS, AggregationParam, aggregate
from ood_core.scores.base import BaseScore, Features
from ood_core.scores.labels import UsesLabels
from ood_core.scores.registry import register_score

Squeezer = Callable[[Tensor], Tensor]

MAX_BITS = 31
SQUEEZER_FORMS = (
    f"'bits:B' (quantisation to B bits, 1 <= B <= {MAX_BITS}), 'median:S' (S x S "
    "median filter per channel, S >= 1) or a callable mapping a batch to a batch "
    "of the same shape"
)


# ---------------------------------------------------------------------------------- squeezers
def reduce_bit_depth(x: Tensor, bits: int, style: str = "reference") -> Tensor:
    """Quantise ``x`` (in [0, 1)) to ``bits`` bits. ``style="reference"`` (the reference library):
    the centre of its bin of width ``2^-bits``, ``(round(x 2^b) + 1/2) / 2^b`` (1 maps to ``1 +
    2^-(b+1)``); ``"paper"`` (the paper's code): ``round(x (2^b - 1)) / (2^b - 1)``, which keeps 0
    and 1. Rounding half to even."""
    if style == "paper":
        levels = 2**bits - 1
        return torch.round(x * levels) / levels
    scale = 2**bits
    return ((x * scale).round() + 0.5) / scale


def _reflect_index(n: int, before: int, after: int, device: torch.device) -> Tensor:
    """Indices of ``range(-before, n + after)`` reflected with the edge sample repeated
    (``d c b a | a b c d | d c b a``: numpy ``symmetric``, scipy.ndimage ``reflect``)."""
    i = torch.arange(-before, n + after, device=device) % (2 * n)
    return torch.where(i >= n, 2 * n - 1 - i, i)


def median_smooth(x: Tensor, size: int, style: str = "reference") -> Tensor:
    """Median filter of window ``size`` per sample (and per channel), as the reference library
    (``scipy.ndimage.vectorized_filter(x, np.median, size, mode='reflect')``).

    Samples ``(N, L)`` are filtered along ``L``, ``(N, H, W)`` and ``(N, C, H, W)`` over the last
    two dims (channels first). Edge-repeating reflection; for an even ``size`` the window spans
    ``size // 2`` before and ``(size - 1) // 2`` after the centre, and the median is the mean of
    the two middle values (``style="paper"``: the upper one, as ``scipy.ndimage.median_filter``
    in the paper's code).
    """
    if not 2 <= x.ndim <= 4:
        raise ValueError(
            f"median squeezing needs samples of 1, 2 or 3 dims, (N, L), (N, H, W) or "
            f"(N, C, H, W); got shape {tuple(x.shape)}."
        )
    if size == 1:
        return x
    dims = (1,) if x.ndim == 2 else (x.ndim - 2, x.ndim - 1)
    window = size ** len(dims)
    check_budget(  # the windows are materialised (and copied once by the selection)
        f"median squeezing 'median:{size}' of a batch of {len(x):,} inputs (x{window:,} "
        "values per pixel)",
        3 * x.numel() * window * x.element_size(),
        "use a smaller median window or a smaller batch_size",
        x.device,
    )
    windows = x
    for d in dims:
        windows = windows.index_select(
            d, _reflect_index(x.shape[d], size // 2, (size - 1) // 2, x.device)
        )
    for d in dims:
        windows = windows.unfold(d, size, 1)
    windows = windows.reshape(*x.shape, -1)
    k = windows.shape[-1]
    lower = windows.kthvalue((k + 1) // 2, dim=-1).values
    if k % 2:
        return lower
    if style == "paper":
        return windows.kthvalue(k // 2 + 1, dim=-1).values
    upper = windows.kthvalue(k // 2 + 1, dim=-1).values
    return (lower + upper) / 2


def parse_squeezer(owner: str, item: Any, style: str = "reference") -> Squeezer:
    """One squeezer as a callable: ``'bits:B'`` / ``'median:S'`` (the text after the colon is read
    by ``int``, as the reference) or a callable kept as is; ValueError naming the accepted forms."""
    if callable(item) and not isinstance(item, str):
        return item
    if not isinstance(item, str):
        raise ValueError(
            f"{owner}: squeezer {item!r} in parameter 'squeezers' is neither a string "
            f"nor callable; each squeezer must be {SQUEEZER_FORMS}."
        )
    for prefix, low, high, fn in (
        ("bits:", 1, MAX_BITS, reduce_bit_depth),
        ("median:", 1, None, median_smooth),
    ):
        if item.startswith(prefix):
            try:
                size = int(item[len(prefix) :].strip())
            except ValueError:
                size = None
            if size is None or size < low or (high is not None and size > high):
                raise ValueError(
                    f"{owner}: invalid squeezer {item!r} in parameter 'squeezers'; "
                    f"each squeezer must be {SQUEEZER_FORMS}."
                )
            return partial(fn, **{"bits" if fn is reduce_bit_depth else "size": size}, style=style)
    raise ValueError(
        f"{owner}: unsupported squeezer {item!r} in parameter 'squeezers'; each "
        f"squeezer must be {SQUEEZER_FORMS}, e.g. 'bits:5' or 'median:2'."
    )


def parse_squeezers(owner: str, squeezers: Any, style: str = "reference") -> list[Squeezer]:
    """A squeezer or an iterable of them -> the list of callables (ValueError when empty)."""
    items = (squeezers,) if isinstance(squeezers, str) or callable(squeezers) else tuple(squeezers)
    if not items:
        raise ValueError(
            f"{owner}: parameter 'squeezers' is empty; give at least one of "
            f"{SQUEEZER_FORMS}, e.g. ['bits:5', 'median:2']."
        )
    return [parse_squeezer(owner, item, style) for item in items]


class SqueezersParam(Param):
    """``squeezers``: one squeezer (string or callable) or an iterable of them; kept as a tuple."""

    def range_text(self) -> str:
        return "a squeezer or a list of squeezers"

    def validate(self, value: Any, owner: str) -> Any:
        if not (isinstance(value, str) or callable(value) or isinstance(value, Iterable)):
            raise ValueError(
                f"{owner}: parameter 'squeezers' must be a squeezer or a list of "
                f"squeezers, each {SQUEEZER_FORMS}; got {value!r}."
            )
        items = (value,) if isinstance(value, str) or callable(value) else tuple(value)
        parse_squeezers(owner, items)
        return items


@register_score
class FeatureSqueezing(BaseScore):
    """Feature squeezing: for each squeezer ``s``, the distance ``|| softmax(f(x)) -
    softmax(f(s(x))) ||_p`` (``p = dist_norm``, default 1); conformity ``-aggregation`` of these
    distances over the squeezers (default ``max``; per sample; 0 when no squeezer changes the
    output, more negative = more OoD). One extra forward pass per squeezer.

    ``squeezers``: one squeezer or a list of them, each a callable (a batch to a batch of the same
    shape) or a string: ``'bits:B'`` quantises inputs in [0, 1) to the centres of ``2^B`` bins,
    ``(round(x 2^B) + 1/2) / 2^B``; ``'median:S'`` is an S x S median filter per channel (see
    :func:`median_smooth`; samples of 1, 2 or 3 dims, channels first). Both as the reference
    library. Extra (not in the reference): ``squeezer_style="paper"`` makes these strings follow
    the paper's code instead: ``round(x (2^B-1)) / (2^B-1)`` (keeps 0 and 1, so an 8-bit image is
    left unchanged by ``'bits:8'``) and the upper middle value for even median windows.

    Xu, Evans & Qi, "Feature Squeezing: Detecting Adversarial Examples in Deep Neural Networks",
    NDSS 2018.
    """

    family = "input perturbation"
    reference = "Xu, Evans & Qi, NDSS 2018"
    needs_fit = False
    layer_rule = "none"
    own_pass = True
    params = (
        SqueezersParam(
            "squeezers",
            "list",
            ("bits:5", "median:2"),
            required=True,
            help="A squeezer or a list of them: 'bits:B' (B-bit quantisation), "
            "'median:S' (S x S median filter) or a callable.",
        ),
        Param(
            "dist_norm",
            "float",
            1.0,
            allow_inf=True,
            help="p of the p-norm distance between the natural and squeezed softmax outputs.",
        ),
        AggregationParam(
            "aggregation",
            "str",
            "max",
            help=f"How the squeezers' distances are combined: one of {AGGREGATIONS} "
            "or a float p (their p-norm).",
        ),
        Param(
            "squeezer_style",
            "choice",
            "reference",
            choices=("reference", "paper"),
            help="'bits:B'/'median:S' as the reference library (bin centres; mean of the middle "
            "values) or as the paper's code (round(x(2^B-1))/(2^B-1); upper middle value).",
        ),
    )

    def extract_own(self, recorder: Recorder, x: Tensor) -> Features:
        name = type(self).__name__
        out = []
        with torch.no_grad():
            for squeezer in parse_squeezers(name, self.squeezers, self.squeezer_style):
                xs = squeezer(x)
                if not isinstance(xs, Tensor) or xs.shape != x.shape:
                    raise ValueError(
                        f"{name}: squeezer {squeezer!r} returned "
                        f"{getattr(xs, 'shape', type(xs).__name__)} for inputs of "
                        f"shape {tuple(x.shape)}; it must keep the shape."
                    )
                out.append(recorder.net(xs.to(x.dtype)).detach().double())
        return {"squeezed_logits": torch.stack(out, dim=1)}

    def _conformity(self, features: Features, logits: Tensor) -> Tensor:
        p = torch.softmax(logits.double(), dim=1)
        q = torch.softmax(features["squeezed_logits"].double(), dim=2)
        dist = torch.linalg.vector_norm(p[:, None, :] - q, ord=self.dist_norm, dim=2)
        return -aggregate(dist, self.aggregation, dim=1)


# ---------------------------------------------------------------------------------- Odds
def _merge_moments(
    acc: tuple[int, Tensor, Tensor] | None, rows: Tensor
) -> tuple[int, Tensor, Tensor]:
    """Chan et al.'s pairwise update of ``(count, mean, sum of squared deviations)`` per column
    with the rows ``rows`` (float64): exact and stable, whatever the chunking."""
    n_b, mean_b = rows.shape[0], rows.mean(0)
    m2_b = ((rows - mean_b) ** 2).sum(0)
    if acc is None:
        return n_b, mean_b, m2_b
    n_a, mean_a, m2_a = acc
    n = n_a + n_b
    delta = mean_b - mean_a
    return n, mean_a + delta * (n_b / n), m2_a + m2_b + delta**2 * (n_a * n_b / n)


@register_score
class Odds(UsesLabels, BaseScore):
    """The odds are odd. With ``g_{y,z}(x) = f_z(x) - f_y(x)`` (log-odds of class ``z`` against
    ``y``) and ``x + eta`` noisy copies of ``x`` (``eta`` uniform in ``[-epsilon, epsilon]`` per
    input element), calibration records, for every class ``y`` and over all pairs (calibration
    sample of label ``y``, noise draw), the mean ``mu_yz`` and variance ``v_yz`` of the shift
    ``g_{y,z}(x + eta) - g_{y,z}(x)``. At inference, ``d_yz`` is the shift of the noise-averaged
    logits (``noise_samples`` draws per input), ``s_yz = (d_yz - mu_yz) / v_yz`` (divided by the
    *variance*, as the reference library), and the non-conformity of class ``y`` aggregates
    ``s_yz`` over ``z != y`` (``z_aggregation``: ``sum``, ``detect`` = max, ``rectify`` = min);
    conformity ``-non-conformity`` per class (a NaN statistic, e.g. of a class without
    calibration samples, gives ``-inf``).

    Noise, as the reference: drawn with ``torch.rand`` from a ``torch.Generator`` on the inputs'
    device seeded with ``rng_seed`` at every fit (``None``: torch's global generator), in the
    inputs' dtype, ``epsilon * (1 - 2 U)``; calibration draws class by class (labels 0, 1, ...; a
    class's samples in data order, the ``noise_samples`` draws of a sample consecutive), and every
    later call continues the same stream (so a second call on the same inputs gives other,
    statistically equivalent, numbers; refit to restart it). On CPU the draws do not depend on
    ``batch_size``, so they equal the reference's exactly. The inputs are kept as features: the
    noisy passes run at fit and scoring time, ``batch_size`` noisy inputs at a time (but all
    ``noise_samples`` copies of an input in one pass, so a pass holds at least
    ``noise_samples`` rows). Memory: the noisy passes are estimated before they start (the
    fit's before any forward pass) and refused, with the estimate, when they cannot fit
    (:func:`~ood_core.budget.check_budget`); lower ``noise_samples`` or ``batch_size``.

    Extras (not in the reference): ``noise`` (``gaussian``: std ``epsilon``; ``sign``: +-epsilon)
    and ``two_sided`` (aggregate ``|s_yz|``, which also flags inputs whose prediction the noise
    strengthens atypically, as far-OoD inputs often do).

    Roth, Kilcher & Hofmann, "The Odds are Odd: A Statistical Test for Detecting Adversarial
    Examples", ICML 2019.
    """

    fit_kind = "own-pass"

    family = "input perturbation"
    reference = "Roth, Kilcher & Hofmann, ICML 2019"
    layer_rule = "none"
    own_pass = True
    params = (
        Param(
            "epsilon",
            "float",
            0.1,
            low=0,
            low_exclusive=True,
            required=True,
            help="Noise scale: bound of the uniform noise (std of gaussian, size of sign noise).",
        ),
        Param(
            "noise_samples",
            "int",
            256,
            low=1,
            help="Number of noise draws per input (each one a forward pass; all draws of an "
            "input run in one pass, whose memory is checked before it starts).",
        ),
        Param(
            "z_aggregation",
            "choice",
            "sum",
            choices=("sum", "detect", "rectify"),
            help="Aggregation of the standardised shifts over z != y: sum, detect (max) or "
            "rectify (min).",
        ),
        Param(
            "rng_seed",
            "int",
            0,
            nullable=True,
            low=-(2**63),
            high=2**64 - 1,
            help="Seed of the noise generator, reset at every fit (None: torch's global RNG).",
        ),
        Param(
            "batch_size",
            "int",
            None,
            nullable=True,
            low=0,
            help="Noisy inputs per forward pass (None: automatic; 0: all at once).",
        ),
        Param(
            "noise",
            "choice",
            "uniform",
            choices=("uniform", "gaussian", "sign"),
            help="Noise distribution: uniform in [-eps, eps] (reference), gaussian (std eps), "
            "sign (+-eps).",
        ),
        Param(
            "two_sided",
            "bool",
            False,
            help="Aggregate |z| instead of z (also flags atypically negative shifts).",
        ),
        Param(
            "z_scale",
            "choice",
            "var",
            choices=("var", "std"),
            help="Divide the centred shifts by their calibration variance (reference) or "
            "standard deviation (a z-score).",
        ),
    )

    _rng: torch.Generator | None = None
    """The noise stream: seeded at every fit, continued by every later call."""
    _noise_recorder: Recorder | None = None
    """The network of the last extraction (the noisy passes run at fit and scoring time)."""

    # ------------------------------------------------------------------ noisy passes
    def _draw(self, n_rows: int, like: Tensor) -> Tensor:
        """``(n_rows, *like.shape[1:])`` noise from the score's generator, in ``like``'s dtype."""
        shape, kw = (n_rows, *like.shape[1:]), {"dtype": like.dtype, "device": like.device}
        if self.noise == "uniform":
            return self.epsilon * (1 - 2 * torch.rand(shape, generator=self._rng, **kw))
        if self.noise == "gaussian":
            return self.epsilon * torch.randn(shape, generator=self._rng, **kw)
        signs = torch.randint(0, 2, shape, generator=self._rng, device=like.device).to(like.dtype)
        return self.epsilon * (1 - 2 * signs)

    def _inputs_per_pass(self, rec: Recorder, n_inputs: int, sample_numel: int) -> int:
        """Inputs whose ``noise_samples`` noisy copies go through one forward pass."""
        bs = self.batch_size
        if bs is None:
            bs = Engine(rec).auto_batch_size((), sample_numel)
        return n_inputs if bs == 0 else max(1, bs // self.noise_samples)

    def check_memory(
        self,
        rec: Recorder,
        n_inputs: int,
        sample_numel: int,
        itemsize: int,
        device: torch.device,
        n_classes: int,
    ) -> None:
        """Refuse (:class:`~ood_core.budget.BudgetError`) noisy passes over ``n_inputs`` inputs
        whose estimated memory (:func:`~ood_core.budget.forward_bytes_per_sample` per noisy row,
        plus the float64 noisy logits) exceeds the limit."""
        k = self.noise_samples
        per_pass = min(n_inputs, self._inputs_per_pass(rec, n_inputs, sample_numel))
        rows = per_pass * k
        n_bytes = rows * (forward_bytes_per_sample(rec, itemsize) + 3 * 8 * n_classes)
        check_budget(
            f"{type(self).__name__}: a noisy forward pass of {per_pass:,} input(s) x "
            f"noise_samples={k:,} = {rows:,} rows",
            n_bytes,
            "lower noise_samples or batch_size",
            device,
        )

    def check_calibration(self, n_samples: int, class_counts: list[int] | None = None) -> None:
        super().check_calibration(n_samples, class_counts)
        rec = self.recorder_
        if rec is None:
            return
        device, dtype = net_device_dtype(rec.net)
        n_classes = per_sample_numel(rec.info((0, 1)).output_size)
        largest = max(class_counts) if class_counts else n_samples  # fit: one class at a time
        self.check_memory(rec, largest, numel(rec.input_shape), dtype.itemsize, device, n_classes)

    def _noisy_logits(self, x: Tensor) -> Iterable[tuple[slice, Tensor]]:
        """Yield ``(rows of x, noisy logits (m, noise_samples, C))``, chunk by chunk in order."""
        rec = self._noise_recorder
        k = self.noise_samples
        n_classes = per_sample_numel(rec.info((0, 1)).output_size)
        self.check_memory(rec, len(x), x[0].numel(), x.element_size(), x.device, n_classes)
        per_chunk = self._inputs_per_pass(rec, len(x), x[0].numel())
        was_training = rec.net.training
        rec.net.eval()
        try:
            with torch.no_grad():
                for start in range(0, len(x), per_chunk):
                    xc = x[start : start + per_chunk]
                    xn = xc.repeat_interleave(k, dim=0) + self._draw(len(xc) * k, xc)
                    out = rec.net(xn).detach()
                    yield slice(start, start + len(xc)), out.view(len(xc), k, -1)
        finally:
            rec.net.train(was_training)

    def extract_own(self, recorder: Recorder, x: Tensor) -> Features:
        self._noise_recorder = recorder
        return {"inputs": x.detach()}

    # ------------------------------------------------------------------ fit / score
    def _fit(self, features: Features, logits: Tensor, labels: Tensor) -> None:
        name = type(self).__name__
        x, c = features["inputs"], logits.shape[1]
        if c < 2:
            raise ValueError(f"{name} needs at least 2 classes (log-odds between classes).")
        seed = self.rng_seed
        self._rng = None if seed is None else torch.Generator(x.device).manual_seed(seed)
        mean = torch.full((c, c), float("nan"), dtype=torch.float64, device=logits.device)
        var = mean.clone()
        absent, single = [], []
        for y in range(c):
            idx = (labels == y).nonzero().squeeze(1)
            if len(idx) == 0:
                absent.append(y)
                continue
            base = logits[idx].double()
            base = base - base[:, y : y + 1]
            acc = None
            for rows, noisy in self._noisy_logits(x[idx.to(x.device)]):
                noisy = noisy.double()
                g = noisy - noisy[..., y : y + 1] - base[rows, None, :].to(noisy.device)
                acc = _merge_moments(acc, g.reshape(-1, c))
            assert acc is not None
            n, mean[y], m2 = acc
            var[y] = m2 / (n - 1) if n > 1 else float("nan")
            single += [y] if n == 1 else []
        self.g_mean, self.g_var = mean, var
        if absent:
            degenerate(
                self,
                f"no calibration sample of class(es) {absent}",
                "their statistics are NaN and their conformity -inf; calibrate with "
                "samples of every class",
            )
        if single:
            degenerate(
                self,
                f"one noisy pair only for class(es) {single} (no variance)",
                "their conformity is -inf; use more noise_samples or calibration data",
            )
        off = ~torch.eye(c, dtype=torch.bool, device=var.device)
        zero = [y for y in range(c) if y not in absent and bool((var[y][off[y]] == 0).any())]
        if zero:
            degenerate(
                self,
                f"a log-odds shift with zero variance under noise for class(es) {zero}",
                "their standardised shifts are infinite; raise epsilon",
            )

    def standardised_shifts(self, features: Features, logits: Tensor) -> Tensor:
        """``(n, C, C)``: ``s[i, y, z] = (d_yz - mu_yz) / v_yz`` (``z_scale="std"``: ``/ sqrt(v_yz)``)
        for the input ``i`` (draws the next noise of the stream)."""
        x = features["inputs"]
        avg = torch.empty(logits.shape, dtype=torch.float64, device=logits.device)
        for rows, noisy in self._noisy_logits(x):
            avg[rows] = noisy.double().mean(1).to(avg.device)
        d = avg - logits.double()
        g = d[:, None, :] - d[:, :, None]  # g[i, y, z] = d_z - d_y
        scale = self.g_var if self.z_scale == "var" else self.g_var.sqrt()
        return (g - self.g_mean) / scale

    def _conformity(self, features: Features, logits: Tensor) -> Tensor:
        s = self.standardised_shifts(features, logits)
        if self.two_sided:
            s = s.abs()
        diag = torch.eye(s.shape[1], dtype=torch.bool, device=s.device)
        if self.z_aggregation == "sum":
            nonconf = s.masked_fill(diag, 0.0).sum(2)
        elif self.z_aggregation == "detect":
            nonconf = s.masked_fill(diag, float("-inf")).amax(2)
        else:
            nonconf = s.masked_fill(diag, float("inf")).amin(2)
        return -nonconf.nan_to_num(nan=float("inf"))


# ---------------------------------------------------------------------------------- IsoMax
__all__ = ["FeatureSqueezing", "Odds"]
