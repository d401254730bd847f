"""Execution settings end to end (device, AMP, executor) and runs computed elsewhere: device
resolution, the ``[execution]`` config table, the CLI flags, provenance in run.json and the
bundle reader, AMP as part of the cache key, the model factory Ray actors rebuild the model
with, and the Runs page opening another run store folder and an exported bundle folder."""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import json
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import server_address
from streamlit.testing.v1 import AppTest

from ood_core import bundle, bundle_writer, devices, hub
from ood_core.config import ConfigError, RunConfig, ScenarioSpec, ScoreSpec, example_config
from ood_core.devices import DeviceError
from ood_core.engine import Engine
from ood_core.runner import (
    ExecutionError,
    RunCache,
    check_execution,
    load_network,
    model_factory,
    run,
)
from ood_lens_app import form, run_folders, run_store, runs, state

ROOT = Path(__file__).resolve().parents[1]
APP = str(ROOT / "app.py")
TIMEOUT = 180
HAS_CUDA = torch.cuda.is_available()
no_cuda = pytest.mark.skipif(HAS_CUDA, reason="checks the refusal on a machine without CUDA")
ENGINE_AMP = "amp" in inspect.signature(Engine.__init__).parameters
needs_engine_amp = pytest.mark.skipif(not ENGINE_AMP, reason="Engine(amp=...) not integrated yet")
BF16_TOLERANCE = 0.05
"""Largest |bf16 - fp32| Softmax confidence accepted. Measured on the bundled tiniest model,
500 Fashion-MNIST test images on this CPU: max |difference| 0.020, predicted classes equal."""

os.environ.setdefault("OOD_LENS_QUIET", "1")


def _small(**execution) -> RunConfig:
    return RunConfig(
        n_calibration=60,
        n_test=40,
        scores=[ScoreSpec("Softmax"), ScoreSpec("KNN", {"k": 5}, ["1-11"])],
        scenarios=[ScenarioSpec(kind="vertical_flip")],
        metrics=["AUC()"],
        **execution,
    )


# ---------------------------------------------------------------------------- devices
@no_cuda
def test_auto_is_the_cpu_on_a_machine_without_cuda() -> None:
    assert devices.resolve_device() == torch.device("cpu")
    assert devices.resolve_device("auto") == torch.device("cpu")
    assert devices.available_devices() == ["auto", "cpu"]


def test_cpu_and_well_formed_specs() -> None:
    assert devices.resolve_device("cpu") == torch.device("cpu")
    for spec in ("auto", "cpu", "cuda", "cuda:0", "cuda:12"):
        assert devices.check_device_spec(spec) == spec
    for bad in ("gpu", "cuda:", "cuda:-1", "CPU", "cuda:1:2", "", "mps"):
        with pytest.raises(DeviceError, match="unknown device"):
            devices.resolve_device(bad)


@no_cuda
@pytest.mark.parametrize("spec", ["cuda", "cuda:0", "cuda:7"])
def test_cuda_is_refused_where_there_is_none(spec: str) -> None:
    with pytest.raises(DeviceError) as info:
        devices.resolve_device(spec)
    assert str(info.value) == (
        f"device '{spec}': CUDA is not available on this machine (use 'auto' or 'cpu')"
    )


@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_a_cuda_index_past_the_last_device_is_refused() -> None:
    n = torch.cuda.device_count()
    with pytest.raises(DeviceError, match=f"has {n} CUDA device"):
        devices.resolve_device(f"cuda:{n}")


def test_amp_choices() -> None:
    cpu = torch.device("cpu")
    assert devices.AMP_CHOICES == ("bf16", "fp16")
    assert devices.check_amp("bf16", cpu) == "bf16"
    for off in (None, False, "", "none"):
        assert devices.check_amp(off, cpu) is None
    with pytest.raises(DeviceError, match="'fp16' needs a CUDA device"):
        devices.check_amp("fp16", cpu)
    with pytest.raises(DeviceError, match="unknown amp"):
        devices.check_amp("int8", cpu)


def test_environment_info() -> None:
    info = devices.environment_info(torch.device("cpu"))
    assert info["torch"] == torch.__version__
    assert info["python"] == ".".join(map(str, sys.version_info[:3]))
    assert {"platform", "device_name"} <= set(info) and all(
        isinstance(v, str) for v in info.values()
    )
    assert ("ray" in info) == _installed("ray")


def _installed(dist: str) -> bool:
    import importlib.metadata

    try:
        importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


