"""Safety: torch.hub trust, the network-mode source policy and data-root confinement, the
dashboard's loopback binding (a real server) and its trust checkbox (AppTest).

Bad-input rows are table-driven: each asserts a clear refusal naming the input and the remedy,
and that nothing was imported or read.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import server_address
from streamlit.testing.v1 import AppTest

from ood_core import data, hub
from ood_core.policy import SourceNotAllowedError, SourcePolicy, confine_path, is_loopback

ROOT = Path(__file__).resolve().parents[1]
PAGE = str(ROOT / "views" / "model_data.py")
TIMEOUT = 180

os.environ.setdefault("OOD_LENS_QUIET", "1")

HUBCONF = '''
import pathlib
import torch

pathlib.Path(__file__).with_name("imported.marker").touch()


def linear():
    """A linear Fashion-MNIST-shaped classifier (untrained)."""
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(28 * 28, 10))
    net.ood_lens = {"input_shape": (1, 28, 28)}
    return net
'''


def _hub_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "hubconf.py").write_text(HUBCONF)
    return path


def _npz(path: Path, n: int = 12) -> Path:
    rng = np.random.default_rng(0)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, images=rng.random((n, 1, 28, 28), dtype=np.float32), labels=np.arange(n) % 10)
    return path


@pytest.fixture
def tree(tmp_path: Path) -> dict[str, Path]:
    """A data root with a dataset, a hub dir and symlinks escaping it; files outside it."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    paths = {
        "root": root,
        "outside": outside,
        "good": _npz(root / "good.npz"),
        "secret": _npz(outside / "secret.npz"),
        "hub": _hub_dir(root / "hub"),
        "outside_hub": _hub_dir(outside / "hub"),
    }
    (root / "link_file.npz").symlink_to(paths["secret"])
    (root / "link_dir").symlink_to(outside, target_is_directory=True)
    paths["link_file"], paths["link_dir"] = root / "link_file.npz", root / "link_dir"
    return paths


# ---------------------------------------------------------------------------- torch.hub trust
def _cached_repo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "torch_hub"))
    return _hub_dir(tmp_path / "torch_hub" / "someone_models_main")


TRUST_ROWS = {  # id: how to build the repo reference from (tmp_path, cached repo dir)
    "github": lambda tmp, cached: "someone/models",
    "github_with_ref": lambda tmp, cached: "someone/models:main",
    "github_unknown_ref": lambda tmp, cached: "someone/other:dev",
    "local_dir": lambda tmp, cached: str(_hub_dir(tmp / "myhub")),
    "local_dir_relative": lambda tmp, cached: os.path.relpath(_hub_dir(tmp / "rel"), Path.cwd()),
    "local_dir_via_symlink": lambda tmp, cached: _symlinked_hub(tmp),
    "cached_github_dir_by_path": lambda tmp, cached: str(cached),
}


def _symlinked_hub(tmp: Path) -> str:
    (tmp / "linked").symlink_to(_hub_dir(tmp / "real"), target_is_directory=True)
    return str(tmp / "linked")


@pytest.mark.parametrize("call", ["load_model", "list_entries"])
@pytest.mark.parametrize("row", list(TRUST_ROWS))
def test_untrusted_repo_is_refused_naming_it_and_the_remedy(row, call, tmp_path, monkeypatch):
    monkeypatch.setattr(hub, "network_available", lambda *a, **k: pytest.fail("network tried"))
    cached = _cached_repo(tmp_path, monkeypatch)
    repo = TRUST_ROWS[row](tmp_path, cached)
    with pytest.raises(hub.UntrustedRepoError) as err:
        hub.load_model(repo, "linear") if call == "load_model" else hub.list_entries(repo)
    msg = str(err.value)
    assert f"'{repo}'" in msg, msg
    assert "--trust-repo" in msg and "trust_repo = true" in msg and "trust box" in msg
    assert isinstance(err.value, hub.HubUnavailableError)  # existing handlers still catch it
    assert not list(tmp_path.rglob("imported.marker")), "the repo's code ran"


