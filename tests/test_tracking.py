"""MLflow tracking: one run per training across train/evaluate/export, linked to DVC experiments."""
import csv
import json
import os
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from conftest import clean_env, free_port, make_dvc_repo, make_params, run_stage, sh, wait_until_healthy, write_params

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
TRACKING = {"tracking": {"enabled": True, "uri": ""}}


def client_for(root: Path):
    from mlflow import MlflowClient

    return MlflowClient(f"sqlite:///{root / 'mlflow.db'}")


def runs_of(root: Path) -> dict:
    """{run name: Run} of the pipeline's experiment in the store under `root`."""
    client = client_for(root)
    experiment = client.get_experiment_by_name("tudui-pipeline")
    assert experiment is not None, f"no experiment in {root / 'mlflow.db'}"
    return {run.info.run_name: run for run in client.search_runs([experiment.experiment_id])}


def test_stages_log_one_run(trained_project, tmp_path, monkeypatch):
    folder = tmp_path / "project"
    shutil.copytree(trained_project, folder)
    write_params(folder, TRACKING)
    for stage in ("train", "evaluate", "export"):
        result = run_stage(folder, stage)
        assert result.returncode == 0, result.stderr
        assert "warning" not in result.stderr.lower(), result.stderr

    (run,) = runs_of(folder).values()
    run_file = json.loads((folder / "models/mlflow_run.json").read_text())
    assert run_file["run_id"] == run.info.run_id and run.info.status == "FINISHED"
    assert run.data.params["train.lr"] == "0.01" and run.data.params["preprocess.max_train"] == "600"
    assert run.data.tags["device"] == "cpu" and run.data.tags["torch_version"] and run.data.tags["precision"]
    assert run.info.run_name == "repro"  # not a git checkout: no commit to name it after
    eval_metrics = json.loads((folder / "metrics/eval.json").read_text())
    assert run.data.metrics["test_accuracy"] == eval_metrics["test_accuracy"]
    assert not [key for key in run.data.metrics if key.startswith("test_accuracy/")]  # per class: a table
    client = client_for(folder)
    history = client.get_metric_history(run.info.run_id, "val/accuracy")
    assert [m.step for m in history] == [1]
    artifacts = {a.path for top in ("metrics", "export", "tensorboard") for a in client.list_artifacts(run.info.run_id, top)}
    assert {"metrics/eval.json", "metrics/per_class.json", "metrics/predictions.json", "metrics/confusion.png", "export/MODEL_CARD.md"} <= artifacts
    assert any(path.startswith("tensorboard/events.out.tfevents") for path in artifacts)
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.artifact_location == (folder / "mlartifacts" / "tudui-pipeline").as_uri()

    import base64
    import io

    import mlflow.pyfunc
    import pandas as pd
    from PIL import Image

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{folder / 'mlflow.db'}")  # resolves models:/ URIs
    (logged,) = client.search_logged_models([run.info.experiment_id])
    assert logged.source_run_id == run.info.run_id
    model = mlflow.pyfunc.load_model(logged.model_uri)  # the served model: image files in (tests/test_serving.py)
    png = io.BytesIO()
    Image.new("L", (28, 28)).save(png, format="PNG")
    rows = model.predict(pd.DataFrame({"image": [base64.b64encode(png.getvalue()).decode()] * 2}))
    assert len(rows) == 2 and set(rows["class"]) <= {row["class"] for row in csv.DictReader((folder / "metrics/per_class.csv").open())}
    assert client.search_model_versions("name = 'tudui-classifier'") == []  # make promote registers, export does not
    # MLflow logs the served model's config as run params ("/" between levels): none may be a pipeline param's
    # name (MLflow would refuse the changed value with a WARNING on every export)
    import yaml
    from mlflow.models.utils import _flatten_nested_params

    mlmodel = yaml.safe_load((Path(logged.artifact_location.removeprefix("file://")) / "MLmodel").read_text())
    config = _flatten_nested_params(mlmodel["flavors"]["python_function"]["config"], sep="/")
    assert config and not set(config) & set(make_params().flat())
    assert {key: run.data.params[key] for key in config} == {key: str(value) for key, value in config.items()}


