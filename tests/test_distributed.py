"""torchrun + DistributedDataParallel on CPU (gloo): two processes train like one, write like one, and
their checkpoints resume in a single process."""
import json
import shutil

import pytest
import torch

from conftest import run_stage, write_params
from stages.lib.modelfile import load_model


@pytest.mark.slow
def test_two_gloo_processes_train_like_one_and_resume_in_one(trained_project, tmp_path):
    folder = tmp_path / "ddp"
    folder.mkdir()
    shutil.copytree(trained_project / "data", folder / "data")
    write_params(folder, {"train": {"nproc": 2}})
    result = run_stage(folder, "train")
    assert result.returncode == 0, result.stderr
    assert "2 processes" in result.stdout and result.stdout.count("wrote models/model.pt") == 1

    single = json.loads((trained_project / "metrics/train.json").read_text())
    ddp = json.loads((folder / "metrics/train.json").read_text())
    # The same global batches, gradients averaged over two halves: the tutorial net (no BatchNorm)
    # ends where one process ends, up to float rounding.
    assert ddp["train_loss"] == pytest.approx(single["train_loss"], rel=1e-3)
    assert abs(ddp["val_accuracy"] - single["val_accuracy"]) <= 0.02
    assert json.loads((folder / "metrics/train_env.json").read_text())["processes"] == 2
    model, ckpt = load_model(folder / "models/model.pt")  # a plain single-process model file
    assert not any(key.startswith("module.") for key in ckpt.state_dict)
    assert model(torch.zeros(1, 1, 32, 32)).shape == (1, 10)

    write_params(folder, {"train": {"nproc": 1, "epochs": 2}})
    resumed = run_stage(folder, "train")
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from models/checkpoint.pt after epoch 1" in resumed.stdout
    assert json.loads((folder / "metrics/train.json").read_text())["epochs"] == 2
