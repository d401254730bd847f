"""Datasets read as streams: calibration sets larger than memory (or than the disk).

Both return an :class:`~ood_core.batches.IterableSource` that yields float batches ``(b, C, H,
W)`` in [0, 1] with int64 labels, holding one Arrow record batch of encoded rows and one batch
of decoded images at a time:

* :func:`parquet_stream`: a local ``.parquet`` file or a folder of them (in name order), read
  record batch by record batch with pyarrow; each file is checked and confined to the data roots
  like every local file (:func:`ood_core.policy.check_data_file`); the number of rows comes from
  the files' metadata.
* :func:`hf_stream`: ``datasets.load_dataset(repo, name=config, split=split, streaming=True)``:
  rows are downloaded as they are read, nothing is cached on disk; the number of rows is unknown
  until the stream ends (pre-flight checks then run after the pass).

Images may be HF ``Image`` structs (encoded PNG/JPEG bytes, decoded with Pillow) or pixel arrays
(uint8 0-255 or float in [0, 1]; ``(H, W)``, ``(H, W, C)`` or ``(C, H, W)``). ``limit`` keeps the
first ``limit`` rows (a streamed calibration set: ``n_calibration``), ``skip`` drops the first
rows (a test set drawn after them from the same stream).
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ood_core.batches import IterableSource, hf_rows
from ood_core.data import DataUnavailableError, ImageDataset, disjoint_indices, network_available
from ood_core.policy import check_data_file, confine_path

IMAGE_COLUMNS = ("image", "img", "images", "pixels", "pixel_values", "x")
LABEL_COLUMNS = ("label", "labels", "fine_label", "y")


class StreamError(DataUnavailableError):
    """A streamed dataset could not be opened or read (message says which file or row)."""


def decode(value: Any) -> np.ndarray:
    """One image as a numpy array: an HF ``Image`` struct ``{"bytes", "path"}`` (decoded with
    Pillow), a PIL image, or nested lists / an array of pixels."""
    if isinstance(value, dict) and ("bytes" in value or "path" in value):
        from PIL import Image

        raw = value.get("bytes")
        if raw is None:
            raise StreamError(
                "an image row names a file by path only; streams read images stored in the rows "
                "(export them with their bytes, e.g. Dataset.to_parquet)"
            )
        with Image.open(io.BytesIO(raw)) as im:
            return np.asarray(im)
    return np.asarray(value)


def _pick(columns: Sequence[str], given: str | None, options: Sequence[str], what: str) -> str:
    if given is not None:
        if given not in columns:
            raise StreamError(f"no {what} column {given!r}; the data has columns {list(columns)}")
        return given
    for name in options:
        if name in columns:
            return name
    raise StreamError(
        f"no {what} column found among {list(columns)} (looked for {', '.join(options)}); "
        f"name it with {what}_column="
    )


def _limited(rows: Iterable[dict[str, Any]], skip: int, limit: int | None) -> Iterator[dict]:
    for i, row in enumerate(rows):
        if i < skip:
            continue
        if limit is not None and i >= skip + limit:
            return
        yield row


def _selected(rows: Iterable[dict[str, Any]], wanted: np.ndarray) -> Iterator[dict]:
    """The rows at the sorted positions ``wanted`` (others are skipped undecoded)."""
    k = 0
    for i, row in enumerate(rows):
        if k == len(wanted):
            return
        if i == wanted[k]:
            k += 1
            yield row


def parquet_files(path: str | Path, roots: Iterable[str | Path] | None = None) -> list[Path]:
    """The parquet files of ``path`` (one file, or a folder's ``*.parquet`` in name order), each
    checked and confined to ``roots`` (:func:`ood_core.policy.check_data_file`)."""
    p = Path(path).expanduser()
    if roots is not None:
        p = confine_path(p, roots)
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.suffix == ".parquet")
        if not files:
            raise StreamError(f"{path}: a folder without .parquet files")
    else:
        files = [p]
    return [check_data_file(f, roots)[0] for f in files]


def parquet_stream(
    path: str | Path,
    *,
    image_column: str | None = None,
    label_column: str | None = None,
    roots: Iterable[str | Path] | None = None,
    skip: int = 0,
    limit: int | None = None,
    rows: Any = None,
    rows_per_batch: int = 256,
) -> IterableSource:
    """A local parquet file or folder as a stream of float batches (see the module docstring);
    ``rows``: sorted row positions to keep (instead of ``skip`` / ``limit``)."""
    import pyarrow.parquet as pq

    files = parquet_files(path, roots)
    try:
        metas = [pq.ParquetFile(f) for f in files]
    except Exception as exc:  # noqa: BLE001 - pyarrow raises several types for a bad file
        raise StreamError(f"{path}: not a readable parquet file ({exc})") from None
    columns = metas[0].schema_arrow.names
    img = _pick(columns, image_column, IMAGE_COLUMNS, "image")
    lab = _pick(columns, label_column, LABEL_COLUMNS, "label")
    total = sum(m.metadata.num_rows for m in metas)
    n = max(0, total - skip) if limit is None else max(0, min(limit, total - skip))
    wanted = None if rows is None else np.asarray(rows, dtype=np.int64)
    if wanted is not None:
        n = len(wanted)

    def read() -> Iterator[dict[str, Any]]:
        for f in files:
            with pq.ParquetFile(f) as pf:
                for rb in pf.iter_batches(batch_size=rows_per_batch, columns=[img, lab]):
                    images = rb.column(img).to_pylist()
                    labels = rb.column(lab).to_pylist()
                    for x, y in zip(images, labels, strict=True):
                        yield {img: x, lab: y}

    def chosen() -> Iterator[dict[str, Any]]:
        return _limited(read(), skip, limit) if wanted is None else _selected(read(), wanted)

    batches = hf_rows(chosen, img, lab, decode, rows_per_batch=rows_per_batch)
    return IterableSource(batches, n=n)


def parquet_labels(
    path: str | Path, label_column: str | None = None, roots: Iterable[str | Path] | None = None
) -> tuple[np.ndarray, list[str]]:
    """All labels of a parquet file or folder (the label column alone is read) and the class
    names (the HF ``ClassLabel`` names the files record, else ``"0"``, ``"1"``...)."""
    import pyarrow.parquet as pq

    files = parquet_files(path, roots)
    schema = pq.read_schema(files[0])
    lab = _pick(schema.names, label_column, LABEL_COLUMNS, "label")
    labels = np.concatenate(
        [pq.read_table(f, columns=[lab]).column(lab).to_numpy() for f in files]
    ).astype(np.int64)
    names: list[str] | None = None
    meta = (schema.metadata or {}).get(b"huggingface")
    if meta:
        feature = json.loads(meta).get("info", {}).get("features", {}).get(lab, {})
        names = feature.get("names")
    if names is None:
        names = [str(c) for c in range(int(labels.max()) + 1 if len(labels) else 0)]
    return labels, [str(n) for n in names]


def hf_stream(
    repo_id: str,
    split: str = "train",
    config: str | None = None,
    *,
    image_column: str | None = None,
    label_column: str | None = None,
    skip: int = 0,
    limit: int | None = None,
    rows_per_batch: int = 256,
) -> IterableSource:
    """A Hugging Face hub dataset split read with ``streaming=True`` (nothing downloaded ahead,
    nothing cached): for calibration sets larger than the disk. Fails fast when offline."""
    from datasets import load_dataset

    offline = "1" in (os.environ.get("HF_HUB_OFFLINE"), os.environ.get("HF_DATASETS_OFFLINE"))
    if offline or not network_available("huggingface.co"):
        raise DataUnavailableError(
            f"Cannot stream '{repo_id}' (split {split!r}) from the Hugging Face hub: no network "
            "connection to huggingface.co. Use a local parquet folder instead."
        )
    try:
        ds = load_dataset(repo_id, name=config, split=split, streaming=True)
        first = next(iter(ds))
    except Exception as exc:  # noqa: BLE001 - the hub raises many types
        raise DataUnavailableError(f"Could not stream '{repo_id}' ({split!r}): {exc}") from exc
    return iterable_stream(
        lambda: iter(ds),
        list(first),
        image_column=image_column,
        label_column=label_column,
        skip=skip,
        limit=limit,
        rows_per_batch=rows_per_batch,
    )


def iterable_stream(
    rows: Any,
    columns: Sequence[str],
    *,
    image_column: str | None = None,
    label_column: str | None = None,
    skip: int = 0,
    limit: int | None = None,
    rows_per_batch: int = 256,
    n: int | None = None,
) -> IterableSource:
    """Rows from ``rows()`` (a function returning an iterator of dicts with ``columns``, such as
    an HF ``IterableDataset``'s ``iter``) as a stream of float batches."""
    img = _pick(columns, image_column, IMAGE_COLUMNS, "image")
    lab = _pick(columns, label_column, LABEL_COLUMNS, "label")
    batches = hf_rows(
        lambda: _limited(rows(), skip, limit), img, lab, decode, rows_per_batch=rows_per_batch
    )
    return IterableSource(batches, n=n)


@dataclass
class StreamedSet:
    """A calibration set read as a stream (``[data] streaming = true``): what the runner needs
    of it without holding its images. ``labels``: all labels when known up front (a parquet's
    label column), else None (they come with the batches)."""

    stream: IterableSource
    labels: torch.Tensor | None
    class_names: list[str]
    name: str

    def source(self) -> IterableSource:
        return self.stream

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.stream.example().shape[1:])

    def __len__(self) -> int:
        return len(self.stream)


def materialise(stream: IterableSource, class_names: list[str], name: str) -> ImageDataset:
    """A (small) streamed set read whole into an :class:`~ood_core.data.ImageDataset`."""
    xs, ys = [], []
    for x, y in stream.batches(1024):
        xs.append(x)
        ys.append(y if y is not None else torch.full((len(x),), -1, dtype=torch.int64))
    if not xs:
        raise StreamError(f"{name}: the stream holds no rows")
    return ImageDataset(torch.cat(xs), torch.cat(ys), class_names, name)


def streamed_split(
    source: str,
    calibration_split: str,
    test_split: str,
    n_calibration: int | None,
    n_test: int | None,
    seed: int,
) -> tuple[StreamedSet, ImageDataset, list[str]]:
    """The calibration set as a stream and the InD test set in memory, for ``[data] streaming``:

    * a local parquet file or folder (one pool of rows): the very rows an in-memory load draws
      (:func:`~ood_core.data.disjoint_indices` with ``seed``), the calibration rows read batch by
      batch, the test rows read whole;
    * a Hugging Face id: the first ``n_calibration`` rows of ``calibration_split`` streamed (a
      stream cannot be subsampled at random: shuffle data sorted by class first), and the first
      ``n_test`` rows of ``test_split`` (after the calibration rows when it is the same split).

    Returns ``(calibration, test, notes)``."""
    path = Path(source).expanduser()
    notes: list[str] = []
    if path.exists():
        labels, names = parquet_labels(path)
        a, b = disjoint_indices(len(labels), n_calibration, n_test, seed, path.name)
        calib = StreamedSet(
            parquet_stream(path, rows=a.numpy()),
            torch.from_numpy(labels[a.numpy()]),
            names,
            path.name,
        )
        ind = materialise(parquet_stream(path, rows=b.numpy()), names, path.name)
        return calib, ind, notes
    calib_stream = hf_stream(source, calibration_split, limit=n_calibration)
    same = calibration_split == test_split
    if same and n_calibration is None:
        raise StreamError(
            f"{source}: streaming calibration and test rows from the same split "
            f"{test_split!r} needs [data] n_calibration (the test rows follow them)"
        )
    skip = n_calibration if same else 0
    ind = materialise(
        hf_stream(source, test_split, skip=skip or 0, limit=n_test), [], f"{source}:{test_split}"
    )
    notes.append(
        f"[data] streaming: the first {n_calibration or 'all'} rows of {source!r} split "
        f"{calibration_split!r} calibrate (a stream is read in order, not subsampled)"
    )
    names = [str(c) for c in range(int(ind.labels.max()) + 1)] if len(ind) else []
    ind.class_names = names
    return StreamedSet(calib_stream, None, names, source), ind, notes


__all__ = [
    "StreamedSet",
    "materialise",
    "streamed_split",
    "StreamError",
    "decode",
    "hf_stream",
    "iterable_stream",
    "parquet_files",
    "parquet_stream",
]
