"""A feature store on disk: per-sample features (``{name: Tensor}`` with a shared first dimension
``n``) kept per key, written in a stream and read back memory-mapped.

Layout on disk (``root`` is :func:`default_root` unless given)::

    root/                                  mode 0o700
      <digest>/                            one entry; digest = key_digest(key), 64 hex digits
        meta.json                          format, digest, key text, n, features {name: {dtype,
                                           shape}}, data_bytes, record_batches, created (epoch
                                           s); its mtime is the entry's last use
        data.arrow                         Arrow IPC file, uncompressed, >= 1 record batches
      .tmp-<digest16>-<pid>-<token>/       an entry being written (renamed to <digest>/ at close)
      .trash-<token>/                      an entry being deleted

Conventions:

* **Keys** are hashables made of ``None``, ``bool``, ``int``, ``float``, ``str``, ``bytes``,
  tuples (named tuples keep their names), frozensets, enums and dataclass instances such as
  :class:`ood_core.engine.FeatureKey`, nested freely (numpy scalars count as their Python
  values). :func:`key_text` writes one canonical text of a key (strings as JSON, floats by
  ``repr``, frozensets sorted, dataclasses as ``QualName(field=...)`` over their compared
  fields); :func:`key_digest` is the sha256 of a format tag and that text, so it is the same in
  every process and Python version, whatever ``PYTHONHASHSEED``. Values equal in Python but of
  different types (``1``, ``1.0``, ``True``) are different keys; anything else (objects whose
  ``repr`` holds an address, lists, tensors) is refused with ``TypeError``. Renaming a key's
  dataclass or its fields orphans its entries (they are evicted like any other).
* **Columns**: one per feature, named by it. A tensor ``(b, *shape)`` is a column of ``b`` rows:
  a primitive column when ``shape == ()``, else a ``FixedSizeList`` of ``prod(shape)`` values;
  ``bool`` is stored as ``uint8`` (Arrow's booleans are bit-packed, so never zero-copy). dtypes:
  float16/32/64, int8/16/32/64, uint8, bool. A feature with no elements per sample (a 0 in
  ``shape``) has no column. Every field carries ``dtype`` and ``shape`` in its metadata, and the
  schema carries all of them (and the key text) as JSON under ``ood_core.store``.
* **Record batches**: a writer copies small appends into one reused buffer of ``record_bytes``
  (64 MiB) and writes it as a record batch when full; an append at least that large, arriving
  with the buffer empty, is written as one record batch of its own, without a copy.
* **Atomic entries**: a writer fills a temporary folder, ``fsync``s it and renames it at
  :meth:`~FeatureWriter.close`, so readers see a whole entry or none; an exception (or
  ``KeyboardInterrupt``) inside ``with store.writer(key)`` removes the temporary folder, and so
  does garbage collection of an unclosed writer. A folder left by a killed process (its pid
  gone, or a day old; this assumes a local file system) is removed by
  :meth:`FeatureStore.keys` and :meth:`FeatureStore.clear`. Writing a key again replaces its
  entry (absent for the moment between two renames; readers that already mapped the old one
  keep it).
* **Damage**: an entry without a readable ``meta.json``, whose data file has another size than
  recorded, or that Arrow cannot open or that disagrees with its meta is absent: it is deleted
  and ``None``/``False`` returned, never an exception. (Bytes flipped inside a file of the right
  size are not detected: there is no checksum.)
* **Budget**: with ``max_bytes``, committing an entry deletes the least recently used others
  (by the mtime of ``meta.json``, set at creation and on every read -- atime is unreliable
  under ``relatime``) until the store fits; an entry larger than ``max_bytes`` on its own is not
  stored (``close()`` returns False; the writer stops writing as soon as it knows).

Memory behaviour: :meth:`FeatureStore.get` and :meth:`FeatureStore.batches` map ``data.arrow``
private copy-on-write (``mmap.ACCESS_COPY``, wrapped by ``pyarrow.py_buffer`` and read by
``pyarrow.ipc.open_file``) and return tensors that are views of the mapped Arrow buffers: nothing
is read until touched, touched pages are clean page cache (``RssFile``, reclaimable), and the
mapping lives as long as any tensor from it (deleting or evicting the entry meanwhile is safe on
POSIX). Such tensors may be modified in place without harm: a written page becomes private to
this process and the file never changes. (A read-only ``pyarrow.memory_map`` turns an in-place
edit into a segmentation fault.) ``get`` is zero-copy only for an entry of one record batch;
with several it concatenates, i.e. allocates the whole entry in anonymous memory (peak: the
copy plus the pages it read) -- streaming fits should use :meth:`FeatureStore.batches`, whose
batches are views (a batch straddling two record batches is a copy of that batch only).
Measured on a 200 MB float32 entry (2-core VM): reading one 4 MB batch adds ~4 MiB of RSS;
``get`` of one record batch adds 0.1 MiB of anonymous memory, of three record batches 191 MiB.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import hashlib
import json
import math
import mmap
import os
import secrets
import shutil
import threading
import time
import warnings
from collections.abc import Hashable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from torch import Tensor

ENV_STORE = "OOD_LENS_STORE"
FORMAT = 1
RECORD_BYTES = 64 * 2**20
META = "meta.json"
DATA = "data.arrow"
_SCHEMA_META = b"ood_core.store"
_STALE_SECONDS = 24 * 3600

_DTYPES: dict[torch.dtype, tuple[str, pa.DataType]] = {
    torch.float16: ("float16", pa.float16()),
    torch.float32: ("float32", pa.float32()),
    torch.float64: ("float64", pa.float64()),
    torch.int8: ("int8", pa.int8()),
    torch.int16: ("int16", pa.int16()),
    torch.int32: ("int32", pa.int32()),
    torch.int64: ("int64", pa.int64()),
    torch.uint8: ("uint8", pa.uint8()),
    torch.bool: ("bool", pa.uint8()),
}
_BY_NAME = {name: dtype for dtype, (name, _) in _DTYPES.items()}


def default_root(env: Mapping[str, str] | None = None) -> Path:
    """``$OOD_LENS_STORE``, else ``~/.cache/ood-lens/features``."""
    text = (os.environ if env is None else env).get(ENV_STORE, "").strip()
    return Path(text).expanduser() if text else Path.home() / ".cache" / "ood-lens" / "features"


# ---------------------------------------------------------------------------------- keys
def key_text(key: Hashable) -> str:
    """The canonical text of ``key`` (see the module docstring); ``TypeError`` for a part that
    has none."""
    if key is None or isinstance(key, bool):
        return repr(key)
    if isinstance(key, enum.Enum):
        return f"{type(key).__qualname__}.{key.name}"
    if isinstance(key, np.bool_):
        return repr(bool(key))
    if isinstance(key, int | np.integer):
        return str(int(key))
    if isinstance(key, float | np.floating):
        return repr(float(key))
    if isinstance(key, str):
        return json.dumps(str(key))
    if isinstance(key, bytes):
        return f"bytes({key.hex()})"
    if isinstance(key, tuple):
        if hasattr(key, "_fields"):  # a named tuple
            parts = (f"{f}={key_text(v)}" for f, v in zip(key._fields, key, strict=True))
            return f"{type(key).__qualname__}({', '.join(parts)})"
        items = [key_text(v) for v in key]
        return f"({items[0]},)" if len(items) == 1 else f"({', '.join(items)})"
    if isinstance(key, frozenset):
        return f"frozenset({{{', '.join(sorted(key_text(v) for v in key))}}})"
    if dataclasses.is_dataclass(key) and not isinstance(key, type):
        fields = (f for f in dataclasses.fields(key) if f.compare)
        parts = (f"{f.name}={key_text(getattr(key, f.name))}" for f in fields)
        return f"{type(key).__qualname__}({', '.join(parts)})"
    raise TypeError(
        f"A store key is made of None, bool, int, float, str, bytes, tuples, frozensets, enums and "
        f"dataclasses; got {type(key).__name__}: {key!r}"
    )


def key_digest(key: Hashable) -> str:
    """sha256 (hex) of ``"ood_core.store/<FORMAT>\\n" + key_text(key)``: an entry's folder name."""
    return hashlib.sha256(f"ood_core.store/{FORMAT}\n{key_text(key)}".encode()).hexdigest()


