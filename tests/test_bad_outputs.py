"""Bad and unusual outputs, table-driven (issue 15, output side): each row is one situation and
the outcome it must give (files present or absent, their contents, the message's words, the exit
code). Companion of ``tests/test_bad_inputs.py`` (same style; its ``OUT_DIR_ROWS`` cover the
folders refused without ``--force``).

Tables:

* ``FORCE_REFUSED_ROWS`` - ``--force`` replaces only a folder that is provably an earlier
  ood-lens bundle (its ``run.json`` parses and lists exactly the regular files present, at the
  recorded sizes). Anything else - a user's folder named like a bundle file, a bundle with a link,
  a hidden or extra file, an unparsable run.json, a run.json listing a folder - exits 2 before
  any computation, says what was found and that nothing was touched, and touches nothing.
  ``FORCE_ACCEPTED_ROWS``: what ``--force`` does replace. ``--out ''`` is refused (exit 2).
* ``STORE_ROWS`` - the dashboard's run store at a place that cannot take a run (under a regular
  file, ``/proc``, ``/dev/null``, a dangling link...): the save says "not saved: <reason>; set
  OOD_LENS_RUNS to a writable folder" (also for a background save that fails later, e.g. a full
  disk) and nothing exists. Pruning (``OOD_LENS_RUNS_KEEP``) keeps the newest runs by creation
  time and never deletes the run being saved.
* ``FIGURE_COUNT_ROWS`` - the summary grid draws for any count of scores and scenarios (1, 22,
  60: a layer sweep); ``FIGURE_FAILURE_ROWS`` - a figure that fails never costs the numbers:
  metrics.csv, confidences.parquet, config.toml and run.json are written, the report names the
  figure and why, run.json records a warning.
* The served dashboard fetches nothing from outside 127.0.0.1 (its favicon is a local file):
  a cheap check of the page icon, and a real Chromium recording every request of a page load and
  a page change.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pandas as pd
import pytest

from ood_core import bundle_writer, outdir, plots, runner
from ood_core.bundle import read_bundle
from ood_core.cli import main
from ood_core.config import RunConfig
from ood_core.report import write_bundle
from ood_core.runner import RunCache

ROOT = Path(__file__).resolve().parents[1]

CONFIG = """\
[model]
repo = "bundled"
entry = "tiniest"

[data]
ind_dataset = "fashion_mnist"
n_calibration = 200
n_test = 100
seed = 0

[evaluation]
metrics = ["AUC()"]

[[scores]]
name = "Softmax"

