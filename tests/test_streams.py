"""Streamed inputs (issue #17): every batch source gives the numbers of the in-memory tensor."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, TensorDataset

from ood_core.batches import IterableSource, RowSource, TensorSource, hf_rows
from ood_core.data import ImageDataset
from ood_core.evaluation import Evaluation
from ood_core.scores import KNN, DeepMahalanobis, Gram, Softmax
from ood_core.streams import StreamError, iterable_stream, parquet_stream

LAYERS = [[], [(1, 3)], [(1, 3)], [(1, 1), (1, 3)]]


def _scores():
    scores = [Softmax(), KNN(k=3), DeepMahalanobis(), Gram(max_gram_order=2)]
    for s, layers in zip(scores, LAYERS, strict=True):
        s.layers = tuple(layers)
    return scores


def _pixels(n: int = 60) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(3)
    return rng.integers(0, 256, (n, 1, 6, 6), dtype=np.uint8), rng.integers(0, 3, n)


def _confidences(net, calib, test, labels, batch_size=16):
    """Fitted on ``calib`` (tensor or source), scored on ``test``: (n_scores, n) float64."""
    ev = Evaluation.for_net(net, torch.zeros(1, 1, 6, 6))
    scores = _scores()
    ev.fit(scores, calib, labels, batch_size=batch_size)
    return ev.predicted(scores, test, batch_size=batch_size)[1]


@pytest.fixture()
def reference(net):
    px, y = _pixels()
    x = torch.from_numpy(px).float() / 255
    labels = torch.from_numpy(y)
    return x, labels, _confidences(net, x, x, labels)


def test_row_source_over_a_uint8_memmap_equals_the_float_tensor(net, reference, tmp_path):
    x, labels, expected = reference
    px, _ = _pixels()
    path = tmp_path / "pixels.npy"
    mm = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=px.shape)
    mm[:] = px
    mm.flush()
    stored = np.load(path, mmap_mode="r")
    order = torch.arange(len(px))
    source = RowSource(stored, order, labels)
    got = _confidences(net, source, RowSource(stored), labels)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_a_dataloader_with_odd_batches_is_rebatched_with_the_same_numbers(net, reference):
    x, labels, expected = reference
    loader = DataLoader(TensorDataset(x, labels), batch_size=7)  # 7 + ... + 4: re-batched to 16
    source = IterableSource(loader, n=len(x))
    assert [len(b) for b, _ in source.batches(16)] == [16, 16, 16, 12]
    got = _confidences(net, source, IterableSource(loader), labels)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_a_source_of_unknown_length_is_checked_once_read(net, reference):
    x, labels, _ = reference
    ev = Evaluation.for_net(net, x[:1])
    knn = KNN(k=61)
    knn.layers = ((1, 3),)
    unknown = IterableSource(lambda: iter([x[:30], x[30:]]))  # n unknown until read
    with pytest.raises(ValueError, match="k=61 neighbours but only 60 calibration samples"):
        ev.fit([knn], unknown)


def test_a_plain_iterator_is_refused_as_it_cannot_be_read_twice():
    with pytest.raises(ValueError, match="re-iterable"):
        IterableSource(iter([torch.zeros(2, 1, 6, 6)]))


def test_a_bad_batch_in_a_stream_names_its_samples(net, reference):
    x, _, _ = reference
    bad = x.clone()
    bad[40, 0, 2, 2] = float("nan")
    ev = Evaluation.for_net(net, x[:1])
    with pytest.raises(ValueError, match=r"inputs \(samples 32 to 47\) contain NaN"):
        ev.fit([Softmax()], IterableSource([bad[:32], bad[32:]]), batch_size=16)


def test_a_source_yielding_more_than_its_n_is_refused(net, reference):
    x, _, _ = reference
    ev = Evaluation.for_net(net, x[:1])
    with pytest.raises(ValueError, match="more samples than the 50"):
        ev.fit([Softmax()], IterableSource([x], n=50))


def test_a_calibration_set_is_streamed_never_converted_whole(net, reference):
    x, labels, expected = reference
    px, _ = _pixels()
    full = ImageDataset(torch.from_numpy(px), labels, ["a", "b", "c"])
    calib = full.subset(60, seed=0)  # all rows, in order: a view on the uint8 pixels
    assert calib.pixels.dtype == torch.uint8 and calib.pixels is full.pixels
    ev = Evaluation.for_net(net, x[:1])
    scores = _scores()
    ev.fit(scores, calib.source(), calib.labels, batch_size=16)
    assert calib._images is None  # no float copy of the whole set was made
    got = ev.predicted(scores, x, batch_size=16)[1]
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_subsets_share_pixels_and_equal_the_copied_images():
    px, y = _pixels()
    ds = ImageDataset(torch.from_numpy(px), torch.from_numpy(y), ["a", "b", "c"])
    a, b = ds.split_disjoint(20, 30, seed=4)
    sub = b.subset(10, seed=1)
    assert sub.pixels is ds.pixels and len(sub) == 10
    x = torch.from_numpy(px).float() / 255
    rows = sub.indices  # rows of the shared pixels
    torch.testing.assert_close(sub.images, x[rows], rtol=0, atol=0)
    assert torch.equal(sub.labels, torch.from_numpy(y)[rows])
    streamed = torch.cat([xb for xb, _ in sub.source().batches(3)])
    torch.testing.assert_close(streamed, sub.images, rtol=0, atol=0)


def _png(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def _write_parquet_folder(folder, px, y, as_png: bool) -> None:
    folder.mkdir()
    for k, (lo, hi) in enumerate(((0, 25), (25, 60))):
        if as_png:
            images = [{"bytes": _png(px[i, 0]), "path": None} for i in range(lo, hi)]
        else:
            images = [px[i, 0].tolist() for i in range(lo, hi)]
        table = pa.table({"image": images, "label": y[lo:hi].tolist()})
        pq.write_table(table, folder / f"part-{k:02d}.parquet", row_group_size=10)


@pytest.mark.parametrize("as_png", [True, False], ids=["png-bytes", "pixel-lists"])
def test_a_parquet_folder_streams_the_same_numbers(net, reference, tmp_path, as_png):
    x, labels, expected = reference
    px, y = _pixels()
    _write_parquet_folder(tmp_path / "calib", px, y, as_png)
    stream = parquet_stream(tmp_path / "calib")
    assert stream.n == 60 and torch.equal(stream.labels(), labels)
    got = _confidences(net, stream, parquet_stream(tmp_path / "calib"), labels)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    tail = parquet_stream(tmp_path / "calib", skip=50, limit=20)  # rows 50-59
    assert tail.n == 10
    torch.testing.assert_close(torch.cat([b for b, _ in tail.batches(4)]), x[50:], rtol=0, atol=0)


def test_a_parquet_stream_refuses_what_it_cannot_read(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(StreamError, match="without .parquet files"):
        parquet_stream(tmp_path / "empty")
    pq.write_table(pa.table({"pic": [[0]], "label": [0]}), tmp_path / "odd.parquet")
    with pytest.raises(StreamError, match="no image column found among"):
        parquet_stream(tmp_path / "odd.parquet")
    from ood_core.policy import SourceNotAllowedError

    with pytest.raises(SourceNotAllowedError):
        parquet_stream(tmp_path / "odd.parquet", roots=[tmp_path / "empty"])


def test_a_hugging_face_streaming_split_gives_the_same_numbers(net, reference, tmp_path):
    """``load_dataset(..., streaming=True)`` (here on local parquet files: no network)."""
    from datasets import load_dataset

    x, labels, expected = reference
    px, y = _pixels()
    _write_parquet_folder(tmp_path / "hf", px, y, as_png=True)
    files = sorted(str(p) for p in (tmp_path / "hf").iterdir())
    ds = load_dataset("parquet", data_files=files, split="train", streaming=True)
    stream = iterable_stream(lambda: iter(ds), ["image", "label"], limit=60)
    got = _confidences(net, stream, TensorSource(x), labels)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_hf_rows_accepts_channels_last_and_plain_arrays():
    rows = [{"image": np.full((6, 6, 3), 255, np.uint8), "label": 1}] * 3
    ((x, y),) = list(hf_rows(lambda: iter(rows))())
    assert x.shape == (3, 3, 6, 6) and float(x.max()) == 1.0 and y.tolist() == [1, 1, 1]


def _fmnist_parquet(path, fmnist_test, n: int = 400) -> None:
    """The first ``n`` bundled Fashion-MNIST test images as an HF-style parquet (PNG rows)."""
    px = (fmnist_test.images[:n, 0] * 255).round().to(torch.uint8).numpy()
    rows = [{"bytes": _png(px[i]), "path": None} for i in range(n)]
    pq.write_table(
        pa.table({"image": rows, "label": fmnist_test.labels[:n].tolist()}), path, row_group_size=64
    )


@pytest.mark.slow
def test_a_streamed_run_equals_the_in_memory_run(tmp_path, fmnist_test):
    """``[data] streaming = true`` on a parquet file: the same samples (seeded), the same numbers
    for every kind of fit (none, bank, streaming statistics)."""
    from ood_core.config import RunConfig, ScenarioSpec, ScoreSpec
    from ood_core.runner import run

    path = tmp_path / "ind.parquet"
    _fmnist_parquet(path, fmnist_test)
    cfg = RunConfig(
        ind_dataset=str(path),
        n_calibration=250,
        n_test=120,
        seed=3,
        scores=[
            ScoreSpec("Softmax"),
            ScoreSpec("KNN", {"k": 5}, ["1-11"]),
            ScoreSpec("DeepMahalanobis", {"inverse": "pinv"}, ["1-11"]),
            ScoreSpec("Gram", {}, ["1-5", "1-12"]),
        ],
        scenarios=[ScenarioSpec(kind="vertical_flip"), ScenarioSpec(dataset="mnist")],
    )
    memory = run(cfg)
    cfg.streaming = True
    streamed = run(cfg)
    assert streamed.config.streaming and "streaming = true" in streamed.config.to_toml()
    torch.testing.assert_close(streamed.ind.images, memory.ind.images, rtol=0, atol=0)
    np.testing.assert_allclose(streamed.confs_ind, memory.confs_ind, rtol=1e-9, atol=1e-12)
    for a, b in zip(streamed.confs_oods, memory.confs_oods, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(streamed.evals, memory.evals, rtol=0, atol=1e-12)
