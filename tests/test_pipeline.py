"""The real `dvc repro` in a fresh git + dvc repository made from this checkout, with a shrunk config."""
import json
import re
import subprocess
import time

import pytest
import torch

from conftest import GIT_ENV, clean_env, make_dvc_repo, sh, venv_path


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
                 "models/export/MODEL_CARD.md", "metrics/predictions.csv", "metrics/train_history.csv", "dvc.lock"):
        assert (repo / path).is_file(), path
    assert any((repo / "logs").glob("events.out.tfevents.*"))
    metrics = json.loads(sh(repo, "dvc", "metrics", "show", "--json", stdout_only=True))
    flat = json.dumps(metrics)
    for key in ("test_accuracy", "val_accuracy"):
        assert key in flat
    assert "onnx_max_abs_diff" not in flat  # metrics/export.json is a plain output, not a metric
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
                   for name in ("train.json", "train_history.csv", "eval.json", "predictions.csv")}
        return outs, metrics

    sh(repo, "dvc", "repro")
    before = snapshot()
    out = sh(repo, "dvc", "repro", "--force")
    assert "Running stage 'download'" in out and "Running stage 'train'" in out
    after = snapshot()
    assert after[1] == before[1]
    for path in ("data/raw", "data/prepared", "models/model.pt", "models/export"):
        assert after[0][path] == before[0][path], path


def snapshot_outputs(repo) -> dict:
    """Every file under data/, models/, logs/ and metrics/ with its bytes' md5."""
    import hashlib

    return {str(p.relative_to(repo)): hashlib.md5(p.read_bytes()).hexdigest()
            for top in ("data", "models", "logs", "metrics") for p in sorted((repo / top).rglob("*")) if p.is_file()}


def stopped_child(process: subprocess.Popen, timeout: float = 600):
    """The descendant of `process` stopped at its TUDUI_FAULT=sigstop@... point (polled, with a deadline)."""
    import psutil

    deadline = time.monotonic() + timeout
    while True:
        for child in psutil.Process(process.pid).children(recursive=True):
            if child.status() == psutil.STATUS_STOPPED:
                return child
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "no stage reached its stop point"
        time.sleep(0.05)


@pytest.mark.slow
def test_params_changed_during_a_run_are_never_recorded(repo):
    """A `dvc exp run -S` sent while `dvc repro` trains is refused by DVC, but it has already rewritten
    params.yaml; the training notices when it ends, writes nothing, and dvc.lock keeps pairing the old
    outputs with the old params."""
    sh(repo, "dvc", "repro")
    committed, lock = (repo / "params.yaml").read_text(), (repo / "dvc.lock").read_text()
    before = snapshot_outputs(repo)
    try:
        (repo / "params.yaml").write_text(re.sub(r"\blr: \S+", "lr: 0.015", committed, count=1))  # train reruns
        env = clean_env(**GIT_ENV, PATH=venv_path(),
                        TUDUI_FAULT="sigstop@step=3")
        process = subprocess.Popen(["dvc", "repro"], cwd=repo, env=env, text=True, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT)
        stage = stopped_child(process)
        refused = sh(repo, "dvc", "exp", "run", "-S", "train.lr=0.03", check=False)
        assert "failed to reproduce" in refused and "rwlock" in refused  # DVC: the outputs are in use
        assert "lr: 0.03" in (repo / "params.yaml").read_text()  # DVC rewrote it before refusing
        stage.resume()
        out, _ = process.communicate(timeout=900)
        assert process.returncode != 0
        assert "error: params.yaml changed while train ran (train.lr 0.015 -> 0.03): nothing was written" in out
        assert snapshot_outputs(repo) == before and (repo / "dvc.lock").read_text() == lock
        assert "train" in sh(repo, "dvc", "status")
    finally:
        (repo / "params.yaml").write_text(committed)
    assert "Data and pipelines are up to date." in sh(repo, "dvc", "repro")


@pytest.fixture
def corrupt_zip(tmp_path):
    path = tmp_path / "photos.zip"
    path.write_bytes(b"PK\x03\x04 this is not really a zip archive")
    return path


@pytest.mark.slow
def test_a_failed_run_leaves_every_output_as_it_was(repo, corrupt_zip, tmp_path):
    """Bad params, a missing or corrupt file, an offline source, a split too large for the data: each
    `dvc repro` fails with one line and leaves data/, models/ and metrics/ byte for byte as they were."""
    from conftest import free_port, write_params

    sh(repo, "dvc", "repro")
    before = snapshot_outputs(repo)
    assert any(path.startswith("data/raw/") for path in before) and "models/model.pt" in before
    offline = f"http://127.0.0.1:{free_port()}/photos.zip"  # nothing listens there
    bad_inputs = {
        "negative lr": ({"train": {"lr": -0.1}}, "train.lr must be > 0"),
        "diverged": ({"train": {"lr": 1000.0}}, "training diverged"),
        "unknown data set": ({"data": {"dataset": "imagenet"}}, "data.dataset must be one of"),
        "missing file": ({"data": {"dataset": "imagefolder", "source": str(tmp_path / "nope.zip")}},
                         "is neither a folder, a file nor an http(s) URL"),
        "corrupt file": ({"data": {"dataset": "imagefolder", "source": str(corrupt_zip)}}, "neither a zip nor a tar"),
        "offline source": ({"data": {"dataset": "imagefolder", "source": offline, "timeout_s": 5.0}},
                           f"could not get {offline}"),
        "split too large": ({"preprocess": {"val_size": 10_000_000}}, "must be smaller than the"),
    }
    committed = (repo / "params.yaml").read_text()
    try:
        for case, (overrides, message) in bad_inputs.items():
            write_params(repo, overrides)
            out = sh(repo, "dvc", "repro", check=False)
            assert message in out, f"{case}: {out}"
            assert snapshot_outputs(repo) == before, case
        (repo / "params.yaml").write_text(committed)
        out = sh(repo, "dvc", "exp", "run", "-S", "train.lr=-0.1", check=False)
        assert "train.lr must be > 0" in out
        assert snapshot_outputs(repo) == before, "dvc exp run"
    finally:
        (repo / "params.yaml").write_text(committed)
    assert "Data and pipelines are up to date." in sh(repo, "dvc", "repro")


@pytest.mark.slow
def test_the_exported_model_is_a_dvc_artifact(repo, tmp_path):
    """dvc.yaml declares models/export as the model artifact `tudui-classifier`: versioned and promoted with
    GTO's git tags (`gto register`, `gto assign`), `dvc artifacts get` fetches it by version or by stage."""
    import yaml

    artifact = yaml.safe_load((repo / "dvc.yaml").read_text())["artifacts"]["tudui-classifier"]
    assert artifact["path"] == "models/export" and artifact["type"] == "model"
    assert artifact["desc"] and artifact["labels"]
    sh(repo, "dvc", "repro")
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-qm", "a trained model")
    sh(repo, "gto", "register", "tudui-classifier", "--version", "v1.0.0")
    sh(repo, "gto", "assign", "tudui-classifier", "--version", "v1.0.0", "--stage", "prod")
    for how in (("--rev", "v1.0.0"), ("--stage", "prod")):
        dest = tmp_path / how[1]
        sh(tmp_path, "dvc", "artifacts", "get", str(repo), "tudui-classifier", *how, "-o", str(dest))
        got = sorted(p.name for p in dest.iterdir())
        assert got == ["MODEL_CARD.md", "model.onnx", "state_dict.pt"], how
        for name in got:
            assert (dest / name).read_bytes() == (repo / "models/export" / name).read_bytes(), (how, name)
