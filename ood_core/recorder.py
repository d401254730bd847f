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

from ood_core.core import (
    LayerId,
    OutputError,
    OutputKey,
    Progress,
    exclusive_eval,
    logits_problem,
    net_lock,
    output_key,
    select,
    select_output,
    viewed_net,
)
from ood_core.inputs import InputRange, check_input_range
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


TRACE_NUMEL = 2**20
"""Module outputs of at most this many values are kept from the trace for the head and feature
checks (the head's input and the network's output are always kept)."""


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


def _same_values(a: Any, b: torch.Tensor) -> bool:
    """``a`` is a tensor holding ``b``'s values per sample (compared flattened, float tolerance)."""
    if not isinstance(a, torch.Tensor) or a.shape[:1] != b.shape[:1] or a.numel() != b.numel():
        return False
    return bool(torch.allclose(a.reshape(b.shape).to(b.dtype), b, 1e-4, 1e-5))


def _copies(args: tuple) -> tuple:
    return tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args)


class Recorder(nn.Module):
    """Wraps a network to record the outputs of chosen layers during its forward passes.

    Args:
        net: the classifier; its forward returns logits ``(N, n_classes)``, or a tuple / list /
            dict / object holding them (then say which with ``output``).
        input_data: an example batch (e.g. ``x[[0]]``) used once to trace the layer table.
        input_size: alternatively, the example input shape including the batch dimension.
        output: the element of ``net``'s output that holds the logits: an index (``0`` for
            ``(logits, feats)``) or a key / attribute name (``"logits"``); the recorder then
            runs :func:`~ood_core.core.select_output` of ``net`` (same layer ids). None: the
            whole output.
        input_range: the range input batches are checked against: ``(low, high)``, ``"any"``
            (no check) or None (the model's declared range, else ``[0, 1]``).
        **summary_kwargs: passed to ``torchinfo.summary`` (e.g. ``dtypes``, ``device``).

    Attributes:
        activations: ``{layer_id: tensor}`` for the recorded layers, from the last forward pass.
        inputs: ``{layer_id: tensor}``, the (first tensor) input of each recorded layer.
        recording: the recorded layer ids, in the order given to :meth:`record`.
        output_problem: why the traced output is not logits ``(N, n_classes)`` (what the
            network returns and how to choose ``output``), or None; the engine refuses to run
            while it is set.
    """

    def __init__(
        self,
        net: nn.Module,
        *,
        input_data: torch.Tensor | None = None,
        input_size: Sequence[int] | None = None,
        output: OutputKey | None = None,
        input_range: InputRange = None,
        **summary_kwargs: Any,
    ) -> None:
        super().__init__()
        if input_data is None and input_size is None:
            raise ValueError("Recorder needs `input_data` (an example batch) or `input_size`.")
        net = select_output(net, output)
        self.net = net
        self.output: OutputKey | None = output_key(net)  # also when given a view
        self.input_range: InputRange = check_input_range(input_range)
        self.output_problem: str | None = None
        example = tuple(input_data.shape) if input_data is not None else tuple(input_size or ())
        self.input_shape: tuple[int, ...] = tuple(int(d) for d in example[1:])
        """Per-sample shape of the example the layer table was traced with (no batch dim)."""
        # the outputs of every module during the trace, per call (those of up to TRACE_NUMEL
        # values), and the inputs of the Linear layers: the head check and the feature pick
        # compare them without another forward pass
        self._traced_outputs: dict[int, list[torch.Tensor | None]] = {}
        self._traced_inputs: dict[int, list[torch.Tensor | None]] = {}
        owner = threading.get_ident()

        def grab(module: nn.Module, args: Any, output: Any) -> None:
            if threading.get_ident() == owner:
                t = first_tensor(output)
                small = t is not None and (module is net or t.numel() <= TRACE_NUMEL)
                self._traced_outputs.setdefault(id(module), []).append(
                    t.detach().clone() if small else None
                )
                if isinstance(module, nn.Linear):
                    i = first_tensor(args)
                    self._traced_inputs.setdefault(id(module), []).append(
                        i.detach().clone() if i is not None else None
                    )

        watched = list(net.modules())
        try:
            with exclusive_eval(net):  # torchinfo's hooks must see this trace only
                handles = [m.register_forward_hook(grab) for m in watched]
                handles.append(viewed_net(net).register_forward_hook(self._output_hook(owner)))
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
            if isinstance(cause, OutputError):  # a bad `output`: its message lists the output
                raise OutputError(str(cause)) from None
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
        self._features: LayerId | None = None
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
        self._read_trace()
        return self._head  # type: ignore[return-value]

    def head_features(self) -> LayerId | None:
        """The layer whose output is the head's input (the penultimate features), checked on the
        traced example: of the layers called just before the head whose output, flattened per
        sample, equals the head's input, the shallowest and then the first, Flatten and Dropout
        skipped (torchvision ResNet's ``avgpool``, timm ViT's pooled ``fc_norm`` (an Identity),
        timm ConvNeXt's ``head.norm``). None without a head or when no layer returns its input
        (e.g. the head reads a token the network slices out itself)."""
        self._read_trace()
        return self._features

    def _read_trace(self) -> None:
        if self._head is False:
            self._head = self._find_head()
            self._features = self._find_features(self._head) if self._head else None
            self._traced_outputs, self._traced_inputs = {}, {}

    def _traced(self, seen: dict[int, list[torch.Tensor | None]], lid: LayerId) -> Any:
        """What ``seen`` kept of layer ``lid``'s call in the trace's last pass (None if nothing)."""
        module_id = id(self._infos[lid].module)
        ids = self._ids_of_module[module_id]
        calls = seen.get(module_id, [])
        if not calls or len(calls) % len(ids):
            return None  # the trace did not show this module as the table did
        return calls[len(calls) - len(ids) + ids.index(lid)]

    def _find_head(self) -> LayerId | None:
        out = tuple(self._infos[(0, 1)].output_size or ())[1:]
        candidates = [
            lid
            for lid in reversed(self.layer_ids[1:])
            if isinstance(self._infos[lid].module, nn.Linear)
            and tuple(self._infos[lid].output_size or ())[1:] == out
        ]
        logits = self._traced_outputs.get(id(self.net), [None])[-1]
        if not candidates or not isinstance(logits, torch.Tensor):
            return candidates[0] if candidates else None  # nothing to check against: shape rule
        for lid in candidates:
            a = self._traced(self._traced_outputs, lid)
            if _same_values(a, logits):
                return lid
        return None

    def _find_features(self, head: LayerId) -> LayerId | None:
        x = self._traced(self._traced_inputs, head)
        if not isinstance(x, torch.Tensor):
            return None
        ids = self.layer_ids
        run: list[LayerId] = []
        for lid in reversed(ids[1 : ids.index(head)]):
            if not _same_values(self._traced(self._traced_outputs, lid), x):
                break
            if not isinstance(self._infos[lid].module, nn.Flatten | nn.Dropout):
                run.append(lid)
        if not run:
            return None
        depth = min(lid[0] for lid in run)
        return [lid for lid in run if lid[0] == depth][-1]

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
        """Common layer choices, each checked on the traced example: ``logits`` (the head, see
        :meth:`head`), ``penultimate`` (the layer whose output is the head's input, see
        :meth:`head_features`) and ``blocks`` (one layer per stage or block, see
        :meth:`blocks`)."""
        head = self.head()
        features = self.head_features()
        return {
            "logits": [head] if head is not None else [],
            "penultimate": [features] if features is not None else [],
            "blocks": self.blocks(),
        }

    def blocks(self) -> list[LayerId]:
        """The network's stages or blocks, in call order: the shallowest group of at least three
        sibling modules of one class that each hold two or more sub-modules (torchvision ResNet's
        ``layer1..4``, timm ConvNeXt's ``stages.0..3``, timm ViT's ``blocks.0..11``); failing
        that, the depth-1 layers with two or more sub-layers. A module called several times
        counts once (its first call)."""
        groups: dict[tuple[str, type], list[LayerId]] = {}
        for lid in self.layer_ids[1:]:
            module = self._infos[lid].module
            if len(list(module.children())) < 2 or self._ids_of_module[id(module)][0] != lid:
                continue
            parent = self._names[lid].rpartition(".")[0]
            groups.setdefault((parent, type(module)), []).append(lid)
        repeated = [ids for ids in groups.values() if len(ids) >= 3]  # noqa: PLR2004
        if repeated:
            return min(repeated, key=lambda ids: (ids[0][0], ids[0]))
        return [
            lid
            for lid in self.layer_ids
            if lid[0] == 1 and len(list(self._infos[lid].module.children())) >= 2
        ]

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

    def _output_hook(self, owner: int) -> Callable[..., None]:
        """A trace hook on the network the view reads (the network itself without a view): sets
        :attr:`output_problem` from the output it returns."""

        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if threading.get_ident() != owner:
                return
            try:
                chosen = output if self.output is None else select(output, self.output)
            except OutputError:
                return  # the view raises it, listing the output
            self.output_problem = logits_problem(chosen, self.output, output)

        return hook

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
