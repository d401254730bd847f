"""Gradient-based scores."""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.func import functional_call, grad, vmap

from ood_core.budget import check_budget, forward_bytes_per_sample
from ood_core.layer_ids import layer_text
from ood_core.params import Param
from ood_core.recorder import LayerId, Recorder
from ood_core.scores.base import BaseScore, Features
from ood_core.scores.logits import TEMPERATURE
from ood_core.scores.registry import register_score


def _pnorm_pow(x: Tensor, p: float) -> Tensor:
    """Per-row ``||x||_p^p`` (or the max-abs for p = inf) of a 2-D tensor."""
    return x.abs().amax(1) if math.isinf(p) else x.abs().pow(p).sum(1)


@register_score
class GradNorm(BaseScore):
    """GradNorm: conformity ``|| d/dθ_L [-mean_c log_softmax(f(x)/T)_c] ||_p`` per sample, the
    p-norm (``grad_norm``) of the gradient w.r.t. the parameters θ_L of the chosen layers of the
    cross-entropy between the tempered softmax and the uniform distribution (larger = more InD).

    Per-sample gradients use ``torch.func`` (``vmap(grad(...))``) in batched passes of their own.
    When the only layer is the final ``nn.Linear`` producing the logits, the gradient has the
    closed form ``g ⊗ h`` (``g = (softmax(f/T) - 1/C) / T``, ``h`` the layer's input), so the norm
    is computed inside the shared gradient-free pass; both paths agree (see the tests).

    Frozen layers (parameters with ``requires_grad=False``) are scored too: the per-sample
    gradients are taken w.r.t. detached copies of the parameters (``torch.func``), so the
    network's ``requires_grad`` flags are neither needed nor changed. The memory of a batch's
    per-sample gradients (``batch x parameters of the layers``) is checked before they are
    computed (:func:`~ood_core.budget.check_budget`).

    Huang, Geng & Li, "On the Importance of Gradients for Detecting Distributional Shifts in the
    Wild", NeurIPS 2021.
    """

    family = "gradients"
    reference = "Huang, Geng & Li, NeurIPS 2021"
    needs_fit = False
    layer_rule = "params"
    suggested_layers = ("logits",)
    params = (
        TEMPERATURE,
        Param("grad_norm", "float", 1.0, low=1, allow_inf=True, help="p of the gradient p-norm."),
        Param(
            "discard_functional_forward",
            "bool",
            False,
            help="Accepted for the reference library's API; no effect here: the logits returned "
            "are always those of the network's own forward pass.",
        ),
    )
    needs_param_grad = True  # per instance: False when the closed form applies (see check_layers)
    closed_form: bool = False

    def check_layers(
        self, layers: tuple[LayerId, ...], recorder: Recorder | None = None
    ) -> tuple[LayerId, ...]:
        if recorder is not None:
            layers = self._check_parameters(tuple(layers), recorder)
        # the generic checks (at least one layer...); the layers' parameters are checked above
        layers = super().check_layers(layers, None)
        self.__dict__["closed_form"] = False
        self.__dict__["needs_param_grad"] = True
        if recorder is not None and len(layers) == 1:
            info = recorder.info(layers[0])
            if (
                layers[0] == recorder.head()
                and info.n_calls == 1
                and layers[0] == recorder.layer_ids[-1]
            ):
                self.__dict__["closed_form"] = True
                self.__dict__["needs_param_grad"] = False
                self.__dict__["_has_bias"] = info.module.bias is not None
        return layers

    def _check_parameters(
        self, layers: tuple[LayerId, ...], recorder: Recorder
    ) -> tuple[LayerId, ...]:
        """The layers in network (call) order without duplicates (as the base class orders
        them), each holding parameters, trainable or frozen (``requires_grad=False`` is fine:
        gradients are taken w.r.t. detached copies)."""
        order = {lid: i for i, lid in enumerate(recorder.layer_ids)}
        layers = tuple(sorted({recorder.check_layer(lay) for lay in layers}, key=order.__getitem__))
        for layer in layers:
            if next(recorder.info(layer).module.parameters(), None) is None:
                raise ValueError(
                    f"{type(self).__name__} needs layers holding parameters; "
                    f"{layer_text(layer)} ({recorder.layer_name(layer)}) has none."
                )
        return layers

    # closed form, inside the shared pass ------------------------------------------------------
    def extract(self, logits: Tensor, activations: dict[LayerId, Tensor]) -> Features:
        (layer,) = self.layers
        h = activations.inputs[layer].flatten(1).double()  # type: ignore[attr-defined]
        if not torch.equal(activations[layer], logits):
            raise RuntimeError(
                f"{self!r}: layer {layer_text(layer)} is not the logits layer; cannot use the closed form."
            )
        z = logits.double()
        g = (torch.softmax(z / self.temperature, dim=1) - 1.0 / z.shape[1]) / self.temperature
        p = self.grad_norm
        has_bias = self.__dict__.get("_has_bias", True)
        if math.isinf(p):
            gmax, hmax = _pnorm_pow(g, p), _pnorm_pow(h, p)
            norm = gmax * (torch.maximum(hmax, torch.ones_like(hmax)) if has_bias else hmax)
        else:
            norm = (_pnorm_pow(g, p) * (_pnorm_pow(h, p) + (1.0 if has_bias else 0.0))).pow(1 / p)
        return {"grad_norm": norm}

    # general case: per-sample gradients with torch.func ---------------------------------------
    def extract_own(self, recorder: Recorder, x: Tensor) -> Features:
        net = recorder.net
        prefixes = [recorder.layer_name(layer) for layer in self.layers]
        params = {k: v.detach() for k, v in net.named_parameters()}
        buffers = dict(net.named_buffers())
        names = sorted(
            {k for k in params for pre in prefixes if pre == "" or k.startswith(pre + ".")}
        )
        sub = {k: params[k] for k in names}
        t = self.temperature
        n_params = sum(v.numel() for v in sub.values())
        check_budget(  # per-sample gradients (and their float64 concatenation), forward + backward
            f"{self!r}: the per-sample gradients of a batch of {len(x):,} inputs w.r.t. "
            f"{n_params:,} parameters",
            len(x)
            * (n_params * (2 * x.element_size() + 8) + 3 * forward_bytes_per_sample(recorder)),
            "lower batch_size or choose a layer with fewer parameters",
            x.device,
        )

        def loss(sub_params: dict[str, Tensor], x1: Tensor) -> Tensor:
            out = functional_call(net, ({**params, **sub_params}, buffers), (x1.unsqueeze(0),))
            return -torch.log_softmax(out / t, dim=1).mean()

        grads = vmap(grad(loss), in_dims=(None, 0))(sub, x.detach())
        flat = torch.cat([grads[k].flatten(1) for k in names], dim=1).double()
        return {"grad_norm": flat.norm(p=self.grad_norm, dim=1)}

    def _conformity(self, features: Features, logits: Tensor) -> Tensor:
        return features["grad_norm"].double()


__all__ = ["GradNorm"]