# ---------------------------------------------------------------------------- config
def test_default_execution_is_not_exported() -> None:
    cfg = example_config()
    assert "[execution]" not in cfg.to_toml()
    assert cfg.execution() == {
        "executor": "local",
        "address": "",
        "workers": 2,
        "device": "auto",
        "amp": None,
    }


@pytest.mark.parametrize(
    "execution",
    [
        {"device": "cpu"},
        {"amp": "bf16"},
        {"device": "cuda:1", "amp": "fp16"},
        {"executor": "ray"},
        {"executor": "ray", "workers": 4, "address": "ray://head:10001", "device": "cuda"},
    ],
)
def test_execution_round_trip(execution: dict) -> None:
    cfg = dataclasses.replace(example_config(), **execution)
    text = cfg.to_toml()
    assert "[execution]" in text
    back = RunConfig.from_toml(text)
    assert back == cfg and back.execution() == cfg.execution()
    assert back.to_toml() == text  # exported again: the same file


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ('device = "gpu"', '[execution] device = "gpu": expected "auto"'),
        ('amp = "bf32"', '[execution] amp = "bf32" (a string): expected false'),
        ("amp = true", "[execution] amp = true (a boolean): expected false"),
        ("amp = 0", "[execution] amp = 0 (an integer): expected false"),
        ('amp = "fp16"\ndevice = "cpu"', "float16 autocast needs a CUDA device"),
        ('executor = "dask"', '[execution] executor = "dask" (a string): expected "local"'),
        ('executor = "ray"\nworkers = 0', "[execution] workers = 0 (an integer): expected"),
        ("workers = 3", 'workers are Ray actors, for executor = "ray"'),
        ('address = "ray://h:1"', 'an address is for executor = "ray"'),
        ("gpus = 1", "[execution] gpus: unknown key; known keys: executor, address, workers"),
    ],
)
def test_execution_problems(table: str, message: str) -> None:
    text = example_config().to_toml() + "\n[execution]\n" + table + "\n"
    with pytest.raises(ConfigError) as info:
        RunConfig.from_toml(text)
    assert message in str(info.value)


def test_model_key_holds_what_changes_numbers() -> None:
    cfg = example_config()
    assert cfg.model_key() == cfg.model_key("cpu") == ("bundled", "tiniest")
    ray = dataclasses.replace(cfg, executor="ray", workers=4)
    assert ray.model_key("cpu") == cfg.model_key("cpu")  # the executor computes the same
    amp = dataclasses.replace(cfg, amp="bf16")
    assert amp.model_key() == ("bundled", "tiniest", ("amp", "bf16"))
    assert cfg.model_key("cuda:0") == ("bundled", "tiniest", ("device", "cuda:0"))


def test_check_execution_on_this_machine() -> None:
    device, amp = check_execution(dataclasses.replace(example_config(), amp="bf16"))
    assert device == devices.resolve_device("auto") and amp == "bf16"
    if not devices.ray_available():
        with pytest.raises(ExecutionError, match=r"pip install 'ood-lens\[ray\]'"):
            check_execution(dataclasses.replace(example_config(), executor="ray"))


# ---------------------------------------------------------------------------- runner
def test_the_cache_keeps_one_model_per_device(tiniest) -> None:
    cache = RunCache()
    cache.models[("bundled", "tiniest")] = tiniest
    assert cache.model("bundled", "tiniest", device=torch.device("cpu")) is tiniest
    meta = torch.device("meta")  # a device every machine has: stands in for a GPU
    moved = cache.model("bundled", "tiniest", device=meta)
    assert moved is not tiniest and next(moved.parameters()).device == meta
    assert cache.models[("bundled", "tiniest", "meta")] is moved
    assert cache.model("bundled", "tiniest", device=meta) is moved
    assert next(tiniest.parameters()).device == torch.device("cpu")  # never moved


