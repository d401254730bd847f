"""Gradient-based scores."""

from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor
from torch.func import functional_call, grad, vmap

from ood_core.budget import (
    check_budget,
    forward_bytes_per_sample,
    memory_limit,
    net_device_dtype,
)
from ood_core.layer_ids import layer_text
from ood_core.params import Param
from ood_core.recorder import LayerId, Recorder
from ood_core.scores.base import BaseScore, Features
from ood_core.scores.logits import TEMPERATURE
from ood_core.scores.registry import register_score

GRAD_BATCH_BYTES = 2**30
"""Estimated memory of one ``vmap`` call of GradNorm's per-sample gradients (at most half the
memory limit): a batch is split into chunks of that many bytes' worth of inputs (at least one),
so the batch size never multiplies a large layer's gradients beyond it."""


def per_sample_grad_bytes(n_params: int, itemsize: int, forward_bytes: int) -> int:
    """Estimated peak bytes per input of GradNorm's ``torch.func`` path: the per-sample
    gradients (``itemsize`` each), their concatenation (``itemsize``) and its float64 copy (8)
    for ``n_params`` parameters, plus 1.5 x the forward pass' activations
    (:func:`~ood_core.budget.forward_bytes_per_sample`, kept for the backward pass). Measured
    (peak RSS growth, CPU, float32), this estimate is 1.1-1.65 x the peak for 0.15-0.6 M
    parameters of small convolutional nets on 16-64 px inputs, 1.08 x (32 px) and 1.26 x
    (224 px) for ResNet-18's layer4 (8.4 M parameters, 135-155 MB per input; see
    tests/test_resource_estimates.py)."""
    return n_params * (2 * itemsize + 8) + (3 * forward_bytes) // 2


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
    network's ``requires_grad`` flags are neither needed nor changed.

    Memory: per-sample gradients take ``~(2 x itemsize + 8) x parameters`` bytes per input (the
    gradients, their concatenation and its float64 copy; :func:`per_sample_grad_bytes`), e.g.
    ~134 MB per input for ResNet-18's layer4 (8.4 M parameters). They are computed a chunk of
    inputs at a time (:data:`GRAD_BATCH_BYTES`, at most half the memory limit, at least one
    input), and the chunk's estimate is checked before any forward pass
    (:meth:`check_calibration`, :func:`~ood_core.budget.check_budget`): a layer whose gradients
    cannot fit even for one input is refused with the number, naming a smaller layer (the head's
    gradient has a closed form).

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
    def _param_names(self, recorder: Recorder) -> list[str]:
        """The network's parameter names that belong to the chosen layers, sorted."""
        prefixes = [recorder.layer_name(layer) for layer in self.layers]
        return sorted(
            {
                k
                for k, _ in recorder.net.named_parameters()
                for pre in prefixes
                if pre == "" or k.startswith(pre + ".")
            }
        )

    def grad_chunk(self, recorder: Recorder, n_inputs: int) -> tuple[int, int, int]:
        """``(inputs per vmap call, bytes per input, parameters)`` for ``n_inputs`` inputs:
        :func:`per_sample_grad_bytes` and as many inputs as fit in :data:`GRAD_BATCH_BYTES`
        (at most half the memory limit), at least one."""
        device, dtype = net_device_dtype(recorder.net)
        params = dict(recorder.net.named_parameters())
        n_params = sum(params[k].numel() for k in self._param_names(recorder))
        per_input = per_sample_grad_bytes(
            n_params, dtype.itemsize, forward_bytes_per_sample(recorder, dtype.itemsize)
        )
        room = min(GRAD_BATCH_BYTES, memory_limit(device)[0] / 2)
        chunk = max(1, min(n_inputs, int(room // max(1, per_input))))
        return chunk, per_input, n_params

    def check_grad_memory(self, recorder: Recorder, n_inputs: int) -> int:
        """Refuse (:class:`~ood_core.budget.BudgetError`) per-sample gradients that cannot fit
        for one chunk of ``n_inputs`` inputs (:meth:`grad_chunk`); return the chunk size."""
        chunk, per_input, n_params = self.grad_chunk(recorder, n_inputs)
        names = ", ".join(
            f"{layer_text(lay)} ({recorder.layer_name(lay) or 'the network'})"
            for lay in self.layers
        )
        head = recorder.head()
        smaller = (
            f"a layer with fewer parameters (e.g. the head {layer_text(head)}, whose gradient has "
            "a closed form)"
            if head is not None and head not in self.layers
            else "a layer with fewer parameters"
        )
        check_budget(
            f"{self!r}: the per-sample gradients w.r.t. the {n_params:,} parameters of {names}, "
            f"{chunk:,} input(s) at a time ({per_input / 1e6:,.1f} MB per input)",
            chunk * per_input,
            f"choose {smaller}",
            net_device_dtype(recorder.net)[0],
        )
        return chunk

    def check_calibration(self, n_samples: int, class_counts: list[int] | None = None) -> None:
        """Before any forward pass: one chunk of per-sample gradients must fit
        (:meth:`check_grad_memory`; nothing to check for the closed form)."""
        super().check_calibration(n_samples, class_counts)
        if self.recorder_ is not None and self.layers and not self.closed_form:
            self.check_grad_memory(self.recorder_, max(1, n_samples))

    def extract_own(self, recorder: Recorder, x: Tensor) -> Features:
        net = recorder.net
        params = {k: v.detach() for k, v in net.named_parameters()}
        buffers = dict(net.named_buffers())
        names = self._param_names(recorder)
        sub = {k: params[k] for k in names}
        t = self.temperature
        chunk = self.check_grad_memory(recorder, len(x))

        def loss(sub_params: dict[str, Tensor], x1: Tensor) -> Tensor:
            out = functional_call(net, ({**params, **sub_params}, buffers), (x1.unsqueeze(0),))
            return -torch.log_softmax(out / t, dim=1).mean()

        def chunk_norms(xc: Tensor) -> Tensor:  # its gradients are freed before the next chunk
            with warnings.catch_warnings():
                # torch's notice that an op (e.g. CPU flash attention in a ViT) has no batching
                # rule: the gradients are the same, computed op by op; nothing for the user to do
                warnings.filterwarnings("ignore", message="There is a performance drop because")
                grads = vmap(grad(loss), in_dims=(None, 0))(sub, xc)
            flat = torch.cat([grads[k].flatten(1) for k in names], dim=1).double()
            return flat.norm(p=self.grad_norm, dim=1)

        norms = [chunk_norms(x[s : s + chunk].detach()) for s in range(0, len(x), chunk)]
        return {"grad_norm": torch.cat(norms) if norms else x.new_zeros(0, dtype=torch.float64)}

    def _conformity(self, features: Features, logits: Tensor) -> Tensor:
        return features["grad_norm"].double()


__all__ = ["GradNorm"]
