"""The Ray executor against the local engine, on a local Ray with 2 CPUs started here.

Every test shares one Ray instance (module fixture), bounded in time by an alarm so that a hang
fails fast instead of stalling the suite, and stopped at the end. The network is the bundled
``tiniest`` model rebuilt on each actor from its hub spec (:func:`ood_core.runner.model_factory`).
"""

from __future__ import annotations

import functools
import os
import shutil
import signal
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

ray = pytest.importorskip("ray")

from ood_core import hub  # noqa: E402
from ood_core.batches import IterableSource, RowSource  # noqa: E402
from ood_core.evaluation import Evaluation  # noqa: E402
from ood_core.ray_engine import RayEngine  # noqa: E402
from ood_core.runner import load_network  # noqa: E402
from ood_core.scores import KNN, DeepMahalanobis, GradNorm, Softmax  # noqa: E402
from ood_core.streams import StreamError, parquet_stream  # noqa: E402

RAY_SECONDS = 240
"""The longest the whole module may take on Ray (start-up included) before it fails."""


def _timeout(signum, frame):  # noqa: ARG001
    raise TimeoutError(f"the Ray tests took over {RAY_SECONDS} s: a hang")


@pytest.fixture(scope="module")
def local_ray():
    previous = signal.signal(signal.SIGALRM, _timeout)
    signal.alarm(RAY_SECONDS)
    # a short folder: Ray's Unix sockets live under it (their paths are limited to 107 bytes)
    tmp = Path(tempfile.mkdtemp(prefix="oodray-"))
    env = {"HOME": os.environ.get("HOME"), "RAY_TMPDIR": os.environ.get("RAY_TMPDIR")}
    os.environ["HOME"] = os.environ["RAY_TMPDIR"] = str(tmp)  # Ray's token file and sessions
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _temp_dir=str(tmp))
    try:
        yield ray
    finally:
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
        for k, v in env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


FACTORY = functools.partial(load_network, "bundled", "tiniest", False, None)


@pytest.fixture(scope="module")
def pixels():
    """90 Fashion-MNIST-sized images (uint8, seeded) and labels in 0..9, stored as rows."""
    g = torch.Generator().manual_seed(3)
    x = (torch.rand(90, 1, 28, 28, generator=g) * 255).to(torch.uint8)
    y = torch.randint(0, 10, (90,), generator=g)
    return x, y


def _engines():
    net = FACTORY()
    local = Evaluation.for_net(net, torch.zeros(1, 1, 28, 28))
    remote = RayEngine(local.recorder, FACTORY, workers=2, device="cpu")
    return local, Evaluation(local.recorder, engine=remote), remote


def _scores():
    scores = [
        Softmax(),
        KNN(k=3),
        DeepMahalanobis(
            pooling="mean"
        ),  # a streaming fit: its sink runs on the driver, batches in order
        GradNorm(),  # an own pass: on the driver
    ]
    for s, layers in zip(scores, [(), ((1, 11),), ((1, 5), (1, 11)), ((1, 12),)], strict=True):
        s.layers = layers
    return scores


def test_fits_and_confidences_on_ray_equal_the_local_engine(local_ray, pixels) -> None:
    x, y = pixels
    local, on_ray, engine = _engines()
    source = RowSource(x, None, y)
    a, b = _scores(), _scores()
    ex_local = local.fit(a, source, batch_size=16)
    ex_ray = on_ray.fit(b, source, batch_size=16)  # 6 batches over 2 actors, the last short
    assert engine.started_here is False  # the fixture's Ray: not stopped by the engine
    torch.testing.assert_close(ex_ray.logits, ex_local.logits, rtol=0, atol=1e-6)
    torch.testing.assert_close(ex_ray.labels, y)
    assert ex_ray.constant_layers == ex_local.constant_layers
    assert ex_ray.n_forward_calls == ex_local.n_forward_calls
    for fa, fb in zip(ex_local.features, ex_ray.features, strict=True):
        assert fa.keys() == fb.keys()
        for k in fa:
            torch.testing.assert_close(fb[k], fa[k], rtol=0, atol=1e-6)
    test = RowSource(x.flip(0), None, None)
    for (la, ca), (lb, cb) in zip(
        local.confidences(a, test, batch_size=32),
        on_ray.confidences(b, test, batch_size=32),
        strict=True,
    ):
        torch.testing.assert_close(lb, la, rtol=0, atol=1e-6)
        torch.testing.assert_close(cb, ca, rtol=0, atol=1e-6)


