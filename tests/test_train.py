"""The train stage: outputs, learning, resume, and the metrics files that dvc reads."""
import copy
import csv
import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import make_params, merge, run_stage, write_params
from stages.lib.modelfile import FORMAT, read_torch_file
from stages.lib.prepared import load_meta, load_split
from stages.lib.device import resolve_device
from stages.lib.errors import PipelineError
from stages.lib.modelfile import load_checkpoint
from stages.lib.training import fit
from stages.train import fingerprint


def test_train_outputs(trained_project):
    model = torch.load(trained_project / "models/model.pt", weights_only=True)
    assert model["format"] == FORMAT and model["epoch"] == 1
    assert model["model"] == {"name": "cifar10_quick", "in_channels": 1, "input_size": [32, 32], "num_classes": 10}
    assert model["classes"][9] == "Ankle boot" and len(model["normalization"]["mean"]) == 1
    assert model["input"] == {"channels": 1, "size": [28, 28], "pad_to": [32, 32], "resize": "stretch"}
    assert model["params"]["train"]["lr"] == 0.01 and "optimizer" not in model

    metrics = json.loads((trained_project / "metrics/train.json").read_text())
    assert {"epochs", "train_loss", "val_loss", "val_accuracy"} <= set(metrics)
    assert 0 <= metrics["val_accuracy"] <= 1 and metrics["epochs"] == 1
    rows = list(csv.DictReader((trained_project / "metrics/train_history.csv").open()))
    assert [r["epoch"] for r in rows] == ["1"] and float(rows[0]["val_accuracy"]) == metrics["val_accuracy"]
    speed = json.loads((trained_project / "metrics/train_time.json").read_text())
    assert {"seconds", "images_per_s"} <= set(speed) and speed["images_per_s"] > 0
    assert all(isinstance(value, (int, float)) for value in speed.values())  # numbers only: metrics
    env = json.loads((trained_project / "metrics/train_env.json").read_text())
    assert env == {"device": "cpu", "precision": env["precision"], "threads": env["threads"], "processes": 1}

    checkpoint = read_torch_file(trained_project / "models/checkpoint.pt")
    assert checkpoint["epoch"] == 1 and "optimizer" in checkpoint and checkpoint["fingerprint"]


def test_tensorboard_log_has_the_tutorial_contents(trained_project):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(trained_project / "logs"), size_guidance={"images": 0}).Reload()
    tags = events.Tags()
    assert {"val/loss", "val/accuracy", "train/epoch_loss"} <= set(tags["scalars"])
    assert tags["images"] == ["train/batch"] and tags["graph"]


def small_data(folder, n_train):
    meta = load_meta(folder / "data/prepared")
    train_x, train_y = load_split("train", folder / "data/prepared")
    data = {"train": (train_x[:n_train], train_y[:n_train]), "val": load_split("val", folder / "data/prepared")}
    return meta, data


def test_training_learns(prepared_project):
    meta, data = small_data(prepared_project, 500)
    params = make_params({"train": {"epochs": 3, "lr": 0.05, "momentum": 0.9}})
    history = list(fit(params, meta, data, torch.device("cpu")))[-1].checkpoint["history"]
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert history[-1]["val_accuracy"] > 0.5  # chance is 0.1


FAST = {"model": {"name": "fast_cnn", "tta_flip": True, "whiten": True},
        "train": {"schedule": "onecycle", "momentum": 0.9, "nesterov": True, "label_smoothing": 0.1, "ema": 0.9,
                  "lr": 0.02}}


@pytest.mark.parametrize("overrides", [{}, {"train": {"augment_crop": 4, "augment_flip": True}}, FAST],
                         ids=["plain", "augmented", "fast-recipe"])
def test_resumed_run_equals_uninterrupted_run(prepared_project, overrides):
    meta, data = small_data(prepared_project, 200)
    params = make_params(merge({"train": {"epochs": 2, "momentum": 0.9}}, overrides))
    saved, a = [], None
    for a in fit(params, meta, data, torch.device("cpu")):
        saved.append(copy.deepcopy(a.checkpoint))  # its tensors are the live model's
    assert [ckpt["epoch"] for ckpt in saved] == [1, 2]

    b = list(fit(params, meta, data, torch.device("cpu"), resume=saved[0]))

    assert len(b) == 1 and b[-1].checkpoint["history"] == a.checkpoint["history"]
    for (name, x), y in zip(a.model.state_dict().items(), b[-1].model.state_dict().values()):
        assert torch.equal(x, y), name


def test_whitened_first_conv_is_the_training_images_whitening_and_stays_so(prepared_project):
    from stages.lib.nets import WHITEN_IMAGES, whitening_filters
    from stages.lib.transforms import Preprocess

    meta, data = small_data(prepared_project, 200)
    last = list(fit(make_params(merge(FAST, {"train": {"epochs": 2}})), meta, data, torch.device("cpu")))[-1]
    shape = meta["input_shape"][1:]
    images = Preprocess(shape, shape, meta["mean"], meta["std"])(data["train"][0][:WHITEN_IMAGES])
    conv = last.model.net.features[0]
    assert not conv.weight.requires_grad
    filters = whitening_filters(images)
    assert torch.equal(conv.weight[:18], torch.cat([filters, -filters]))  # 2 epochs of SGD left it as it started
    assert last.checkpoint["history"][-1]["val_accuracy"] > 0.3  # the net above it learned (chance is 0.1)