def test_the_model_factory_pickles_and_keeps_the_trust_check(tmp_path: Path) -> None:
    cfg = dataclasses.replace(example_config(), output=None)
    factory = pickle.loads(pickle.dumps(model_factory(cfg)))
    net = factory()
    reference = hub.load_model("bundled", "tiniest")
    x = torch.rand(3, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(net(x), reference(x), rtol=0, atol=0)
    # a real hub folder, so that only trust stands between it and its code
    (tmp_path / "hubconf.py").write_text("import torch\n\ndef linear():\n    raise SystemExit\n")
    other = dataclasses.replace(cfg, model_repo=str(tmp_path), model_entry="linear")
    with pytest.raises(hub.UntrustedRepoError):
        pickle.loads(pickle.dumps(model_factory(other)))()
    with pytest.raises(hub.UntrustedRepoError):
        load_network(str(tmp_path), "linear", False, None)


@pytest.fixture(scope="module")
def local_result():
    return run(_small(device="cpu"), RunCache())


def test_a_run_records_where_and_how_it_was_computed(local_result) -> None:
    ex = local_result.execution
    assert ex["executor"] == "local" and ex["workers"] == 1 and ex["address"] == ""
    assert ex["device"] == "cpu" and ex["device_spec"] == "cpu" and ex["amp"] is None
    assert ex["host"] and run_store.is_run_id(ex["run_id"])
    assert local_result.environment["torch"] == torch.__version__
    assert local_result.config.device == "cpu"  # the spec stays in the config


def test_provenance_in_run_json_and_read_back(local_result, tmp_path: Path) -> None:
    out = tmp_path / "out"
    bundle_writer.export(local_result, out)
    info = json.loads((out / "run.json").read_text())
    assert info["execution"] == local_result.execution
    assert info["environment"] == local_result.environment
    assert 'device = "cpu"' in (out / "config.toml").read_text()
    html = (out / "report.html").read_text()
    assert "Computed with" in html and "Computed by the local executor on cpu" in html
    read = bundle.read_bundle(out)
    back = bundle.to_result(read)
    assert back.execution == local_result.execution
    assert back.environment == local_result.environment
    # computed on a GPU elsewhere: opens here on the CPU (nothing is recomputed)
    info["execution"] |= {"device": "cuda:0", "device_spec": "cuda", "amp": "bf16"}
    (out / "run.json").write_text(json.dumps(info))
    toml = out / "config.toml"
    toml.write_text(toml.read_text().replace('device = "cpu"', 'device = "cuda"'))
    back = bundle.to_result(bundle.read_bundle(out))
    assert back.execution["device"] == "cuda:0" and back.config.device == "cuda"
    np.testing.assert_array_equal(back.confs_ind, local_result.confs_ind)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"executor": "dask"}, 'execution.executor = "dask" (a string): expected "local" or "ray"'),
        ({"workers": 0}, "execution.workers = 0 (an integer): expected a whole number of workers"),
        ({"device": "gpu"}, 'execution.device = "gpu" (a string): expected a resolved device'),
        ({"amp": "int8"}, 'execution.amp = "int8" (a string): expected null, "bf16" or "fp16"'),
        ({"shell": "rm"}, "unknown key execution.shell; known keys: executor, workers"),
    ],
)
def test_the_bundle_reader_checks_provenance(
    local_result, tmp_path: Path, change: dict, message: str
) -> None:
    out = tmp_path / "out"
    bundle_writer.export(local_result, out)
    info = json.loads((out / "run.json").read_text())
    info["execution"] |= change
    (out / "run.json").write_text(json.dumps(info))
    with pytest.raises(bundle.BundleError) as err:
        bundle.read_bundle(out)
    assert message in str(err.value)


def test_a_bundle_of_an_earlier_version_has_no_provenance(local_result, tmp_path: Path) -> None:
    out = tmp_path / "out"
    bundle_writer.export(dataclasses.replace(local_result, execution={}, environment={}), out)
    info = json.loads((out / "run.json").read_text())
    assert "execution" not in info and "environment" not in info
    back = bundle.to_result(bundle.read_bundle(out))
    assert back.execution == {} and run_store.computed_text(info) == "not recorded"


@needs_engine_amp
def test_bf16_on_the_cpu_is_close_to_fp32_and_cached_apart() -> None:
    cache = RunCache()
    fp32 = run(_small(device="cpu"), cache)
    bf16 = run(_small(device="cpu", amp="bf16"), cache)
    assert bf16.execution["amp"] == "bf16"
    diff = np.abs(bf16.confs_ind[0] - fp32.confs_ind[0])
    assert 0 < diff.max() <= BF16_TOLERANCE  # bf16 was applied, and stays close
    keys = {key[0][0] for key in cache.fitted}
    assert ("bundled", "tiniest") in keys and ("bundled", "tiniest", ("amp", "bf16")) in keys
    assert len(cache.fitted) == 4  # two scores, fitted once per precision


