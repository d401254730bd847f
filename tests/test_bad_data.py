"""Bad and unusual data files, table-driven: each row is one input and the clear refusal (or the
exact loaded values) it must give. Tiny files are built in ``tmp_path``; nothing uses the network.

Tables (one parametrized test each):

* ``CONFINE_ROWS`` - data-root confinement of every file a loader opens (network mode): symlinked
  images and sub-folders of an image folder, parquet image rows that reference files by path.
* ``STALE_ROWS`` - a local parquet / npz / image folder rewritten in place with the same size and
  mtime (as ``cp -p`` / ``rsync -t`` leave it) is read anew through every cache.
* ``LABEL_ROWS`` - labels from files: negative, fractional, NaN, null, huge, too few class names.
* ``NOT_REGULAR_ROWS`` - FIFOs and devices (which would block or never end) are refused unopened.
* ``BAD_FILE_ROWS`` - unlabelled folders (loaded as OoD sets), truncated or mis-named files, empty
  files, zip bombs, complex / object arrays, pixel ranges (messages show the offending value).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import threading
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image as PILImage

from ood_core import data
from ood_core.config import RunConfig, ScenarioSpec, ScoreSpec
from ood_core.data import DataUnavailableError
from ood_core.policy import SourceNotAllowedError, SourcePolicy
from ood_core.runner import RunCache, run


# ---------------------------------------------------------------------------- file builders
def png(path: Path, value: int, size: tuple[int, int] = (28, 28)) -> Path:
    """A grey PNG with every pixel ``value``, stored uncompressed (its size never varies)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    PILImage.fromarray(np.full(size[::-1], value, np.uint8), "L").save(path, compress_level=0)
    return path


def hf_meta(features: dict[str, Any]) -> dict[bytes, bytes]:
    from datasets import Features

    return {
        b"huggingface": json.dumps({"info": {"features": Features(features).to_dict()}}).encode()
    }


def image_parquet(path: Path, rows: list[dict], labels: list[int], hf: bool = True) -> Path:
    """A parquet in Hugging Face's ``Image`` layout: rows ``{"bytes", "path"}``."""
    from datasets import Image, Value

    struct = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    table = pa.table({"image": pa.array(rows, struct), "label": pa.array(labels, pa.int64())})
    if hf:
        table = table.replace_schema_metadata(hf_meta({"image": Image(), "label": Value("int64")}))
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return path


def array_parquet(
    path: Path, images: np.ndarray, labels: Any, names: list[str] | None = None
) -> Path:
    """A parquet of uint8 pixel lists (uncompressed, so a rewrite keeps its size)."""
    from datasets import ClassLabel

    table = pa.table(
        {
            "image": pa.array(images.tolist(), pa.list_(pa.list_(pa.uint8()))),
            "label": pa.array(labels),
        }
    )
    if names is not None:
        from datasets import List, Value

        table = table.replace_schema_metadata(
            hf_meta({"image": List(List(Value("uint8"))), "label": ClassLabel(names=names)})
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, compression="none", use_dictionary=False)
    return path


def npz(path: Path, images: Any = None, labels: Any = None, **arrays: Any) -> Path:
    images = np.full((6, 28, 28), 9, np.uint8) if images is None else images
    labels = np.arange(len(images)) % 3 if labels is None else labels
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, images=images, labels=labels, **arrays)
    return path


def grey(n: int = 6, value: int = 9) -> np.ndarray:
    return np.full((n, 28, 28), value, np.uint8)


