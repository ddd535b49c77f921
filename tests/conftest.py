"""Shared fixtures: small projects made from the real params.yaml with a shrunk config."""
from __future__ import annotations

import copy
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]

# A suite started in the background (`make test &`, nohup) inherits SIGINT ignored, and so would every
# process a test starts: a Python started that way never raises KeyboardInterrupt, and the tests' injected
# Ctrl-C would do nothing. A handled signal is reset to its default in an exec'd child; an ignored one is not.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

MIRROR = Path("/usr/share/datasets/fashion-mnist")

# pytest-xdist runs a worker per core: each worker and the stages it starts then use one thread, so the
# workers do not fight over the cores (a run's thread count is fixed by the `threads` param either way).
WORKER = os.environ.get("PYTEST_XDIST_WORKER")
if WORKER:
    import torch

    torch.set_num_threads(1)

# A few hundred images and one epoch: every stage runs for real, in seconds.
SMALL = {
    **({"threads": 1} if WORKER else {}),
    "preprocess": {"val_size": 100, "max_train": 600, "max_test": 200},
    "train": {"epochs": 1, "device": "cpu"},
    "export": {"onnx_check_images": 32},
    "tracking": {"enabled": False},  # tests/test_tracking.py turns it on against its own stores
}


# pytest-xdist hands out whole files (make test: --dist loadfile) in collection order (--no-loadscope-reorder,
# not by their number of tests), so the longest files come first: none of them starts last and runs alone at the
# end. test_champion.py first of all: it builds the shared `swept` repository that test_experiments.py,
# test_flips.py and test_parallel_experiments.py (later in the order) would otherwise wait for, idle.
LONGEST_FILES = ("test_champion.py", "test_team.py", "test_tracking.py", "test_bench.py", "test_serving.py",
                 "test_predict.py", "test_pipeline.py", "test_datasets.py")


def pytest_collection_modifyitems(items):
    first = {name: rank for rank, name in enumerate(LONGEST_FILES)}
    items.sort(key=lambda item: first.get(item.path.name, len(first)))  # stable: files stay whole, the rest in order