def _is_digest(name: str) -> bool:
    return len(name) == 64 and all(c in "0123456789abcdef" for c in name)


# ---------------------------------------------------------------------------------- entries
@dataclasses.dataclass(frozen=True)
class EntryInfo:
    """One stored entry, as :meth:`FeatureStore.keys` lists it."""

    digest: str
    key: str
    """:func:`key_text` of the key (keys are not rebuilt from it)."""
    n: int
    features: dict[str, dict[str, Any]]
    """``{name: {"dtype": "float32", "shape": [..]}}``; shapes exclude the first dimension."""
    bytes: int
    """Size on disk (data file and meta)."""
    created: float
    last_used: float
    """Epoch seconds of the last write or read."""


_CLOCK = threading.Lock()
_LAST_NS = 0


def _touch(path: Path) -> None:
    """Set ``path``'s mtime to now, strictly later than any earlier touch by this process (file
    systems stamp implicit writes with a coarse clock, which would tie LRU order)."""
    global _LAST_NS
    with _CLOCK:
        _LAST_NS = max(time.time_ns(), _LAST_NS + 1)
        now = _LAST_NS
    with contextlib.suppress(OSError):
        os.utime(path, ns=(now, now))


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, OSError):
        return True
    return True


def _arrow_type(dtype: torch.dtype, shape: tuple[int, ...]) -> pa.DataType:
    t = _DTYPES[dtype][1]
    return pa.list_(t, math.prod(shape)) if shape else t


