"""The real `dvc repro` in a fresh git + dvc repository made from this checkout, with a shrunk config."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO, write_params

DVC = str(Path(sys.executable).with_name("dvc"))


def sh(folder, *args, timeout=600):
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    result = subprocess.run(args, cwd=folder, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{args}: {result.stdout}\n{result.stderr}"
    return result.stdout + result.stderr


@pytest.fixture(scope="module")
def repo(tmp_path_factory, mirror):
    folder = tmp_path_factory.mktemp("repo")
    shutil.copytree(REPO / "stages", folder / "stages", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "dvc.yaml", folder)
    write_params(folder)
    sh(folder, "git", "init", "-q")
    sh(folder, DVC, "init", "-q")
    sh(folder, DVC, "config", "core.analytics", "false")
    return folder


@pytest.mark.slow
def test_dvc_repro_builds_everything_then_is_up_to_date(repo):
    out = sh(repo, DVC, "repro")
    for stage in ("download", "preprocess", "train", "evaluate", "export"):
        assert f"Running stage '{stage}'" in out
    for path in ("data/raw/fashion_mnist/train-images-idx3-ubyte.gz", "data/prepared/train.pt", "models/model.pt",
                 "models/checkpoint.pt", "models/export/model.onnx", "models/export/state_dict.pt",
                 "models/export/MODEL_CARD.md", "metrics/confusion.csv", "metrics/train_history.csv", "dvc.lock"):
        assert (repo / path).is_file(), path
    assert any((repo / "logs").glob("events.out.tfevents.*"))
    metrics = json.loads(sh(repo, DVC, "metrics", "show", "--json"))
    flat = json.dumps(metrics)
    for key in ("test_accuracy", "val_accuracy", "onnx_max_abs_diff"):
        assert key in flat
    assert torch.load(repo / "models/model.pt", weights_only=True)["epoch"] == 1
    # DVC-tracked outputs are git-ignored; metrics files are left for git.
    ignored = (repo / "data/.gitignore").read_text() + (repo / "models/.gitignore").read_text()
    assert "/prepared" in ignored and "/model.pt" in ignored and "/export" in ignored
    assert not (repo / "metrics/.gitignore").exists()

    assert "Data and pipelines are up to date." in sh(repo, DVC, "repro")


@pytest.mark.slow
def test_changing_lr_reruns_only_train_evaluate_export(repo):
    sh(repo, DVC, "repro")
    text = (repo / "params.yaml").read_text().replace("lr: 0.01", "lr: 0.02")
    (repo / "params.yaml").write_text(text)
    assert "train" in sh(repo, DVC, "status")
    out = sh(repo, DVC, "repro")
    assert "Stage 'download' didn't change, skipping" in out
    assert "Stage 'preprocess' didn't change, skipping" in out
    for stage in ("train", "evaluate", "export"):
        assert f"Running stage '{stage}'" in out
    assert torch.load(repo / "models/model.pt", weights_only=True)["params"]["train"]["lr"] == 0.02
