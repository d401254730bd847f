"""Scores that fit no other family: input squeezing, noise-induced log-odds shifts, and post-hoc
IsoMax prototypes in logit space.

``FeatureSqueezing`` and ``Odds`` run extra forward passes on modified inputs (``own_pass``);
``IsoMax`` reads the logits only. All statistics are computed in float64.
"""

from __future__ import annotations

import re
from math import prod

import torch
import torch.nn.functional as F
from torch import Tensor

from ood_core.params import Param
from ood_core.recorder import Recorder
from ood_core.scores.base import BaseScore, Features

MAX_BITS = 16
SQUEEZER_FORMS = (f"'bits:B' (colour depth reduction to B bits, 1 <= B <= {MAX_BITS}) or "
                  "'median:S' (S x S median filter per channel, S >= 1)")  # fmt: skip
_SQUEEZER_RE = re.compile(r"^\s*(bits|median)\s*:\s*(\d+)\s*$")

ODDS_INPUT_ELEMENTS = 2**20
"""Budget (input elements) of one noisy forward pass of :class:`Odds`: the noise samples of a batch
are processed in chunks of ``max(1, budget // (batch x input size))``."""
ISOMAX_BROADCAST_ELEMENTS = 2**24
"""Above this many ``n x C x C`` elements, :class:`IsoMax` distances use ``torch.cdist``."""
ODDS_MIN_SAMPLES = 3
"""Fewest calibration samples per class for :class:`Odds` class statistics (as the reference)."""


# ---------------------------------------------------------------------------------- squeezers
def parse_squeezers(owner: str, squeezers: tuple[str, ...] | list[str]) -> list[tuple[str, int]]:
    """``("bits:5", "median:2")`` -> ``[("bits", 5), ("median", 2)]``, or a ValueError naming
    the accepted forms."""
    if not squeezers:
        raise ValueError(f"{owner}: parameter 'squeezers' is empty; give at least one of "
                         f"{SQUEEZER_FORMS}, e.g. ['bits:5', 'median:2'].")  # fmt: skip
    parsed = []
    for item in squeezers:
        m = _SQUEEZER_RE.match(item) if isinstance(item, str) else None
        if m is None:
            raise ValueError(f"{owner}: invalid squeezer {item!r} in parameter 'squeezers'; each "
                             f"squeezer must be {SQUEEZER_FORMS}, e.g. 'bits:5' or 'median:2'.")  # fmt: skip
        kind, size = m.group(1), int(m.group(2))
        if kind == "bits" and not 1 <= size <= MAX_BITS:
            raise ValueError(f"{owner}: squeezer {item!r} needs 1 <= B <= {MAX_BITS} bits; each "
                             f"squeezer must be {SQUEEZER_FORMS}.")  # fmt: skip
        if kind == "median" and size < 1:
            raise ValueError(f"{owner}: squeezer {item!r} needs a window S >= 1; each squeezer "
                             f"must be {SQUEEZER_FORMS}.")  # fmt: skip
        parsed.append((kind, size))
    return parsed


def reduce_bit_depth(x: Tensor, bits: int) -> Tensor:
    """Colour depth reduction ``round(x * (2^b - 1)) / (2^b - 1)`` (inputs in [0, 1]; rounding
    half to even, as ``np.rint`` in the paper's implementation)."""
    levels = 2**bits - 1
    return torch.round(x * levels) / levels


def _symmetric_index(n: int, before: int, after: int, device: torch.device) -> Tensor:
    """Indices of ``range(-before, n + after)`` reflected with the edge sample repeated
    (``d c b a | a b c d | d c b a``: numpy ``symmetric``, scipy.ndimage ``reflect``)."""
    i = torch.arange(-before, n + after, device=device) % (2 * n)
    return torch.where(i >= n, 2 * n - 1 - i, i)