[[scenarios]]
kind = "vertical_flip"
"""


def _snapshot(root: Path) -> dict[str, bytes | str]:
    """Every entry under ``root`` (links by target, never followed) with its content."""
    snap: dict[str, bytes | str] = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if p.is_symlink():
            snap[rel] = f"-> {os.readlink(p)}"
        elif p.is_fifo():
            snap[rel] = "fifo"
        else:
            snap[rel] = p.read_bytes() if p.is_file() else "dir"
    return snap


def _must_not_run(*args: Any, **kwargs: Any) -> None:
    raise AssertionError("the run started although --out was refused")


def _cfg(tmp: Path) -> Path:
    path = tmp / "cfg.toml"
    path.write_text(CONFIG)
    return path


# ================================================================== 1. --force and --out
def _bundle(tmp: Path, name: str = "out", config: bool = True) -> Path:
    """A genuine earlier ood-lens bundle (as :func:`ood_core.report.write_bundle` writes it)."""
    frame = pd.DataFrame({"score": ["Softmax()"], "ood": ["Flip"], "value": [0.5]})
    conf = pd.DataFrame({"score": ["Softmax()"], "dataset": ["InD"], "confidence": [0.1]})
    write_bundle(
        tmp / name,
        metrics_frame=frame,
        confidences=conf,
        report_html="<html>earlier report</html>",
        config_toml=CONFIG if config else None,
        run_info={"warnings": []},
    )
    return tmp / name


def _edit_run_json(out: Path, change: Callable[[dict], None]) -> None:
    info = json.loads((out / "run.json").read_text())
    change(info)
    (out / "run.json").write_text(json.dumps(info))


def _folder_named_like_a_bundle_file(tmp: Path) -> Path:
    (tmp / "out" / "metrics.csv").mkdir(parents=True)
    (tmp / "out" / "metrics.csv" / "thesis.tex").write_text("precious")
    return tmp / "out"


def _users_own_report(tmp: Path) -> Path:
    (tmp / "out").mkdir()
    (tmp / "out" / "report.html").write_text("<p>my own notes</p>")
    return tmp / "out"


def _bundle_with_a_link(tmp: Path) -> Path:
    out = _bundle(tmp)
    (tmp / "victim.html").write_text("must stay")
    (out / "report.html").unlink()
    (out / "report.html").symlink_to(tmp / "victim.html")
    return out


def _bundle_with_a_hidden_file(tmp: Path) -> Path:
    out = _bundle(tmp)
    (out / ".notes").write_text("precious")
    return out


def _bundle_with_a_subfolder(tmp: Path) -> Path:
    out = _bundle(tmp)
    (out / "plots").mkdir()
    (out / "plots" / "fig.png").write_bytes(b"png")
    return out


def _run_json_unparsable(tmp: Path) -> Path:
    out = _bundle(tmp)
    (out / "run.json").write_text("{ not json")
    return out


def _run_json_binary(tmp: Path) -> Path:
    out = _bundle(tmp)
    (out / "run.json").write_bytes(b"\xff\xfe\x00garbage")
    return out


def _run_json_a_list(tmp: Path) -> Path:
    out = _bundle(tmp)
    (out / "run.json").write_text('["metrics.csv"]')
    return out


def _run_json_without_files(tmp: Path) -> Path:
    out = _bundle(tmp)
    _edit_run_json(out, lambda info: info.pop("files"))
    return out


def _run_json_a_folder(tmp: Path) -> Path:
    (tmp / "out" / "run.json").mkdir(parents=True)
    (tmp / "out" / "metrics.csv").write_text("a,b")
    return tmp / "out"


def _run_json_a_link(tmp: Path) -> Path:
    out = _bundle(tmp)
    (tmp / "elsewhere.json").write_bytes((out / "run.json").read_bytes())
    (out / "run.json").unlink()
    (out / "run.json").symlink_to(tmp / "elsewhere.json")
    return out


def _listed_file_is_a_folder(tmp: Path) -> Path:
    out = _bundle(tmp)
    (out / "metrics.csv").unlink()
    (out / "metrics.csv").mkdir()
    (out / "metrics.csv" / "thesis.tex").write_text("precious")
    return out


def _listed_file_missing(tmp: Path) -> Path:
    out = _bundle(tmp)
    (out / "confidences.parquet").unlink()
    return out


def _present_but_not_listed(tmp: Path) -> Path:
    out = _bundle(tmp, config=False)
    (out / "config.toml").write_text("# my own config")
    return out


def _edited_since(tmp: Path) -> Path:
    out = _bundle(tmp)
    (out / "report.html").write_text("<html>my thesis draft, much longer than the report</html>")
    return out


def _run_json_lists_a_foreign_file(tmp: Path) -> Path:
    out = _bundle(tmp)
    (out / "thesis.tex").write_text("precious")
    _edit_run_json(out, lambda info: info["files"].update({"thesis.tex": {"bytes": 8}}))
    return out


def _bundle_file_is_a_fifo(tmp: Path) -> Path:
    out = _bundle(tmp)
    (out / "confidences.parquet").unlink()
    os.mkfifo(out / "confidences.parquet")
    return out


NOT_TOUCHED = "nothing was touched"

# (id, setup(tmp) -> out folder, substrings of the message)
FORCE_REFUSED_ROWS = [
    (
        "metrics.csv-is-a-users-folder",
        _folder_named_like_a_bundle_file,
        ["metrics.csv is a folder"],
    ),
    ("only-a-users-report", _users_own_report, ["it has no run.json"]),
    ("bundle-with-a-symlink", _bundle_with_a_link, ["report.html is a symbolic link"]),
    ("bundle-with-a-hidden-file", _bundle_with_a_hidden_file, ["does not write (.notes)"]),
    ("bundle-with-a-subfolder", _bundle_with_a_subfolder, ["does not write (plots)"]),
    ("run.json-unparsable", _run_json_unparsable, ["run.json does not parse"]),
    ("run.json-not-text", _run_json_binary, ["run.json does not parse"]),
    ("run.json-a-list", _run_json_a_list, ["no table of the files"]),
    ("run.json-without-files", _run_json_without_files, ["no table of the files"]),
    ("run.json-is-a-folder", _run_json_a_folder, ["its run.json is a folder"]),
    ("run.json-is-a-symlink", _run_json_a_link, ["its run.json is a symbolic link"]),
    ("listed-file-is-a-folder", _listed_file_is_a_folder, ["metrics.csv is a folder"]),
    ("listed-file-missing", _listed_file_missing, ["lists confidences.parquet, not present"]),
    ("file-not-listed", _present_but_not_listed, ["config.toml not listed in its run.json"]),
    ("file-edited-since", _edited_since, ["report.html was changed since ood-lens wrote it"]),
    ("lists-a-foreign-file", _run_json_lists_a_foreign_file, ["does not write (thesis.tex)"]),
    ("bundle-file-is-a-fifo", _bundle_file_is_a_fifo, ["confidences.parquet is not a regular"]),
]


@pytest.mark.parametrize(
    ("setup", "needles"), [pytest.param(*r[1:], id=r[0]) for r in FORCE_REFUSED_ROWS]
)
def test_force_refuses_what_is_not_an_earlier_bundle_and_touches_nothing(
    setup, needles, tmp_path, capsys, monkeypatch
):
    out = setup(tmp_path)
    cfg = _cfg(tmp_path)
    before = _snapshot(tmp_path)
    monkeypatch.setattr("ood_core.runner.run", _must_not_run)
    code = main(["run", str(cfg), "--out", str(out), "--quiet", "--force"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: ") and "Traceback" not in err
    flat = " ".join(err.split())  # rich may wrap the line
    for needle in [*needles, "is not an earlier ood-lens bundle", NOT_TOUCHED]:
        assert needle in flat, f"{needle!r} not in {flat!r}"
    assert _snapshot(tmp_path) == before


# (id, setup(tmp) -> out folder): check_out_dir(force=True) accepts them
FORCE_ACCEPTED_ROWS = [
    ("genuine-bundle", _bundle),
    ("genuine-bundle-without-config", lambda tmp: _bundle(tmp, config=False)),
    ("run.json-lists-names-only", lambda tmp: _names_only(_bundle(tmp))),
    ("empty-folder", lambda tmp: (tmp / "out").mkdir() or tmp / "out"),
]


def _names_only(out: Path) -> Path:
    _edit_run_json(out, lambda info: info.update(files=sorted(info["files"])))
    return out


@pytest.mark.parametrize("setup", [pytest.param(r[1], id=r[0]) for r in FORCE_ACCEPTED_ROWS])
def test_force_accepts_an_earlier_bundle(setup, tmp_path):
    out = setup(tmp_path)
    if any(out.iterdir()):
        assert outdir.bundle_problems(out) == []
    assert outdir.check_out_dir(out, force=True) == out


@pytest.fixture(scope="module")
def small_result() -> runner.RunResult:
    """One real small run (bundled model and data, a few seconds), reused below."""
    return runner.run(RunConfig.from_toml(CONFIG), RunCache())


@pytest.fixture
def fake_run(small_result, monkeypatch, tmp_path) -> Path:
    """``ood-lens run`` with the computation replaced by ``small_result``: returns the config."""
    monkeypatch.setattr("ood_core.runner.run", lambda config, **kw: small_result)
    return _cfg(tmp_path)


def test_force_replaces_the_bundle_an_earlier_run_wrote(fake_run, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["run", str(fake_run), "--out", str(out), "--quiet"]) == 0
    first = json.loads((out / "run.json").read_text())
    assert set(first["files"]) | {"run.json"} == {p.name for p in out.iterdir()}
    time.sleep(1.1)  # written_at has seconds
    assert main(["run", str(fake_run), "--out", str(out), "--quiet", "--force"]) == 0
    second = json.loads((out / "run.json").read_text())
    assert second["written_at"] != first["written_at"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cfg.toml", "out"]  # no backup left


def test_a_file_added_while_the_results_are_written_is_kept(fake_run, tmp_path, monkeypatch):
    """The folder is checked again just before the swap: a user's file that appeared (or a
    bundle file changed) meanwhile makes the export stop with nothing of theirs lost."""
    out = _bundle(tmp_path)
    write = outdir._write_new

    def meanwhile(path: Path, data: bytes) -> None:
        if path.name == "run.json":
            (out / "report.html").write_text("<p>the user's own, longer, report text</p>")
        write(path, data)

    monkeypatch.setattr(outdir, "_write_new", meanwhile)
    assert main(["run", str(fake_run), "--out", str(out), "--quiet", "--force"]) == 2
    assert (out / "report.html").read_text() == "<p>the user's own, longer, report text</p>"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cfg.toml", "out"]


def _manifest_files(names: dict[str, bytes]) -> list[tuple[str, bytes]]:
    table = {n: {"bytes": len(d)} for n, d in names.items()}
    return [*names.items(), ("run.json", json.dumps({"files": table}).encode())]


@pytest.mark.parametrize("force", [False, True], ids=["plain", "force"])
def test_an_empty_existing_folder_is_filled(force, tmp_path):
    (tmp_path / "out").mkdir()
    outdir.write_atomic(tmp_path / "out", _manifest_files({"metrics.csv": b"x"}), force=force)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["metrics.csv", "run.json"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary or backup folder


def test_a_file_appearing_at_the_last_moment_is_never_deleted(tmp_path, monkeypatch):
    """Between the last check and the swap the old folder is moved aside, then checked once
    more: a user's file that appeared there puts it back, untouched, and the export stops."""
    out = tmp_path / "out"
    outdir.write_atomic(out, _manifest_files({"metrics.csv": b"old"}))
    real_rename = os.rename

    def rename(src: Any, dst: Any) -> None:
        real_rename(src, dst)
        if ".old-" in str(dst):
            (Path(dst) / "thesis.tex").write_text("precious")

    monkeypatch.setattr(outdir.os, "rename", rename)
    with pytest.raises(outdir.OutputDirError, match=r"does not write \(thesis.tex\)"):
        outdir.write_atomic(out, _manifest_files({"metrics.csv": b"new"}), force=True)
    assert (out / "thesis.tex").read_text() == "precious"
    assert (out / "metrics.csv").read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