# ---------------------------------------------------------------------------- 1. confinement
@pytest.fixture
def tree(tmp_path: Path) -> dict[str, Path]:
    """``root`` (the data root) and ``outside`` with a secret image (pixels 7)."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    return {"root": root, "outside": outside, "secret": png(outside / "secret.png", 7)}


def _folder_with_linked_image(t: dict[str, Path]) -> str:
    png(t["root"] / "ood" / "a.png", 1)
    (t["root"] / "ood" / "b.png").symlink_to(t["secret"])
    return str(t["root"] / "ood")


def _folder_with_linked_class(t: dict[str, Path]) -> str:
    png(t["root"] / "classes" / "cat" / "a.png", 1)
    png(t["outside"] / "dogs" / "d.png", 7)
    (t["root"] / "classes" / "dog").symlink_to(t["outside"] / "dogs", target_is_directory=True)
    return str(t["root"] / "classes")


def _folder_with_linked_subfolder(t: dict[str, Path]) -> str:
    png(t["root"] / "ood" / "a.png", 1)
    (t["root"] / "ood" / "more").symlink_to(t["outside"], target_is_directory=True)
    return str(t["root"] / "ood")


def _row_parquet(ref: Callable[[dict[str, Path]], str], hf: bool = True, embedded: int = 0):
    def build(t: dict[str, Path]) -> str:
        rows = [{"bytes": png(t["root"] / "e.png", 3).read_bytes(), "path": None}] * embedded
        rows.append({"bytes": None, "path": ref(t)})
        return str(image_parquet(t["root"] / "rows.parquet", rows, [0] * len(rows), hf=hf))

    return build


def _linked_inside(t: dict[str, Path]) -> str:
    (t["root"] / "link.png").symlink_to(t["secret"])
    return "link.png"


def _hub_rows(t: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> Callable[[], Any]:
    """``load_hub`` of a hub dataset whose image rows name a file outside the HF cache."""
    import datasets
    from datasets import Dataset, Features, Image, Value

    fake = Dataset.from_dict(
        {"image": [{"bytes": None, "path": str(t["secret"])}], "label": [0]},
        features=Features({"image": Image(), "label": Value("int64")}),
    )
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(data, "network_available", lambda *a, **k: True)
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: fake)
    return lambda: data.load_hub("someone/evil", split="test")


REFUSED = "outside the allowed data roots"
# id: (build(tree) -> source, or (tree, monkeypatch) -> loader; roots?; expected)
# expected: (exception type, words in the message) or the pixel value every image must have
CONFINE_ROWS: dict[str, tuple[Callable, bool, Any]] = {
    "folder_image_symlinked_outside": (
        _folder_with_linked_image,
        True,
        (SourceNotAllowedError, REFUSED),
    ),
    "folder_class_folder_symlinked_outside": (
        _folder_with_linked_class,
        True,
        (SourceNotAllowedError, REFUSED),
    ),
    "folder_subfolder_symlinked_outside": (
        _folder_with_linked_subfolder,
        True,
        (SourceNotAllowedError, REFUSED),
    ),
    "parquet_row_absolute_outside": (
        _row_parquet(lambda t: str(t["secret"])),
        True,
        (SourceNotAllowedError, f"row 0 references a file by path.*{REFUSED}"),
    ),
    "parquet_row_dotdot_outside": (
        _row_parquet(lambda t: "../outside/secret.png"),
        True,
        (SourceNotAllowedError, REFUSED),
    ),
    "parquet_row_symlink_in_root_to_outside": (
        _row_parquet(_linked_inside),
        True,
        (SourceNotAllowedError, REFUSED),
    ),
    "parquet_row_outside_without_hf_metadata": (
        _row_parquet(lambda t: str(t["secret"]), hf=False),
        True,
        (SourceNotAllowedError, REFUSED),
    ),
    "parquet_second_row_outside": (
        _row_parquet(lambda t: str(t["secret"]), embedded=1),
        True,
        (SourceNotAllowedError, "column 'image' row 1 references"),
    ),
    "parquet_row_url": (
        _row_parquet(lambda t: "https://example.com/x.png"),
        True,
        (DataUnavailableError, "is a URL.*Embed the bytes"),
    ),
    "parquet_row_missing_file": (
        _row_parquet(lambda t: "missing.png"),
        True,
        (DataUnavailableError, "row 0 references a file by path: No such file"),
    ),
    "hub_rows_outside_the_hf_cache": (_hub_rows, False, (SourceNotAllowedError, REFUSED)),
    # allowed: what lies inside the root; on loopback (no roots) relative to the parquet's folder
    "parquet_row_absolute_inside_root": (
        _row_parquet(lambda t: str(png(t["root"] / "img" / "in.png", 5))),
        True,
        5,
    ),
    "parquet_row_relative_inside_root": (
        _row_parquet(lambda t: (png(t["root"] / "img" / "in.png", 6), "img/in.png")[1]),
        True,
        6,
    ),
    "loopback_row_relative_to_the_parquet_not_cwd": (
        _row_parquet(lambda t: (png(t["root"] / "rel.png", 8), "rel.png")[1]),
        False,
        8,
    ),
    "loopback_row_outside_is_allowed": (_row_parquet(lambda t: str(t["secret"])), False, 7),
    "folder_with_symlink_inside_root": (
        lambda t: (
            png(t["root"] / "real" / "a.png", 4),
            (t["root"] / "ood").mkdir(),
            (t["root"] / "ood" / "a.png").symlink_to(t["root"] / "real" / "a.png"),
            str(t["root"] / "ood"),
        )[-1],
        True,
        4,
    ),
}


@pytest.mark.parametrize("row", list(CONFINE_ROWS))
def test_every_file_a_loader_opens_is_confined(row, tree, tmp_path, monkeypatch):
    build, with_roots, expected = CONFINE_ROWS[row]
    monkeypatch.chdir(tmp_path)  # relative image rows must not resolve against the cwd
    if build is _hub_rows:
        load, source = build(tree, monkeypatch), "someone/evil"
    else:
        source = build(tree)
        roots = [str(tree["root"])] if with_roots else None
        load = lambda: data.load(source, roots=roots)  # noqa: E731
    if isinstance(expected, tuple):
        kind, words = expected
        with pytest.raises(kind, match=words) as err:
            load()
        msg = str(err.value)
        assert Path(source).name in msg, msg  # names the folder's image, the parquet, the id
        if kind is SourceNotAllowedError:
            assert f"resolves to {tree['outside'].resolve()}" in msg, msg
    else:
        ds = load()
        assert ds.images.shape[1:] == (1, 28, 28)
        assert torch.all(ds.images == expected / 255), ds.images.unique()


# ---------------------------------------------------------------------------- 2. stale caches
def _write(kind: str, path: Path, value: int) -> Path:
    """Write ``kind`` at ``path`` with pixels ``value``, keeping size and mtime of a former file."""
    before = path.stat() if kind != "folder" and path.exists() else None
    if kind == "parquet":
        array_parquet(path, grey(6, value), np.arange(6) % 3)
    elif kind == "npz":
        npz(path, grey(6, value))
    else:
        target = path / "b" / "x.png"
        before = target.stat() if target.exists() else None
        png(path / "a" / "x.png", 50)
        png(target, value)
        path = target
    if before is not None:
        assert path.stat().st_size == before.st_size  # the rewrite keeps the size
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))  # ... and the mtime
        assert path.stat().st_mtime_ns == before.st_mtime_ns
    return path


def _via_load(source: str) -> torch.Tensor:
    return data.load(source).images


def _via_run_cache(cache: RunCache) -> Callable[[str], torch.Tensor]:
    return lambda source: cache.dataset(source, "test", None, 0).images


def _via_run_cache_subset(cache: RunCache) -> Callable[[str], torch.Tensor]:
    return lambda source: cache.dataset(source, "test", 4, 1).images


def _via_dashboard(monkeypatch: pytest.MonkeyPatch) -> Callable[[str], torch.Tensor]:
    from ood_lens_app import loaders

    monkeypatch.setattr(loaders, "source_policy", SourcePolicy)  # loopback
    loaders._load_dataset.clear()
    return lambda source: loaders.load_dataset(source, "test").images


# id: (kind of file, the cache it is read through)
STALE_ROWS = {
    "parquet_data_load": ("parquet", "load"),  # the `datasets` cache keyed paths by mtime
    "parquet_run_cache": ("parquet", "run_cache"),
    "parquet_run_cache_subset": ("parquet", "run_cache_subset"),
    "npz_run_cache": ("npz", "run_cache"),
    "folder_run_cache": ("folder", "run_cache"),
    "folder_data_load": ("folder", "load"),
    "parquet_dashboard": ("parquet", "dashboard"),
    "npz_dashboard": ("npz", "dashboard"),
    "folder_dashboard": ("folder", "dashboard"),
}


@pytest.mark.parametrize("row", list(STALE_ROWS))
def test_a_file_rewritten_with_the_same_mtime_is_read_anew(row, tmp_path, monkeypatch):
    kind, via = STALE_ROWS[row]
    path = tmp_path / {"parquet": "d.parquet", "npz": "d.npz", "folder": "imgs"}[kind]
    get = {
        "load": lambda: _via_load,
        "run_cache": lambda: _via_run_cache(RunCache()),
        "run_cache_subset": lambda: _via_run_cache_subset(RunCache()),
        "dashboard": lambda: _via_dashboard(monkeypatch),
    }[via]()
    _write(kind, path, 10)
    assert get(str(path))[-1].max() == pytest.approx(10 / 255)
    _write(kind, path, 200)
    assert get(str(path))[-1].max() == pytest.approx(200 / 255)
    _write(kind, path, 10)
    assert get(str(path))[-1].max() == pytest.approx(10 / 255)


def test_an_unchanged_file_is_not_reloaded_even_when_touched(tmp_path):
    path = npz(tmp_path / "d.npz")
    cache = RunCache()
    first = cache.dataset(str(path), "test", None, 0)
    os.utime(path, (1, 1))
    assert cache.dataset(str(path), "test", None, 0) is first
    assert data.source_fingerprint(str(path)) == first.meta["fingerprint"]


def test_a_run_rescores_an_ood_file_rewritten_in_place(tmp_path):
    path = tmp_path / "ood.npz"
    rng = np.random.default_rng(0)
    npz(path, rng.integers(0, 256, (20, 28, 28), dtype=np.uint8), np.zeros(20, np.int64))
    cfg = RunConfig(
        n_calibration=40,
        n_test=20,
        scores=[ScoreSpec("Softmax")],
        scenarios=[ScenarioSpec(dataset=str(path))],
        metrics=["AUC()"],
    )
    cache = RunCache()
    first = run(cfg, cache)
    st = path.stat()
    new = rng.integers(0, 256, (20, 28, 28), dtype=np.uint8)
    npz(path, new, np.zeros(20, np.int64))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    second = run(cfg, cache)
    assert torch.equal(second.ood_images[0], torch.from_numpy(new)[:, None].float() / 255)
    assert not np.array_equal(second.confs_oods[0], first.confs_oods[0])  # scored anew
    np.testing.assert_array_equal(second.confs_ind, first.confs_ind)  # same InD data


# ---------------------------------------------------------------------------- 3. labels
TEN = [str(i) for i in range(10)]
# id: (format, labels, class names or None, expected: words of the refusal, or (labels, names))
LABEL_ROWS: dict[str, tuple[str, Any, list[str] | None, Any]] = {
    "npz_negative": ("npz", [0, 1, -1, 2], None, "negative label -1 at row 2"),
    "parquet_negative": ("parquet", [0, -3, 1, 2], None, "negative label -3 at row 1"),
    "npz_fractional": ("npz", [0.0, 1.0, 2.5, 1.0], None, "fractional label 2.5 at row 2"),
    "parquet_fractional": ("parquet", [0.0, 0.5, 1.0, 1.0], None, "fractional label 0.5 at row 1"),
    "npz_nan": ("npz", [0.0, np.nan, 1.0, 1.0], None, "label nan .*not finite.* at row 1"),
    "npz_inf": ("npz", [0.0, 1.0, np.inf, 1.0], None, "label inf .*at row 2"),
    "parquet_null": ("parquet", [0, None, 1, 1], None, r"missing \(null\) at row 1"),
    "npz_trillion": ("npz", [0, 1, 10**12, 2], None, "label 1000000000000 at row 2 is too large"),
    "parquet_trillion_float": ("parquet", [0.0, 1e12, 1.0, 1.0], None, "label 1000000000000 at"),
    "npz_at_the_class_limit": ("npz", [0, 1, 100_000, 2], None, "100000 at row 2 is too large"),
    "npz_three_names_ten_classes": (
        "npz",
        list(range(4)) + [9],
        ["a", "b", "c"],
        r"3 class names for the labels of column 'labels', which go up to 9 \(10 classes\); "
        "give one class name per class",
    ),
    "parquet_three_names_ten_classes": (
        "parquet",
        [0, 1, 2, 9],
        ["a", "b", "c"],
        r"3 class names for the labels of column 'label', which go up to 9 \(10 classes\)",
    ),
    "npz_string_labels": ("npz", ["cat", "dog", "cat", "dog"], None, "are <U3 values"),
    "parquet_string_labels": ("parquet", ["cat", "dog", "cat", "dog"], None, "are object values"),
    "npz_labels_2d": ("npz", [[0, 1], [1, 0], [0, 0], [1, 1]], None, r"shape \(4, 2\)"),
    # loaded, with exact values
    "npz_integral_floats": ("npz", [0.0, 2.0, 1.0, 2.0], None, ([0, 2, 1, 2], ["0", "1", "2"])),
    "parquet_more_names_than_seen": ("parquet", [0, 1, 1, 0], TEN, ([0, 1, 1, 0], TEN)),
    "npz_all_minus_one_is_unlabelled": ("npz", [-1, -1, -1, -1], None, ([-1, -1, -1, -1], [])),
    "parquet_uint8_labels": (
        "parquet",
        np.array([3, 0, 3, 1], np.uint8),
        None,
        ([3, 0, 3, 1], TEN[:4]),
    ),
}


@pytest.mark.parametrize("row", list(LABEL_ROWS))
def test_labels_from_files_are_class_indices(row, tmp_path):
    fmt, labels, names, expected = LABEL_ROWS[row]
    if fmt == "npz":
        extra = {"class_names": np.array(names)} if names else {}
        path = npz(tmp_path / "d.npz", grey(len(labels)), np.asarray(labels), **extra)
    else:
        path = array_parquet(tmp_path / "d.parquet", grey(len(labels)), labels, names)
    if isinstance(expected, str):
        with pytest.raises(DataUnavailableError, match=expected) as err:
            data.load(str(path))
        msg = str(err.value)
        assert str(path) in msg and ("'labels'" in msg or "'label'" in msg), msg
        if "names" not in expected and "shape" not in expected:
            assert "class indices 0, 1, 2" in msg or "index" in msg, msg
    else:
        ds = data.load(str(path))
        assert ds.labels.tolist() == expected[0] and ds.class_names == expected[1]
        assert ds.labelled == (expected[0][0] >= 0)


# ---------------------------------------------------------------------------- 4. FIFOs, devices
@pytest.fixture
def fifos() -> Iterator[Callable[[Path], Path]]:
    """Make FIFOs; a watchdog gives any reader that blocks on one an end of file at once, so a
    loader that opens a FIFO fails (with some other error) instead of hanging the suite."""
    made: list[Path] = []
    stop = threading.Event()

    def watch() -> None:
        while not stop.wait(0.05):
            for p in list(made):
                with contextlib.suppress(OSError):  # ENXIO: no reader is blocked on it
                    os.close(os.open(p, os.O_WRONLY | os.O_NONBLOCK))

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()

    def make(path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        os.mkfifo(path)
        made.append(path)
        return path

    yield make
    stop.set()
    thread.join()


def _linked(name: str, target: Callable[[Path, Callable], Path]) -> Callable:
    def build(tmp: Path, fifo: Callable) -> str:
        (tmp / name).symlink_to(target(tmp, fifo))
        return str(tmp / name)

    return build


NOT_REGULAR = "not a regular file"
# id: (build(tmp, make_fifo) -> source; roots?; words of the refusal)
NOT_REGULAR_ROWS: dict[str, tuple[Callable, bool, str]] = {
    "fifo_npz": (lambda tmp, f: str(f(tmp / "x.npz")), False, f"FIFO.*{NOT_REGULAR}"),
    "fifo_parquet": (lambda tmp, f: str(f(tmp / "x.parquet")), False, f"FIFO.*{NOT_REGULAR}"),
    "fifo_parquet_under_roots": (lambda tmp, f: str(f(tmp / "x.parquet")), True, "FIFO"),
    "symlink_to_fifo": (
        _linked("y.npz", lambda tmp, f: f(tmp / "pipe")),
        False,
        f"FIFO \\(named pipe\\) \\(it resolves to .*pipe\\), {NOT_REGULAR}",
    ),
    "char_device_as_npz": (
        _linked("z.npz", lambda tmp, f: Path("/dev/zero")),
        False,
        "character device",
    ),
    "folder_named_npz": (
        lambda tmp, f: ((tmp / "d.npz").mkdir(), str(tmp / "d.npz"))[1],
        False,
        f"a folder, {NOT_REGULAR}",
    ),
    "fifo_in_flat_folder": (
        lambda tmp, f: (png(tmp / "ood" / "a.png", 1), f(tmp / "ood" / "b.png"), str(tmp / "ood"))[
            -1
        ],
        False,
        "b.png' is a FIFO",
    ),
    "fifo_in_class_folder": (
        lambda tmp, f: (
            png(tmp / "cls" / "cat" / "a.png", 1),
            png(tmp / "cls" / "dog" / "b.png", 2),
            f(tmp / "cls" / "dog" / "c.jpg"),
            str(tmp / "cls"),
        )[-1],
        True,
        "c.jpg' is a FIFO",
    ),
    "fifo_as_parquet_image_row": (
        lambda tmp, f: str(
            image_parquet(
                tmp / "rows.parquet", [{"bytes": None, "path": str(f(tmp / "p.png"))}], [0]
            )
        ),
        False,
        f"row 0 references a file by path: .*FIFO.*{NOT_REGULAR}",
    ),
}


@pytest.mark.parametrize("via", ["load", "run_cache", "fingerprint"])
@pytest.mark.parametrize("row", list(NOT_REGULAR_ROWS))
def test_fifos_and_devices_are_refused_before_opening(row, via, tmp_path, fifos):
    build, with_roots, words = NOT_REGULAR_ROWS[row]
    source = build(tmp_path, fifos)
    roots = [str(tmp_path)] if with_roots else None
    if via == "fingerprint" and row == "fifo_as_parquet_image_row":
        assert data.source_fingerprint(source, roots)  # the parquet itself is a regular file
        return
    call = {
        "load": lambda: data.load(source, roots=roots),
        "run_cache": lambda: RunCache().dataset(source, "test", None, 0),
        "fingerprint": lambda: data.source_fingerprint(source, roots),
    }[via]
    with pytest.raises(DataUnavailableError, match=words) as err:
        call()
    assert "regular file" in str(err.value)


# ---------------------------------------------------------------------------- 5. bad files
def _npz_declaring(shape: tuple[int, ...]) -> Callable:
    """An npz whose 'images' member declares ``shape`` float32 but holds no data (a bomb)."""

    def build(tmp: Path, mp: pytest.MonkeyPatch) -> str:
        header = io.BytesIO()
        np.lib.format.write_array_header_1_0(
            header, {"descr": "<f4", "fortran_order": False, "shape": shape}
        )
        labels = io.BytesIO()
        np.save(labels, np.zeros(2, np.int64))
        with zipfile.ZipFile(tmp / "bomb.npz", "w") as zf:
            zf.writestr("images.npy", header.getvalue())
            zf.writestr("labels.npy", labels.getvalue())
        return str(tmp / "bomb.npz")

    return build


def _compressed_zeros(tmp: Path, mp: pytest.MonkeyPatch) -> str:
    mp.setattr(data, "MAX_BYTES", 2_000_000)  # 8 GiB in use; a small limit keeps the test tiny
    path = tmp / "zeros.npz"
    np.savez_compressed(path, images=np.zeros((1000, 28, 28), np.float32), labels=np.zeros(1000))
    assert path.stat().st_size < 100_000
    return str(path)


def _big_parquet(tmp: Path, mp: pytest.MonkeyPatch) -> str:
    path = array_parquet(tmp / "big.parquet", grey(50), np.zeros(50, np.int64))
    mp.setattr(data, "MAX_BYTES", path.stat().st_size - 1)
    return str(path)


def _file(name: str, content: bytes | Callable[[], bytes]) -> Callable:
    def build(tmp: Path, mp: pytest.MonkeyPatch) -> str:
        (tmp / name).write_bytes(content() if callable(content) else content)
        return str(tmp / name)

    return build


def _npz_bytes(**arrays: Any) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def _npy_bytes() -> bytes:
    buf = io.BytesIO()
    np.save(buf, grey(4))
    return buf.getvalue()


def _one_pixel(value: float, dtype: Any = np.float32) -> np.ndarray:
    """Three images of 0.5 but one pixel ``value``."""
    arr = np.full((3, 28, 28), 0.5, dtype)
    arr[1, 3, 4] = value
    return arr


def _pixels(images: Any) -> Callable:
    return _file("px.npz", lambda: _npz_bytes(images=images, labels=np.zeros(len(images), int)))


def _folder(*files: tuple[str, int] | tuple[str, int, tuple[int, int]]) -> Callable:
    def build(tmp: Path, mp: pytest.MonkeyPatch) -> str:
        (tmp / "f").mkdir(exist_ok=True)
        for rel, value, *size in files:
            if value < 0:
                (tmp / "f" / rel).parent.mkdir(parents=True, exist_ok=True)
                (tmp / "f" / rel).write_bytes(b"not an image")
            else:
                png(tmp / "f" / rel, value, *size)
        return str(tmp / "f")

    return build


def _half_parquet(tmp: Path, mp: pytest.MonkeyPatch) -> str:
    path = array_parquet(tmp / "cut.parquet", grey(20), np.zeros(20, np.int64))
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return str(path)


def _zero_rows(tmp: Path, mp: pytest.MonkeyPatch) -> str:
    return str(array_parquet(tmp / "none.parquet", grey(0), pa.array([], pa.int64())))


def _rgb_parquet(tmp: Path, mp: pytest.MonkeyPatch) -> str:
    """HF's Image layout with the bytes embedded (what hub parquet files hold): RGB images."""
    rows = []
    for value in (30, 60):
        buf = io.BytesIO()
        PILImage.fromarray(np.full((8, 8, 3), value, np.uint8), "RGB").save(buf, "PNG")
        rows.append({"bytes": buf.getvalue(), "path": f"img{value}.png"})  # path: a name only
    path = image_parquet(tmp / "rgb.parquet", rows, [1, 0])
    assert data.load(str(path)).images.shape == (2, 3, 8, 8)
    return str(path)


