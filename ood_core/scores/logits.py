"""Scores computed from the logits ``f`` alone (no layers), in float64.

All return conformity where higher = more in-distribution. Per-class scores return ``(n, C)``;
per-sample ones return ``(n,)`` (repeated over classes by the base class).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ood_core.budget import check_budget, net_device_dtype, per_sample_numel
from ood_core.diagnostics import degenerate
from ood_core.params import Param
from ood_core.recorder import Recorder
from ood_core.scores.base import BaseScore, Features
from ood_core.scores.labels import UsesLabels
from ood_core.scores.registry import register_score

TEMPERATURE = Param("temperature", "float", 1.0, low=0, low_exclusive=True, help="Temperature T.")


class _LogitScore(BaseScore):
    family = "logits"
    needs_fit = False
    layer_rule = "none"


@register_score
class Softmax(_LogitScore):
    """Maximum softmax probability baseline: conformity ``softmax(f)`` (per class).

    Hendrycks & Gimpel, "A Baseline for Detecting Misclassified and Out-of-Distribution Examples in
    Neural Networks", ICLR 2017.
    """

    reference = "Hendrycks & Gimpel, ICLR 2017"

    def _conformity(self, features: Features, logits: Tensor) -> Tensor:
        return torch.softmax(logits.double(), dim=1)


BaselineClassif = Softmax


@register_score
class Logit(_LogitScore):
    """Maximum logit: conformity ``f`` (per class).

    Hendrycks et al., "Scaling Out-of-Distribution Detection for Real-World Settings", ICML 2022.
    """

    reference = "Hendrycks et al., ICML 2022"

    def _conformity(self, features: Features, logits: Tensor) -> Tensor:
        return logits.double()


@register_score
class Energy(_LogitScore):
    """Negative free energy: conformity ``T * logsumexp(f / T)`` (per sample).

    Liu et al., "Energy-based Out-of-distribution Detection", NeurIPS 2020.
    """

    reference = "Liu et al., NeurIPS 2020"
    params = (TEMPERATURE,)

    def _conformity(self, features: Features, logits: Tensor) -> Tensor:
        t = self.temperature
        return t * torch.logsumexp(logits.double() / t, dim=1)


@register_score
class JointEnergy(_LogitScore):
    """Joint energy over labels: conformity ``sum_c softplus(f_c)`` (per sample).

    Wang et al., "Can multi-label classification networks know what they don't know?", NeurIPS 2021.
    """

    reference = "Wang et al., NeurIPS 2021"

    def _conformity(self, features: Features, logits: Tensor) -> Tensor:
        return F.softplus(logits.double()).sum(1)


@register_score
class Entropy(_LogitScore):
    """Negative predictive entropy: conformity ``sum_c p_c log p_c`` with ``p = softmax(f)``.

    Classic uncertainty baseline (e.g. Hendrycks & Gimpel 2017; Lakshminarayanan et al. 2017).
    """

    reference = "Shannon entropy of the softmax"

    def _conformity(self, features: Features, logits: Tensor) -> Tensor:
        logp = torch.log_softmax(logits.double(), dim=1)
        return (logp.exp() * logp).sum(1)


@register_score
class GEN(_LogitScore):
    """Generalized entropy: conformity ``-sum_{top M} p^g (1 - p)^g`` over the M largest probs.

    Liu, Lochman & Zach, "GEN: Pushing the Limits of Softmax-Based Out-of-Distribution Detection",
    CVPR 2023.
    """

    reference = "Liu, Lochman & Zach, CVPR 2023"
    params = (
        Param("gamma", "float", 0.1, low=0, low_exclusive=True, high=1, help="Exponent g."),
        Param("top_m", "int", 100, low=1, help="Number M of largest probabilities used."),
    )

    def _conformity(self, features: Features, logits: Tensor) -> Tensor:
        p = torch.softmax(logits.double(), dim=1)
        m = min(self.top_m, p.shape[1])
        top = p.topk(m, dim=1).values
        g = self.gamma
        return -(top.pow(g) * (1 - top).pow(g)).sum(1)


@register_score
class TemperatureScaling(UsesLabels, _LogitScore):
    """Temperature scaling: conformity ``softmax(f / T)`` (per class), with ``T`` fitted by
    minimising the calibration negative log-likelihood (LBFGS on log T).

    Guo et al., "On Calibration of Modern Neural Networks", ICML 2017.
    """

    fit_kind = "logits"

    reference = "Guo et al., ICML 2017"
    needs_fit = True

    def _fit(self, features: Features, logits: Tensor, labels: Tensor) -> None:
        z = logits.double()
        log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
        opt = torch.optim.LBFGS([log_t], lr=0.5, max_iter=100)

        def closure() -> Tensor:
            opt.zero_grad()
            loss = F.cross_entropy(z / log_t.exp(), labels)
            loss.backward()
            return loss

        with torch.enable_grad():
            opt.step(closure)
        self.fitted_temperature = float(log_t.detach().exp())

    def _conformity(self, features: Features, logits: Tensor) -> Tensor:
        return torch.softmax(logits.double() / self.fitted_temperature, dim=1)


@register_score
class KLMatching(_LogitScore):
    """KL matching: conformity ``-KL(p(x) || d_k)`` where ``d_k`` is the mean calibration softmax of
    samples predicted as class ``k`` (per class ``k``). Evaluation reads the predicted class's
    template; the paper scores the closest template, ``-min_k KL(p(x) || d_k)``
    (``readout="closest"``).

    Hendrycks et al., "Scaling Out-of-Distribution Detection for Real-World Settings", ICML 2022.
    """

    fit_kind = "logits"

    reference = "Hendrycks et al., ICML 2022"
    needs_fit = True
    params = (
        Param(
            "readout",
            "choice",
            "predicted",
            choices=("predicted", "closest"),
            help="predicted: class k's conformity is -KL to its own template (evaluation reads "
            "the predicted class, as the reference library does); closest: every class "
            "gets -min_k KL (the paper's score).",
        ),
    )

    def _fit(self, features: Features, logits: Tensor, labels: Tensor) -> None:
        p = torch.softmax(logits.double(), dim=1)
        pred = p.argmax(1)
        c = p.shape[1]
        templates = torch.full((c, c), 1.0 / c, dtype=torch.float64, device=p.device)
        empty = []
        for k in range(c):
            if (pred == k).any():
                templates[k] = p[pred == k].mean(0)
            else:
                empty.append(k)
        if empty:
            degenerate(
                self,
                f"class(es) {empty} are never predicted on the calibration data, so "
                "their template is the uniform distribution",
                "use more (or more varied) calibration data",
            )
        self.templates = templates.clamp_min(1e-12)

    def _conformity(self, features: Features, logits: Tensor) -> Tensor:
        logp = torch.log_softmax(logits.double(), dim=1)
        p = logp.exp()
        # KL(p || d_k) = sum_j p_j (log p_j - log d_kj) for every k -> (n, C)
        neg_entropy = (p * logp).sum(1, keepdim=True)
        cross = p @ self.templates.log().T
        conformity = -(neg_entropy - cross)
        if self.readout == "closest":
            return conformity.amax(1)
        return conformity


@register_score
class ODIN(_LogitScore):
    """ODIN: temperature scaling plus a small input perturbation.

    ``x' = x - epsilon * normalised gradient of -max_c log_softmax(f(x)/T)`` (the gradient sign for
    ``fgm_norm=inf``, the gradient divided by its ``fgm_norm``-norm otherwise), then conformity
    ``softmax(f(x')/T)`` (per class). With ``epsilon=0`` no gradient pass is needed.

    Liang, Li & Srikant, "Enhancing The Reliability of Out-of-distribution Image Detection in
    Neural Networks", ICLR 2018.
    """

    reference = "Liang, Li & Srikant, ICLR 2018"
    params = (
        Param(
            "temperature",
            "float",
            1000.0,
            low=0,
            low_exclusive=True,
            required=True,
            help="Temperature T (the paper uses 1000).",
        ),
        Param("epsilon", "float", 0.0, low=0, help="Input perturbation size (0: none)."),
        Param(
            "fgm_norm",
            "float",
            float("inf"),
            low=1,
            allow_inf=True,
            help="Norm of the gradient step (inf: sign).",
        ),
    )

    @property
    def needs_input_grad(self) -> bool:
        return self.epsilon > 0

    def extract_own(self, recorder: Recorder, x: Tensor) -> Features:
        return {
            "logits_perturbed": input_step_logits(
                recorder.net, x, self.epsilon, self.fgm_norm, self.temperature
            )
        }

    def _conformity(self, features: Features, logits: Tensor) -> Tensor:
        z = features.get("logits_perturbed", logits).double()
        return torch.softmax(z / self.temperature, dim=1)


# ---------------------------------------------------------------------------------- IsoMax
ISOMAX_MAX_STEPS = 100_000


@register_score
class IsoMax(UsesLabels, BaseScore):
    """Post-hoc IsoMax in logit space: prototypes ``P`` (C x C) start at zero (as the paper's
    training) and are fitted with Adam (``lr``, ``eps = 1e-8``, ``1e-4`` for half precision;
    ``n_steps`` full-batch steps) to minimise the cross-entropy of ``softmax(-s ||f - P_c||_p)``
    against the calibration labels (``s = entropic_scale``, ``p = dist_norm``); conformity
    ``softmax(-s ||f - P_c||_p)_c`` (per class, sums to 1 over classes). As the reference library:
    the fit runs in the logits' dtype, and the score uses the same entropic scale as the fit (the
    paper scores with the plain softmax of ``-distance``).

    Memory: every step holds the ``(n, C, C)`` differences between the logits and the
    prototypes, with their gradients; the fit refuses before starting, with the estimate, when
    they cannot fit (:func:`~ood_core.budget.check_budget`), as does scoring.

    Extra (not in the reference): ``init="class_means"`` starts the prototypes at the class means
    of the calibration logits (a class absent from the labels: the mean of all logits), which
    needs far fewer steps (``n_steps=0`` keeps the means).

    Macêdo, Ren, Zanchettin, Oliveira & Ludermir, "Entropic Out-of-Distribution Detection",
    IJCNN 2021.
    """

    fit_kind = "logits"

    family = "logits"
    reference = "Macêdo et al., IJCNN 2021"
    layer_rule = "none"
    params = (
        Param(
            "entropic_scale",
            "float",
            10.0,
            low=0,
            low_exclusive=True,
            help="Entropic scale s multiplying the distances (fit and score).",
        ),
        Param(
            "dist_norm",
            "float",
            2.0,
            low=1,
            allow_inf=True,
            help="p of the p-norm distance to prototypes.",
        ),
        Param("lr", "float", 0.1, low=0, low_exclusive=True, help="Adam learning rate."),
        Param(
            "n_steps",
            "int",
            1000,
            low=0,
            high=ISOMAX_MAX_STEPS,
            help=f"Adam full-batch steps (at most {ISOMAX_MAX_STEPS:_}; each costs a pass over "
            "the calibration logits).",
        ),
        Param(
            "init",
            "choice",
            "zeros",
            choices=("zeros", "class_means"),
            help="Initial prototypes: zeros (reference) or the class means of the logits.",
        ),
    )

    def check_calibration(self, n_samples: int, class_counts: list[int] | None = None) -> None:
        super().check_calibration(n_samples, class_counts)
        rec = self.recorder_
        if rec is not None:
            device, dtype = net_device_dtype(rec.net)
            n_classes = per_sample_numel(rec.info((0, 1)).output_size)
            self.check_memory(n_samples, n_classes, dtype.itemsize, device, fit=True)

    def check_memory(
        self, n: int, n_classes: int, itemsize: int, device: torch.device, *, fit: bool
    ) -> None:
        """Refuse (:class:`~ood_core.budget.BudgetError`) when the ``(n, C, C)`` logit-prototype
        differences (x4 with the autograd graph of a fit step, x2 when scoring) cannot fit."""
        n_bytes = (4 if fit else 2) * n * n_classes * n_classes * itemsize
        what = "fit" if fit else "scoring"
        check_budget(
            f"{type(self).__name__} {what}: the ({n:,}, {n_classes:,}, {n_classes:,}) "
            "logit-prototype differences",
            n_bytes,
            "use fewer " + ("calibration samples" if fit else "inputs per call"),
            device,
        )

    def distances(self, logits: Tensor, prototypes: Tensor | None = None) -> Tensor:
        """``(n, C)`` p-norm distances of the logits to the prototypes (exact differences, in the
        prototypes' dtype)."""
        protos = self.prototypes if prototypes is None else prototypes
        return torch.linalg.vector_norm(
            logits.to(protos.dtype)[:, None, :] - protos, ord=self.dist_norm, dim=-1
        )

    def _fit(self, features: Features, logits: Tensor, labels: Tensor) -> None:
        z = logits.detach()
        c = z.shape[1]
        self.check_memory(len(z), c, z.element_size(), z.device, fit=True)
        counts = torch.bincount(labels, minlength=c)
        absent = (counts == 0).nonzero().squeeze(1).tolist()
        if absent:
            degenerate(
                self,
                f"no calibration sample of class(es) {absent}",
                "their prototypes are only pushed away from the data and their conformity "
                "is meaningless; calibrate with samples of every class",
            )
        if self.init == "zeros":
            protos = torch.zeros(c, c, dtype=z.dtype, device=z.device)
        else:
            sums = torch.zeros(c, c, dtype=z.dtype, device=z.device).index_add_(0, labels, z)
            protos = torch.where(
                counts[:, None] > 0, sums / counts.clamp_min(1)[:, None].to(z.dtype), z.mean(0)
            )
        if self.n_steps > 0:
            protos = protos.clone().requires_grad_(True)
            opt = torch.optim.Adam(
                [protos], lr=self.lr, eps=1e-4 if z.dtype == torch.half else 1e-8
            )
            with torch.enable_grad():
                for _ in range(self.n_steps):
                    opt.zero_grad()
                    loss = F.cross_entropy(-self.entropic_scale * self.distances(z, protos), labels)
                    loss.backward()
                    opt.step()
        self.prototypes = protos.detach()
        if not torch.isfinite(self.prototypes).all():
            raise ValueError(
                f"{self!r}: the prototype fit diverged (non-finite values); lower lr "
                "or entropic_scale."
            )

    def _conformity(self, features: Features, logits: Tensor) -> Tensor:
        self.check_memory(
            len(logits), logits.shape[1], self.prototypes.element_size(), logits.device, fit=False
        )
        return torch.softmax(-self.entropic_scale * self.distances(logits), dim=1).double()


def fgm_direction(grad: Tensor, p: float) -> Tensor:
    """Per-sample direction of unit ``L^p`` norm maximising ``<grad, d>`` (the reference's FGM
    direction): ``sign(g)`` for ``p = inf``; ``sign(g) (|g| / ||g||_q)^(q - 1)`` with ``1/p + 1/q
    = 1`` for ``1 < p < inf``; for ``p = 1`` the unit mass split evenly over the coordinates of
    largest ``|g|``. Components with ``|g| <= eps`` of the dtype count as 0; a zero or non-finite
    gradient gives a zero direction."""
    g = grad.flatten(1)
    g = g.masked_fill(g.abs() <= torch.finfo(g.dtype).eps, 0)
    bad = ~g.isfinite().all(1, keepdim=True)
    g = g.masked_fill(bad, 0)
    a = g.abs()
    if math.isinf(p):
        mag = torch.ones_like(g)
    elif p > 1:
        q = p / (p - 1)
        norm = torch.linalg.vector_norm(a, ord=q, dim=1, keepdim=True)
        mag = (a / norm.masked_fill(norm == 0, 1)) ** (q - 1)
    else:
        top = a == a.max(1, keepdim=True).values
        mag = top.to(g.dtype) / top.sum(1, keepdim=True)
    return (mag * g.sign()).view_as(grad)


def input_step_logits(
    net: torch.nn.Module, x: Tensor, epsilon: float, norm: float, temperature: float
) -> Tensor:
    """Logits after moving ``x`` by ``epsilon`` to increase ``max_c log_softmax(f(x)/T)``."""
    xg = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        out = net(xg)
        objective = torch.log_softmax(out / temperature, dim=1).max(1).values.sum()
        (grad,) = torch.autograd.grad(objective, xg)
    with torch.no_grad():
        return net(x + epsilon * fgm_direction(grad, norm)).detach()


__all__ = [
    "BaselineClassif",
    "fgm_direction",
    "Softmax",
    "Logit",
    "Energy",
    "JointEnergy",
    "Entropy",
    "GEN",
    "TemperatureScaling",
    "KLMatching",
    "ODIN",
    "IsoMax",
]
