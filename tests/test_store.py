"""The on-disk feature store (:mod:`ood_core.store`): exact round trips, zero-copy reads, streaming
batches, atomic writes, damage handling, LRU eviction, stable digests and memory on big entries."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from ood_core.engine import FeatureKey
from ood_core.store import FeatureStore, default_root, key_digest, key_text

ROOT = Path(__file__).resolve().parents[1]
KEY = FeatureKey(("bundled", "tiniest"), ("mnist", "test", 500, 0.25, None), (1, 5))


def _batch(rows: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    f = torch.randn(rows, 2, 3, generator=g)
    if rows:
        f[0, 0, :] = torch.tensor([float("nan"), float("-inf"), -0.0])
    return {
        "f32": f,
        "f64": torch.randn(rows, generator=g, dtype=torch.float64),
        "i64": torch.randint(-(2**40), 2**40, (rows, 4), generator=g),
        "bool": torch.rand(rows, 1, 2, 2, generator=g) > 0.5,
        "f16": torch.randn(rows, 5, generator=g).half(),
        "u8": torch.randint(0, 256, (rows,), generator=g, dtype=torch.uint8),
        "empty": torch.zeros(rows, 0, 3),
    }


def _cat(parts):
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def _same(a: dict, b: dict) -> None:
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(
            a[k].reshape(-1).view(torch.uint8), b[k].reshape(-1).view(torch.uint8)
        ), k


def _mapping_of(ptr: int) -> str | None:
    """The file mapped at address ``ptr`` in this process (Linux), or None."""
    for line in Path("/proc/self/maps").read_text().splitlines():
        parts = line.split(maxsplit=5)
        start, end = (int(x, 16) for x in parts[0].split("-"))
        if start <= ptr < end:
            return parts[5] if len(parts) == 6 else ""
    return None


needs_proc = pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux /proc")


# ---------------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("record_bytes", [64 * 2**20, 300], ids=["one-record-batch", "many"])
def test_round_trip_exact_over_appends(tmp_path, record_bytes):
    store = FeatureStore(tmp_path, record_bytes=record_bytes)
    parts = [_batch(rows, seed) for seed, rows in enumerate([5, 1, 0, 17, 3])]
    with store.writer(KEY) as w:
        for p in parts:
            w.append(p)
    assert KEY in store and ("other",) not in store
    _same(store.get(KEY), _cat(parts))
    (info,) = store.keys()
    assert info.digest == key_digest(KEY) and info.key == key_text(KEY) and info.n == 26
    assert info.features["bool"] == {"dtype": "bool", "shape": [1, 2, 2]}
    assert info.bytes == store.nbytes > 0
    meta = json.loads((store.path(KEY) / "meta.json").read_text())
    assert meta["n"] == 26 and (meta["record_batches"] == 1) == (record_bytes > 2**20)


def test_put_replaces_and_delete_and_clear(tmp_path):
    store = FeatureStore(tmp_path)
    assert store.put("k", {"x": torch.zeros(3)})
    assert store.put("k", {"x": torch.ones(4)})
    assert torch.equal(store.get("k")["x"], torch.ones(4))
    assert store.put(("j", 1), {"x": torch.ones(2)})
    assert len(store.keys()) == 2
    assert store.delete("k") and not store.delete("k") and store.get("k") is None
    store.clear()
    assert store.keys() == [] and store.nbytes == 0 and list(tmp_path.iterdir()) == []


def test_appends_are_checked(tmp_path):
    store = FeatureStore(tmp_path)
    with store.writer("k") as w:
        with pytest.raises(ValueError, match="first dimension"):
            w.append({"a": torch.zeros(3), "b": torch.zeros(4)})
        with pytest.raises(ValueError, match="not storable"):
            w.append({"a": torch.zeros(3, dtype=torch.complex64)})
        w.append({"a": torch.zeros(3, 2)})
        with pytest.raises(ValueError, match="keep the features"):
            w.append({"a": torch.zeros(3, 3)})
        with pytest.raises(ValueError, match="keep the features"):
            w.append({"a": torch.zeros(3, 2, dtype=torch.float64)})
        w.append({"a": torch.ones(2, 4).t()})  # non-contiguous is fine
    assert torch.equal(store.get("k")["a"], torch.cat([torch.zeros(3, 2), torch.ones(4, 2)]))
    with pytest.raises(TypeError, match="store key"):
        store.put(("k", object()), {"a": torch.zeros(1)})


# ---------------------------------------------------------------------------------- zero-copy
@needs_proc
def test_get_and_batches_are_views_of_the_mapped_file(tmp_path):
    store = FeatureStore(tmp_path, record_bytes=60 * 41)  # 41 bytes a row: 60-row batches
    parts = [{"x": torch.randn(40, 10), "m": torch.rand(40) > 0.5} for _ in range(3)]
    store.put("one", parts[0])
    with store.writer("many") as w:
        for p in parts:
            w.append(p)
    data = str(store.path("one") / "data.arrow")
    got = store.get("one")
    for t in got.values():
        assert _mapping_of(t.data_ptr()) == data  # the tensor's memory is the file's mapping
    many = str(store.path("many") / "data.arrow")
    # batches of 30 rows lie inside one record batch, so are views; of those of 40 rows, the
    # second straddles two record batches, and is a copy
    assert all(_mapping_of(b["x"].data_ptr()) == many for b in store.batches("many", 30))
    owners = [_mapping_of(b["x"].data_ptr()) == many for b in store.batches("many", 40)]
    assert owners == [True, False, True]
    # several record batches: get() concatenates, a copy in anonymous memory
    assert _mapping_of(store.get("many")["x"].data_ptr()) != many


def test_in_place_edits_never_reach_the_file(tmp_path):
    store = FeatureStore(tmp_path)
    x = torch.arange(12.0).reshape(4, 3)
    store.put("k", {"x": x})
    got = store.get("k")["x"]
    got.mul_(-1)  # a private copy-on-write page: no segfault, no change on disk
    assert torch.equal(got, -x)
    assert torch.equal(store.get("k")["x"], x)


# ---------------------------------------------------------------------------------- batches
def test_batches_equal_slices(tmp_path):
    store = FeatureStore(tmp_path, record_bytes=500)  # record batches of ~10 rows
    parts = [_batch(rows, seed) for seed, rows in enumerate([7, 13, 1, 29, 0, 6])]
    with store.writer(KEY) as w:
        for p in parts:
            w.append(p)
    full = _cat(parts)
    for size in (1, 4, 10, 11, 56, 100):
        got = list(store.batches(KEY, size))
        assert [len(b["f32"]) for b in got] == [min(size, 56 - i) for i in range(0, 56, size)]
        for i, b in enumerate(got):
            _same(b, {k: v[i * size : (i + 1) * size] for k, v in full.items()})
    with pytest.raises(KeyError):
        store.batches("absent", 4)


def test_empty_entry(tmp_path):
    store = FeatureStore(tmp_path)
    with store.writer("k") as w:
        w.append({"x": torch.zeros(0, 3), "i": torch.zeros(0, dtype=torch.int64)})
    got = store.get("k")
    assert got["x"].shape == (0, 3) and got["i"].dtype == torch.int64
    assert list(store.batches("k", 5)) == []


# ---------------------------------------------------------------------------------- atomicity
@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_interrupted_writer_leaves_nothing(tmp_path, error):
    store = FeatureStore(tmp_path)
    with pytest.raises(error), store.writer(KEY) as w:
        w.append(_batch(8, 0))
        assert [p.name[:5] for p in tmp_path.iterdir()] == [".tmp-"]  # not visible as an entry
        assert KEY not in store and store.get(KEY) is None
        raise error()
    assert list(tmp_path.iterdir()) == [] and KEY not in store


def test_unclosed_writer_is_cleaned_and_dead_writers_swept(tmp_path):
    store = FeatureStore(tmp_path)
    w = store.writer("k")
    w.append({"x": torch.zeros(2)})
    del w
    assert list(tmp_path.iterdir()) == []
    stale = tmp_path / ".tmp-0123456789abcdef-999999999-abcd"  # no such pid
    stale.mkdir()
    (stale / "data.arrow").write_bytes(b"half")
    live = store.writer("live")
    assert store.keys() == [] and not stale.exists()
    assert live.close() and "live" in store  # a live writer's folder is kept


# ---------------------------------------------------------------------------------- damage
@pytest.mark.parametrize("damage", ["truncate", "no-meta", "bad-meta", "garbage-same-size"])
def test_damaged_entry_is_absent_and_deleted(tmp_path, damage):
    store = FeatureStore(tmp_path)
    store.put(KEY, _batch(20, 1))
    entry = store.path(KEY)
    data = entry / "data.arrow"
    if damage == "truncate":
        with open(data, "r+b") as f:
            f.truncate(data.stat().st_size // 2)
    elif damage == "no-meta":
        (entry / "meta.json").unlink()
    elif damage == "bad-meta":
        (entry / "meta.json").write_text("{not json")
    else:  # right size, not an Arrow file any more
        data.write_bytes(b"\0" * data.stat().st_size)
    if damage == "garbage-same-size":
        assert KEY in store  # cheap check passes; opening does not
    else:
        assert KEY not in store
    assert store.get(KEY) is None
    assert not entry.exists()
    assert store.keys() == []


def test_damaged_entries_are_dropped_from_listing(tmp_path):
    store = FeatureStore(tmp_path)
    store.put("a", {"x": torch.zeros(3)})
    store.put("b", {"x": torch.zeros(3)})
    (store.path("a") / "data.arrow").write_bytes(b"short")
    entries = store.keys()
    assert [e.key for e in entries] == [key_text("b")]


# ---------------------------------------------------------------------------------- budget
def test_lru_eviction_within_max_bytes(tmp_path):
    probe = FeatureStore(tmp_path / "probe")
    probe.put("p", {"x": torch.zeros(1000)})
    size = probe.nbytes
    store = FeatureStore(tmp_path / "s", max_bytes=int(2.5 * size))
    for k in ("a", "b"):
        assert store.put(k, {"x": torch.full((1000,), ord(k), dtype=torch.float32)})
    assert store.get("a") is not None  # a is now more recently used than b
    assert store.put("c", {"x": torch.zeros(1000)})
    assert "b" not in store and "a" in store and "c" in store
    assert store.nbytes <= store.max_bytes
    entries = store.keys()  # least recently used first
    assert [e.key for e in entries] == [key_text("a"), key_text("c")]
    # an entry larger than the whole budget is not stored, and evicts nothing
    with store.writer("huge") as w:
        for _ in range(4):
            w.append({"x": torch.zeros(1000)})
    assert not w.stored and "huge" not in store and "a" in store and "c" in store


# ---------------------------------------------------------------------------------- keys, root
_KEYS_CODE = """
import dataclasses
from ood_core.store import key_digest

