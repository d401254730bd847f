"""Record internal activations of any ``nn.Module`` by torchinfo layer id.

Layer ids are torchinfo's ``(depth, depth_index)``: ``depth_index`` counts the module calls at that
depth across the whole network, in call order, starting at 1; ``(0, 1)`` is the whole network. A
module called twice in one forward pass has two ids (one per call).

Typical use (as in the reference library)::

    rnet = Recorder(net, input_data=x[[0]])   # prints the layer table when displayed
    rnet.record((1, 5), (1, 11))
    logits = rnet(x)
    rnet.activations[(1, 11)]                 # output of that layer for x
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch
import torchinfo
from torch import nn

from ood_core.core import LayerId, Progress, exclusive_eval, net_lock
from ood_core.layer_ids import layer_text, layers_text, parse_layer_id, parse_layer_ids

__all__ = ["LayerId", "LayerInfo", "Recorder", "net_lock", "parse_layer_ids"]


@dataclass(frozen=True)
class LayerInfo:
    """One row of the layer table: ``output_size`` includes the batch dimension of the traced
    example; ``n_calls`` counts the ids of the module (a module called twice has two ids)."""

    id: LayerId
    name: str
    module: nn.Module
    type: str
    input_size: tuple
    output_size: tuple
    n_calls: int


def first_tensor(output: Any) -> torch.Tensor | None:
    """The tensor a module returned, or the first tensor of a tuple/list/dict output."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, dict):
        output = list(output.values())
    if isinstance(output, list | tuple):
        for item in output:
            t = first_tensor(item)
            if t is not None:
                return t
    return None


def _copies(args: tuple) -> tuple:
    return tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args)