def test_val_every_skips_validation_passes_and_changes_no_weight(prepared_project):
    meta, data = small_data(prepared_project, 200)
    every = list(fit(make_params({"train": {"epochs": 3, "momentum": 0.9}}), meta, data, torch.device("cpu")))[-1]
    params = make_params({"train": {"epochs": 3, "momentum": 0.9, "val_every": 2, "keep": "last"}})
    some = list(fit(params, meta, data, torch.device("cpu")))[-1]
    validated = [row["epoch"] for row in some.checkpoint["history"] if row["val_accuracy"] is not None]
    assert validated == [2, 3]  # every 2nd epoch and the last
    assert some.checkpoint["history"][0] == {**every.checkpoint["history"][0], "val_loss": None, "val_accuracy": None}
    assert some.checkpoint["history"][1:] == every.checkpoint["history"][1:]
    assert all(torch.equal(x, y) for x, y in zip(every.model.state_dict().values(), some.model.state_dict().values()))


def test_a_run_resumed_with_another_val_every_goes_on(prepared_project):
    """train.val_every is not part of the resume fingerprint: a run stopped after unvalidated epochs resumes
    with validation after every epoch, and its earlier rows stay as they were."""
    meta, data = small_data(prepared_project, 200)
    base = {"epochs": 3, "momentum": 0.9, "keep": "last"}
    first = next(iter(fit(make_params({"train": {**base, "val_every": 0}}), meta, data, torch.device("cpu"))))
    params = make_params({"train": {**base, "val_every": 1}})
    assert fingerprint(params, meta) == fingerprint(make_params({"train": {**base, "val_every": 0}}), meta)
    rows = list(fit(params, meta, data, torch.device("cpu"), resume=first.checkpoint))[-1].checkpoint["history"]
    assert [row["val_accuracy"] is None for row in rows] == [True, False, False]


def test_constant_lr_runs_continue_with_more_epochs(prepared_project):
    """With the tutorial's constant lr, a 1-epoch run resumed to 2 epochs equals a 2-epoch run."""
    meta, data = small_data(prepared_project, 200)
    a = list(fit(make_params({"train": {"epochs": 2}}), meta, data, torch.device("cpu")))[-1]
    one = list(fit(make_params({"train": {"epochs": 1}}), meta, data, torch.device("cpu")))[-1]
    b = list(fit(make_params({"train": {"epochs": 2}}), meta, data, torch.device("cpu"), resume=one.checkpoint))[-1]
    assert b.checkpoint["history"] == a.checkpoint["history"]
    assert all(torch.equal(x, y) for x, y in zip(a.model.state_dict().values(), b.model.state_dict().values()))


def test_fast_recipe_model_file_holds_the_averaged_weights(prepared_project, tmp_path):
    shutil.copytree(prepared_project / "data", tmp_path / "data")
    write_params(tmp_path, merge(FAST, {"train": {"epochs": 2}}))
    result = run_stage(tmp_path, "train")
    assert result.returncode == 0, result.stderr
    final = torch.load(tmp_path / "models/model.pt", weights_only=True)
    ckpt = torch.load(tmp_path / "models/checkpoint.pt", weights_only=True)
    assert final["model"]["tta_flip"] and final["model"]["widths"] == [32, 64, 128]
    assert all(torch.equal(final["state_dict"][k], v) for k, v in ckpt["average"]["weights"].items())
    assert not torch.equal(final["state_dict"]["net.head.weight"], ckpt["state_dict"]["net.head.weight"])
    assert json.loads((tmp_path / "metrics/train.json").read_text())["val_accuracy"] > 0.25  # chance: 0.1