def _field(name: str, dtype: torch.dtype, shape: tuple[int, ...]) -> pa.Field:
    meta = {"dtype": _DTYPES[dtype][0], "shape": json.dumps(list(shape))}
    return pa.field(name, _arrow_type(dtype, shape), nullable=False, metadata=meta)


def _tensor(array: pa.Array, dtype: torch.dtype, rows: int, shape: tuple[int, ...]) -> Tensor:
    """A zero-copy tensor ``(rows, *shape)`` over an Arrow column's value buffer."""
    if shape:
        array = array.flatten()  # honours the slice offset, unlike .values
    # the value buffer itself (Array.to_numpy would be as zero-copy, but imports pandas): a
    # read-only ndarray whose .base is the pyarrow.Buffer inside the mapping
    np_dtype = np.dtype(np.uint8 if dtype == torch.bool else _DTYPES[dtype][0])
    values = np.frombuffer(
        array.buffers()[1],
        dtype=np_dtype,
        count=len(array),
        offset=array.offset * np_dtype.itemsize,
    )
    with warnings.catch_warnings():  # "not writable": the mapping is copy-on-write, see above
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        t = torch.from_numpy(values)
    if dtype == torch.bool:
        t = t.view(torch.bool)
    return t.reshape(rows, *shape)


class _Opened:
    """A validated entry: its meta and its mapped record batches."""

    def __init__(self, path: Path, meta: dict[str, Any], batches: list[pa.RecordBatch]):
        self.path = path
        self.meta = meta
        self.batches = batches
        self.spec = {
            name: (_BY_NAME[f["dtype"]], tuple(f["shape"])) for name, f in meta["features"].items()
        }

    def columns(self, batch: pa.RecordBatch) -> dict[str, Tensor]:
        rows = batch.num_rows
        out = {}
        for name, (dtype, shape) in self.spec.items():
            if math.prod(shape) == 0:
                out[name] = torch.empty((rows, *shape), dtype=dtype)
            else:
                out[name] = _tensor(batch.column(name), dtype, rows, shape)
        return out


