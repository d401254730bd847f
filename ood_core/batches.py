"""Streamed inputs: what the engine iterates over, one batch of images (and labels) at a time.

Every pass of :mod:`ood_core.engine` consumes a :class:`BatchSource`. A source knows its number
of samples (or None when it cannot, e.g. a streamed Hugging Face dataset), the per-sample shape,
and yields batches ``(images, labels)``: images float ``(b, C, H, W)`` in the model's input
range, labels int64 ``(b,)`` or None. Nothing here holds more than one batch of float images:

* :class:`TensorSource`: a tensor already in memory (what the seed API is given).
* :class:`RowSource`: rows of a stored pixel array (uint8 0-255 or float [0, 1], e.g. an
  :class:`~ood_core.data.ImageDataset`'s compact pixels, a numpy memmap or an Arrow-backed
  array) selected by index, converted to float per batch and optionally transformed per batch
  (a perturbation that maps each image on its own).
* :class:`IterableSource`: any re-iterable of batches: a ``torch.utils.data.DataLoader``
  (workers), a generator function, or rows of ``datasets.load_dataset(..., streaming=True)``
  (:func:`hf_rows`), re-batched to the requested size.

``as_source(x)`` wraps a tensor; sources pass through. Row order is the source's order; each
source is iterated afresh for every pass (a calibration set is read once per fit).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import torch
from torch import Tensor

Batch = tuple[Tensor, Tensor | None]
"""``(images (b, C, H, W) float, labels (b,) int64 or None)``."""


class BatchSource:
    """Base class of streamed inputs (see the module docstring).

    Subclasses implement :meth:`_batches`; ``n`` is the number of samples (None: unknown until
    iterated) and ``sample_shape`` the per-sample shape (None: read from the first batch).
    """

    n: int | None = None
    sample_shape: tuple[int, ...] | None = None

    def __len__(self) -> int:
        if self.n is None:
            raise TypeError(f"{type(self).__name__}: the number of samples is not known")
        return self.n

    def batches(self, batch_size: int) -> Iterator[Batch]:
        """``(images, labels)`` batches of at most ``batch_size`` samples, in order."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        return self._batches(int(batch_size))

    def _batches(self, batch_size: int) -> Iterator[Batch]:
        raise NotImplementedError

    def example(self) -> Tensor:
        """The first image ``(1, C, H, W)`` (to trace a model on)."""
        for x, _ in self.batches(1):
            return x[:1]
        raise ValueError("Cannot compute scores on empty inputs (0 samples).")

    def known_labels(self) -> Tensor | None:
        """The labels ``(n,)`` when the source stores them (no pass needed), else None."""
        return None

    def labels(self) -> Tensor | None:
        """All labels ``(n,)`` (one pass over the source when they are not stored), or None."""
        parts = [y for _, y in self.batches(1024)]
        if not parts or any(y is None for y in parts):
            return None
        return torch.cat(parts)  # type: ignore[arg-type]


class TensorSource(BatchSource):
    """Batches sliced from an in-memory tensor ``x`` ``(N, ...)`` (and labels ``(N,)``)."""

    def __init__(self, x: Tensor, labels: Tensor | None = None) -> None:
        self.x = x
        self.y = labels
        self.n = len(x)
        self.sample_shape = tuple(x.shape[1:])

    def _batches(self, batch_size: int) -> Iterator[Batch]:
        for start in range(0, self.n or 0, batch_size):
            stop = start + batch_size
            yield self.x[start:stop], None if self.y is None else self.y[start:stop]

    def example(self) -> Tensor:
        return self.x[:1]

    def known_labels(self) -> Tensor | None:
        return self.y

    def labels(self) -> Tensor | None:
        return self.y