def test_train_stage_validating_only_the_last_epoch(prepared_project, tmp_path):
    shutil.copytree(prepared_project / "data", tmp_path / "data")
    write_params(tmp_path, {"train": {"epochs": 2, "val_every": 0, "train_on_val": True, "keep": "last"},
                            "tracking": {"enabled": False}})
    result = run_stage(tmp_path, "train")
    assert result.returncode == 0, result.stderr
    assert "epoch 1/2  train_loss" in result.stdout and "(not validated: train.val_every)" in result.stdout
    with open(tmp_path / "metrics/train_history.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["epoch"], r["val_accuracy"] == "") for r in rows] == [("1", True), ("2", False)]
    summary = json.loads((tmp_path / "metrics/train.json").read_text())
    assert summary["kept_epoch"] == 2 and summary["val_accuracy"] == float(rows[1]["val_accuracy"])


def test_checkpoint_from_other_settings_is_not_resumed(prepared_project, tmp_path):
    meta = load_meta(prepared_project / "data/prepared")
    params = make_params()
    messages = []
    path = tmp_path / "checkpoint.pt"
    torch.save({"format": FORMAT, "model": {}, "state_dict": {}, "fingerprint": fingerprint(params, meta), "epoch": 1},
               path)
    assert load_checkpoint(path, fingerprint(params, meta), 3, messages.append)["epoch"] == 1
    other = make_params({"train": {"lr": 0.5}})
    assert load_checkpoint(path, fingerprint(other, meta), 3, messages.append) is None
    assert load_checkpoint(path, fingerprint(params, meta), 1, messages.append) is None
    assert "other settings" in messages[1] and "already has 1 epochs" in messages[2]
    path.write_bytes(b"half a checkpoint")
    assert load_checkpoint(path, fingerprint(params, meta), 3, messages.append) is None
    assert "not a readable PyTorch file" in messages[3] and messages[3].endswith("starting over")
    assert fingerprint(make_params({"train": {"log_every": 7, "epochs": 9}}), meta) == fingerprint(params, meta)


def test_cuda_without_a_gpu_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert resolve_device("auto").type == "cpu"
    with pytest.raises(PipelineError, match="CUDA is not available"):
        resolve_device("cuda")


def test_missing_imagenet_weights_stop_train_before_it_writes_anything(prepared_project, tmp_path, monkeypatch):
    shutil.copytree(prepared_project / "data", tmp_path / "data")
    write_params(tmp_path, {"model": {"name": "resnet18", "pretrained": True}})
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    result = run_stage(tmp_path, "train")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"resnet18-f37072fd.pth is not in {tmp_path / 'torch/hub/checkpoints'}" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "params.yaml"]


def test_train_without_prepared_data_says_what_to_run(tmp_path):
    write_params(tmp_path)
    result = run_stage(tmp_path, "train")
    assert result.returncode == 2
    assert "run the preprocess stage first" in result.stderr and "Traceback" not in result.stderr


def process_state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


@pytest.mark.slow
def test_metrics_follow_a_running_training_and_a_failed_one_puts_them_back(prepared_project, tmp_path):
    """train rewrites its metrics files after every epoch, so `dvc exp show` and `dvc plots` follow a
    running experiment: stopped (SIGSTOP, TUDUI_FAULT) in epoch 2, the files hold epoch 1. A training
    that then fails puts the files of the previous run back: they describe models/model.pt."""
    import signal
    import subprocess
    import sys
    import time

    from conftest import REPO, clean_env

    folder = tmp_path / "live"
    shutil.copytree(prepared_project, folder)
    write_params(folder, {"train": {"epochs": 3}})
    before = run_stage(folder, "train")  # a finished run: its metrics describe models/model.pt
    assert before.returncode == 0, before.stderr
    finished = {name: (folder / name).read_bytes() for name in ("metrics/train.json", "metrics/train_history.csv")}

    write_params(folder, {"train": {"epochs": 3, "lr": 0.02}})
    training = subprocess.Popen([sys.executable, "-m", "stages.train"], cwd=folder, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True,
                                env=clean_env(PYTHONPATH=str(REPO), TUDUI_FAULT="sigstop@step=12"))  # 8 steps an epoch
    try:
        deadline = time.time() + 600  # a safety net for a hung process, not a timing assumption
        while process_state(training.pid) != "T":
            assert training.poll() is None, training.communicate()
            assert time.time() < deadline, "training never reached step 12"
            time.sleep(0.2)
        rows = list(csv.DictReader((folder / "metrics/train_history.csv").open()))
        assert [row["epoch"] for row in rows] == ["1"]
        assert json.loads((folder / "metrics/train.json").read_text())["epochs"] == 1
        training.send_signal(signal.SIGINT)  # delivered on SIGCONT: the training fails
        training.send_signal(signal.SIGCONT)
        _, stderr = training.communicate(timeout=600)
    finally:
        if training.poll() is None:
            training.kill()
    assert training.returncode == 130, stderr
    for name, content in finished.items():
        assert (folder / name).read_bytes() == content, name


def test_train_on_val_fits_every_labelled_image(prepared_project, tmp_path):
    from stages.lib.prepared import training_images

    x, y = torch.zeros(5, 1, 2, 2), torch.arange(5)
    vx, vy = torch.ones(2, 1, 2, 2), torch.tensor([7, 8])
    assert training_images({"train": (x, y), "val": (vx, vy)}, False) == (x, y)
    both = training_images({"train": (x, y), "val": (vx, vy)}, True)
    assert torch.equal(both[1], torch.tensor([0, 1, 2, 3, 4, 7, 8])) and both[0][5:].eq(1).all()

    shutil.copytree(prepared_project / "data", tmp_path / "data")
    write_params(tmp_path, {"train": {"train_on_val": True, "keep": "last"}})  # SMALL: 600 images, 100 of them val
    result = run_stage(tmp_path, "train")
    assert result.returncode == 0, result.stderr
    assert "600 train / 100 val images" in result.stdout