# ---------------------------------------------------------------------------------- store
class FeatureStore:
    """A folder of feature entries (see the module docstring).

    Args:
        root: the folder (created with mode 0o700, parents too); :func:`default_root` if None.
        max_bytes: the most bytes the entries may take on disk (None: no limit); least recently
            used entries are deleted to stay within it.
        record_bytes: a writer's record batch size (small appends are coalesced up to it).
    """

    def __init__(
        self,
        root: Path | str | None = None,
        max_bytes: int | None = None,
        *,
        record_bytes: int = RECORD_BYTES,
    ) -> None:
        self.root = Path(default_root() if root is None else root).expanduser()
        self.max_bytes = None if max_bytes is None else int(max_bytes)
        self.record_bytes = max(1, int(record_bytes))
        missing = [p for p in (self.root, *self.root.parents) if not p.exists()]
        for p in reversed(missing):
            p.mkdir(mode=0o700, exist_ok=True)

    def __repr__(self) -> str:
        return f"FeatureStore({str(self.root)!r}, max_bytes={self.max_bytes})"

    # ------------------------------------------------------------------ paths and validation
    def path(self, key: Hashable) -> Path:
        """The folder of ``key``'s entry (which may not exist)."""
        return self.root / key_digest(key)

    def _drop(self, path: Path, ino: int | None = None) -> None:
        """Delete an entry folder: renamed away first, so that it vanishes at once. With ``ino``
        (the inode found damaged), a folder published under that name since is left in place."""
        trash = self.root / f".trash-{secrets.token_hex(8)}"
        try:
            path.rename(trash)
        except OSError:
            return
        if ino is not None:
            try:
                moved = trash.stat().st_ino
            except OSError:
                moved = ino
            if moved != ino:  # another writer replaced the damaged entry: put theirs back
                with contextlib.suppress(OSError):
                    trash.rename(path)
                    return
        shutil.rmtree(trash, ignore_errors=True)

    def _meta(self, path: Path, text: str | None = None) -> tuple[dict[str, Any], int] | None:
        """The meta and inode of a sound-looking entry (meta readable and matching, data of the
        recorded size); a damaged entry is deleted and None returned."""
        try:
            ino = path.stat().st_ino
        except OSError:
            return None
        try:
            meta = json.loads((path / META).read_text())
            ok = (
                meta["format"] == FORMAT
                and meta["digest"] == path.name
                and (text is None or meta["key"] == text)
                and (path / DATA).stat().st_size == meta["data_bytes"]
                and all(
                    f["dtype"] in _BY_NAME and all(int(s) >= 0 for s in f["shape"])
                    for f in meta["features"].values()
                )
            )
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            ok = False
        if not ok:
            self._drop(path, ino)
            return None
        return meta, ino

    def _open(self, key: Hashable) -> _Opened | None:
        text = key_text(key)
        path = self.root / key_digest(key)
        for _ in range(2):  # once more if the entry was replaced while being opened
            found = self._meta(path, text)
            if found is None:
                return None
            meta, ino = found
            try:
                with open(path / DATA, "rb") as f:
                    mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
                reader = pa.ipc.open_file(pa.py_buffer(mapped))
                batches = [reader.get_batch(i) for i in range(reader.num_record_batches)]
                opened = _Opened(path, meta, batches)
                schema = reader.schema
                types = {
                    n: _arrow_type(d, s) for n, (d, s) in opened.spec.items() if math.prod(s) > 0
                }
                if (
                    set(schema.names) != set(types)
                    or any(schema.field(n).type != t for n, t in types.items())
                    or sum(b.num_rows for b in batches) != meta["n"]
                ):
                    raise ValueError("data disagrees with meta")
            except (OSError, ValueError, KeyError, pa.ArrowException):
                try:
                    replaced = path.stat().st_ino != ino
                except OSError:
                    replaced = False
                if replaced:
                    continue  # a writer replaced it meanwhile: read the new one
                self._drop(path, ino)
                return None
            _touch(path / META)
            return opened
        return None

    # ------------------------------------------------------------------ reading
    def __contains__(self, key: Hashable) -> bool:
        """Whether a sound-looking entry exists (meta and data size checked; not opened)."""
        return self._meta(self.root / key_digest(key), key_text(key)) is not None

    def get(self, key: Hashable) -> dict[str, Tensor] | None:
        """``key``'s features, or None. Views of the mapped file when the entry is one record
        batch; otherwise concatenated (a copy of the whole entry)."""
        opened = self._open(key)
        if opened is None:
            return None
        if len(opened.batches) == 1:
            return opened.columns(opened.batches[0])
        if not opened.batches:
            return {n: torch.empty((0, *s), dtype=d) for n, (d, s) in opened.spec.items()}
        parts = [opened.columns(b) for b in opened.batches]
        return {name: torch.cat([p[name] for p in parts]) for name in opened.spec}

    def batches(self, key: Hashable, batch_size: int) -> Iterator[dict[str, Tensor]]:
        """Yield ``key``'s rows ``[i, i + batch_size)`` in order, as views of the mapped file
        (a batch straddling two record batches is a small copy); ``KeyError`` if absent (raised
        here, not at the first ``next``)."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1; got {batch_size}")
        opened = self._open(key)
        if opened is None:
            raise KeyError(key)
        return self._iter_batches(opened, int(batch_size))

    @staticmethod
    def _iter_batches(opened: _Opened, size: int) -> Iterator[dict[str, Tensor]]:
        pending: list[dict[str, Tensor]] = []
        have = 0
        for batch in opened.batches:
            cols = opened.columns(batch)
            start, rows = 0, batch.num_rows
            while start < rows:
                take = min(size - have, rows - start)
                pending.append({k: v[start : start + take] for k, v in cols.items()})
                have += take
                start += take
                if have == size:
                    yield _join(pending)
                    pending, have = [], 0
        if pending:
            yield _join(pending)

    def keys(self) -> list[EntryInfo]:
        """The sound-looking entries, least recently used first (damaged ones are deleted, and
        so are folders left by writers that died)."""
        self._sweep()
        out = []
        for path in self.root.iterdir():
            if not _is_digest(path.name):
                continue
            found = self._meta(path)
            if found is None:
                continue
            meta = found[0]
            try:
                stat = (path / META).stat()
            except OSError:
                continue
            out.append(
                EntryInfo(
                    digest=path.name,
                    key=meta["key"],
                    n=int(meta["n"]),
                    features=meta["features"],
                    bytes=int(meta["data_bytes"]) + stat.st_size,
                    created=float(meta["created"]),
                    last_used=stat.st_mtime_ns / 1e9,
                )
            )
        return sorted(out, key=lambda e: (e.last_used, e.digest))

    @property
    def nbytes(self) -> int:
        """Bytes on disk of the stored entries (data files and metas)."""
        return sum(e.bytes for e in self.keys())

    # ------------------------------------------------------------------ removing
    def delete(self, key: Hashable) -> bool:
        """Delete ``key``'s entry; whether there was one."""
        path = self.root / key_digest(key)
        existed = path.is_dir()
        self._drop(path)
        return existed

    def clear(self) -> None:
        """Delete every entry (and leftovers of dead writers; live writers are left alone)."""
        self._sweep()
        for path in self.root.iterdir():
            if _is_digest(path.name):
                self._drop(path)

    def _sweep(self) -> None:
        now = time.time()
        for path in self.root.iterdir():
            name = path.name
            if name.startswith(".trash-"):
                shutil.rmtree(path, ignore_errors=True)
            elif name.startswith(".tmp-"):
                parts = name.split("-")
                try:
                    pid = int(parts[2])
                    age = now - max(p.stat().st_mtime for p in (path, *path.iterdir()))
                except (IndexError, ValueError, OSError):
                    pid, age = -1, math.inf
                if pid < 0 or not _pid_alive(pid) or age > _STALE_SECONDS:
                    shutil.rmtree(path, ignore_errors=True)

    def _evict(self, keep: str) -> None:
        if self.max_bytes is None:
            return
        entries = self.keys()
        total = sum(e.bytes for e in entries)
        for e in entries:  # least recently used first
            if total <= self.max_bytes:
                break
            if e.digest != keep:
                self._drop(self.root / e.digest)
                total -= e.bytes

    # ------------------------------------------------------------------ writing
    def writer(self, key: Hashable) -> FeatureWriter:
        """A :class:`FeatureWriter` for ``key`` (use it as a context manager)."""
        return FeatureWriter(self, key)

    def put(self, key: Hashable, features: Mapping[str, Tensor]) -> bool:
        """Store ``features`` under ``key`` in one go; whether it was stored."""
        with self.writer(key) as w:
            w.append(features)
        return w.stored


