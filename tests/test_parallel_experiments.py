"""Parallel queued DVC experiments logging to one MLflow store. Apart from tests/test_tracking.py so that
pytest-xdist can run this long test (a queue of five experiments) beside that file's."""
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import clean_env, make_dvc_repo, sh
from test_tracking import TRACKING, client_for, runs_of


@pytest.fixture(scope="module")
def exp_repo(tmp_path_factory, mirror):
    return make_dvc_repo(tmp_path_factory.mktemp("exp_repo"), TRACKING)


def metrics_files(repo: Path) -> dict:
    return {name: (repo / "metrics" / name).read_text()
            for name in ("train.json", "train_history.csv", "eval.json", "predictions.csv", "export.json")}


@pytest.mark.slow
def test_parallel_queued_experiments_all_log_to_the_repo_root_store(exp_repo):
    """Three lr/epoch variants queued, two workers at a time: every one finishes as its own MLflow run in
    the repo root's sqlite store (not in the temporary copies), with no lost or doubled runs; and the one
    that repeats an experiment run alone beforehand gives the same metrics files, byte for byte."""
    sh(exp_repo, "dvc", "exp", "run", "-n", "alone", "-S", "train.lr=0.03", "-S", "train.epochs=1")
    alone = metrics_files(exp_repo)
    variants = {"q-lr02": ("0.02", "1"), "q-lr03": ("0.03", "1"), "q-lr05-e2": ("0.05", "2")}
    for name, (lr, epochs) in variants.items():
        sh(exp_repo, "dvc", "exp", "run", "--queue", "-n", name, "-S", f"train.lr={lr}", "-S", f"train.epochs={epochs}")
    # The workers it spawns inherit its stdout: read through a pipe (sh), it would return only when the
    # whole queue has run. Started with no pipes, it returns at once and the queue is polled below.
    subprocess.run(["dvc", "queue", "start", "-j", "2"], cwd=exp_repo, check=True, timeout=300,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   env=clean_env(PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"))
    deadline = time.time() + 3600  # a safety net for a hung queue, not a timing assumption
    while time.time() < deadline:
        status = sh(exp_repo, "dvc", "queue", "status")
        if all(name in status for name in variants) and not any(w in status for w in ("Running", "Queued")):
            break
        time.sleep(3)
    sh(exp_repo, "dvc", "queue", "stop", check=False)
    assert status.count("Success") >= len(variants), status
    runs = runs_of(exp_repo)
    for name, (lr, epochs) in variants.items():
        run = runs[name]
        assert run.info.status == "FINISHED"
        assert run.data.params["train.lr"] == lr and run.data.params["train.epochs"] == epochs
        assert "test_accuracy" in run.data.metrics
        log = sh(exp_repo, "dvc", "queue", "logs", name, check=False)
        assert "warning: MLflow" not in log, log
    client = client_for(exp_repo)
    every_run = client.search_runs([client.get_experiment_by_name("tudui-pipeline").experiment_id])
    assert sorted(r.info.run_name for r in every_run if r.info.run_name in variants) == sorted(variants)
    assert not list((exp_repo / ".dvc" / "tmp").rglob("mlflow.db"))
    sh(exp_repo, "dvc", "exp", "apply", "q-lr03")
    assert metrics_files(exp_repo) == alone