def array_parquet_strings(path: Path) -> Path:
    pq.write_table(pa.table({"image": ["a", "b"], "label": [0, 1]}), path)
    return path


# id: (build(tmp, monkeypatch) -> source; expected: words of the refusal, or
#      ("unlabelled" | "labelled", n images, pixel values in file order[, class names]))
BAD_FILE_ROWS: dict[str, tuple[Callable, Any]] = {
    # image folders: flat or one folder = an unlabelled OoD set; two classes at least = labelled
    "flat_folder": (_folder(("a.png", 1), ("b.png", 2), ("c.png", 3)), ("unlabelled", [1, 2, 3])),
    "one_class_folder": (_folder(("digits/a.png", 4), ("digits/b.png", 5)), ("unlabelled", [4, 5])),
    "nested_single_folder": (_folder(("x/y/a.png", 6), ("x/b.png", 7)), ("unlabelled", [7, 6])),
    "flat_folder_with_notes": (
        _folder(("a.png", 1), ("b.png", 2)),
        ("unlabelled", [1, 2]),
    ),
    "two_class_folders": (
        _folder(("dog/a.png", 1), ("cat/b.png", 2), ("cat/c.png", 3)),
        ("labelled", [2, 3, 1], [0, 0, 1], ["cat", "dog"]),
    ),
    "images_next_to_class_folders": (
        _folder(("cat/a.png", 1), ("dog/b.png", 2), ("loose.png", 3)),
        "1 image.*'loose.png'.*lie next to the class folders.*move them",
    ),
    "folder_of_notes_only": (
        lambda tmp, mp: (
            ((tmp / "f").mkdir(), (tmp / "f" / "notes.txt").write_text("hi")) and str(tmp / "f")
        ),
        r"no images \(.*\.png.*\) found; put images in it",
    ),
    "missing_folder": (lambda tmp, mp: str(tmp / "gone") + "/", r"No such file or folder"),
    "empty_folder": (_folder(), r"no images \(.*\.png.*\) found"),
    "folder_images_of_two_sizes": (
        _folder(("a.png", 1), ("b.png", 2, (32, 32))),
        r"different shapes, e.g. \(28, 28\) and \(32, 32\); resize them",
    ),
    "folder_unreadable_image": (
        _folder(("a.png", 1), ("b.png", -1)),
        "b.png: not a readable image",
    ),
    # npz
    "truncated_npz": (
        _file("cut.npz", lambda: _npz_bytes(images=grey(), labels=np.zeros(6))[:300]),
        r"not a readable .npz archive \(truncated or corrupt.*numpy.savez",
    ),
    "npy_named_npz": (_file("one.npz", _npy_bytes), r"a .npy file \(one array\), not an .npz"),
    "text_named_npz": (_file("t.npz", b"images,labels\n1,2\n"), r"not an .npz archive \(no zip"),
    "empty_npz": (_file("e.npz", b""), r"the file is empty \(0 bytes\)"),
    "npz_zero_samples": (_pixels(np.zeros((0, 28, 28), np.uint8)), r"no samples \(0 images\)"),
    "npz_missing_labels": (
        _file("m.npz", lambda: _npz_bytes(images=grey())),
        r"expected arrays 'images' and 'labels'.*found \['images'\]",
    ),
    "npz_bomb_declared_shape": (
        _npz_declaring((10**6, 1, 1000, 1000)),
        r"array 'images' declares shape \(1000000, 1, 1000, 1000\) \(4e\+03 GB\).*MAX_BYTES",
    ),
    "npz_bomb_compressed_zeros": (
        _compressed_zeros,
        r"declare 0\.003\d* GB uncompressed.*MAX_BYTES",
    ),
    "npz_complex_images": (_pixels(np.zeros((3, 28, 28), np.complex64)), "complex values"),
    "npz_object_images": (
        _file("o.npz", lambda: _npz_bytes(images=np.array([None, 1], object), labels=[0, 1])),
        r"holds Python objects \(pickled\)",
    ),
    "npz_float_just_above_one": (
        _pixels(_one_pixel(1.0005)),
        r"found max 1.0005\. Divide 0-255 values by 255, or clip",
    ),
    "npz_float64_a_hair_above_one": (_pixels(_one_pixel(1 + 1e-9, np.float64)), "max 1.000000001"),
    "npz_float_below_zero": (_pixels(np.full((2, 4, 4), -0.25, np.float64)), "found min -0.25"),
    "npz_float_nan_pixel": (
        _pixels(np.where(np.eye(4, dtype=bool), np.nan, 0.5)[None].repeat(2, 0)),
        "8 pixel values are NaN or infinite",
    ),
    "npz_int_256": (_pixels(np.full((2, 4, 4), 256, np.int16)), r"found max 256\. Clip"),
    "npz_float_exactly_one": (_pixels(np.ones((2, 28, 28), np.float32)), ("labelled", [255, 255])),
    # parquet
    "empty_parquet": (_file("e.parquet", b""), r"the file is empty \(0 bytes\)"),
    "parquet_zero_rows": (_zero_rows, r"no samples \(0 rows\)"),
    "truncated_parquet": (_half_parquet, "not a readable parquet file.*export it again"),
    "text_named_parquet": (_file("t.parquet", b"image,label\n"), "not a readable parquet file"),
    "parquet_above_max_bytes": (_big_parquet, r"GB, above the .* GB a data file may have"),
    "parquet_embedded_rgb_images": (_rgb_parquet, ("labelled", [30, 60])),
    "parquet_string_images": (
        lambda tmp, mp: str(array_parquet_strings(tmp / "s.parquet")),
        "images are string values",
    ),
}