def to_float_images(pixels: Tensor) -> Tensor:
    """Integer 0-255 pixels (uint8, or the int64 that lists of pixels become) -> float32 in
    [0, 1] (``/ 255``); float pixels as float32."""
    if pixels.dtype == torch.uint8:
        return pixels.float().div_(255)
    if not pixels.is_floating_point() and pixels.dtype != torch.bool:
        lo, hi = int(pixels.min()), int(pixels.max())
        if lo < 0 or hi > 255:  # noqa: PLR2004
            raise ValueError(
                f"Integer pixels must lie in [0, 255]; found values in [{lo}, {hi}]. Clip them, "
                "or give floats in [0, 1]."
            )
        return pixels.float().div_(255)
    return pixels.float()


class RowSource(BatchSource):
    """Rows ``indices`` (all, in order, when None) of stored ``pixels`` ``(N, C, H, W)``.

    ``pixels``: a uint8 (0-255) or float ([0, 1]) tensor or numpy array (a memmap is read only
    where indexed); ``labels``: the selected rows' labels ``(n,)`` (already indexed) or None;
    ``transform``: applied to each float batch (it must map every image on its own, so that
    batching does not change the result).
    """

    def __init__(
        self,
        pixels: Tensor | np.ndarray,
        indices: Tensor | None = None,
        labels: Tensor | None = None,
        transform: Callable[[Tensor], Tensor] | None = None,
    ) -> None:
        self.pixels = pixels
        self.indices = indices
        self.y = labels
        self.transform = transform
        self.n = len(pixels) if indices is None else len(indices)
        self.sample_shape = tuple(pixels.shape[1:])

    def rows(self, start: int, stop: int) -> Tensor:
        """Float images of selected rows ``start:stop`` (before the transform)."""
        if self.indices is None:
            part = self.pixels[start:stop]
        else:
            idx = self.indices[start:stop]
            part = self.pixels[idx.numpy() if isinstance(self.pixels, np.ndarray) else idx]
        return to_float_images(torch.as_tensor(np.ascontiguousarray(part)))

    def _batches(self, batch_size: int) -> Iterator[Batch]:
        for start in range(0, self.n or 0, batch_size):
            stop = min(start + batch_size, self.n or 0)
            x = self.rows(start, stop)
            if self.transform is not None:
                x = self.transform(x)
            yield x, None if self.y is None else self.y[start:stop]

    def known_labels(self) -> Tensor | None:
        return self.y

    def labels(self) -> Tensor | None:
        return self.y


def _split_item(item: Any) -> Batch:
    """A batch as an iterable yields it: a tensor, ``(x, y)`` or ``{"image"/"images", "label"/
    "labels"}``."""
    if isinstance(item, Tensor):
        return item, None
    if isinstance(item, dict):
        x = next((item[k] for k in ("images", "image", "pixel_values", "x") if k in item), None)
        y = next((item[k] for k in ("labels", "label", "y") if k in item), None)
        if x is None:
            raise ValueError(
                f"A batch dict needs an 'images' (or 'image', 'pixel_values', 'x') entry; got "
                f"keys {sorted(item)}"
            )
        return torch.as_tensor(x), None if y is None else torch.as_tensor(y)
    if isinstance(item, (tuple, list)) and len(item) in (1, 2):
        x = torch.as_tensor(item[0])
        return x, None if len(item) == 1 else torch.as_tensor(item[1])
    raise ValueError(
        "An iterable of batches must yield tensors (b, C, H, W), (images, labels) pairs or "
        f"dicts with 'images' and 'labels'; got {type(item).__name__}"
    )