def test_unreachable_server_warns_and_the_stage_succeeds(prepared_project, tmp_path):
    folder = tmp_path / "project"
    shutil.copytree(prepared_project, folder)
    write_params(folder, {"tracking": {"enabled": True, "uri": f"http://127.0.0.1:{free_port()}",
                                       "timeout_s": 2.0}})
    result = run_stage(folder, "train", timeout=120)
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning: MLflow")]
    assert len(warnings) == 1 and "127.0.0.1" in warnings[0]
    assert json.loads((folder / "models/mlflow_run.json").read_text())["run_id"] is None
    assert (folder / "models/model.pt").exists()


def test_tracking_disabled_writes_no_store(trained_project):
    assert json.loads((trained_project / "models/mlflow_run.json").read_text())["run_id"] is None
    assert not (trained_project / "mlflow.db").exists()


@pytest.fixture(scope="module")
def exp_repo(tmp_path_factory, mirror):
    """As the README's recipe has it: a committed baseline run (`dvc repro`), the experiments come on it."""
    repo = make_dvc_repo(tmp_path_factory.mktemp("exp_repo"), TRACKING)
    sh(repo, "dvc", "repro")
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-qm", "baseline run")
    return repo


@pytest.fixture(scope="module")
def experiments(exp_repo) -> dict:
    """Two lr experiments run in the workspace (`dvc exp run -n`): {name: (lr, the eval.json it left there)}."""
    seen = {}
    for name, lr in (("lr-low", "0.02"), ("lr-high", "0.05")):
        sh(exp_repo, "dvc", "exp", "run", "-n", name, "-S", f"train.lr={lr}")
        seen[name] = (lr, json.loads((exp_repo / "metrics/eval.json").read_text()))
    return seen


@pytest.mark.slow
def test_dvc_experiments_become_named_mlflow_runs(exp_repo, experiments):
    seen = experiments
    runs = runs_of(exp_repo)
    for name, (lr, eval_metrics) in seen.items():
        run = runs[name]
        assert run.info.status == "FINISHED"
        assert run.data.params["train.lr"] == lr
        assert run.data.tags["dvc_exp_name"] == name and run.data.tags["dvc_exp_baseline_rev"]
        assert run.data.tags["git_commit"] and run.data.tags["prepared_data_md5"]
        assert run.data.metrics["test_accuracy"] == eval_metrics["test_accuracy"]
    listed = sh(exp_repo, "dvc", "exp", "list", "--name-only", stdout_only=True).split()
    assert {"lr-low", "lr-high"} <= set(listed)

    # each export logged the served model into its run and registered nothing (make promote registers:
    # tests/test_champion.py)
    client = client_for(exp_repo)
    assert client.search_model_versions("name = 'tudui-classifier'") == []
    for name in seen:
        run = runs[name]
        (logged,) = client.search_logged_models([run.info.experiment_id],
                                                filter_string=f"source_run_id = '{run.info.run_id}'")
        assert logged.name == "model"


def api(base: str, path: str, body: dict | None = None) -> dict:
    request = urllib.request.Request(f"{base}/api/2.0/mlflow/{path}", data=json.dumps(body).encode() if body else None,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response)


