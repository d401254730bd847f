"""Calibration rows grouped by class, spilled to disk past a budget: the fit state of scores that
need every row of a class at once (exact per-class quantiles, e.g. Gram's bands).

A :class:`ClassRows` is filled batch by batch (:meth:`ClassRows.update`, as the engine's
streaming fits are, ``fit_kind = "class-rows"``) or from whole features. It keeps the batches as
given (no copy) up to ``max_bytes``; past it every buffered row is appended to one file per
(feature, class) in a temporary folder and the buffer emptied, so the memory of the pass is the
budget whatever the number of samples. A fit then reads one class's rows at a time
(:meth:`ClassRows.rows`): its peak is the largest class, not the calibration set. Rows keep
their arrival order within a class (the order of a stable sort by class), so a fit from a state
filled in any batches is exactly that of the whole matrix. Rows whose group is not a class of
the network (a label ``>= C``) are kept apart (:meth:`ClassRows.all_rows` includes them).
"""

from __future__ import annotations

import shutil
import tempfile
import weakref
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ood_core.budget import check_disk

SPILL_BYTES = 2**26
"""Bytes of rows kept in memory before they are appended to the per-class files (64 MiB)."""
OTHER = -1
"""The group of rows whose class is not one of the network's."""


class ClassRows:
    """Per-sample features ``{key: (n, ...)}`` grouped by class: by the predicted class
    (``group_by="pred"``: the logits' argmax) or by the given labels (``"labels"``).

    ``max_bytes``: rows held in memory (default :data:`SPILL_BYTES`) before spilling to ``directory`` (a new temporary folder,
    removed by :meth:`close` or when the state is collected); ``math.inf`` never spills.
    Also tracks, per key, which flattened columns hold a NaN and how many rows do.
    """

    def __init__(
        self,
        group_by: str = "labels",
        max_bytes: float | None = None,
        directory: str | Path | None = None,
    ) -> None:
        if group_by not in ("pred", "labels"):
            raise ValueError(f"group_by must be 'pred' or 'labels', got {group_by!r}.")
        self.group_by = group_by
        self.max_bytes = SPILL_BYTES if max_bytes is None else max_bytes
        self.parent = directory
        self.n = 0
        self.n_classes: int | None = None
        self.shapes: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        self.counts: dict[int, int] = {}
        self.nan_columns: dict[str, Tensor] = {}
        self.nan_rows: dict[str, int] = {}
        self.buffer: list[tuple[dict[str, Tensor], Tensor]] = []
        self.buffered = 0
        self.folder: Path | None = None
        self._finalizer: weakref.finalize | None = None

    # ------------------------------------------------------------------ filling
    def update(self, features: dict[str, Tensor], logits: Tensor, labels: Tensor) -> None:
        """Add one batch: ``features[key]`` ``(b, ...)``, its logits ``(b, C)`` and labels
        ``(b,)``."""
        if self.n_classes is None:
            self.n_classes = int(logits.shape[1])
        groups = logits.argmax(1) if self.group_by == "pred" else labels
        groups = groups.detach().to("cpu").long()
        groups = torch.where((groups >= 0) & (groups < self.n_classes), groups, OTHER)
        self._add({k: v.detach().to("cpu") for k, v in features.items()}, groups)

    def merge(self, other: ClassRows) -> None:
        """Append another state's rows (e.g. of a later shard of the data) after this one's."""
        if other.n_classes is None:
            return
        if self.n_classes is None:
            self.n_classes = other.n_classes
        for g in sorted(other.counts):
            rows = {key: other.rows(key, g) for key in other.shapes}
            self._add(rows, torch.full((other.counts[g],), g, dtype=torch.long))

    def _add(self, feats: dict[str, Tensor], groups: Tensor) -> None:
        for key, h in feats.items():
            self.shapes.setdefault(key, (tuple(h.shape[1:]), h.dtype))
            nan = h.reshape(len(h), -1).isnan()
            cols = nan.any(0)
            self.nan_columns[key] = (
                self.nan_columns[key] | cols if key in self.nan_columns else cols
            )
            self.nan_rows[key] = self.nan_rows.get(key, 0) + int(nan.any(1).sum())
        for g, k in zip(*torch.unique(groups, return_counts=True), strict=True):
            self.counts[int(g)] = self.counts.get(int(g), 0) + int(k)
        self.n += len(groups)
        self.buffer.append((feats, groups))
        self.buffered += sum(v.nbytes for v in feats.values())
        if self.buffered > self.max_bytes:
            self._spill()

    # ------------------------------------------------------------------ reading
    def class_counts(self) -> list[int]:
        """Rows per class ``0 .. C-1`` (rows of no class left out)."""
        return [self.counts.get(c, 0) for c in range(self.n_classes or 0)]

    def rows(self, key: str, c: int) -> Tensor:
        """Every row of class ``c`` (or :data:`OTHER`) for feature ``key`` ``(n_c, ...)``, in
        arrival order, on the CPU."""
        return self._group(key, c)

    def all_rows(self, key: str) -> Tensor:
        """Every row of feature ``key``, grouped by class (rows of no class last)."""
        groups = [*range(self.n_classes or 0), OTHER]
        return torch.cat([self._group(key, g) for g in groups])

    def _group(self, key: str, g: int) -> Tensor:
        shape, dtype = self.shapes[key]
        parts = []
        path = self._path(key, g)
        if path is not None and path.exists():
            flat = np.fromfile(path, dtype=torch.empty(0, dtype=dtype).numpy().dtype)
            parts.append(torch.from_numpy(flat).reshape(-1, *shape))
        parts += [feats[key][groups == g] for feats, groups in self.buffer]
        if not parts:
            return torch.empty((0, *shape), dtype=dtype)
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    # ------------------------------------------------------------------ disk
    @property
    def spilled(self) -> bool:
        """Whether rows were written to disk."""
        return self.folder is not None

    def _path(self, key: str, g: int) -> Path | None:
        if self.folder is None:
            return None
        index = list(self.shapes).index(key)
        return self.folder / f"{index}_{'other' if g == OTHER else g}.bin"

    def _spill(self) -> None:
        """Append every buffered row to its (feature, class) file and empty the buffer."""
        if self.folder is None:
            self.folder = Path(tempfile.mkdtemp(prefix="ood-lens-rows-", dir=self.parent))
            self._finalizer = weakref.finalize(self, shutil.rmtree, self.folder, True)
        try:
            for key in self.shapes:
                for g in sorted(self.counts):
                    parts = [f[key][gr == g] for f, gr in self.buffer]
                    parts = [p for p in parts if len(p)]
                    if not parts:
                        continue
                    path = self._path(key, g)
                    assert path is not None
                    with path.open("ab") as out:
                        for p in parts:
                            out.write(p.contiguous().numpy().tobytes())
        except OSError as e:
            raise OSError(
                f"Writing calibration rows to {self.folder} failed ({e}); free disk space "
                "there or point TMPDIR at a disk with room for them."
            ) from e
        self.buffer.clear()
        self.buffered = 0

    def close(self) -> None:
        """Remove the spilled files (the state is empty afterwards)."""
        if self._finalizer is not None:
            self._finalizer()
        self.folder = None
        self.buffer.clear()
        self.buffered = 0


def check_spill_room(what: str, n_bytes: int, remedy: str) -> None:
    """Before a pass: refuse a state of ``n_bytes`` of rows that would spill (beyond
    :data:`SPILL_BYTES`) to a temporary folder without room for them."""
    if n_bytes > SPILL_BYTES:
        check_disk(what, n_bytes, remedy, tempfile.gettempdir())


__all__ = ["OTHER", "SPILL_BYTES", "ClassRows", "check_spill_room"]