@pytest.mark.parametrize("text", ["", " ", "\t"], ids=["empty", "space", "tab"])
def test_empty_out_is_refused(text, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(outdir.OutputDirError, match="--out is empty"):
        outdir.check_out_dir(text)
    with pytest.raises(outdir.OutputDirError, match="--out is empty"):
        outdir.write_atomic(text, [("metrics.csv", b"x")], force=True)
    assert list(tmp_path.iterdir()) == []


def test_cli_refuses_an_empty_out(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = _cfg(tmp_path)
    monkeypatch.setattr("ood_core.runner.run", _must_not_run)
    assert main(["run", str(cfg), "--out", "", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "--out is empty" in err and "Traceback" not in err
    assert [p.name for p in tmp_path.iterdir()] == ["cfg.toml"]


# ================================================================== 2. the run store
def _under_a_file(tmp: Path) -> Path:
    (tmp / "afile").write_text("x")
    return tmp / "afile" / "runs"


def _a_file(tmp: Path) -> Path:
    (tmp / "afile").write_text("x")
    return tmp / "afile"


def _dangling_link(tmp: Path) -> Path:
    (tmp / "runs").symlink_to(tmp / "nowhere")
    return tmp / "runs"


# (id, setup(tmp) -> OOD_LENS_RUNS, substrings of the reason)
STORE_ROWS = [
    ("under-a-regular-file", _under_a_file, ["Not a directory"]),
    ("a-regular-file", _a_file, ["afile"]),
    ("under-proc", lambda tmp: Path("/proc/ood-lens-test/runs"), ["/proc/ood-lens-test"]),
    ("proc-itself", lambda tmp: Path("/proc"), ["/proc"]),
    ("under-dev-null", lambda tmp: Path("/dev/null/runs"), ["Not a directory"]),
    ("dangling-link", _dangling_link, ["runs"]),
]


@pytest.fixture
def cheap_export(monkeypatch) -> list[str]:
    """``bundle_writer.export`` replaced by one writing a minimal bundle (run.json only); returns
    the folders written, in order."""
    written: list[str] = []

    def export(result: Any, out_dir: Any, **kw: Any) -> dict[str, Path]:
        out = outdir.write_atomic(out_dir, [("run.json", b'{"files": {}}')])
        written.append(out.name)
        return {"run": out / "run.json"}

    monkeypatch.setattr("ood_lens_app.run_store.bundle_writer.export", export)
    return written


@pytest.mark.parametrize("background", [False, True], ids=["foreground", "background"])
@pytest.mark.parametrize(("setup", "needles"), [pytest.param(*r[1:], id=r[0]) for r in STORE_ROWS])
def test_a_store_that_cannot_take_runs_says_not_saved(
    setup, needles, background, small_result, tmp_path
):
    from ood_lens_app import run_store

    root = setup(tmp_path)
    before = _snapshot(tmp_path)
    with pytest.raises(run_store.StoreError) as info:
        run_store.save(small_result, root, background=background)
    message = str(info.value)
    for needle in ["not saved", *needles, "set OOD_LENS_RUNS to a writable folder"]:
        assert needle in message, f"{needle!r} not in {message!r}"
    assert _snapshot(tmp_path) == before
    assert not [p for p in Path("/proc").iterdir() if p.name.startswith(".ood-lens")]


@pytest.mark.parametrize("where", ["metrics.csv", "confidences.parquet", "report.html", "run.json"])
def test_a_full_disk_during_a_background_save_is_reported(
    where, small_result, tmp_path, monkeypatch
):
    from ood_lens_app import run_store

    write = outdir._write_new

    def full(path: Path, data: bytes) -> None:
        if path.name == where:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        write(path, data)

    monkeypatch.setattr(outdir, "_write_new", full)
    run_id = run_store.save(small_result, tmp_path, background=True)
    problem = run_store.save_error(run_id)
    assert problem is not None
    for needle in ["not saved", "No space left on device", "set OOD_LENS_RUNS to a writable"]:
        assert needle in problem
    assert not run_store.exists(tmp_path, run_id) and list(tmp_path.iterdir()) == []
    assert run_store.list_runs(tmp_path).empty
    with pytest.raises(run_store.StoreError, match="No space left on device"):
        run_store.save(small_result, tmp_path)  # in the foreground: raised
    monkeypatch.setattr(outdir, "_write_new", write)
    ok = run_store.save(small_result, tmp_path, background=True)
    assert run_store.save_error(ok) is None and run_store.exists(tmp_path, ok)


def _same_clock(monkeypatch: pytest.MonkeyPatch, seconds: float = 1_767_225_600.0) -> None:
    """Every id made in one and the same microsecond."""
    from ood_lens_app import run_store

    monkeypatch.setattr(run_store.time, "time", lambda: seconds)
    monkeypatch.setattr(run_store.time, "time_ns", lambda: int(seconds * 1e9))


def test_ids_sort_by_creation_time_even_in_the_same_microsecond(monkeypatch):
    from ood_lens_app import run_store

    _same_clock(monkeypatch)
    ids = [run_store.new_id("cfg") for _ in range(200)]
    assert len(set(ids)) == 200 and all(run_store.is_run_id(i) for i in ids)
    assert sorted(ids, key=run_store.sort_key) == ids
    assert sorted(ids) == ids  # plain name order too (the Runs list, a file browser)


@pytest.mark.parametrize("background", [False, True], ids=["foreground", "background"])
def test_keep_1_with_saves_in_the_same_second_keeps_the_newest(
    background, small_result, cheap_export, tmp_path, monkeypatch
):
    from ood_lens_app import run_store

    _same_clock(monkeypatch)
    monkeypatch.setenv("OOD_LENS_RUNS_KEEP", "1")
    for _ in range(8):
        run_id = run_store.save(small_result, tmp_path, background=background)
        assert run_store.save_error(run_id) is None
        assert run_store.exists(tmp_path, run_id), "the run just saved was pruned"
    assert [p.name for p in tmp_path.iterdir()] == [run_id] == cheap_export[-1:]


def test_keep_2_keeps_the_two_newest_over_older_format_ids(small_result, cheap_export, tmp_path):
    from ood_lens_app import run_store

    for old in ("20240101-120000-ffffff", "20240101-120000-000000"):  # ids of earlier versions
        (tmp_path / old).mkdir()
        (tmp_path / old / "run.json").write_text("{}")
    ids = [run_store.save(small_result, tmp_path, keep=2) for _ in range(3)]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(ids[1:])


def test_the_run_being_saved_is_never_pruned(small_result, cheap_export, tmp_path):
    """A run dated later (a clock set back since) sorts as the newest: keep=1 must still keep
    the run just saved, the one the page names."""
    from ood_lens_app import run_store

    future = "29990101-000000-000000-abcdef"
    (tmp_path / future).mkdir()
    (tmp_path / future / "run.json").write_text("{}")
    run_id = run_store.save(small_result, tmp_path, keep=1)
    assert run_store.exists(tmp_path, run_id) and run_store.exists(tmp_path, future)


def test_runs_list_newest_first_by_creation_time(small_result, tmp_path, monkeypatch):
    from ood_lens_app import run_store

    _same_clock(monkeypatch)
    ids = [run_store.save(small_result, tmp_path) for _ in range(3)]
    assert run_store.list_runs(tmp_path)["id"].tolist() == ids[::-1]


# ================================================================== 3. figures and export
class _Named:
    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


def _confidences(n_scores: int, n_oods: int, n: int = 40) -> tuple[np.ndarray, list[np.ndarray]]:
    rng = np.random.default_rng(n_scores * 100 + n_oods)
    ind = rng.normal(1.0, 1.0, size=(n_scores, n))
    return ind, [rng.normal(0.0, 1.0, size=(n_scores, n // 2)) for _ in range(n_oods)]


def _domains_disjoint(fig: Any) -> bool:
    """No two subplot areas overlap, and all lie in the figure."""
    boxes = []
    layout = fig.layout.to_plotly_json()
    for key, axis in layout.items():
        if key.startswith("xaxis"):
            suffix = key[5:]
            y = layout[f"yaxis{suffix}"]["domain"]
            boxes.append((*axis["domain"], *y))
    for x0, x1, y0, y1 in boxes:
        if not (0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1):
            return False
    for i, a in enumerate(boxes):
        for b in boxes[i + 1 :]:
            if (
                a[0] < b[1] - 1e-9
                and b[0] < a[1] - 1e-9
                and a[2] < b[3] - 1e-9
                and b[2] < a[3] - 1e-9
            ):
                return False
    return True


# (n_scores, n_oods): a layer sweep over 22 or 60 layers, or many scenarios
FIGURE_COUNT_ROWS = [(1, 1), (2, 3), (6, 6), (7, 1), (22, 1), (1, 22), (22, 3), (60, 2), (2, 60)]


@pytest.mark.parametrize(("n_scores", "n_oods"), FIGURE_COUNT_ROWS, ids=lambda v: str(v))
def test_summary_plot_draws_any_count(n_scores, n_oods):
    ind, oods = _confidences(n_scores, n_oods)
    pairs = [(_Named("KNN(k=5)"), [(1, i + 1)]) for i in range(n_scores)]
    fig = plots.summary_plot(ind, oods, scores_and_layers=pairs)
    kinds = [t.type for t in fig.data]
    assert kinds.count("histogram") == n_scores * (n_oods + 1)
    rocs = [t for t in fig.data if t.type == "scatter" and t.name]
    assert len(rocs) == n_scores * n_oods
    titles = [a.text for a in fig.layout.annotations]
    assert "KNN(k=5) @<br>1-1" in titles or "KNN(k=5)<br>@ 1-1" in titles
    assert sum("InD vs OoD" in t for t in titles) == n_oods
    assert _domains_disjoint(fig)
    assert fig.layout.height >= 600


def test_image_grid_draws_many_rows():
    n = 112  # 14 rows of 8: more than a fixed 0.08 vertical spacing allows
    fig = plots.image_grid_figure(np.zeros((n, 1, 2, 2)), [str(i) for i in range(n)])
    assert len(fig.data) == n and _domains_disjoint(fig)


def _widened(result: runner.RunResult, n_scores: int, n_oods: int) -> Any:
    """``result`` with its one score and scenario repeated: ``n_scores`` scores (a layer sweep)
    and ``n_oods`` scenarios, with consistent frames (cheap: nothing recomputed)."""
    score, layers = result.scores_and_layers[0]
    names = [f"{result.score_names[0]} #{i}" for i in range(n_scores)]
    titles = [f"{result.ood_titles[0]} {j}" for j in range(n_oods)]
    row = result.frame.iloc[0]
    frame = pd.DataFrame(
        [
            row.to_dict() | {"score": f"{row['score']} #{i}", "ood": t}
            for i in range(n_scores)
            for t in titles
        ]
    )
    ind = np.repeat(result.confs_ind[:1], n_scores, axis=0)
    oods = [np.repeat(result.confs_oods[0][:1], n_scores, axis=0) for _ in titles]
    return dataclasses.replace(
        result,
        scores_and_layers=[(score, layers)] * n_scores,
        score_names=names,
        ood_titles=titles,
        confs_ind=ind,
        confs_oods=oods,
        evals=np.full((n_scores, n_oods, 1), float(row["value"])),
        frame=frame,
        ood_images=[result.ood_images[0]] * n_oods,
    )


@pytest.mark.parametrize(("n_scores", "n_oods"), [(22, 1), (1, 22)], ids=str)
def test_export_writes_everything_for_many_scores_or_scenarios(
    n_scores, n_oods, small_result, tmp_path
):
    wide = _widened(small_result, n_scores, n_oods)
    paths = bundle_writer.export(wide, tmp_path / "out")
    assert {p.name for p in (tmp_path / "out").iterdir()} == outdir.BUNDLE_FILES
    info = json.loads(paths["run"].read_text())
    assert not [w for w in info["warnings"] if "could not be drawn" in w]
    assert len(pd.read_csv(paths["metrics"])) == n_scores * n_oods
    assert "Figures not drawn" not in paths["report"].read_text()


def test_cli_with_22_scenarios_writes_the_results(small_result, tmp_path, monkeypatch, capsys):
    wide = _widened(small_result, 1, 22)
    monkeypatch.setattr("ood_core.runner.run", lambda config, **kw: wide)
    out = tmp_path / "out"
    assert main(["run", str(_cfg(tmp_path)), "--out", str(out), "--quiet"]) == 0
    assert {p.name for p in out.iterdir()} == outdir.BUNDLE_FILES


def _boom(*args: Any, **kwargs: Any) -> Any:
    raise ValueError("The 'vertical_spacing' argument must be less than or equal to 0.05")


def _boom_to_html(*args: Any, **kwargs: Any) -> Any:
    raise RuntimeError("renderer exploded")


def _boom_on_the_roc(*args: Any, **kwargs: Any) -> Any:
    raise MemoryError("out of memory drawing the ROC")


# (id, what to patch, replacement, figure names in the report, substrings of the warning)
FIGURE_FAILURE_ROWS = [
    ("summary-grid", "ood_core.plots.summary_plot", _boom, ["Summary"], ["vertical_spacing"]),
    (
        "histogram",
        "ood_core.plots.histogram_figure",
        _boom,
        ["Confidences: Softmax()"],
        ["ValueError"],
    ),
    ("roc", "ood_core.plots.roc_figure", _boom_on_the_roc, ["ROC: InD vs"], ["MemoryError"]),
    ("rendering", "plotly.io.to_html", _boom_to_html, ["Summary"], ["renderer exploded"]),
    (
        "whole-report",
        "ood_core.report.html_report",
        _boom_to_html,
        [],
        ["report.html could not be drawn"],
    ),
]


@pytest.mark.parametrize(
    ("target", "replacement", "figures", "needles"),
    [pytest.param(*r[1:], id=r[0]) for r in FIGURE_FAILURE_ROWS],
)
def test_a_failing_figure_never_costs_the_numbers(
    target, replacement, figures, needles, small_result, tmp_path, monkeypatch
):
    monkeypatch.setattr(target, replacement)
    paths = bundle_writer.export(small_result, tmp_path / "out")
    out = tmp_path / "out"
    assert {p.name for p in out.iterdir()} == outdir.BUNDLE_FILES
    assert pd.read_csv(out / "metrics.csv")["value"].tolist() == pytest.approx(
        small_result.frame["value"].tolist()
    )
    assert len(pd.read_parquet(out / "confidences.parquet")) == len(
        small_result.confidences_frame()
    )
    assert RunConfig.from_toml((out / "config.toml").read_text()) == small_result.config
    info = json.loads(paths["run"].read_text())
    assert info["status"] == "complete"
    problems = [w for w in info["warnings"] if "could not be drawn" in w]
    assert problems, info["warnings"]
    for needle in needles:
        assert any(needle in w for w in problems), (needle, problems)
    report = (out / "report.html").read_text()
    assert "could not be drawn" in report
    for name in figures:
        assert f"Figure &#x27;{name}" in report, name
    assert read_bundle(out).info["warnings"] == info["warnings"]  # the bundle reads back


def test_figures_that_still_draw_stay_in_the_report(small_result, tmp_path, monkeypatch):
    monkeypatch.setattr("ood_core.plots.summary_plot", _boom)
    problems: list[str] = []
    figures = bundle_writer.result_figures(small_result, problems)
    assert [name for name, _ in figures] == [
        *(f"Confidences: {n}" for n in small_result.score_names),
        *(f"ROC: InD vs {t}" for t in small_result.ood_titles),
        *(  # the OoD images passing each score's 95 % threshold, where some pass
            f"Passing undetected at 95% InD acceptance: {n} (the most confident OoD images "
            "per set, with their confidence)"
            for n in small_result.score_names
        ),
    ]
    assert problems == [
        "Figure 'Summary' could not be drawn (ValueError: The 'vertical_spacing' argument must "
        "be less than or equal to 0.05)."
    ]
    report = bundle_writer.export(small_result, tmp_path / "out")["report"].read_text()
    assert report.count("class='figure'") == len(figures)  # the others drawn, plotly.js once
    assert report.count('<script type="text/javascript">/**') <= 1
    with pytest.raises(ValueError, match="vertical_spacing"):
        bundle_writer.result_figures(small_result)  # without a list to collect in: raised


def test_result_figures_on_a_synthetic_sweep():
    n_scores = 22
    ind, oods = _confidences(n_scores, 2)
    result = SimpleNamespace(
        confs_ind=ind,
        confs_oods=oods,
        scores_and_layers=[(_Named("Energy()"), [(1, i + 1)]) for i in range(n_scores)],
        score_names=[f"Energy() @ 1-{i + 1}" for i in range(n_scores)],
        ood_titles=["A", "B"],
    )
    problems: list[str] = []
    figures = bundle_writer.result_figures(result, problems)  # type: ignore[arg-type]
    assert problems == [] and len(figures) == 1 + n_scores + 2


# ================================================================== 4. nothing from outside
def test_the_favicon_is_a_local_file(monkeypatch):
    """Streamlit's frontend fetches a ``:material/...:`` favicon from fonts.gstatic.com (on
    every page change; 43 failed requests offline) and uses a page's icon as the favicon when
    the app sets none: the app sets a local image, served by its own server."""
    import streamlit as st
    from streamlit.testing.v1 import AppTest

    seen: list[dict[str, Any]] = []
    real = st.set_page_config
    monkeypatch.setattr(st, "set_page_config", lambda **kw: (seen.append(kw), real(**kw))[1])
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=120)
    at.run()
    assert not at.exception
    assert seen, "app.py never called st.set_page_config"
    for kw in seen:
        icon = kw.get("page_icon")
        assert icon is not None, "no page_icon: the navigation's page icons become the favicon"
        assert not str(icon).startswith((":material", "http://", "https://", "//")), icon
        path = Path(icon)
        assert path.is_file() and path.resolve().is_relative_to(ROOT), icon
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size < 16_384


# The Chromium check of every request a page load makes: tests/test_browser.py
# (test_served_dashboard_requests_only_its_own_server, on the shared served app).