def test_trusted_repo_runs_and_bundled_needs_no_trust(tmp_path, monkeypatch):
    monkeypatch.setattr(hub, "network_available", lambda *a, **k: pytest.fail("network tried"))
    _cached_repo(tmp_path, monkeypatch)
    net = hub.load_model("someone/models", "linear", trust_repo=True)  # the cached copy
    assert net(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    assert (tmp_path / "torch_hub" / "someone_models_main" / "imported.marker").exists()
    assert hub.load_model("bundled", "tiniest").training is False
    assert hub.load_model(str(hub.BUNDLED_HUB), "tiniest").training is False


# ---------------------------------------------------------------------------- network policy
@pytest.mark.parametrize(
    "address",
    [None, "", "0.0.0.0", "::", "192.0.2.2", "10.1.2.3", "example.com", "127.0.0.1.example.com"],
)
def test_non_loopback_addresses_mean_network_mode(address):
    assert not is_loopback(address)
    policy = SourcePolicy.from_env(address, {})
    assert policy.served_on_network and policy.refusal("github")


@pytest.mark.parametrize("address", ["127.0.0.1", "127.0.0.2", "localhost", "::1", "[::1]"])
def test_loopback_addresses_allow_every_source(address, tree):
    policy = SourcePolicy.from_env(address, {})
    assert is_loopback(address) and not policy.served_on_network
    assert all(policy.refusal(k) is None for k in ("github", "local_hub", "local_files"))
    policy.check_model_repo("someone/models")
    policy.check_model_repo(str(tree["outside_hub"]))
    policy.check_data_source(str(tree["secret"]))
    assert policy.load_roots() is None


ALL = "github,local_hub,local_files"
# id: (OOD_LENS_ALLOW, roots configured?, "model" or "data", input from the tree, message part)
POLICY_ROWS = {
    "github_off": ("", True, "model", "someone/models", "GitHub torch.hub repositories are off"),
    "github_ref_off": ("local_hub", True, "model", "someone/models:v2", "OOD_LENS_ALLOW=github"),
    "local_hub_off": ("github", True, "model", "{hub}", "local hub directories are off"),
    "local_hub_outside_roots": (ALL, True, "model", "{outside_hub}", "outside the allowed data"),
    "local_hub_dotdot": (ALL, True, "model", "{root}/../outside/hub", "outside the allowed data"),
    "local_hub_via_symlink": (ALL, True, "model", "{link_dir}/hub", "outside the allowed data"),
    "local_files_off": ("github,local_hub", True, "data", "{good}", "local data files and fo"),
    "local_files_no_roots": ("local_files", False, "data", "{good}", "no data roots are config"),
    "file_outside_roots": (ALL, True, "data", "{secret}", "outside the allowed data roots"),
    "file_dotdot_escape": (
        ALL,
        True,
        "data",
        "{root}/../outside/secret.npz",
        "resolves to .*outside the allowed",
    ),
    "file_symlink_escape": (ALL, True, "data", "{link_file}", "outside the allowed data roots"),
    "dir_symlink_escape": (ALL, True, "data", "{link_dir}/secret.npz", "outside the allowed"),
    "folder_symlink_escape": (ALL, True, "data", "{link_dir}", "outside the allowed data roots"),
    "system_file": (ALL, True, "data", "/etc/passwd", "outside the allowed data roots"),
    "home_file": (ALL, True, "data", "~/secret.npz", "outside the allowed data roots"),
    "relative_escape": (ALL, True, "data", "../secret.npz", "outside the allowed data roots"),
    "missing_file_outside": (ALL, True, "data", "/nonexistent/x.parquet", "outside the allowed"),
    "url_as_hf_id": (ALL, True, "data", "file:///etc/passwd", "must be written 'owner/name'"),
    "hf_id_with_dotdot": (ALL, True, "data", "owner/..", "must be written 'owner/name'"),
    "hf_id_with_scheme": (ALL, True, "data", "hf://datasets/x/y", "must be written 'owner/name'"),
}


@pytest.mark.parametrize("row", list(POLICY_ROWS))
def test_network_mode_refuses_sources_that_are_off_or_outside_the_roots(row, tree):
    allow, with_roots, what, template, expected = POLICY_ROWS[row]
    env = {"OOD_LENS_ALLOW": allow}
    if with_roots:
        env["OOD_LENS_DATA_ROOTS"] = str(tree["root"])
    policy = SourcePolicy.from_env("0.0.0.0", env)
    value = template.format(**{k: str(v) for k, v in tree.items()})
    check = policy.check_model_repo if what == "model" else policy.check_data_source
    with pytest.raises(SourceNotAllowedError, match=expected) as err:
        check(value)
    assert value in str(err.value) or "OOD_LENS_ALLOW" in str(err.value)
    assert not list(tree["root"].parent.rglob("imported.marker"))


@pytest.mark.parametrize(
    "row", [r for r, v in POLICY_ROWS.items() if v[2] == "data" and "outside the allowed" in v[4]]
)
def test_data_load_confines_local_paths_itself(row, tree):
    """The loader checks the roots too (the check the pages call is not the only guard)."""
    template = POLICY_ROWS[row][3]
    value = template.format(**{k: str(v) for k, v in tree.items()})
    with pytest.raises(SourceNotAllowedError, match="outside the allowed data roots"):
        data.load(value, roots=[str(tree["root"])])


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"OOD_LENS_ALLOW": "gitub"}, "unknown source 'gitub'.*Did you mean 'github'"),
        ({"OOD_LENS_ALLOW": "all"}, "unknown source 'all'.*github, local_hub, local_files"),
        ({"OOD_LENS_ALLOW": "local_files;github"}, "unknown source"),
        (
            {"OOD_LENS_DATA_ROOTS": "/nonexistent/ood-lens-root"},
            "OOD_LENS_DATA_ROOTS.*not an existing",
        ),
        ({"OOD_LENS_DATA_ROOTS": "{good}"}, "not an existing folder"),
    ],
)
def test_malformed_policy_settings_are_explained(env, expected, tree):
    env = {k: v.format(good=tree["good"]) for k, v in env.items()}
    with pytest.raises(ValueError, match=expected):
        SourcePolicy.from_env("0.0.0.0", env)
    assert SourcePolicy.from_env("127.0.0.1", env) == SourcePolicy()  # ignored on loopback


