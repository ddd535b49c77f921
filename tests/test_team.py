"""Team setup: the MLflow tracking server on PostgreSQL (scripts/mlflow_server.py) and a DVC remote."""
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import REPO, clean_env, free_port, make_dvc_repo, run_stage, sh, wait_until_healthy, write_params

SCRIPT = REPO / "scripts" / "mlflow_server.py"


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(2)
        return s.connect_ex(("127.0.0.1", port)) == 0


def proc_stat(pid: int) -> list[str] | None:
    """state, ppid, pgrp, session, ... of a process, or None once it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def alive(pid: int) -> bool:
    stat = proc_stat(pid)
    return stat is not None and stat[0] != "Z"  # a zombie has exited; only its parent's wait is missing


def session_pids(sid: int) -> list[int]:
    pids = [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()]
    return [pid for pid in pids if (stat := proc_stat(pid)) and stat[3] == str(sid) and stat[0] != "Z"]


def api(base: str, path: str, body: dict | None = None) -> dict:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(f"{base}/api/2.0/{path}", data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response)


@pytest.fixture
def postgresql():
    if not list(Path("/usr/lib/postgresql").glob("*/bin/initdb")) and not shutil.which("initdb"):
        message = "PostgreSQL is not installed: apt-get install postgresql"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture
def server_dir():
    """A folder for the server outside pytest's tmp tree: as root, PostgreSQL runs as the postgres
    user, which must be able to reach it (/tmp/pytest-of-root is private)."""
    folder = Path(tempfile.mkdtemp(prefix="tudui-mlserver-"))
    folder.chmod(0o711)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.slow
def test_mlflow_server_on_postgresql(postgresql, server_dir, trained_project, tmp_path):
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    pgdata = server_dir / "pgdata"
    log_path = tmp_path / "server.out"
    with open(log_path, "w") as log:
        server = subprocess.Popen([sys.executable, str(SCRIPT), "--dir", str(server_dir), "--port", str(port),
                                   "--workers", "1"], stdout=log, stderr=subprocess.STDOUT, env=clean_env(),
                                  start_new_session=True)

    def server_log() -> str:
        return log_path.read_text(errors="replace")[-3000:]

    try:
        wait_until_healthy(base, server, 120, server_log)

        project = tmp_path / "project"
        shutil.copytree(trained_project, project)
        write_params(project, {"tracking": {"enabled": True, "uri": base}})
        for stage in ("train", "evaluate", "export"):
            result = run_stage(project, stage)
            assert result.returncode == 0, f"{stage}: {result.stderr}"
            assert "warning" not in result.stderr, result.stderr
        assert not (project / "mlflow.db").exists()
        run_id = json.loads((project / "models/mlflow_run.json").read_text())["run_id"]
        eval_metrics = json.loads((project / "metrics/eval.json").read_text())

        # Read the run back through the REST API.
        experiment_id = api(base, "mlflow/experiments/get-by-name?experiment_name=tudui-pipeline")[
            "experiment"]["experiment_id"]
        runs = api(base, "mlflow/runs/search", {"experiment_ids": [experiment_id]})["runs"]
        assert [r["info"]["run_id"] for r in runs] == [run_id]
        run = api(base, f"mlflow/runs/get?run_id={run_id}")["run"]
        assert run["info"]["status"] == "FINISHED"
        params = {p["key"]: p["value"] for p in run["data"]["params"]}
        assert params["train.lr"] == "0.01" and params["preprocess.max_train"] == "600"
        metrics = {m["key"]: m["value"] for m in run["data"]["metrics"]}
        assert metrics["test_accuracy"] == eval_metrics["test_accuracy"]

        # Artifacts go through the server into --artifacts-destination.
        listed = api(base, f"mlflow/artifacts/list?run_id={run_id}&path=metrics")["files"]
        assert "metrics/eval.json" in {f["path"] for f in listed}
        artifact_uri = run["info"]["artifact_uri"]
        assert artifact_uri.startswith("mlflow-artifacts:/"), artifact_uri
        location = artifact_uri.removeprefix("mlflow-artifacts:/").strip("/")
        with urllib.request.urlopen(f"{base}/api/2.0/mlflow-artifacts/artifacts/{location}/metrics/eval.json",
                                    timeout=30) as response:
            served = response.read()
        assert served == (project / "metrics/eval.json").read_bytes()
        assert (server_dir / "artifacts" / location / "metrics/eval.json").read_bytes() == served
        assert list((server_dir / "artifacts").rglob("MLmodel")), "the logged model is missing"

        # The run is in PostgreSQL, reached over the cluster's socket.
        import psycopg

        with psycopg.connect(host=str(pgdata), port=5432, user="mlflow", dbname="mlflow", connect_timeout=10) as db:
            assert db.execute("SELECT status FROM runs WHERE run_uuid = %s", (run_id,)).fetchone() == ("FINISHED",)
            lr = db.execute("SELECT value FROM params WHERE run_uuid = %s AND key = 'train.lr'", (run_id,)).fetchone()
            assert lr == ("0.01",)
        postgres_pid = int((pgdata / "postmaster.pid").read_text().split()[0])
        assert alive(postgres_pid)

        # Ctrl-C stops both, cleanly.
        os.kill(server.pid, signal.SIGINT)
        assert server.wait(timeout=120) == 0, server_log()
        assert "stopped the MLflow server and PostgreSQL" in server_log()
        deadline = time.time() + 30
        while (alive(postgres_pid) or session_pids(server.pid)) and time.time() < deadline:
            time.sleep(0.5)
        assert not alive(postgres_pid), "postgres still running"
        assert not session_pids(server.pid), f"leftover processes: {session_pids(server.pid)}"
        assert not port_open(port)
        assert not (pgdata / "postmaster.pid").exists() and not (pgdata / ".s.PGSQL.5432").exists()
    finally:
        if server.poll() is None:
            os.kill(server.pid, signal.SIGTERM)
            try:
                server.wait(timeout=90)
            except subprocess.TimeoutExpired:
                pass
        for pid in session_pids(server.pid):
            os.kill(pid, signal.SIGKILL)
        if (pgdata / "postmaster.pid").exists():
            subprocess.run([sys.executable, str(SCRIPT), "--stop", "--dir", str(server_dir)], timeout=120)


def test_server_refuses_a_busy_port(postgresql, tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = subprocess.run([sys.executable, str(SCRIPT), "--dir", str(tmp_path / "srv"), "--port", str(port)],
                                capture_output=True, text=True, timeout=60, env=clean_env())
    assert result.returncode == 1
    assert result.stderr.startswith(f"error: cannot listen on 127.0.0.1:{port}") and result.stderr.count("\n") == 1
    assert not (tmp_path / "srv" / "pgdata").exists()


def test_project_has_a_default_dvc_remote_outside_the_repo():
    from configobj import ConfigObj

    config = ConfigObj(str(REPO / ".dvc" / "config"))
    name = config["core"]["remote"]
    url = config[f'remote "{name}"']["url"]
    assert not (REPO / ".dvc" / url).resolve().is_relative_to(REPO), url  # relative to .dvc/, as dvc reads it


def digests(repo: Path) -> dict:
    files = [p for top in ("data/raw", "data/prepared") for p in sorted((repo / top).rglob("*")) if p.is_file()]
    return {str(p.relative_to(repo)): (hashlib.md5(p.read_bytes()).hexdigest(), p.stat().st_size) for p in files}


def test_dvc_remote_moves_data_between_checkouts(tmp_path, mirror):
    repo = make_dvc_repo(tmp_path / "repo", {"data": {"mirrors": [str(mirror)]}})
    sh(repo, "dvc", "repro", "preprocess")
    remote = tmp_path / "remote"
    sh(repo, "dvc", "remote", "add", "-d", "shared", str(remote))
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-qm", "data")
    before = digests(repo)
    assert {"data/raw/fashion_mnist/train-images-idx3-ubyte.gz", "data/prepared/train.pt"} <= set(before)

    stages = ("download", "preprocess")  # train's outputs were never made: leave them out
    sh(repo, "dvc", "push", *stages)
    assert "in sync" in sh(repo, "dvc", "status", "--cloud", *stages)
    shutil.rmtree(repo / ".dvc" / "cache")
    shutil.rmtree(repo / "data")
    sh(repo, "dvc", "pull", *stages)
    assert digests(repo) == before

    # A second machine: a fresh clone has neither cache nor outputs until it pulls.
    sh(tmp_path, "git", "clone", "-q", str(repo), "other")
    other = tmp_path / "other"
    sh(other, "dvc", "pull", *stages)
    assert digests(other) == before
    assert "up to date" in sh(other, "dvc", "status", *stages)
