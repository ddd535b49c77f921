"""train.keep (the best epoch or the last) and train.patience (early stopping), on real training runs."""
import csv
import json
import shutil
import signal

import pytest
import torch

from conftest import run_stage, write_params
from stages.lib.modelfile import read_torch_file
from stages.lib.training import best_row, kept_row

# A noisy run (high lr, momentum) of 3 epochs of 8 SGD steps (500 images, batches of 64): its best epoch
# may be any of the three, so the tests hold whichever it is.
NOISY = {"train": {"epochs": 3, "lr": 0.05, "momentum": 0.9}}


def test_best_row_prefers_accuracy_then_loss_then_the_earlier_epoch():
    rows = [{"epoch": 1, "val_accuracy": 0.5, "val_loss": 1.0}, {"epoch": 2, "val_accuracy": 0.7, "val_loss": 0.9},
            {"epoch": 3, "val_accuracy": 0.7, "val_loss": 0.8}, {"epoch": 4, "val_accuracy": 0.7, "val_loss": 0.8},
            {"epoch": 5, "val_accuracy": 0.6, "val_loss": 0.5}]
    assert best_row(rows)["epoch"] == 3
    assert best_row([{"epoch": 1, "val_accuracy": None, "val_loss": None}, *rows[:2]])["epoch"] == 2  # train.val_every
    assert kept_row(rows, "best")["epoch"] == 3 and kept_row(rows, "last")["epoch"] == 5


def trained(prepared_project, folder, overrides, env=None):
    shutil.copytree(prepared_project, folder)
    write_params(folder, overrides)
    result = run_stage(folder, "train", env=env)
    return folder, result


def weights(folder):
    return read_torch_file(folder / "models/model.pt")["state_dict"]


@pytest.fixture(scope="module")
def keep_best(prepared_project, tmp_path_factory):
    folder, result = trained(prepared_project, tmp_path_factory.mktemp("keep") / "best", NOISY)
    assert result.returncode == 0, result.stderr
    return folder


def test_keep_best_writes_the_best_epochs_weights_and_says_so(keep_best, prepared_project, tmp_path):
    """The model file of keep: best is, bit for bit, the model of a run that stopped at the best epoch
    (a constant lr: the first k epochs of any run are the same), and train.json names that epoch."""
    history = [{"epoch": int(r["epoch"]), "val_accuracy": float(r["val_accuracy"]), "val_loss": float(r["val_loss"])}
               for r in csv.DictReader((keep_best / "metrics/train_history.csv").open())]
    best = best_row(history)["epoch"]
    summary = json.loads((keep_best / "metrics/train.json").read_text())
    assert summary["epochs"] == 3 and summary["kept_epoch"] == best and summary["stopped_early"] is False
    assert summary["val_accuracy"] == history[best - 1]["val_accuracy"]
    model_file = read_torch_file(keep_best / "models/model.pt")
    assert model_file["epoch"] == best and model_file["val_metrics"]["epoch"] == best

    short, result = trained(prepared_project, tmp_path / "short",
                            {"train": {**NOISY["train"], "epochs": best, "keep": "last"}})
    assert result.returncode == 0, result.stderr
    a, b = weights(keep_best), weights(short)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_keep_best_resumed_after_sigkill_ends_bit_for_bit(keep_best, prepared_project, tmp_path):
    """Killed in epoch 3 (step 20 of 24): the rerun resumes after epoch 2 with the best weights so far
    from the checkpoint and writes the same model file as the uninterrupted run."""
    killed, result = trained(prepared_project, tmp_path / "killed", NOISY, env={"TUDUI_FAULT": "sigkill@step=20"})
    assert result.returncode == -signal.SIGKILL
    (checkpoint,) = killed.glob(".resume/*/checkpoint.pt")
    assert read_torch_file(checkpoint)["epoch"] == 2 and "best_state" in read_torch_file(checkpoint)
    rerun = run_stage(killed, "train")
    assert rerun.returncode == 0 and "after epoch 2" in rerun.stdout, rerun.stderr
    a, b = weights(keep_best), weights(killed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (killed / "metrics/train.json").read_text() == (keep_best / "metrics/train.json").read_text()


def test_patience_stops_when_validation_stops_improving(prepared_project, tmp_path):
    """An lr too small to move a float32 weight: every epoch validates the same, so epoch 1 stays the best
    and patience 1 stops the run after epoch 2 of 5, keeping epoch 1."""
    folder, result = trained(prepared_project, tmp_path / "patience",
                             {"train": {"epochs": 5, "lr": 1e-12, "patience": 1}})
    assert result.returncode == 0, result.stderr
    assert "stopping early: no better validation accuracy in 1 epochs" in result.stdout
    summary = json.loads((folder / "metrics/train.json").read_text())
    assert (summary["epochs"], summary["stopped_early"], summary["kept_epoch"]) == (2, True, 1)
    assert read_torch_file(folder / "models/model.pt")["epoch"] == 1
    rerun = run_stage(folder, "train")  # a stopped run is complete: it is not resumed into epoch 3
    assert rerun.returncode == 0 and "stopped early after epoch 2" in rerun.stdout, rerun.stderr
    assert json.loads((folder / "metrics/train.json").read_text())["epochs"] == 2


def test_keep_best_with_train_on_val_is_refused_before_training(prepared_project, tmp_path):
    folder = tmp_path / "refused"
    shutil.copytree(prepared_project, folder)
    write_params(folder, {"train": {"train_on_val": True, "keep": "best"}})
    result = run_stage(folder, "train")
    assert result.returncode == 2 and "set train.keep: last" in result.stderr.strip().splitlines()[-1]
    assert not (folder / "models").exists()


@pytest.mark.parametrize("overrides", [{"keep": "best"}, {"keep": "last", "patience": 2}], ids=["best", "patience"])
def test_keep_best_and_patience_without_every_validation_are_refused(prepared_project, tmp_path, overrides):
    shutil.copytree(prepared_project, tmp_path / "p")
    write_params(tmp_path / "p", {"train": {"val_every": 0, **overrides}})
    result = run_stage(tmp_path / "p", "train")
    assert result.returncode == 2 and "set train.val_every: 1" in result.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "p/models").exists()