# ---------------------------------------------------------------------------- CLI
def _cli(*args: str, cwd: Path, **env_vars: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OOD_LENS_QUIET="1", **env_vars)
    return subprocess.run(
        [sys.executable, "-m", "ood_core.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=300,
    )


def _config_file(tmp_path: Path) -> Path:
    path = tmp_path / "run.toml"
    path.write_text(_small().to_toml())
    return path


def test_cli_flags_override_and_are_recorded(tmp_path: Path) -> None:
    path = _config_file(tmp_path)
    out = tmp_path / "out"
    done = _cli("run", str(path), "--out", str(out), "--device", "cpu", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "Computed with executor local on cpu" in done.stdout and "run id " in done.stdout
    exported = RunConfig.from_toml((out / "config.toml").read_text())
    assert exported.device == "cpu" and exported.execution()["executor"] == "local"
    assert json.loads((out / "run.json").read_text())["execution"]["device"] == "cpu"


@no_cuda
@pytest.mark.parametrize("device", ["cuda", "cuda:7"])
def test_cli_refuses_cuda_without_cuda(tmp_path: Path, device: str) -> None:
    done = _cli("run", str(_config_file(tmp_path)), "--device", device, cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr == (
        f"error: device '{device}': CUDA is not available on this machine (use 'auto' or 'cpu')\n"
    )


def test_cli_refuses_what_the_flags_cannot_do(tmp_path: Path) -> None:
    path = _config_file(tmp_path)
    done = _cli("run", str(path), "--workers", "3", cwd=tmp_path)
    assert done.returncode == 2 and 'workers are Ray actors, for executor = "ray"' in done.stderr
    done = _cli("run", str(path), "--device", "gpu", cwd=tmp_path)
    assert done.returncode == 2 and '[execution] device = "gpu"' in done.stderr
    if not HAS_CUDA:
        done = _cli("run", str(path), "--amp", "fp16", cwd=tmp_path)
        assert done.returncode == 2 and "'fp16' needs a CUDA device" in done.stderr
    if not devices.ray_available():
        done = _cli("run", str(path), "--executor", "ray", cwd=tmp_path)
        assert done.returncode == 2 and "pip install 'ood-lens[ray]'" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


@no_cuda
def test_a_config_asking_for_cuda_names_its_file(tmp_path: Path) -> None:
    path = tmp_path / "gpu.toml"
    path.write_text(_small(device="cuda").to_toml())
    done = _cli("run", str(path), cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.startswith(f"error: {path}: [execution] device 'cuda': CUDA is not")


# ---------------------------------------------------------------------------- Ray executor
@pytest.mark.skipif(not devices.ray_available(), reason="needs ray and ood_core.ray_engine")
def test_the_cli_on_ray_with_two_workers_gives_the_local_numbers(local_result, tmp_path) -> None:
    """What a user types: ``ood-lens run CONFIG --executor ray --workers 2`` (a local Ray with
    this machine's CPUs, started and stopped by the run, its files under ``RAY_TMPDIR``)."""
    path = _config_file(tmp_path)
    out = tmp_path / "out"
    ray_tmp = tempfile.mkdtemp(prefix="oodray-")  # short: Ray's socket paths are <= 107 bytes
    try:
        done = _cli(
            "run",
            str(path),
            "--out",
            str(out),
            "--executor",
            "ray",
            "--workers",
            "2",
            cwd=tmp_path,
            RAY_TMPDIR=ray_tmp,
            HOME=ray_tmp,  # Ray's token file, not in ~
        )
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Computed with executor ray (2 worker(s), local Ray) on cpu" in done.stdout
    execution = json.loads((out / "run.json").read_text())["execution"]
    assert execution["executor"] == "ray" and execution["workers"] == 2
    assert execution["startup_seconds"] > 0  # a Ray was started for the run, and stopped
    frame = pd.read_parquet(out / "confidences.parquet")
    expected = local_result.confidences_frame()
    assert list(frame.columns) == list(expected.columns) and len(frame) == len(expected)
    numeric = [c for c in frame.columns if pd.api.types.is_float_dtype(frame[c])]
    np.testing.assert_allclose(frame[numeric], expected[numeric], rtol=0, atol=1e-6)
    bundle_writer.export(local_result, tmp_path / "local")
    got, want = pd.read_csv(out / "metrics.csv"), pd.read_csv(tmp_path / "local" / "metrics.csv")
    assert got.drop(columns="value").equals(want.drop(columns="value"))
    np.testing.assert_allclose(got["value"], want["value"], rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------- dashboard form
def test_the_execution_form_on_this_machine() -> None:
    ss = state.default_state()
    assert ss["w.exec_device"] == "auto" and ss["w.exec_amp"] == state.AMP_OFF
    opts = form.execution_options(ss)
    assert opts["devices"] == devices.available_devices()
    assert ("fp16" in opts["amps"]) == HAS_CUDA and opts["amps"][:2] == ["off", "bf16"]
    assert opts["executor_disabled"] == (not devices.ray_available())
    values, problems = form.execution_values(ss)
    assert values == example_config().execution() and problems == []
    ss |= {"w.exec_amp": "bf16", "w.exec_device": "cpu", "w.exec_workers": 5}
    values, problems = form.execution_values(ss)
    assert values["amp"] == "bf16" and values["device"] == "cpu"
    assert values["workers"] == 2 and problems == []  # workers are for Ray only


@no_cuda
def test_a_restored_cuda_setting_is_shown_and_refused() -> None:
    ss = state.default_state(dataclasses.replace(example_config(), device="cuda:1"))
    assert ss["w.exec_device"] == "cuda:1"
    assert "cuda:1" in form.execution_options(ss)["devices"]
    _, problems = form.execution_values(ss)
    assert problems == [
        "Execution: device 'cuda:1': CUDA is not available on this machine (use 'auto' or 'cpu')."
    ]


def test_apply_config_restores_the_execution_widgets() -> None:
    ss: dict = {}
    state.init_state(ss)
    cfg = dataclasses.replace(
        example_config(), executor="ray", workers=3, address="ray://h:1", amp="bf16"
    )
    runs.apply_config(ss, cfg)
    assert (ss["w.exec_executor"], ss["w.exec_workers"], ss["w.exec_address"]) == (
        "ray",
        3,
        "ray://h:1",
    )
    assert ss["w.exec_amp"] == "bf16" and ss["w.exec_device"] == "auto"
    values, _ = form.execution_values(ss)
    assert values == cfg.execution()


def test_settings_differ_by_amp_and_resolved_device_only() -> None:
    cfg = example_config()
    assert runs.same_settings(cfg, dataclasses.replace(cfg, executor="ray", workers=4))
    assert not runs.same_settings(cfg, dataclasses.replace(cfg, amp="bf16"))
    if not HAS_CUDA:
        assert runs.same_settings(cfg, dataclasses.replace(cfg, device="cpu"))


# ---------------------------------------------------------------------------- runs elsewhere
@pytest.fixture(scope="module")
def elsewhere(tmp_path_factory, local_result) -> dict[str, Path]:
    """A run store written "by another machine" and an exported bundle folder."""
    base = tmp_path_factory.mktemp("elsewhere")
    store = base / "shared-runs"
    run_id = run_store.save(local_result, store)
    out = base / "results"
    bundle_writer.export(local_result, out)
    return {"store": store, "bundle": out, "run_id": Path(run_id)}


def test_folders_are_recognised_and_listed(elsewhere, tmp_path: Path) -> None:
    from ood_core.policy import SourcePolicy

    loopback = SourcePolicy()
    store = run_folders.check_folder(str(elsewhere["store"]), loopback)
    assert store.kind == "store" and not store.confined
    table = run_folders.list_folder(store)
    run_id = str(elsewhere["run_id"])
    assert (
        list(table["id"]) == [run_id]
        and table["computed"][0]
        == "local · cpu · host "
        + (run_store.load(elsewhere["store"], run_id).info["execution"]["host"])
    )
    one = run_folders.check_folder(str(elsewhere["bundle"]), loopback)
    assert one.kind == "bundle"
    listed = run_folders.list_folder(one)
    assert len(listed) == 1 and listed["computed"][0].startswith("local · cpu")
    for bad, message in ((tmp_path / "none", "no such folder"), (tmp_path, "neither")):
        with pytest.raises(run_folders.FolderError, match=message):
            run_folders.check_folder(str(bad), loopback)


def test_a_network_served_dashboard_confines_run_folders(elsewhere, tmp_path: Path) -> None:
    from ood_core.policy import SourceNotAllowedError, SourcePolicy

    closed = SourcePolicy(served_on_network=True)
    with pytest.raises(SourceNotAllowedError, match="local data files and folders are off"):
        run_folders.check_folder(str(elsewhere["store"]), closed)
    rooted = SourcePolicy(True, frozenset({"local_files"}), (str(tmp_path),))
    with pytest.raises(SourceNotAllowedError, match="outside the allowed data roots"):
        run_folders.check_folder(str(elsewhere["store"]), rooted)
    # a run folder under the root that links out of it is never listed nor opened
    store = tmp_path / "store"
    store.mkdir()
    run_id = str(elsewhere["run_id"])
    (store / run_id).symlink_to(elsewhere["store"] / run_id)
    folder = run_folders.check_folder(str(store), rooted)
    assert folder.confined and run_folders.list_folder(folder).empty
    with pytest.raises(SourceNotAllowedError, match="links outside"):
        run_folders.load_run(folder, run_id)


@contextlib.contextmanager
def _runs_store(path: Path) -> Iterator[None]:
    old = os.environ.get("OOD_LENS_RUNS")
    os.environ["OOD_LENS_RUNS"] = str(path)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("OOD_LENS_RUNS", None)
        else:
            os.environ["OOD_LENS_RUNS"] = old


def _open_folder(at: AppTest, folder: Path) -> AppTest:
    at.switch_page("views/runs.py").run()
    at.text_input(key="runs_folder_path").input(str(folder)).run()
    at.button(key="runs_folder_open").click().run()
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]
    return at


@pytest.mark.parametrize("kind", ["store", "bundle"])
def test_the_runs_page_opens_runs_computed_elsewhere(elsewhere, tmp_path: Path, kind) -> None:
    with _runs_store(tmp_path / "own"):  # this dashboard's own store is empty
        at = _open_folder(AppTest.from_file(APP, default_timeout=TIMEOUT), elsewhere[kind])
        table = at.dataframe[0].value
        run_id = str(elsewhere["run_id"]) if kind == "store" else table["id"][0]
        assert list(table["id"]) == [run_id] and table["computed"][0].startswith("local · cpu")
        assert "read-only" in " ".join(c.value for c in at.caption)
        assert not [b for b in at.button if b.key == "runs_delete"]  # read-only
        # the provenance table (AppTest keys no read-only dataframe: found by its columns)
        shown = next(d.value for d in at.dataframe if "setting" in d.value.columns)
        assert dict(zip(shown["setting"], shown["value"], strict=True))["device"] == "cpu"
        at.button(key="runs_open").click().run()
        assert not at.exception, [e.value for e in at.exception]
        result = at.session_state["result"]
        assert result is not None and result.execution["executor"] == "local"
        where = elsewhere[kind] / (run_id if kind == "store" else "")
        assert Path(result.restored_from) == where
        assert at.session_state["run_id"] is None  # not this dashboard's run: not in the URL
        assert result.score_names == ["Softmax()", "KNN(k=5) @ 1-11"]


def test_the_runs_page_refuses_a_folder_without_runs(tmp_path: Path) -> None:
    with _runs_store(tmp_path / "own"):
        at = AppTest.from_file(APP, default_timeout=TIMEOUT)
        at.run()  # once before switching (AppTest's rule)
        at.switch_page("views/runs.py").run()
        at.text_input(key="runs_folder_path").input(str(tmp_path)).run()
        at.button(key="runs_folder_open").click().run()
        assert not at.exception
        assert any("neither an exported bundle" in e.value for e in at.error)


HUBCONF = '''
import torch


def linear():
    """A linear Fashion-MNIST-shaped classifier (untrained)."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(28 * 28, 10))
    net.ood_lens = {"input_shape": (1, 28, 28)}
    return net
'''


def test_a_bundle_from_elsewhere_of_another_repo_still_needs_its_trust_box(tmp_path: Path) -> None:
    repo = tmp_path / "hub"
    repo.mkdir()
    (repo / "hubconf.py").write_text(HUBCONF)
    config = dataclasses.replace(
        _small(device="cpu"), model_repo=str(repo), model_entry="linear", trust_repo=True
    )
    config.scores = [ScoreSpec("Softmax")]
    out = tmp_path / "results"
    bundle_writer.export(run(config, RunCache()), out)
    with _runs_store(tmp_path / "own"), server_address("127.0.0.1"):
        at = _open_folder(AppTest.from_file(APP, default_timeout=TIMEOUT), out)
        at.button(key="runs_open").click().run()
        assert not at.exception
        assert any(f"'{repo}'" in e.value and "never grants trust" in e.value for e in at.error)
        assert at.session_state["result"] is None
        box = at.checkbox(key=runs.restore_trust_key(str(repo)))
        assert box.value is False
        box.check().run()
        assert not at.exception, [e.value for e in at.exception]
        result = at.session_state["result"]
        assert result is not None and Path(result.restored_from) == out
