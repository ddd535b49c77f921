"""Shared fixtures: small projects made from the real params.yaml with a shrunk config."""
from __future__ import annotations

import copy
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
MIRROR = Path("/usr/share/datasets/fashion-mnist")

# A few hundred images and one epoch: every stage runs for real, in seconds.
SMALL = {
    "preprocess": {"val_size": 100, "max_train": 600, "max_test": 200},
    "train": {"epochs": 1, "device": "cpu"},
    "export": {"onnx_check_images": 32},
}


def merge(base: dict, overrides: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in overrides.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def make_params(overrides: dict | None = None) -> dict:
    real = yaml.safe_load((REPO / "params.yaml").read_text())
    return merge(merge(real, SMALL), overrides or {})


def write_params(folder: Path, overrides: dict | None = None) -> dict:
    params = make_params(overrides)
    (folder / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return params


def run_stage(folder: Path, module: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run `python -m stages.<module>` in `folder` the way dvc does, with this checkout on the path."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", f"stages.{module}", *args], cwd=folder, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session")
def mirror() -> Path:
    """The Fashion-MNIST files from Debian's dataset-fashion-mnist (CI installs it)."""
    if not (MIRROR / "train-images-idx3-ubyte.gz").exists():
        message = f"{MIRROR} is missing: apt-get install dataset-fashion-mnist"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return MIRROR


@pytest.fixture(scope="session")
def prepared_project(tmp_path_factory, mirror) -> Path:
    """A folder with params.yaml, data/raw and data/prepared from the real download and preprocess."""
    folder = tmp_path_factory.mktemp("prepared")
    write_params(folder, {"data": {"mirrors": [str(mirror)]}})
    for stage in ("download", "preprocess"):
        result = run_stage(folder, stage)
        assert result.returncode == 0, result.stderr
    return folder


@pytest.fixture(scope="session")
def trained_project(tmp_path_factory, prepared_project) -> Path:
    """prepared_project plus train, evaluate and export, run as dvc would run them."""
    folder = tmp_path_factory.mktemp("trained")
    shutil.copytree(prepared_project, folder, dirs_exist_ok=True)
    for stage in ("train", "evaluate", "export"):
        result = run_stage(folder, stage)
        assert result.returncode == 0, f"{stage}: {result.stderr}"
    return folder