def test_a_workers_input_error_comes_back_as_the_local_message(local_ray, pixels) -> None:
    x, _ = pixels
    local, on_ray, _ = _engines()
    bad = x.float() / 255
    bad[40, 0, 3, 3] = float("nan")
    with pytest.raises(ValueError) as expected:
        local.confidences([Softmax()], RowSource(bad), batch_size=16)
    with pytest.raises(ValueError) as got:
        on_ray.confidences([Softmax()], RowSource(bad), batch_size=16)
    assert str(got.value) == str(expected.value) and "samples 32 to 47" in str(got.value)


def _stream(x: torch.Tensor, y: torch.Tensor | None, fail_at: int | None = None):
    """``x`` (uint8) as a re-iterable stream of unknown length, in uneven chunks of 7 rows; with
    ``fail_at``, reading fails there as a broken file does."""

    def chunks():
        for i in range(0, len(x), 7):
            if fail_at is not None and i >= fail_at:
                raise StreamError(f"row {i:,} of the stream cannot be decoded")
            xb = x[i : i + 7].float() / 255
            yield xb if y is None else (xb, y[i : i + 7])

    return IterableSource(chunks, n=None)


def test_a_streamed_source_flows_through_ray_data_with_the_local_numbers(
    local_ray, pixels, tmp_path
):
    x, y = pixels
    test = x.flip(0)
    table = pa.table({"image": [im[0].tolist() for im in test.numpy()], "label": [0] * len(x)})
    pq.write_table(table, tmp_path / "test.parquet", row_group_size=25)
    local, on_ray, engine = _engines()
    a, b = _scores()[:3], _scores()[:3]
    ex_local = local.fit(a, _stream(x, y), batch_size=16)
    ex_ray = on_ray.fit(b, _stream(x, y), batch_size=16)
    assert engine.started_here is False
    torch.testing.assert_close(ex_ray.logits, ex_local.logits, rtol=0, atol=1e-6)
    torch.testing.assert_close(ex_ray.labels, y)
    assert ex_ray.constant_layers == ex_local.constant_layers
    expected = local.confidences(a, _stream(test, None), batch_size=16)
    for (la, ca), (lb, cb) in zip(  # a parquet file read by Ray Data's read task
        expected,
        on_ray.confidences(b, parquet_stream(tmp_path / "test.parquet"), batch_size=16),
        strict=True,
    ):
        assert len(cb) == len(x)
        torch.testing.assert_close(lb, la, rtol=0, atol=1e-6)
        torch.testing.assert_close(cb, ca, rtol=0, atol=1e-6)


def test_a_stream_failing_midway_on_ray_raises_the_local_error(local_ray, pixels) -> None:
    x, _ = pixels
    local, on_ray, _ = _engines()
    with pytest.raises(StreamError) as expected:
        local.confidences([Softmax()], _stream(x, None, fail_at=42), batch_size=16)
    with pytest.raises(StreamError) as got:
        on_ray.confidences([Softmax()], _stream(x, None, fail_at=42), batch_size=16)
    assert str(got.value) == str(expected.value) == "row 42 of the stream cannot be decoded"


def test_the_hub_model_is_what_actors_rebuild() -> None:
    a, b = FACTORY(), hub.load_model("bundled", "tiniest")
    x = torch.rand(2, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)