class IterableSource(BatchSource):
    """Batches from a re-iterable (a DataLoader, a list, or a callable returning an iterator),
    re-batched to the requested size (labels kept when every batch has them).

    ``n``: the number of samples when known (for progress bars and pre-flight checks).
    """

    def __init__(
        self,
        batches: Iterable[Any] | Callable[[], Iterable[Any]],
        n: int | None = None,
        sample_shape: tuple[int, ...] | None = None,
    ) -> None:
        if isinstance(batches, Iterator):
            raise ValueError(
                "IterableSource needs a re-iterable (a DataLoader, a list, or a function "
                "returning a new iterator): a plain iterator is used up after one pass, and "
                "calibration and scoring each read the data"
            )
        self._source = batches
        self.n = n
        self.sample_shape = sample_shape

    def _iterate(self) -> Iterable[Any]:
        return self._source() if callable(self._source) else self._source

    def _batches(self, batch_size: int) -> Iterator[Batch]:
        xs: list[Tensor] = []
        ys: list[Tensor | None] = []
        held = 0
        for item in self._iterate():
            x, y = _split_item(item)
            if x.ndim < 2:  # noqa: PLR2004 - one sample
                raise ValueError(f"A batch must be (b, C, H, W); got shape {tuple(x.shape)}")
            xs.append(x)
            ys.append(y)
            held += len(x)
            while held >= batch_size:
                out, xs, ys, held = _take(xs, ys, batch_size)
                yield out
        if held:
            out, xs, ys, held = _take(xs, ys, held)
            yield out


def _take(
    xs: list[Tensor], ys: list[Tensor | None], k: int
) -> tuple[Batch, list[Tensor], list[Tensor | None], int]:
    """The first ``k`` samples of the held chunks, and what is left."""
    x = torch.cat(xs) if len(xs) > 1 else xs[0]
    labelled = all(y is not None for y in ys)
    y = (torch.cat(ys) if len(ys) > 1 else ys[0]) if labelled else None  # type: ignore[arg-type]
    rest_x, rest_y = x[k:], None if y is None else y[k:]
    left = len(rest_x)
    return (
        (x[:k], None if y is None else y[:k]),
        [rest_x] if left else [],
        [rest_y] if left else [],
        left,
    )


def hf_rows(
    rows: Callable[[], Iterable[dict[str, Any]]],
    image_column: str = "image",
    label_column: str | None = "label",
    decode: Callable[[Any], np.ndarray] | None = None,
    rows_per_batch: int = 256,
) -> Callable[[], Iterator[Batch]]:
    """Batches of images from rows ``{image_column: ..., label_column: ...}`` (e.g. a
    ``datasets.load_dataset(..., streaming=True)`` split): images decoded by ``decode`` (default:
    ``numpy.asarray``; PIL images, nested lists or arrays (H, W), (H, W, C) or (C, H, W)),
    uint8 scaled to [0, 1]; for :class:`IterableSource`."""
    to_array = decode or np.asarray

    def chw(value: Any) -> np.ndarray:
        a = to_array(value)
        if a.ndim == 2:  # noqa: PLR2004
            a = a[None]
        elif a.ndim == 3 and a.shape[-1] in (1, 3, 4) and a.shape[0] not in (1, 3, 4):  # noqa: PLR2004
            a = a.transpose(2, 0, 1)
        return a

    def batches() -> Iterator[Batch]:
        xs: list[np.ndarray] = []
        ys: list[int] = []
        for row in rows():
            xs.append(chw(row[image_column]))
            if label_column is not None:
                ys.append(int(row[label_column]))
            if len(xs) == rows_per_batch:
                yield _stack_rows(xs, ys, label_column)
                xs, ys = [], []
        if xs:
            yield _stack_rows(xs, ys, label_column)

    return batches


def _stack_rows(xs: list[np.ndarray], ys: list[int], label_column: str | None) -> Batch:
    x = to_float_images(torch.from_numpy(np.ascontiguousarray(np.stack(xs))))
    return x, torch.tensor(ys, dtype=torch.int64) if label_column is not None else None


def as_source(data: Tensor | BatchSource, labels: Tensor | None = None) -> BatchSource:
    """``data`` as a :class:`BatchSource` (a tensor is wrapped; a source passes through)."""
    if isinstance(data, BatchSource):
        return data
    return TensorSource(data, labels)


__all__ = [
    "Batch",
    "BatchSource",
    "IterableSource",
    "RowSource",
    "TensorSource",
    "as_source",
    "hf_rows",
    "to_float_images",
]