@pytest.mark.parametrize("row", list(BAD_FILE_ROWS))
def test_bad_files_are_refused_naming_the_file_and_the_fix(row, tmp_path, monkeypatch):
    build, expected = BAD_FILE_ROWS[row]
    source = build(tmp_path, monkeypatch)
    if row == "flat_folder_with_notes":
        (Path(source) / "README.txt").write_text("not an image: ignored")
        (Path(source) / ".hidden.png").write_bytes(b"ignored")
    if isinstance(expected, str):
        with pytest.raises(DataUnavailableError, match=expected) as err:
            data.load(source)
        assert Path(source).name in str(err.value), str(err.value)
        return
    ds = data.load(source)
    kind, values, *labels_names = expected
    assert [round(v * 255) for v in ds.images.amax((1, 2, 3)).tolist()] == values
    assert torch.equal(ds.images.amin((1, 2, 3)), ds.images.amax((1, 2, 3)))
    assert ds.labelled == (kind == "labelled")
    if kind == "unlabelled":
        assert ds.labels.tolist() == [-1] * len(values) and ds.class_names == []
    elif labels_names:
        assert ds.labels.tolist() == labels_names[0] and ds.class_names == labels_names[1]


def test_an_unlabelled_folder_is_an_ood_set_but_never_the_ind_data(tmp_path):
    rng = np.random.default_rng(1)
    for i in range(25):
        png(tmp_path / "ood" / f"{i:02d}.png", int(rng.integers(0, 256)))
    cfg = RunConfig(
        n_calibration=40,
        n_test=20,
        scores=[ScoreSpec("Softmax")],
        scenarios=[ScenarioSpec(dataset=str(tmp_path / "ood"))],
        metrics=["AUC()"],
    )
    result = run(cfg, RunCache())
    assert result.confs_oods[0].shape == (1, 20) and np.isfinite(result.evals).all()
    as_ind = RunConfig.from_toml(cfg.to_toml())
    as_ind.ind_dataset = str(tmp_path / "ood")
    as_ind.scenarios = [ScenarioSpec(kind="vertical_flip")]
    with pytest.raises(DataUnavailableError, match="has no labels.*Use it as an OoD set") as err:
        run(as_ind, RunCache())
    assert str((tmp_path / "ood").resolve()) in str(err.value)