@pytest.mark.slow
def test_a_repro_run_reads_back_as_the_mlflow_ui_expects(exp_repo, monkeypatch):
    """A plain `dvc repro`, read back through the REST API of a real `mlflow server`: a name after the
    commit, the source tags the UI shows, the data set as a run input (digest = DVC's md5 of
    data/prepared), where it ran, the validation curves, system metrics and the per-class table."""
    import yaml

    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.5")  # a tiny training lasts seconds
    sh(exp_repo, "dvc", "repro", "--force", "--downstream", "train")  # the training on, not the unchanged data again
    commit = sh(exp_repo, "git", "rev-parse", "HEAD", stdout_only=True).strip()
    outs = yaml.safe_load((exp_repo / "dvc.lock").read_text())["stages"]["preprocess"]["outs"]
    data_md5 = next(out["md5"] for out in outs if out["path"] == "data/prepared")
    meta = json.loads((exp_repo / "data/prepared/meta.json").read_text())
    env = json.loads((exp_repo / "metrics/train_env.json").read_text())
    run_id = json.loads((exp_repo / "models/mlflow_run.json").read_text())["run_id"]

    port = free_port()
    mlflow_cli = str(Path(sys.executable).with_name("mlflow"))
    server = subprocess.Popen([mlflow_cli, "server", "--backend-store-uri", f"sqlite:///{exp_repo / 'mlflow.db'}",
                               "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_until_healthy(base, server, 300)
        run = api(base, f"runs/get?run_id={run_id}")["run"]
        assert run["info"]["run_name"] == f"repro-{commit[:7]}" and run["info"]["status"] == "FINISHED"
        tags = {t["key"]: t["value"] for t in run["data"]["tags"]}
        assert tags["mlflow.source.name"] == "dvc.yaml" and tags["mlflow.source.type"] == "LOCAL"
        assert tags["mlflow.source.git.commit"] == commit and tags["prepared_data_md5"] == data_md5
        assert {tags["device"], tags["precision"], tags["threads"]} == {env["device"], env["precision"], str(env["threads"])}
        (dataset,) = [d["dataset"] for d in run["inputs"]["dataset_inputs"]]
        assert dataset["name"] == "fashion_mnist" and dataset["digest"] == data_md5
        assert json.loads(dataset["profile"])["images"] == meta["counts"]
        metrics = {m["key"] for m in run["data"]["metrics"]}
        assert {"val/accuracy", "val/loss", "train_loss", "test_accuracy", "test_loss"} <= metrics
        assert any(key.startswith("system/cpu_utilization") for key in metrics), metrics
        history = api(base, f"metrics/get-history?run_id={run_id}&metric_key=val/accuracy")["metrics"]
        assert [m["step"] for m in history] == [1]
        listed = {f["path"] for f in api(base, f"artifacts/list?run_id={run_id}&path=metrics")["files"]}
        assert "metrics/per_class.json" in listed
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=60)


@pytest.mark.slow
def test_exp_show_reads_at_a_glance(exp_repo, experiments):
    """After several lr experiments on a committed baseline run (the README's recipe: exp_repo), `dvc exp show
    --only-changed` fits 160 columns with the test accuracy in full view, and the metrics it shows are the
    numbers people compare, nothing else."""
    assert set(experiments) <= set(sh(exp_repo, "dvc", "exp", "list", "--name-only", stdout_only=True).split())
    shown = json.loads(sh(exp_repo, "dvc", "exp", "show", "--json", stdout_only=True))
    metrics = set()
    for baseline in shown:
        for rev in [baseline, *(exp for e in baseline.get("experiments") or [] for exp in e["revs"])]:
            for path, content in rev["data"]["metrics"].items():
                assert "data" in content, (rev["name"], path, content)
                metrics |= {f"{path}:{key}" for key in content["data"]}
    assert metrics == {"metrics/train.json:" + k for k in ("epochs", "stopped_early", "kept_epoch", "train_loss",
                                                           "val_loss", "val_accuracy")} | {
        "metrics/train_time.json:seconds", "metrics/train_time.json:images_per_s",
        "metrics/eval.json:test_accuracy", "metrics/eval.json:test_loss"}
    table = subprocess.run(["dvc", "exp", "show", "--only-changed", "--no-pager"], cwd=exp_repo, capture_output=True,
                           text=True, env=clean_env(COLUMNS="160", PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}"))
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert max(len(line) for line in lines) <= 160
    header = "\n".join(lines[:4])
    assert "test_accuracy" in header and "train.lr" in header, table.stdout