def test_network_mode_allows_what_is_enabled_and_inside_the_roots(tree, monkeypatch):
    monkeypatch.chdir(tree["root"])
    env = {
        "OOD_LENS_ALLOW": " GitHub , local_hub,local_files ",
        "OOD_LENS_DATA_ROOTS": f"{tree['outside'] / 'hub'}{os.pathsep}{tree['root']}",
    }
    policy = SourcePolicy.from_env("0.0.0.0", env)
    assert policy.allow == {"github", "local_hub", "local_files"}
    for repo in ("bundled", str(hub.BUNDLED_HUB), "someone/models", str(tree["hub"])):
        policy.check_model_repo(repo)
    for source in (
        "fashion_mnist",
        "owner/hf-dataset",
        "ego-thales/cifar10",
        "uoft-cs/cifar10",
        "Owner_1/Name.v2",
        str(tree["good"]),
        "good.npz",
        "./good.npz",
        f"{tree['root']}/hub/../good.npz",
    ):
        policy.check_data_source(source)
    loaded = data.load("good.npz", roots=policy.load_roots())
    assert len(loaded) == 12 and loaded.meta["source"] == str(tree["good"].resolve())
    assert confine_path(tree["hub"], policy.data_roots) == tree["hub"].resolve()
    # bundled models and data need nothing enabled
    closed = SourcePolicy.from_env("0.0.0.0", {})
    closed.check_model_repo("bundled")
    closed.check_data_source("fashion_mnist")
    closed.check_data_source("owner/hf-dataset")  # downloads into the HF cache, reads no path
    assert "only bundled models" in closed.describe()


# ---------------------------------------------------------------------------- served app
def _non_loopback_ipv4() -> str | None:
    """An IPv4 address of one of this machine's own interfaces that is not loopback."""
    found: list[str] = []
    ip = shutil.which("ip")
    if ip:
        out = subprocess.run([ip, "-4", "-o", "addr"], capture_output=True, text=True).stdout
        found += [line.split()[3].split("/")[0] for line in out.splitlines() if " inet " in line]
    with contextlib.suppress(OSError):
        found += socket.gethostbyname_ex(socket.gethostname())[2]
    for addr in found:
        with contextlib.suppress(ValueError):
            if not ipaddress.ip_address(addr).is_loopback:
                return addr
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _answers(host: str, port: int, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(f"http://{host}:{port}/_stcore/health", timeout=timeout) as r:
            return r.status == 200
    except OSError:
        return False


@contextlib.contextmanager
def _served(*args: str) -> Iterator[int]:
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMLIT_")}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "streamlit",
            "run",
            "app.py",
            "--server.port",
            str(port),
            "--server.headless",
            "true",
            *args,
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 20
        while not _answers("127.0.0.1", port, 0.5):
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"streamlit did not start on 127.0.0.1:{port} (exit {proc.poll()})")
            time.sleep(0.3)
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


