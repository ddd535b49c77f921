"""Parallel queued DVC experiments logging to one MLflow store: the queue is tests/conftest.py's `swept`
repository, whose eight experiments tools.sweep queued and ran two at a time (`dvc queue start -j 2`) with
tracking on. Apart from tests/test_tracking.py so that pytest-xdist can run this test beside that file's."""
from pathlib import Path

import pytest

from conftest import copy_repo, sh
from test_tracking import client_for, runs_of

# the swept repository's experiments: {name: (train.lr, evaluate.batch_size)}; all train 2 epochs
QUEUED = {**{f"lr{lr}-seed{seed}": (lr, "1000") for lr in ("0.02", "0.0001") for seed in (0, 1, 2)},
          **{f"batch_size100-seed{seed}": ("0.02", "100") for seed in (3, 4)}}


def metrics_files(repo: Path) -> dict:
    return {name: (repo / "metrics" / name).read_text()
            for name in ("train.json", "train_history.csv", "eval.json", "predictions.csv", "export.json")}


@pytest.mark.slow
def test_parallel_queued_experiments_all_log_to_the_repo_root_store(swept, tmp_path):
    """Eight variants queued, two workers at a time: every one finishes as its own MLflow run in the repo
    root's sqlite store (not in the temporary copies), with no lost or doubled runs; and one of them repeated
    alone in the workspace (of a copy of the repository) gives the same metrics files, byte for byte."""
    status = sh(swept, "dvc", "queue", "status")
    for name in QUEUED:
        assert [line for line in status.splitlines() if f" {name} " in line and line.rstrip().endswith("Success")], status
    runs = runs_of(swept)
    for name, (lr, batch_size) in QUEUED.items():
        run = runs[name]
        assert run.info.status == "FINISHED"
        assert run.data.params["train.lr"] == lr and run.data.params["evaluate.batch_size"] == batch_size
        assert run.data.params["train.epochs"] == "2" and run.data.tags["dvc_exp_name"] == name
        assert "test_accuracy" in run.data.metrics
        log = sh(swept, "dvc", "queue", "logs", name, check=False)
        assert "warning: MLflow" not in log, log
    client = client_for(swept)
    every_run = client.search_runs([client.get_experiment_by_name("tudui-pipeline").experiment_id])
    assert sorted(r.info.run_name for r in every_run if r.info.run_name in QUEUED) == sorted(QUEUED)
    assert not list((swept / ".dvc" / "tmp").rglob("mlflow.db"))

    repo = copy_repo(swept, tmp_path / "repo")
    sh(repo, "dvc", "exp", "run", "-n", "alone", "-S", "train.lr=0.02", "-S", "seed=1")  # = lr0.02-seed1
    alone = metrics_files(repo)
    sh(repo, "dvc", "exp", "apply", "lr0.02-seed1")
    assert metrics_files(repo) == alone
