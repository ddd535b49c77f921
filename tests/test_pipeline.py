"""The real `dvc repro` in a fresh git + dvc repository made from this checkout, with a shrunk config."""
import json

import pytest
import torch

from conftest import make_dvc_repo, sh


@pytest.fixture(scope="module")
def repo(tmp_path_factory, mirror):
    return make_dvc_repo(tmp_path_factory.mktemp("repo"))


@pytest.mark.slow
def test_dvc_repro_builds_everything_then_is_up_to_date(repo):
    out = sh(repo, "dvc", "repro")
    for stage in ("download", "preprocess", "train", "evaluate", "export"):
        assert f"Running stage '{stage}'" in out
    for path in ("data/raw/fashion_mnist/train-images-idx3-ubyte.gz", "data/prepared/train.pt", "models/model.pt",
                 "models/checkpoint.pt", "models/export/model.onnx", "models/export/state_dict.pt",
                 "models/export/MODEL_CARD.md", "metrics/confusion.csv", "metrics/train_history.csv", "dvc.lock"):
        assert (repo / path).is_file(), path
    assert any((repo / "logs").glob("events.out.tfevents.*"))
    metrics = json.loads(sh(repo, "dvc", "metrics", "show", "--json", stdout_only=True))
    flat = json.dumps(metrics)
    for key in ("test_accuracy", "val_accuracy", "onnx_max_abs_diff"):
        assert key in flat
    assert torch.load(repo / "models/model.pt", weights_only=True)["epoch"] == 1
    # DVC-tracked outputs are git-ignored; metrics files are left for git.
    ignored = (repo / "data/.gitignore").read_text() + (repo / "models/.gitignore").read_text()
    assert "/prepared" in ignored and "/model.pt" in ignored and "/export" in ignored
    assert not (repo / "metrics/.gitignore").exists()

    assert "Data and pipelines are up to date." in sh(repo, "dvc", "repro")


@pytest.mark.slow
def test_changing_lr_reruns_only_train_evaluate_export(repo):
    sh(repo, "dvc", "repro")
    text = (repo / "params.yaml").read_text().replace("lr: 0.01", "lr: 0.02")
    (repo / "params.yaml").write_text(text)
    assert "train" in sh(repo, "dvc", "status")
    out = sh(repo, "dvc", "repro")
    assert "Stage 'download' didn't change, skipping" in out
    assert "Stage 'preprocess' didn't change, skipping" in out
    for stage in ("train", "evaluate", "export"):
        assert f"Running stage '{stage}'" in out
    assert torch.load(repo / "models/model.pt", weights_only=True)["params"]["train"]["lr"] == 0.02


@pytest.mark.slow
def test_forced_rerun_is_bit_for_bit(repo):
    import yaml

    def snapshot():
        lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
        outs = {out["path"]: out["md5"] for stage in lock.values() for out in stage.get("outs", [])}
        metrics = {name: (repo / "metrics" / name).read_text()
                   for name in ("train.json", "train_history.csv", "eval.json", "confusion.csv")}
        return outs, metrics

    sh(repo, "dvc", "repro")
    before = snapshot()
    out = sh(repo, "dvc", "repro", "--force")
    assert "Running stage 'download'" in out and "Running stage 'train'" in out
    after = snapshot()
    assert after[1] == before[1]
    for path in ("data/raw", "data/prepared", "models/model.pt"):
        assert after[0][path] == before[0][path], path