class Recorder(nn.Module):
    """Wraps a network to record the outputs of chosen layers during its forward passes.

    Args:
        net: the classifier; its forward returns logits ``(N, n_classes)``.
        input_data: an example batch (e.g. ``x[[0]]``) used once to trace the layer table.
        input_size: alternatively, the example input shape including the batch dimension.
        **summary_kwargs: passed to ``torchinfo.summary`` (e.g. ``dtypes``, ``device``).

    Attributes:
        activations: ``{layer_id: tensor}`` for the recorded layers, from the last forward pass.
        inputs: ``{layer_id: tensor}``, the (first tensor) input of each recorded layer.
        recording: the recorded layer ids, in the order given to :meth:`record`.
    """

    def __init__(
        self,
        net: nn.Module,
        *,
        input_data: torch.Tensor | None = None,
        input_size: Sequence[int] | None = None,
        **summary_kwargs: Any,
    ) -> None:
        super().__init__()
        if input_data is None and input_size is None:
            raise ValueError("Recorder needs `input_data` (an example batch) or `input_size`.")
        self.net = net
        example = tuple(input_data.shape) if input_data is not None else tuple(input_size or ())
        self.input_shape: tuple[int, ...] = tuple(int(d) for d in example[1:])
        """Per-sample shape of the example the layer table was traced with (no batch dim)."""
        # the outputs of the network and of its Linear layers during the trace, per call: the
        # head check compares them without another forward pass
        self._traced_outputs: dict[int, list[torch.Tensor | None]] = {}
        owner = threading.get_ident()

        def grab(module: nn.Module, args: Any, output: Any) -> None:
            if threading.get_ident() == owner:
                t = first_tensor(output)
                self._traced_outputs.setdefault(id(module), []).append(
                    t.detach().clone() if t is not None else None
                )

        watched = [m for m in net.modules() if m is net or isinstance(m, nn.Linear)]
        try:
            with exclusive_eval(net):  # torchinfo's hooks must see this trace only
                handles = [m.register_forward_hook(grab) for m in watched]
                try:
                    self.summary = torchinfo.summary(
                        net,
                        input_data=_copies((input_data,))[0],  # the caller's example stays intact
                        input_size=input_size,
                        verbose=0,
                        depth=100,
                        col_names=("input_size", "output_size", "num_params", "params_percent"),
                        row_settings=("var_names", "depth"),
                        **summary_kwargs,
                    )
                finally:
                    for h in handles:
                        h.remove()
        except Exception as exc:  # torchinfo wraps the model's own error
            shape = tuple(input_data.shape) if input_data is not None else tuple(input_size or ())
            cause = exc.__cause__ or exc  # torchinfo's own message says "see above"
            raise ValueError(
                f"The network failed on an example input of shape {shape}: "
                f"{type(cause).__name__}: {cause}. Check that the data matches what the model "
                "expects (channels, height, width)."
            ) from exc
        names = {id(m): name for name, m in net.named_modules()}
        self._infos = {(li.depth, li.depth_index): li for li in self.summary.summary_list}
        self._names = {lid: names.get(id(li.module), "") for lid, li in self._infos.items()}
        # module -> its ids in call order (a module called twice has two ids)
        self._ids_of_module: dict[int, list[LayerId]] = {}
        self._module_by_id: dict[int, nn.Module] = {}
        for lid, li in self._infos.items():
            self._ids_of_module.setdefault(id(li.module), []).append(lid)
            self._module_by_id[id(li.module)] = li.module
        self.recording: tuple[LayerId, ...] = ()
        self.activations: dict[LayerId, torch.Tensor] = {}
        self.inputs: dict[LayerId, torch.Tensor] = {}
        self._calls: dict[int, int] = {}
        self._versions: dict[tuple[LayerId, bool], int] = {}
        self._head: LayerId | None | bool = False  # False: not looked for yet
        self._copy: set[LayerId] = set()

    # ------------------------------------------------------------------ layer table
    @property
    def layer_ids(self) -> list[LayerId]:
        """All layer ids of the network in table order, ``(0, 1)`` first."""
        return list(self._infos)

    def info(self, layer: Any) -> LayerInfo:
        """What the layer table knows of one layer (module, name, shapes, how often its module is
        called per forward pass)."""
        lid = self.check_layer(layer)
        li = self._infos[lid]
        return LayerInfo(
            id=lid,
            name=self._names[lid],
            module=li.module,
            type=li.class_name,
            input_size=tuple(li.input_size or ()),
            output_size=tuple(li.output_size or ()),
            n_calls=len(self._ids_of_module[id(li.module)]),
        )

    def head(self) -> LayerId | None:
        """The classifier head: the last ``nn.Linear`` (below the network itself) whose output has
        the network's per-sample output shape **and is the network's output** (checked once on
        the traced example: a head whose logits the network averages with another head's, or
        changes after it, is not the head); None if there is none. The one head rule of the
        package (quick picks, activation shaping, ViM, GradNorm's closed form)."""
        if self._head is False:
            self._head = self._find_head()
            self._traced_outputs = {}
        return self._head

    def _find_head(self) -> LayerId | None:
        out = tuple(self._infos[(0, 1)].output_size or ())[1:]
        candidates = [
            lid
            for lid in reversed(self.layer_ids[1:])
            if isinstance(self._infos[lid].module, nn.Linear)
            and tuple(self._infos[lid].output_size or ())[1:] == out
        ]
        seen = self._traced_outputs
        logits = seen.get(id(self.net), [None])[-1]
        if not candidates or not isinstance(logits, torch.Tensor):
            return candidates[0] if candidates else None  # nothing to check against: shape rule
        for lid in candidates:
            module_id = id(self._infos[lid].module)
            ids = self._ids_of_module[module_id]
            calls = seen.get(module_id, [])
            if not calls or len(calls) % len(ids):
                continue  # the trace did not show this module as the table did
            a = calls[len(calls) - len(ids) + ids.index(lid)]  # its calls in the last pass
            if (
                isinstance(a, torch.Tensor)
                and a.shape == logits.shape
                and torch.allclose(a, logits, 1e-4, 1e-5)
            ):
                return lid
        return None

    def layer_name(self, layer: LayerId) -> str:
        """Dotted module name of a layer (``""`` for the whole network)."""
        return self._names[self.check_layer(layer)]

    def check_layer(self, layer: Any) -> LayerId:
        """Validate a layer id, raising ``ValueError`` naming the valid range if unknown."""
        lid = parse_layer_id(layer)
        if lid not in self._infos:
            depths = sorted({d for d, _ in self._infos})
            last = {d: max(i for dd, i in self._infos if dd == d) for d in depths}
            per_depth = ", ".join(
                f"depth {d}: {d}-1" + (f" to {layer_text((d, n))}" if n > 1 else "")
                for d, n in last.items()
            )
            raise ValueError(
                f"Unknown layer id {layer_text(lid)} for {type(self.net).__name__}; valid ids are ({per_depth}). "
                "See the layer table (print the Recorder or call layer_table())."
            )
        return lid

    def layer_table(self) -> pd.DataFrame:
        """One row per layer: id, depth, name, type, input/output shapes, params, params %."""
        total = max(self.summary.total_params, 1)
        rows = []
        for lid, li in self._infos.items():
            n_params = li.trainable_params if li.depth > 0 else self.summary.total_params
            own = li.leftover_params() if li.depth > 0 else 0
            rows.append(
                {
                    "id": layer_text(lid),
                    "depth": lid[0],
                    "index": lid[1],
                    "name": self._names[lid] or "(network)",
                    "type": li.class_name,
                    "input_shape": str(li.input_size),
                    "output_shape": str(li.output_size),
                    "params": int(n_params),
                    "own_params": int(own),
                    "params_pct": round(100 * own / total, 2),
                    "leaf": bool(li.is_leaf_layer),
                }
            )
        return pd.DataFrame(rows)

    def quick_picks(self) -> dict[str, list[LayerId]]:
        """Common layer choices: ``logits`` (the final Linear producing the output),
        ``penultimate`` (the layer feeding it, skipping Flatten/Dropout/Identity), ``blocks``
        (depth-1 layers with at least two sub-layers, e.g. residual blocks)."""
        ids = self.layer_ids
        head = [lid for lid in [self.head()] if lid is not None]
        picks: dict[str, list[LayerId]] = {"logits": head, "penultimate": [], "blocks": []}
        if head:
            depth = head[-1][0]
            skip = (nn.Flatten, nn.Dropout, nn.Identity)
            before = [
                lid
                for lid in ids[: ids.index(head[-1])]
                if lid[0] == depth and not isinstance(self._infos[lid].module, skip)
            ]
            picks["penultimate"] = before[-1:]
        picks["blocks"] = [
            lid for lid in ids if lid[0] == 1 and len(list(self._infos[lid].module.children())) >= 2
        ]
        return picks

    # ------------------------------------------------------------------ recording
    def record(self, *layers: Any) -> Recorder:
        """Record these layer ids from now on (replaces the previous selection); returns self.

        As in the reference library, duplicates and the order given are ignored: ``recording``
        lists the layers in network (call) order. Nothing is attached to the network here: the
        hooks exist only while :meth:`forward` runs."""
        order = {lid: i for i, lid in enumerate(self.layer_ids)}
        ids = tuple(sorted({self.check_layer(layer) for layer in layers}, key=order.__getitem__))
        self.recording = ids
        self.activations = {}
        self.inputs = {}
        return self

    @property
    def copied_layers(self) -> tuple[LayerId, ...]:
        """Recorded layers whose output (or input) the network later modified in place (e.g. a
        BatchNorm followed by ``ReLU(inplace=True)``): they are copied as they are returned."""
        return tuple(sorted(self._copy))

    def _hook(self, mid: int, owner: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if threading.get_ident() != owner:  # another thread's forward on the same module
                return
            k = self._calls.get(mid, 0)
            self._calls[mid] = k + 1
            ids = self._ids_of_module[mid]
            if k < len(ids) and ids[k] in self.recording:
                lid = ids[k]
                for store, value in ((self.activations, output), (self.inputs, args)):
                    tensor = first_tensor(value)
                    if tensor is None:
                        continue
                    if lid in self._copy:
                        tensor = tensor.clone()
                    store[lid] = tensor
                    self._versions[(lid, store is self.inputs)] = tensor._version

        return hook

    def _run(self, args: tuple, kwargs: dict) -> Any:
        """One forward pass of the network with this recorder's hooks installed (removed after)."""
        self._calls = {}
        self.activations = {}
        self.inputs = {}
        self._versions = {}
        owner = threading.get_ident()
        handles = [
            self._module_by_id[mid].register_forward_hook(self._hook(mid, owner))
            for mid in {id(self._infos[lid].module) for lid in self.recording}
        ]
        try:
            return self.net(*args, **kwargs)
        finally:
            for h in handles:
                h.remove()

    def _modified_in_place(self) -> set[LayerId]:
        """Recorded layers whose tensor was written in place after it was returned."""
        out = set()
        for (lid, is_input), version in self._versions.items():
            tensor = (self.inputs if is_input else self.activations).get(lid)
            if tensor is not None and tensor._version != version:
                out.add(lid)
        return out

    def close(self) -> None:
        """Stop recording (the network carries no hook of this recorder between passes)."""
        self.recording = ()

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Run the network; afterwards :attr:`activations` holds the recorded layers' outputs.

        Thread-safe: passes of every recorder on one network are serialised (:func:`net_lock`),
        tensor arguments are copied so that a network editing its input in place never changes
        the caller's tensors, and a recorded output that the network later modifies in place is
        recorded again as a copy (the pass is rerun once; :attr:`copied_layers`)."""
        with net_lock(self.net):
            out = self._run(_copies(args), kwargs)
            changed = self._modified_in_place() - self._copy
            if changed:
                self._copy |= changed
                out = self._run(_copies(args), kwargs)
        missing = [lid for lid in self.recording if lid not in self.activations]
        if missing:
            raise RuntimeError(
                f"Layer(s) {layers_text(missing)} were not reached in this forward pass (the example input "
                "reached them when the layer table was built); is there a data-dependent branch?"
            )
        return out

    # ------------------------------------------------------------------ batched recording
    def record_batches(
        self,
        data: torch.Tensor,
        *,
        batch_size: int = 256,
        reduce: Callable[[torch.Tensor, dict[LayerId, torch.Tensor]], Any] | None = None,
        progress: Progress | None = None,
    ) -> list[Any]:
        """Run ``data`` through the net in batches under ``torch.no_grad``.

        ``reduce(logits, activations)`` turns each batch into whatever small per-sample result is
        needed (default: ``(logits, {id: activation})`` detached), so memory never grows with the
        dataset times the raw activation size. Returns the per-batch results in order.
        """
        results = []
        n = len(data)
        with torch.no_grad():
            for start in range(0, n, batch_size):
                logits = self(data[start : start + batch_size])
                if reduce is None:
                    results.append((logits, {k: v.detach() for k, v in self.activations.items()}))
                else:
                    results.append(reduce(logits, self.activations))
                if progress is not None:
                    progress(min(start + batch_size, n), n)
        return results

    def __repr__(self) -> str:
        rec = layers_text(self.recording) or "None"
        line = "=" * len(str(self.summary).splitlines()[0])
        return (
            f"Recorder instance for the following network\n{self.summary}\n"
            f"Currently recording: {rec}\n{line}"
        )