def merge(base: dict, overrides: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in overrides.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def raw_params(overrides: dict | None = None) -> dict:
    """The real params.yaml (read as DVC reads it) with SMALL and then `overrides` over it, unchecked."""
    from stages.lib.params import read_yaml

    return merge(merge(read_yaml(REPO / "params.yaml"), SMALL), overrides or {})


def make_params(overrides: dict | None = None):
    """raw_params, checked: the Params object the stages pass around."""
    from stages.lib.params import validate

    return validate(raw_params(overrides))


def write_params(folder: Path, overrides: dict | None = None) -> dict:
    params = raw_params(overrides)
    (folder / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return params


# Nothing from the caller's shell may redirect a test: no tracking server, repo root or proxy.
PROXY_VARS = ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY")
SCRUB = ("MLFLOW_TRACKING_URI", "DVC_ROOT", "DVC_EXP_NAME", "TUDUI_FAULT", *PROXY_VARS)


@pytest.fixture(autouse=True)
def no_proxy(monkeypatch):
    """urllib would send the tests' 127.0.0.1 requests through a proxy named in the environment."""
    for var in PROXY_VARS:
        monkeypatch.delenv(var, raising=False)


def clean_env(**extra: str) -> dict:
    return {**{k: v for k, v in os.environ.items() if k not in SCRUB}, **extra}


def venv_path() -> str:
    """PATH with this venv's bin first, as `make` runs commands (dvc, python)."""
    return f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"


def run_stage(folder: Path, module: str, *args: str, timeout: float = 1800,
              env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `python -m stages.<module>` (a stage; a dotted name such as tools.predict as it is) in `folder`
    the way dvc does, with this checkout on the path."""
    env = clean_env(PYTHONPATH=str(REPO), **(env or {}))
    return subprocess.run([sys.executable, "-m", module if "." in module else f"stages.{module}", *args], cwd=folder, env=env,
                          capture_output=True, text=True, timeout=timeout)


GIT_ENV = {"GIT_AUTHOR_NAME": "test", "GIT_AUTHOR_EMAIL": "test@localhost",
           "GIT_COMMITTER_NAME": "test", "GIT_COMMITTER_EMAIL": "test@localhost"}


def sh(folder: Path, *args: str, timeout: float = 1800, check: bool = True, stdout_only: bool = False) -> str:
    """Run a command in `folder` with this venv first on PATH (as `make` does); return its output."""
    env = clean_env(**GIT_ENV, PATH=venv_path())
    result = subprocess.run(args, cwd=folder, env=env, capture_output=True, text=True, timeout=timeout)
    if check:
        assert result.returncode == 0, f"{args}: {result.stdout}\n{result.stderr}"
    return result.stdout if stdout_only else result.stdout + result.stderr


def make_dvc_repo(folder: Path, overrides: dict | None = None) -> Path:
    """A fresh git + DVC repository holding this checkout's stages and dvc.yaml, committed."""
    shutil.copytree(REPO / "stages", folder / "stages", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("dvc.yaml", ".gitignore"):
        shutil.copy(REPO / name, folder)
    write_params(folder, overrides)
    sh(folder, "git", "init", "-q")
    sh(folder, "dvc", "init", "-q")
    sh(folder, "dvc", "config", "core.analytics", "false")
    shutil.copytree(REPO / ".dvc/plots", folder / ".dvc/plots")  # dvc.yaml's plot templates
    sh(folder, "git", "add", "-A")
    sh(folder, "git", "commit", "-qm", "pipeline")
    return folder


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_healthy(base: str, process: subprocess.Popen, timeout: float, log=lambda: "") -> None:
    """Poll `base`/health until it answers 200; fail if `process` exits or `timeout` seconds pass."""
    import time
    import urllib.request

    deadline = time.time() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"{base}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            assert process.poll() is None, f"server exited with {process.returncode}:\n{log()}"
            assert time.time() < deadline, f"no {base}/health after {timeout} s:\n{log()}"
            time.sleep(1)


def needs(present: bool, message: str) -> None:
    """Skip a test whose prerequisite (a Debian package, a built file) is missing; fail instead under CI
    (`.ci/run` sets CI=true), where everything is installed and a skip would hide a broken setup."""
    if not present:
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture(scope="session")
def mirror() -> Path:
    """The Fashion-MNIST files from Debian's dataset-fashion-mnist (CI installs it)."""
    needs((MIRROR / "train-images-idx3-ubyte.gz").exists(), f"{MIRROR} is missing: apt-get install dataset-fashion-mnist")
    return MIRROR


def built_once(tmp_path_factory, name: str, build) -> Path:
    """A folder `build(folder)` makes once per test session and every pytest-xdist worker shares: the first
    worker to get here builds it under a file lock, the others wait and reuse it. Tests copy it before
    changing anything in it."""
    import fcntl

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the workers' base folders are siblings
    folder, done = root / name, root / f"{name}.done"
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.exists():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            build(folder)
            done.touch()
    return folder


@pytest.fixture(scope="session")
def prepared_project(tmp_path_factory, mirror) -> Path:
    """A folder with params.yaml, data/raw and data/prepared from the real download and preprocess."""
    def build(folder):
        write_params(folder, {"data": {"mirrors": [str(mirror)]}})
        for stage in ("download", "preprocess"):
            result = run_stage(folder, stage)
            assert result.returncode == 0, result.stderr

    return built_once(tmp_path_factory, "prepared", build)


@pytest.fixture(scope="session")
def trained_project(tmp_path_factory, prepared_project) -> Path:
    """prepared_project plus train, evaluate and export, run as dvc would run them."""
    def build(folder):
        shutil.copytree(prepared_project, folder, dirs_exist_ok=True)
        for stage in ("train", "evaluate", "export"):
            result = run_stage(folder, stage)
            assert result.returncode == 0, f"{stage}: {result.stderr}"

    return built_once(tmp_path_factory, "trained", build)


def tool_env(**extra: str) -> dict:
    """The environment `make` gives a tool: this checkout on the path and the venv first on PATH."""
    return clean_env(PYTHONPATH=str(REPO), PATH=venv_path(), **extra)


# The shared experiments' recipe: a training that learns in seconds (600 images, 2 epochs with momentum); fp32
# so that machines with and without bf16 train alike. lr 1e-4 barely moves the weights (~11% vs 52-63% here).
SWEPT = {"seed": 0, "threads": 1, "train": {"lr": 0.02, "momentum": 0.9, "epochs": 2, "precision": "fp32"}}
SWEEPS = (("train.lr=0.02,0.0001", "3"), ("evaluate.batch_size=100", "3,4"))  # (--grid, --seeds) of each sweep


@pytest.fixture(scope="session")
def swept(tmp_path_factory, mirror) -> Path:
    """One DVC repository of real experiments, built once per session for tests/test_experiments.py,
    test_flips.py, test_parallel_experiments.py and test_champion.py: tracking on (the sqlite store in the
    repo root), HEAD lr 0.02 with its data prepared, and eight experiments, every stage run and logged, from two
    sweeps (tools.sweep, queued, two jobs at a time): lr 0.02 and 1e-4 with seeds 0, 1 and 2, then
    evaluate.batch_size 100 (the same training, evaluated in other batches) with seeds 3 and 4. Three seeds a
    side: Welch's interval with two spans ±12.7 SE. Read only: a test that changes anything works on
    copy_repo(swept, ...)."""
    def build(folder):
        make_dvc_repo(folder, {**SWEPT, "data": {"mirrors": [str(mirror)]}, "tracking": {"enabled": True, "uri": ""}})
        sh(folder, "dvc", "repro", "preprocess")
        sh(folder, "git", "add", "-A")
        sh(folder, "git", "commit", "-qm", "data")
        for grid, seeds in SWEEPS:
            result = subprocess.run([sys.executable, "-m", "tools.sweep", "--set", "threads=1", "--grid", grid,
                                     "--seeds", seeds, "--jobs", "2"], cwd=folder, env=tool_env(),
                                    capture_output=True, text=True, timeout=1800)
            assert result.returncode == 0, result.stdout + result.stderr

    return built_once(tmp_path_factory, "swept", build)


def copy_repo(source: Path, folder: Path) -> Path:
    """A copy of a DVC repository to change, with its MLflow store: the sqlite store names the runs' artifacts
    by absolute path (file:///.../mlartifacts/...), and in the copy's store they name the copy's. The queue's
    state and DVC's locks (.dvc/tmp) stay behind."""
    import sqlite3

    shutil.copytree(source, folder, symlinks=True,
                    ignore=lambda where, names: ["tmp"] if Path(where) == source / ".dvc" else [])
    if (folder / "mlflow.db").exists():
        old, new = str(source.resolve()), str(folder.resolve())
        db = sqlite3.connect(folder / "mlflow.db")
        try:
            for (table,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall():
                for column in [row[1] for row in db.execute(f'PRAGMA table_info("{table}")').fetchall()]:
                    db.execute(f'UPDATE "{table}" SET "{column}" = replace("{column}", ?, ?) '
                               f'WHERE typeof("{column}") = \'text\' AND instr("{column}", ?) > 0', (old, new, old))
            db.commit()
            assert old not in "\n".join(db.iterdump()), f"{folder / 'mlflow.db'} still names {old}"
        finally:
            db.close()
    return folder


@pytest.fixture
def serve_folder():
    """Start a static HTTP server on 127.0.0.1 for a folder; returns its base URL. Stopped after the test."""
    import functools
    import http.server
    import threading

    servers = []

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    def start(folder: Path) -> str:
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(folder)))
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        servers.append((server, thread))
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield start
    for server, thread in servers:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