@dataclasses.dataclass(frozen=True)
class _Key:
    model: tuple
    layer: tuple | None

KEYS = [
    _Key(("bundled", "tiniest"), (1, 5)),
    ("mnist", 1, 0.1, -0.0, float("inf"), None, True, b"\\x00\\xff", ((("nested",),),)),
    frozenset({"a", "b", ("c", 1), frozenset({"d", "e"})}),
    "é unicode ✓",
]
"""


def test_key_digest_is_stable_across_processes():
    scope: dict = {}
    exec(_KEYS_CODE, scope)  # the same keys in this process
    here = [key_digest(k) for k in scope["KEYS"]]
    assert len(set(here)) == len(here)
    code = _KEYS_CODE + "print(' '.join(key_digest(k) for k in KEYS))"
    # another hash seed: frozenset order, str hashes and ids differ; the digests must not
    env = {**os.environ, "PYTHONHASHSEED": "12345", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == here
    # the canonical text, and a pinned digest: changing either would orphan every stored entry
    assert key_text(("a", 1, 1.0, True, None, (2,))) == '("a", 1, 1.0, True, None, (2,))'
    assert key_text(KEY).startswith('FeatureKey(model=("bundled", "tiniest"), dataset=("mnist"')
    assert key_digest(("mnist", 1)) == (
        "3623aa641f15b45ba58b6bf4f7b42be75ed2bd6e8be850d14b4832c0521eb9eb"
    )
    assert len({key_digest(1), key_digest(1.0), key_digest(True)}) == 3


def test_default_root_and_mode(tmp_path, monkeypatch):
    monkeypatch.setenv("OOD_LENS_STORE", str(tmp_path / "a" / "b"))
    assert default_root() == tmp_path / "a" / "b"
    store = FeatureStore()
    assert store.root == tmp_path / "a" / "b" and store.root.is_dir()
    assert stat.S_IMODE(store.root.stat().st_mode) == 0o700
    assert stat.S_IMODE((tmp_path / "a").stat().st_mode) == 0o700
    assert default_root({}) == Path.home() / ".cache" / "ood-lens" / "features"


# ---------------------------------------------------------------------------------- memory
@needs_proc
def test_reading_one_batch_of_a_200mb_entry_costs_little_memory(tmp_path):
    n, d = 50_000, 1000  # 200 MB of float32, one record batch
    store = FeatureStore(tmp_path)
    x = torch.arange(d, dtype=torch.float32).repeat(n, 1)
    store.put("big", {"x": x, "i": torch.arange(n)})
    store.put("tiny", {"x": torch.zeros(3, d), "i": torch.arange(3)})
    del x
    code = textwrap.dedent(
        """
        import sys
        import torch
        from ood_core.store import FeatureStore

        def status():
            out = {}
            for line in open("/proc/self/status"):
                k, _, v = line.partition(":")
                if k in ("VmRSS", "VmHWM", "RssAnon"):
                    out[k] = int(v.split()[0]) * 1024
            return out

        store = FeatureStore(sys.argv[1])
        float(torch.ones(4).sum())
        next(store.batches("tiny", 2))  # load the code paths first (their pages count as RSS)
        try:  # reset the peak so that VmHWM is this read's peak
            open("/proc/self/clear_refs", "w").write("5")
        except OSError:
            pass
        before = status()
        batch = next(store.batches("big", 1000))
        assert float(batch["x"].double().sum()) == 1000 * sum(range(1000))
        assert batch["i"].tolist() == list(range(1000))
        one = status()
        full = store.get("big")  # one record batch: zero-copy, no anonymous copy
        assert full["x"].shape == (50_000, 1000) and float(full["x"][-1, -1]) == 999.0
        whole = status()
        print(one["VmHWM"] - before["VmRSS"], one["VmRSS"] - before["VmRSS"],
              whole["RssAnon"] - before["RssAnon"])
        """
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    try:
        done = subprocess.run(
            [sys.executable, "-c", code, str(tmp_path)],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
        )
    finally:
        store.clear()  # pytest keeps tmp_path of recent runs: not 200 MB each
    assert done.returncode == 0, done.stderr
    peak, rss, anon = (int(v) for v in done.stdout.split())
    print(
        f"RSS peak {peak / 2**20:.1f} MiB, RSS {rss / 2**20:.1f} MiB, anon after get {anon / 2**20:.1f} MiB"
    )
    assert peak < 24 * 2**20 and rss < 24 * 2**20  # one 4 MB batch of a 200 MB entry
    assert anon < 24 * 2**20  # get(): views, not a 200 MB copy