def test_served_app_answers_on_loopback_only_unless_opted_in():
    addr = _non_loopback_ipv4()
    if addr is None:
        pytest.skip("this machine has no non-loopback IPv4 address to probe")
    with _served() as port:  # the repo's .streamlit/config.toml
        assert _answers("127.0.0.1", port)
        assert not _answers(addr, port), f"the dashboard answered on {addr}:{port}"
    with _served("--server.address", "0.0.0.0") as port:  # the documented opt-in
        assert _answers(addr, port), "the probe itself cannot see a network-served app"


def _fake_checkout(tmp_path: Path) -> Path:
    """A copy of ./dev with a stub .venv whose `streamlit` prints its arguments."""
    for name in ("dev", "pyproject.toml", "constraints.txt"):
        shutil.copy2(ROOT / name, tmp_path / name)
    bin_dir = tmp_path / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    for name, body in (("python", "exit 0"), ("streamlit", 'echo "$@"')):
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod(0o755)
    import hashlib

    digest = hashlib.sha256(
        (ROOT / "pyproject.toml").read_bytes() + (ROOT / "constraints.txt").read_bytes()
    ).hexdigest()
    (tmp_path / ".venv" / ".setup-stamp").write_text(digest[:16] + "\n")
    return tmp_path


@pytest.mark.parametrize(
    ("env", "args", "address", "warned"),
    [
        ({}, [], "127.0.0.1", False),
        ({"OOD_LENS_ADDRESS": "0.0.0.0"}, [], "0.0.0.0", True),
        ({}, ["--server.address", "0.0.0.0"], "0.0.0.0", False),  # streamlit: the last one wins
    ],
)
def test_dev_app_binds_to_loopback_unless_asked(env, args, address, warned, tmp_path):
    if shutil.which("bash") is None:
        pytest.skip("needs bash")
    checkout = _fake_checkout(tmp_path)
    run_env = {k: v for k, v in os.environ.items() if not k.startswith("OOD_LENS_")} | env
    out = subprocess.run(
        ["bash", str(checkout / "dev"), "app", *args],
        env=run_env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 0, out.stderr
    argv = out.stdout.split()
    given = [argv[i + 1] for i, a in enumerate(argv) if a == "--server.address"]
    assert given[-1] == address and given[0] == env.get("OOD_LENS_ADDRESS", "127.0.0.1")
    assert ("reachable from the network" in out.stderr) == warned


def test_repo_config_binds_to_loopback():
    import tomllib

    conf = tomllib.loads((ROOT / ".streamlit" / "config.toml").read_text())
    assert is_loopback(conf["server"]["address"])


# ---------------------------------------------------------------------------- dashboard


def _page() -> AppTest:
    at = AppTest.from_file(PAGE, default_timeout=TIMEOUT)
    at.run()
    return at


def _errors(at: AppTest) -> list[str]:
    return [e.value for e in at.error]


def _choose_model(at: AppTest, source: str, repo: str, entry: str = "linear") -> AppTest:
    at.radio(key="w.model_src").set_value(source).run()
    key = "w.gh" if source.startswith("GitHub") else "w.local"
    at.text_input(key=f"{key}_repo" if key == "w.gh" else "w.local_dir").input(repo).run()
    at.text_input(key=f"{key}_entry").input(entry).run()
    return at


@pytest.mark.parametrize("source", ["GitHub (torch.hub)", "Local hub directory"])
def test_dashboard_refuses_an_unticked_repo_and_names_it(source, tmp_path, monkeypatch):
    monkeypatch.setattr(hub, "network_available", lambda *a, **k: pytest.fail("network tried"))
    repo = "someone/models" if source.startswith("GitHub") else str(_hub_dir(tmp_path / "h"))
    with server_address("127.0.0.1"):
        at = _choose_model(_page(), source, repo)
        box = at.checkbox(key=f"w.trust.{repo}")
        assert repo in box.label and "run" in box.label and box.value is False
        at.button(key="load_model").click().run()
    assert not at.exception
    assert any(f"'{repo}'" in e and "trust box" in e for e in _errors(at)), _errors(at)
    assert at.session_state["model_repo"] == "bundled"  # the current model is kept
    assert not list(tmp_path.rglob("imported.marker"))


def test_dashboard_loads_a_ticked_local_repo_and_trust_does_not_carry_over(tmp_path):
    repo, other = str(_hub_dir(tmp_path / "h")), str(_hub_dir(tmp_path / "other"))
    with server_address("127.0.0.1"):
        at = _choose_model(_page(), "Local hub directory", repo)
        at.checkbox(key=f"w.trust.{repo}").check().run()
        at.button(key="load_model").click().run()
        assert not at.exception and not _errors(at), _errors(at)
        assert (at.session_state["model_repo"], at.session_state["model_entry"]) == (repo, "linear")
        assert repo in " ".join(m.value for m in at.markdown)
        # another folder typed after ticking: its own box, unticked, so refused
        at.text_input(key="w.local_dir").input(other).run()
        assert at.checkbox(key=f"w.trust.{other}").value is False
        at.button(key="load_model").click().run()
    assert any(f"'{other}'" in e for e in _errors(at)), _errors(at)
    assert at.session_state["model_repo"] == repo
    assert not (Path(other) / "imported.marker").exists()


def test_dashboard_served_on_network_turns_code_and_file_sources_off(monkeypatch):
    monkeypatch.delenv("OOD_LENS_ALLOW", raising=False)
    monkeypatch.delenv("OOD_LENS_DATA_ROOTS", raising=False)
    with server_address("0.0.0.0"):
        at = _page()
        assert not at.exception and not _errors(at), _errors(at)  # bundled still works
        assert any("Served on a network" in c.value for c in at.caption)
        for source, kind in (
            ("GitHub (torch.hub)", "GitHub"),
            ("Local hub directory", "local hub"),
        ):
            at.radio(key="w.model_src").set_value(source).run()
            assert any(kind in i.value and "OOD_LENS_ALLOW" in i.value for i in at.info)
            assert not [t for t in at.text_input if t.key in ("w.gh_repo", "w.local_dir")]
        at.radio(key="w.data_src").set_value("Local file").run()
        assert any("local data files" in i.value for i in at.info)
        assert not [t for t in at.text_input if t.key == "w.data_path"]
    assert not at.exception


def test_dashboard_served_on_network_confines_local_files(tree, monkeypatch):
    monkeypatch.setenv("OOD_LENS_ALLOW", "local_files")
    monkeypatch.setenv("OOD_LENS_DATA_ROOTS", str(tree["root"]))
    with server_address("0.0.0.0"):
        at = _page()
        at.radio(key="w.data_src").set_value("Local file").run()
        assert any(str(tree["root"]) in c.value for c in at.caption)
        for bad in (tree["secret"], tree["link_file"], f"{tree['root']}/../outside/secret.npz"):
            at.text_input(key="w.data_path").input(str(bad)).run()
            at.button(key="load_data").click().run()
            assert any("outside the allowed data roots" in e for e in _errors(at)), _errors(at)
            assert at.session_state["ind_source"] == "fashion_mnist"
        at.text_input(key="w.data_path").input(str(tree["good"])).run()
        at.button(key="load_data").click().run()
    assert not at.exception
    assert at.session_state["ind_source"] == str(tree["good"]), _errors(at)


def test_dashboard_ticked_github_repo_reaches_the_offline_check(tmp_path, monkeypatch):
    monkeypatch.setattr(hub, "network_available", lambda *a, **k: False)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))  # nothing cached
    with server_address("127.0.0.1"):
        at = _choose_model(_page(), "GitHub (torch.hub)", "nobody/nothing")
        at.checkbox(key="w.trust.nobody/nothing").check().run()
        at.button(key="load_model").click().run()
    assert not at.exception
    assert any("nobody/nothing" in e and "not reachable" in e for e in _errors(at)), _errors(at)
    assert at.session_state["model_repo"] == "bundled"