def _join(parts: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    if len(parts) == 1:
        return parts[0]
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


class FeatureWriter:
    """Streams one entry: :meth:`append` per batch, then :meth:`close` (or leave the ``with``
    block). Until then the entry lives in a temporary folder that :meth:`abort`, an exception in
    the ``with`` block or garbage collection of an unclosed writer remove."""

    def __init__(self, store: FeatureStore, key: Hashable) -> None:
        self.store = store
        self.key_text = key_text(key)
        self.digest = key_digest(key)
        self.n = 0
        self.stored = False
        self.spec: dict[str, tuple[torch.dtype, tuple[int, ...]]] | None = None
        self._tmp = store.root / f".tmp-{self.digest[:16]}-{os.getpid()}-{secrets.token_hex(4)}"
        self._tmp.mkdir(mode=0o700)
        self._sink: pa.NativeFile | None = None
        self._writer: pa.ipc.RecordBatchFileWriter | None = None
        self._schema: pa.Schema | None = None
        self._buf: dict[str, Tensor] | None = None  # coalesces small appends
        self._cap = 0
        self._fill = 0
        self._written = 0
        self._batches = 0
        self._done = False
        self._too_big = False
        self._row_bytes = 1

    def __enter__(self) -> FeatureWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def __del__(self) -> None:
        if not getattr(self, "_done", True):
            with contextlib.suppress(Exception):
                self.abort()

    # ------------------------------------------------------------------
    def _check(self, features: Mapping[str, Tensor]) -> dict[str, Tensor]:
        if not isinstance(features, Mapping) or not features:
            raise ValueError("append() takes a non-empty dict {name: tensor}")
        out: dict[str, Tensor] = {}
        rows = None
        for name, t in features.items():
            if not isinstance(name, str) or not isinstance(t, Tensor):
                raise ValueError(f"features are {{str: Tensor}}; got {name!r}: {type(t).__name__}")
            if t.dtype not in _DTYPES:
                raise ValueError(f"feature {name!r}: dtype {t.dtype} is not storable")
            if t.dim() == 0:
                raise ValueError(f"feature {name!r} has no sample dimension")
            if rows is None:
                rows = t.shape[0]
            elif t.shape[0] != rows:
                raise ValueError(
                    f"features differ in their first dimension: {name!r} has {t.shape[0]}, "
                    f"others {rows}"
                )
            out[name] = t.detach().cpu().contiguous()
        spec = {k: (v.dtype, tuple(v.shape[1:])) for k, v in out.items()}
        if all(math.prod(s) == 0 for _, s in spec.values()):
            raise ValueError("every feature has no elements per sample: nothing to store")
        if self.spec is None:
            self.spec = spec
            self._row_bytes = sum(math.prod(s) * d.itemsize for d, s in spec.values())
        elif spec != self.spec:
            raise ValueError(
                f"append() must keep the features' names, dtypes and shapes: first "
                f"{_spec_text(self.spec)}, now {_spec_text(spec)}"
            )
        return out

    def append(self, features: Mapping[str, Tensor]) -> None:
        """Add a batch ``{name: (b, *shape)}`` (same names, dtypes and shapes every time)."""
        if self._done:
            raise RuntimeError("this writer is closed")
        batch = self._check(features)
        rows = next(iter(batch.values())).shape[0]
        size = sum(t.nbytes for t in batch.values())
        self.n += rows
        if self._too_big or rows == 0:
            return
        if self.store.max_bytes is not None and self._written + self._fill * self._row_bytes + (
            size > self.store.max_bytes
        ):
            self._too_big = True  # can never fit: stop writing, keep counting rows
            self._buf, self._fill = None, 0
            return
        if not self._fill and size >= self.store.record_bytes:
            self._write(batch)  # a big append is its own record batch, written without a copy
            return
        if self._buf is None:  # one reused buffer: fresh memory costs page faults every time
            self._cap = max(1, self.store.record_bytes // self._row_bytes)
            self._buf = {
                k: torch.empty((self._cap, *v.shape[1:]), dtype=v.dtype) for k, v in batch.items()
            }
        start = 0
        while start < rows:
            take = min(self._cap - self._fill, rows - start)
            for k, v in batch.items():
                self._buf[k][self._fill : self._fill + take].copy_(v[start : start + take])
            self._fill += take
            start += take
            if self._fill == self._cap:
                self._flush()

    def _flush(self) -> None:
        if self._fill and self._buf is not None:
            self._write({k: v[: self._fill] for k, v in self._buf.items()})
        self._fill = 0

    def _write(self, batch: dict[str, Tensor]) -> None:
        assert self.spec is not None
        arrays, fields = [], []
        for name, t in batch.items():
            dtype, shape = self.spec[name]
            if math.prod(shape) == 0:
                continue
            values = t.reshape(-1)
            if dtype == torch.bool:
                values = values.view(torch.uint8)
            array = pa.array(values.numpy(), type=_DTYPES[dtype][1])
            if shape:
                array = pa.FixedSizeListArray.from_arrays(array, math.prod(shape))
            arrays.append(array)
            fields.append(_field(name, dtype, shape))
        if self._writer is None:
            self._open_file(fields)
        assert self._writer is not None
        rb = pa.RecordBatch.from_arrays(arrays, schema=self._schema)
        self._writer.write_batch(rb)
        self._written += sum(t.nbytes for t in batch.values())
        self._batches += 1

    def _open_file(self, fields: list[pa.Field]) -> None:
        spec = self.spec or {}
        schema_meta = {
            _SCHEMA_META: json.dumps(
                {"format": FORMAT, "key": self.key_text, "features": _spec_json(spec)}
            )
        }
        schema = self._schema = pa.schema(fields, metadata=schema_meta)
        self._sink = pa.OSFile(str(self._tmp / DATA), "wb")
        options = pa.ipc.IpcWriteOptions(compression=None)
        self._writer = pa.ipc.new_file(self._sink, schema, options=options)

    def _close_file(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._sink is not None:
            self._sink.close()
            self._sink = None

    # ------------------------------------------------------------------
    def close(self) -> bool:
        """Finish the entry and publish it atomically (then apply the store's budget); whether it
        was stored (False: larger than ``max_bytes`` on its own). Idempotent."""
        if self._done:
            return self.stored
        try:
            if self._too_big:
                self.abort()
                return False
            self._flush()
            if self._writer is None:  # no rows: an empty file of the features' schema
                self._write_empty()
            self._close_file()
            data = self._tmp / DATA
            _fsync(data)
            meta = {
                "format": FORMAT,
                "digest": self.digest,
                "key": self.key_text,
                "n": self.n,
                "features": _spec_json(self.spec or {}),
                "data_bytes": data.stat().st_size,
                "record_batches": self._batches,
                "created": time.time(),
            }
            (self._tmp / META).write_text(json.dumps(meta, indent=1))
            _fsync(self._tmp / META)
            self._publish()
        except BaseException:
            self.abort()
            raise
        self._done = True
        self.stored = True
        with contextlib.suppress(OSError):
            self.store._evict(keep=self.digest)
        return True

    def _write_empty(self) -> None:
        spec = (self.spec or {}).items()
        self._open_file([_field(n, d, s) for n, (d, s) in spec if math.prod(s) > 0])

    def _publish(self) -> None:
        final = self.store.root / self.digest
        trash = None
        try:
            self._tmp.rename(final)
        except OSError:  # an entry is there: move it away, move ours in, then delete it
            trash = self.store.root / f".trash-{secrets.token_hex(8)}"
            with contextlib.suppress(OSError):
                final.rename(trash)
            try:
                self._tmp.rename(final)
            except OSError:  # another writer published the same key in between: keep theirs
                shutil.rmtree(self._tmp, ignore_errors=True)
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)
        with contextlib.suppress(OSError):
            fd = os.open(self.store.root, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _touch(final / META)

    def abort(self) -> None:
        """Drop everything written so far (nothing is published)."""
        self._done = True
        with contextlib.suppress(Exception):
            self._close_file()
        shutil.rmtree(self._tmp, ignore_errors=True)


def _spec_json(spec: Mapping[str, tuple[torch.dtype, tuple[int, ...]]]) -> dict[str, Any]:
    return {k: {"dtype": _DTYPES[d][0], "shape": list(s)} for k, (d, s) in spec.items()}


def _spec_text(spec: Mapping[str, tuple[torch.dtype, tuple[int, ...]]]) -> str:
    return ", ".join(f"{k}: {_DTYPES[d][0]}{list(s)}" for k, (d, s) in spec.items())


__all__ = [
    "ENV_STORE",
    "EntryInfo",
    "FeatureStore",
    "FeatureWriter",
    "default_root",
    "key_digest",
    "key_text",
]