def median_smooth(x: Tensor, size: int) -> Tensor:
    """``size x size`` median filter over the last two dims of ``x`` ``(N, C, H, W)``, per channel.

    Matches the paper's implementation (EvadeML-Zoo: ``scipy.ndimage.median_filter(x,
    size=(1, s, s, 1), mode='reflect')`` and its TensorFlow twin): edge-repeating reflection,
    for even ``s`` the extra padding row/column goes before (top/left pad ``s // 2``,
    bottom/right pad ``(s - 1) // 2``), and for even windows the upper of the two middle values
    (sorted index ``s*s // 2``).
    """
    if x.ndim != 4:
        raise ValueError(f"median squeezing needs image batches (N, C, H, W); got shape "
                         f"{tuple(x.shape)}.")  # fmt: skip
    if size == 1:
        return x
    before, after = size // 2, (size - 1) // 2
    h, w = x.shape[-2:]
    rows = _symmetric_index(h, before, after, x.device)
    cols = _symmetric_index(w, before, after, x.device)
    xp = x.index_select(2, rows).index_select(3, cols)
    windows = xp.unfold(2, size, 1).unfold(3, size, 1).reshape(*x.shape, size * size)
    return windows.kthvalue(size * size // 2 + 1, dim=-1).values


def squeeze(x: Tensor, kind: str, size: int) -> Tensor:
    """Apply one parsed squeezer to the batch ``x``."""
    return reduce_bit_depth(x, size) if kind == "bits" else median_smooth(x, size)


class FeatureSqueezing(BaseScore):
    """Feature squeezing: conformity ``-max_s || softmax(f(x)) - softmax(f(s(x))) ||_1`` over the
    squeezers ``s`` (per sample; 0 when no squeezer changes the prediction, more negative = more
    OoD). Squeezers: ``'bits:B'`` reduces the colour depth to ``round(x (2^B-1)) / (2^B-1)``
    (inputs in [0, 1]); ``'median:S'`` is an S x S per-channel median filter with the padding of
    the paper's implementation (see :func:`median_smooth`). One extra forward pass per squeezer.

    Xu, Evans & Qi, "Feature Squeezing: Detecting Adversarial Examples in Deep Neural Networks",
    NDSS 2018.
    """

    family = "input perturbation"
    reference = "Xu, Evans & Qi, NDSS 2018"
    needs_fit = False
    layer_rule = "none"
    own_pass = True
    params = (
        Param("squeezers", "list", ("bits:5", "median:2"),
              help="Squeezers, each 'bits:B' (colour depth B bits) or 'median:S' (S x S median)."),
    )  # fmt: skip

    def check_params(self) -> None:
        parse_squeezers(type(self).__name__, self.squeezers)

    def extract_own(self, recorder: Recorder, x: Tensor) -> Features:
        squeezers = parse_squeezers(type(self).__name__, self.squeezers)
        with torch.no_grad():
            out = [recorder.net(squeeze(x, kind, size)).detach().double() for kind, size in squeezers]
        return {"squeezed_logits": torch.stack(out, dim=1)}

    def _conformity(self, features: Features, logits: Tensor) -> Tensor:
        p = torch.softmax(logits.double(), dim=1)
        q = torch.softmax(features["squeezed_logits"].double(), dim=2)
        return -(p[:, None, :] - q).abs().sum(2).amax(1)


# ---------------------------------------------------------------------------------- Odds
class Odds(BaseScore):
    """The odds are odd: with ``y`` the predicted class and ``g_{y,z} = f_z - f_y``, the noise-
    induced log-odds shift ``d_z = mean_eta [g_{y,z}(x + eta) - g_{y,z}(x)]`` over
    ``noise_samples`` draws ``eta`` (``gaussian``: std ``epsilon``; ``uniform``: U[-eps, eps], the
    reference code's default kind; ``sign``: +-eps), standardised with the calibration mean and
    std of that shift for class ``y`` and each ``z``; conformity ``-max_{z != y} (d_z - mu_yz) /
    sigma_yz`` (per sample; large positive shifts towards another class flag an input). With
    ``two_sided=True`` (not in the paper): ``-max_{z != y} |(d_z - mu_yz) / sigma_yz|``, which also
    flags inputs whose prediction the noise *strengthens* atypically (as far-OoD inputs often do;
    e.g. MNIST under a Fashion-MNIST model, where the paper's one-sided test ranks them as InD).

    Simplifications w.r.t. the reference code: one noise level (no separate detection noise);
    noisy inputs are not clipped to the data range; the detector's threshold is left to the
    evaluation (the conformity is the statistic it thresholds); no corrected prediction. As in
    the reference, class statistics use the calibration samples whose label equals the
    prediction (all of them when fitting on predictions) and need >= 3 of them; a class with
    fewer uses the statistics pooled over all classes and ``z``. Stds are floored at 1e-6 x the
    pooled std. Noise draws are the same for every sample (draw ``j`` comes from a generator
    seeded with ``seed`` and ``j``), so results do not depend on batching or sample order.

    Roth, Kilcher & Hofmann, "The Odds are Odd: A Statistical Test for Detecting Adversarial
    Examples", ICML 2019.
    """

    family = "input perturbation"
    reference = "Roth, Kilcher & Hofmann, ICML 2019"
    layer_rule = "none"
    own_pass = True
    params = (
        Param("epsilon", "float", 0.1, low=0, low_exclusive=True, required=True,
              help="Noise scale (std of the Gaussian noise; bound of the uniform/sign noise)."),
        Param("noise_samples", "int", 256, low=1, help="Number of noise draws averaged per input."),
        Param("noise", "choice", "gaussian", choices=("gaussian", "uniform", "sign"),
              help="Noise distribution: gaussian (std eps), uniform U[-eps, eps], sign (+-eps)."),
        Param("seed", "int", 0, low=0, help="Seed of the noise draws (deterministic results)."),
        Param("two_sided", "bool", False,
              help="False: the paper's one-sided test (-max z); True: -max |z| (also flags "
                   "atypically negative shifts)."),
    )  # fmt: skip

    def _noise(self, j: int, shape: tuple[int, ...]) -> Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + j)
        if self.noise == "gaussian":
            eta = torch.randn(shape, generator=g, dtype=torch.float64)
        elif self.noise == "uniform":
            eta = torch.rand(shape, generator=g, dtype=torch.float64) * 2 - 1
        else:
            eta = torch.randint(0, 2, shape, generator=g).double() * 2 - 1
        return eta * self.epsilon

    def extract_own(self, recorder: Recorder, x: Tensor) -> Features:
        b, shape = len(x), tuple(x.shape[1:])
        k = self.noise_samples
        chunk = max(1, min(k, ODDS_INPUT_ELEMENTS // max(1, b * prod(shape))))
        total: Tensor | None = None
        with torch.no_grad():
            for j0 in range(0, k, chunk):
                js = range(j0, min(k, j0 + chunk))
                eta = torch.stack([self._noise(j, shape) for j in js]).to(x.device, x.dtype)
                xn = (x[:, None] + eta[None]).reshape(b * len(js), *shape)
                out = recorder.net(xn).detach().double().view(b, len(js), -1).sum(1)
                total = out if total is None else total + out
        assert total is not None
        return {"noisy_logits": total / k}

    @staticmethod
    def _shifts(features: Features, logits: Tensor, ref: Tensor) -> Tensor:
        """``(n, C)``: mean shift of ``g_{ref,z} = f_z - f_ref`` under noise, for every ``z``."""
        d = features["noisy_logits"].double() - logits.double()
        return d - d.gather(1, ref[:, None])

    def _fit(self, features: Features, logits: Tensor, labels: Tensor) -> None:
        c = logits.shape[1]
        name = type(self).__name__
        if c < 2:
            raise ValueError(f"{name} needs at least 2 classes (log-odds between classes).")
        if int(labels.max()) >= c or int(labels.min()) < 0:
            raise ValueError(f"{name}: calibration labels must lie in [0, {c - 1}].")
        keep = labels == logits.argmax(1)
        if int(keep.sum()) < ODDS_MIN_SAMPLES:
            raise ValueError(f"{name} needs at least {ODDS_MIN_SAMPLES} calibration samples whose "
                             f"label equals the prediction; got {int(keep.sum())}. Use more "
                             "calibration data or fit on the predictions (calib_labels=None).")  # fmt: skip
        y = labels[keep]
        s = self._shifts({"noisy_logits": features["noisy_logits"][keep]}, logits[keep], y)
        off = torch.ones_like(s, dtype=torch.bool)
        off.scatter_(1, y[:, None], False)
        pooled = s[off]
        pooled_mean, pooled_std = pooled.mean(), pooled.std(correction=0)
        mean = torch.full((c, c), float(pooled_mean), dtype=torch.float64, device=s.device)
        std = torch.full((c, c), float(pooled_std), dtype=torch.float64, device=s.device)
        for k in range(c):
            sk = s[y == k]
            if len(sk) >= ODDS_MIN_SAMPLES:
                mean[k], std[k] = sk.mean(0), sk.std(0, correction=0)
        floor = 1e-6 * float(pooled_std) if float(pooled_std) > 0 else 1e-12
        self.shift_mean, self.shift_std = mean, std.clamp_min(floor)

    def standardised_shifts(self, features: Features, logits: Tensor,
                            ref: Tensor | None = None) -> Tensor:  # fmt: skip
        """``(n, C)`` standardised shifts ``(d_z - mu_yz) / sigma_yz`` w.r.t. ``ref`` (default:
        the predicted class ``y``); the column ``z = y`` is ``-inf``."""
        y = logits.argmax(1) if ref is None else ref.to(logits.device).long()
        s = self._shifts(features, logits, y)
        z = (s - self.shift_mean[y]) / self.shift_std[y]
        return z.scatter(1, y[:, None], float("-inf"))

    def _conformity(self, features: Features, logits: Tensor) -> Tensor:
        z = self.standardised_shifts(features, logits)
        if self.two_sided:
            z = z.nan_to_num(neginf=0.0).abs()  # the z = y column (-inf) -> 0, never the max
        return -z.amax(1)


# ---------------------------------------------------------------------------------- IsoMax
class IsoMax(BaseScore):
    """Post-hoc IsoMax in logit space: prototypes ``P`` (C x C) start at the class means of the
    calibration logits and are fitted with Adam (``lr``, ``n_steps``, full batch) to minimise the
    cross-entropy of ``softmax(-s ||f - P_c||_p)`` against the calibration labels
    (``s = entropic_scale``, ``p = dist_norm``); conformity ``softmax(-s ||f - P_c||_p)_c`` (per
    class, sums to 1 over classes). The same entropic scale ``s`` is used for the score as for the
    fit (the reference-library convention; the paper scores with scale 1, i.e. the plain softmax
    of ``-distance``). A class absent from the calibration labels starts at the mean of all
    calibration logits.

    Macêdo, Ren, Zanchettin, Oliveira & Ludermir, "Entropic Out-of-Distribution Detection",
    IJCNN 2021.
    """

    family = "logits"
    reference = "Macêdo et al., IJCNN 2021"
    layer_rule = "none"
    params = (
        Param("entropic_scale", "float", 10.0, low=0, low_exclusive=True,
              help="Entropic scale s multiplying the distances (fit and score)."),
        Param("dist_norm", "float", 2.0, low=1, help="p of the p-norm distance to prototypes."),
        Param("lr", "float", 0.1, low=0, low_exclusive=True, help="Adam learning rate."),
        Param("n_steps", "int", 1000, low=0, help="Adam steps (0: prototypes = class means)."),
    )  # fmt: skip

    def distances(self, logits: Tensor, prototypes: Tensor | None = None) -> Tensor:
        """``(n, C)`` p-norm distances of the logits to the prototypes, in float64 (exact
        differences, no ``|a|^2 + |b|^2 - 2ab`` expansion; zero distances have zero gradient)."""
        protos = self.prototypes if prototypes is None else prototypes
        z = logits.double()
        if z.shape[0] * protos.numel() <= ISOMAX_BROADCAST_ELEMENTS:  # faster for small problems
            return torch.linalg.vector_norm(z[:, None, :] - protos[None], ord=self.dist_norm, dim=-1)
        return torch.cdist(z, protos, p=self.dist_norm, compute_mode="donot_use_mm_for_euclid_dist")

    def _fit(self, features: Features, logits: Tensor, labels: Tensor) -> None:
        z = logits.double()
        c = z.shape[1]
        if int(labels.max()) >= c or int(labels.min()) < 0:
            raise ValueError(f"{type(self).__name__}: calibration labels must lie in [0, {c - 1}].")
        counts = torch.bincount(labels, minlength=c).to(z.dtype)
        sums = torch.zeros(c, c, dtype=z.dtype, device=z.device).index_add_(0, labels, z)
        protos = torch.where(counts[:, None] > 0, sums / counts.clamp_min(1)[:, None], z.mean(0))
        if self.n_steps > 0:
            protos = protos.clone().requires_grad_(True)
            opt = torch.optim.Adam([protos], lr=self.lr)
            with torch.enable_grad():
                for _ in range(self.n_steps):
                    opt.zero_grad()
                    loss = F.cross_entropy(-self.entropic_scale * self.distances(z, protos), labels)
                    loss.backward()
                    opt.step()
        self.prototypes = protos.detach()
        if not torch.isfinite(self.prototypes).all():
            raise ValueError(f"{self!r}: the prototype fit diverged (non-finite values); lower lr "
                             "or entropic_scale.")  # fmt: skip

    def _conformity(self, features: Features, logits: Tensor) -> Tensor:
        return torch.softmax(-self.entropic_scale * self.distances(logits), dim=1)


SCORES = (FeatureSqueezing, Odds, IsoMax)
__all__ = ["FeatureSqueezing", "Odds", "IsoMax"]