def _tiny_hub_dir(tmp_path):
    hub_dir = tmp_path / "myhub"
    hub_dir.mkdir()
    (hub_dir / "hubconf.py").write_text(
        "import torch\n"
        "def tiny():\n"
        "    '''A tiny classifier.'''\n"
        "    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 10))\n"
    )
    return hub_dir


@pytest.mark.parametrize("how", ["flag", "config"])
def test_cli_runs_a_local_repo_only_with_explicit_trust(tmp_path, capsys, how):
    from ood_core.cli import main
    from ood_core.config import RunConfig, ScenarioSpec, ScoreSpec, example_config

    cfg = example_config()
    cfg.model_repo, cfg.model_entry = str(_tiny_hub_dir(tmp_path)), "tiny"
    cfg.n_calibration, cfg.n_test = 50, 30
    cfg.scores = [ScoreSpec("Softmax")]
    cfg.scenarios = [ScenarioSpec(kind="vertical_flip")]
    path = tmp_path / "run.toml"
    path.write_text(cfg.to_toml())
    assert main(["run", str(path), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "myhub" in err and "--trust-repo" in err and "Traceback" not in err
    if how == "flag":
        assert main(["run", str(path), "--quiet", "--trust-repo"]) == 0
    else:  # issue 15: the file's trust_repo = true is a request, not consent
        path.write_text(
            cfg.to_toml().replace('entry = "tiny"', 'entry = "tiny"\ntrust_repo = true')
        )
        asked = RunConfig.from_toml(path.read_text())
        assert asked.trust_requested and not asked.trust_repo
        assert main(["run", str(path), "--quiet"]) == 2
        err = capsys.readouterr().err
        assert "myhub" in err and "--trust-repo" in err and "a request, not consent" in err
        assert main(["run", str(path), "--quiet", "--trust-repo"]) == 0
    assert "Evaluation of 1 scores" in capsys.readouterr().out
    assert "trust_repo" not in RunConfig.from_toml(path.read_text()).to_toml()  # never exported


def test_cli_layers_needs_trust_for_a_local_repo(tmp_path, capsys):
    from ood_core.cli import main

    hub_dir = _tiny_hub_dir(tmp_path)
    assert main(["layers", "--repo", str(hub_dir), "--entry", "tiny"]) == 2
    assert "--trust-repo" in capsys.readouterr().err
    assert main(["layers", "--repo", str(hub_dir), "--entry", "tiny", "--trust-repo"]) == 0
    assert "Linear" in capsys.readouterr().out


# ---------------------------------------------------------------------------- every file opened
def _png(path: Path, value: int) -> Path:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((28, 28), value, np.uint8), "L").save(path)
    return path


def _rows_parquet(path: Path, ref: str) -> str:
    """A parquet in HF's Image layout whose one row names its image file by path (no bytes)."""
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq
    from datasets import Features, Image, Value

    features = Features({"image": Image(), "label": Value("int64")}).to_dict()
    struct = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    table = pa.table({"image": pa.array([{"bytes": None, "path": ref}], struct), "label": [0]})
    meta = {b"huggingface": json.dumps({"info": {"features": features}}).encode()}
    pq.write_table(table.replace_schema_metadata(meta), path)
    return str(path)


def _linked_images(t: dict[str, Path]) -> str:
    _png(t["root"] / "imgs" / "a.png", 1)
    (t["root"] / "imgs" / "b.png").symlink_to(_png(t["outside"] / "s.png", 7))
    return str(t["root"] / "imgs")


def _linked_class(t: dict[str, Path]) -> str:
    _png(t["root"] / "cls" / "cat" / "a.png", 1)
    _png(t["outside"] / "dogs" / "d.png", 7)
    (t["root"] / "cls" / "dog").symlink_to(t["outside"] / "dogs", target_is_directory=True)
    return str(t["root"] / "cls")


def _via_link_dir(t: dict[str, Path]) -> str:
    _png(t["root"] / "deep" / "a.png", 1)
    _png(t["outside"] / "s.png", 7)
    (t["root"] / "deep" / "more").symlink_to(t["link_dir"], target_is_directory=True)
    return str(t["root"] / "deep")


# id: build(tree) -> a source inside the root whose loader would open a file outside it
SECOND_HOP_ROWS = {
    "folder_with_symlinked_image": _linked_images,
    "folder_with_symlinked_class_folder": _linked_class,
    "folder_with_subfolder_via_link_dir": _via_link_dir,
    "parquet_image_row_absolute_path": lambda t: _rows_parquet(
        t["root"] / "abs.parquet", str(_png(t["outside"] / "s.png", 7))
    ),
    "parquet_image_row_dotdot_path": lambda t: (
        _png(t["outside"] / "s.png", 7),
        _rows_parquet(t["root"] / "rel.parquet", "../outside/s.png"),
    )[1],
    "parquet_image_row_via_link_dir": lambda t: (
        _png(t["outside"] / "s.png", 7),
        _rows_parquet(t["root"] / "ln.parquet", "link_dir/s.png"),
    )[1],
}


@pytest.mark.parametrize("via", ["data.load", "dashboard"])
@pytest.mark.parametrize("row", list(SECOND_HOP_ROWS))
def test_network_mode_confines_every_file_a_loader_opens(row, via, tree, monkeypatch):
    """The named folder or parquet lies inside the root (the policy check passes), but an image
    it leads to lies outside: the loader refuses before reading it."""
    from ood_lens_app import loaders

    source = SECOND_HOP_ROWS[row](tree)
    env = {"OOD_LENS_ALLOW": "local_files", "OOD_LENS_DATA_ROOTS": str(tree["root"])}
    policy = SourcePolicy.from_env("0.0.0.0", env)
    policy.check_data_source(source)  # the named path itself is allowed
    monkeypatch.setattr(loaders, "source_policy", lambda: policy)
    loaders._load_dataset.clear()
    load = {
        "data.load": lambda: data.load(source, roots=policy.load_roots()),
        "dashboard": lambda: loaders.load_dataset(source, "test"),
    }[via]
    with pytest.raises(SourceNotAllowedError, match="outside the allowed data roots"):
        load()
    inside = _png(tree["root"] / "ok" / "a.png", 9)  # what lies inside the root loads
    assert data.load(str(inside.parent), roots=policy.load_roots()).images.max() == 9 / 255


# ---------------------------------------------------------------------------- issue 15: trust
# Trust comes only from the person at the keyboard (an argument, --trust-repo, a ticked box),
# never from a file, and is checked on every use of a model, cached or not.
def test_a_cached_model_is_never_handed_to_a_caller_who_did_not_trust_it(tmp_path, monkeypatch):
    import re

    from ood_core.config import RunConfig, ScenarioSpec, ScoreSpec
    from ood_core.runner import RunCache, load_inputs

    monkeypatch.setattr(hub, "network_available", lambda *a, **k: pytest.fail("network tried"))
    _cached_repo(tmp_path, monkeypatch)
    cache = RunCache()
    for repo in (str(_hub_dir(tmp_path / "myhub")), "someone/models"):
        net = cache.model(repo, "linear", trust_repo=True)
        assert cache.model(repo, "linear", trust_repo=True) is net  # cached for who trusts it
        for untrusting in (False, "yes", 1):
            with pytest.raises(hub.UntrustedRepoError, match=re.escape(f"'{repo}'")):
                cache.model(repo, "linear", untrusting)
        config = RunConfig(
            model_repo=repo,
            model_entry="linear",
            scores=[ScoreSpec("Softmax")],
            scenarios=[ScenarioSpec(kind="vertical_flip")],
        )
        with pytest.raises(hub.UntrustedRepoError):
            load_inputs(config, cache)
    cache.models[("elsewhere", "x")] = torch.nn.Linear(1, 1)  # put there by other code
    with pytest.raises(hub.UntrustedRepoError, match="'elsewhere'"):
        cache.model("elsewhere", "x")
    assert cache.model("bundled", "tiniest") is cache.model("bundled", "tiniest")


@pytest.mark.parametrize("kind", ["local_dir", "cached_github"])
def test_cli_a_config_asking_for_trust_runs_the_repo_only_with_the_flag(
    kind, tmp_path, monkeypatch, capsys
):
    from ood_core.cli import main
    from ood_core.config import ScenarioSpec, ScoreSpec, example_config

    monkeypatch.setattr(hub, "network_available", lambda *a, **k: pytest.fail("network tried"))
    cached = _cached_repo(tmp_path, monkeypatch)
    repo = "someone/models" if kind == "cached_github" else str(_hub_dir(tmp_path / "myhub"))
    marker = (cached if kind == "cached_github" else Path(repo)) / "imported.marker"
    cfg = example_config()
    cfg.model_repo, cfg.model_entry, cfg.n_calibration, cfg.n_test = repo, "linear", 50, 30
    cfg.scores, cfg.scenarios = [ScoreSpec("Softmax")], [ScenarioSpec(kind="vertical_flip")]
    path = tmp_path / "run.toml"
    path.write_text(cfg.to_toml().replace("[model]\n", "[model]\ntrust_repo = true\n", 1))
    assert main(["run", str(path), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"'{repo}'" in err and "--trust-repo" in err and "request, not consent" in err
    assert not marker.exists(), "the repo's code ran on the file's say-so"
    assert main(["run", str(path), "--quiet", "--trust-repo"]) == 0
    assert marker.exists() and "Evaluation of 1 scores" in capsys.readouterr().out


def _saved_run_of(repo: str, runs: Path, asks_trust: bool) -> str:
    """A saved run (an export bundle in the run store) whose model comes from ``repo``; its
    config.toml says ``trust_repo = true`` when ``asks_trust``. The marker its run left is gone."""
    from ood_core.config import RunConfig, ScenarioSpec, ScoreSpec
    from ood_core.runner import RunCache, run
    from ood_lens_app import run_store

    config = RunConfig(
        model_repo=repo,
        model_entry="linear",
        trust_repo=True,
        n_calibration=50,
        n_test=30,
        scores=[ScoreSpec("Softmax")],
        scenarios=[ScenarioSpec(kind="vertical_flip")],
        metrics=["AUC()"],
    )
    run_id = run_store.save(run(config, RunCache()), runs)
    if asks_trust:
        toml = runs / run_id / "config.toml"
        toml.write_text(toml.read_text().replace("[model]\n", "[model]\ntrust_repo = true\n", 1))
    (Path(repo) / "imported.marker").unlink()
    return run_id


@pytest.mark.parametrize("via", ["url", "runs_page"])
def test_dashboard_opens_a_saved_run_of_another_repo_only_once_its_box_is_ticked(
    via, tmp_path, monkeypatch
):
    runs_dir = tmp_path / "runs"
    monkeypatch.setenv("OOD_LENS_RUNS", str(runs_dir))
    repo = str(_hub_dir(tmp_path / "someone_hub"))
    run_id = _saved_run_of(repo, runs_dir, asks_trust=True)
    marker = Path(repo) / "imported.marker"
    with server_address("127.0.0.1"):
        at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=TIMEOUT)
        if via == "url":
            at.query_params["run"] = run_id
            at.run()
        else:
            at.switch_page("views/runs.py").run()
            at.button(key="runs_open").click().run()
        assert not at.exception, [e.value for e in at.exception]
        assert any(f"'{repo}'" in e and "never grants trust" in e for e in _errors(at))
        box = at.checkbox(key=f"trust_open.{repo}")
        assert repo in box.label and "runs its code" in box.label and box.value is False
        assert at.session_state["result"] is None and at.session_state["model_repo"] == "bundled"
        assert not marker.exists(), "the saved run's repo code ran without the box ticked"
        box.check().run()
        assert not at.exception, [e.value for e in at.exception]
        result = at.session_state["result"]
        assert result is not None and result.restored_from.endswith(run_id)
        assert at.session_state["run_id"] == run_id and marker.exists()
        assert at.session_state["model_repo"] == repo and repo in at.session_state["trusted_repos"]
        at.run()  # the next script run: nothing left to ask, the result stays
        assert not at.exception and at.session_state["result"] is result
        assert not [c for c in at.checkbox if c.key == f"trust_open.{repo}"]


def test_dashboard_runs_a_ticked_repo_and_never_an_unticked_one(tmp_path, monkeypatch):
    """The run itself checks trust too (RunCache.model on every call): a ticked repo runs; once
    the session no longer trusts it, the model the cache holds is refused."""
    monkeypatch.setenv("OOD_LENS_RUNS", str(tmp_path / "runs"))
    repo = str(_hub_dir(tmp_path / "h"))
    with server_address("127.0.0.1"):
        at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=TIMEOUT)
        at.run()
        at = _choose_model(at, "Local hub directory", repo)
        at.checkbox(key=f"w.trust.{repo}").check().run()
        at.button(key="load_model").click().run()
        assert at.session_state["model_repo"] == repo, _errors(at)
        for key, value in {
            "w.n_cal": 50,
            "w.n_test": 30,
            "w.scores": ["Softmax"],
            "w.perts": ["vertical_flip"],
            "w.ood_bundled": [],
        }.items():
            at.session_state[key] = value
        at.switch_page("views/scores.py").run()
        at.button(key="run").click().run()
        assert not at.exception and at.session_state["result"] is not None, _errors(at)
        assert at.session_state["result"].config.trust_repo is True  # the session's consent
        at.session_state["trusted_repos"] = []  # the session's trust withdrawn
        at.session_state["result"] = None
        at.switch_page("views/scores.py").run()
        at.button(key="run").click().run()
    assert not at.exception
    assert at.session_state["result"] is None
    assert any(f"'{repo}'" in e and "trust box" in e for e in _errors(at)), _errors(at)
