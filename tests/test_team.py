"""Team setup: the MLflow tracking server with logins on PostgreSQL (tools/mlflow_server.py), DVC remotes
(a folder, and SSH through a real sshd on loopback), and three clones standing in for three machines that
share experiments through a bare git remote, the SSH remote and the server."""
from __future__ import annotations

import base64
import csv
import hashlib
import http.client
import importlib.util
import io
import json
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import (GIT_ENV, REPO, clean_env, free_port, make_dvc_repo, needs, run_stage, sh, wait_until_healthy,
                      write_params, venv_path)

SCRIPT = REPO / "tools" / "mlflow_server.py"
# The roles and throttle figures of the server's app (stdlib-only at import: no MLflow here).
_spec = importlib.util.spec_from_file_location("mlflow_auth", REPO / "tools" / "mlflow_auth.py")
AUTH = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(AUTH)
SSHD = Path("/usr/sbin/sshd")
# Nothing from the caller's shell may log a test in, or hand the server a password.
CREDENTIAL_VARS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN",
                   "MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_AUTH_CONFIG_PATH", "MLFLOW_FLASK_SERVER_SECRET_KEY",
                   "SSH_AUTH_SOCK")


def env(**extra: str) -> dict:
    return {k: v for k, v in clean_env(**extra).items() if k not in CREDENTIAL_VARS or k in extra}



def require_postgresql() -> None:
    needs(bool(list(Path("/usr/lib/postgresql").glob("*/bin/initdb")) or shutil.which("initdb")),
          "PostgreSQL is not installed: apt-get install postgresql")


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


def kill_session(proc: subprocess.Popen) -> None:
    """SIGKILL whatever is left of a process started with start_new_session=True, and reap it."""
    for pid in session_pids(proc.pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    if proc.poll() is None:
        proc.wait(timeout=60)


def call(base: str, path: str, body: dict | None = None, auth: tuple[str, str] | None = None,
         method: str | None = None) -> tuple[int, dict | str]:
    """One REST request; (HTTP status, the JSON answer or its text)."""
    headers = {"Content-Type": "application/json"}
    if auth:
        headers["Authorization"] = "Basic " + base64.b64encode(":".join(auth).encode()).decode()
    data = json.dumps(body).encode() if body is not None else None
    url = f"{base}{path}" if path.startswith("/") else f"{base}/api/{path}"
    request = urllib.request.Request(url, data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            status, text = response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        status, text = exc.code, exc.read().decode(errors="replace")
    try:
        return status, json.loads(text)
    except ValueError:
        return status, text


def api(base: str, path: str, body: dict | None = None, auth: tuple[str, str] | None = None,
        method: str | None = None) -> dict:
    status, answer = call(base, path, body, auth, method)
    assert status == 200, f"{path}: HTTP {status}: {answer}"
    return answer


def wait_until(condition, timeout: float, what) -> None:
    """Poll `condition` until it holds; fail with what() after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what()
        time.sleep(0.2)


def marked_pids(folder: Path) -> list[int]:
    """Live processes the server script started for `folder` (it marks their environment)."""
    mark = f"TUDUI_MLFLOW_SERVER={folder}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and mark in (entry / "environ").read_bytes().split(b"\0"):
                found.append(int(entry.name))
        except OSError:
            pass
    return found


# --- the tracking server -------------------------------------------------------------------------------

@dataclass
class Server:
    port: int
    folder: Path
    proc: subprocess.Popen
    log_path: Path

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pgdata(self) -> Path:
        return self.folder / "pgdata"

    @property
    def admin(self) -> tuple[str, str]:
        return "admin", (self.folder / "admin_password").read_text().strip()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def server_folder() -> Path:
    """A folder for the server outside pytest's tmp tree: as root, PostgreSQL runs as the postgres
    user, which must be able to reach it (/tmp/pytest-of-root is private)."""
    folder = Path(tempfile.mkdtemp(prefix="tudui-mlserver-"))
    folder.chmod(0o711)
    return folder


def start_server(folder: Path, log_path: Path, port: int | None = None) -> Server:
    port = port or free_port()
    with open(log_path, "a") as log:
        proc = subprocess.Popen([sys.executable, str(SCRIPT), "--dir", str(folder), "--port", str(port),
                                 "--workers", "1"], stdout=log, stderr=subprocess.STDOUT, env=env(),
                                start_new_session=True)
    server = Server(port, folder, proc, log_path)
    try:
        wait_until_healthy(server.base, proc, 240, lambda: server.log()[-3000:])
    except BaseException:
        stop_server(server)
        raise
    return server


def stop_server(server: Server) -> None:
    """Cleanup however the test went: SIGTERM, then SIGKILL for leftovers, then PostgreSQL."""
    if server.proc.poll() is None:
        os.kill(server.proc.pid, signal.SIGTERM)
        try:
            server.proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            pass
    kill_session(server.proc)
    if (server.pgdata / "postmaster.pid").exists() or marked_pids(server.folder):
        subprocess.run([sys.executable, str(SCRIPT), "--stop", "--dir", str(server.folder)], timeout=300)


def add_user(server: Server, name: str, password: str, *flags: str, **extra_env: str) -> subprocess.CompletedProcess:
    """The README's command for a new login; the password goes in on stdin."""
    return subprocess.run([sys.executable, str(SCRIPT), "--dir", str(server.folder), "--port", str(server.port),
                           "--add-user", name, *flags], input=password + "\n", capture_output=True, text=True,
                          timeout=120, env=env(**extra_env))


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """One server with logins for this module's tests."""
    require_postgresql()
    folder = server_folder()
    server = start_server(folder, tmp_path_factory.mktemp("mlserver") / "server.out")
    try:
        yield server
    finally:
        stop_server(server)
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def users(mlflow_server) -> dict:
    """Three teammates who may log runs, a read-only user and a promoter, each with a fresh random password."""
    made = {}
    for name, flags in (("alice", ()), ("bob", ()), ("carol", ()), ("rita", ("--read-only",)),
                        ("pete", ("--promoter",))):
        password = "pw-" + secrets.token_urlsafe(18)
        result = add_user(mlflow_server, name, password, *flags)
        assert result.returncode == 0, result.stderr
        assert f"created the MLflow user {name!r}" in result.stdout and password not in result.stdout
        made[name] = password
    return made


def test_rest_api_refuses_missing_and_wrong_credentials(mlflow_server, users):
    path = "2.0/mlflow/experiments/search?max_results=5"
    status, answer = call(mlflow_server.base, path)
    assert status == 401, answer
    assert call(mlflow_server.base, path, auth=("alice", users["bob"]))[0] == 401
    assert call(mlflow_server.base, path, auth=("alice", users["alice"] + "x"))[0] == 401
    assert call(mlflow_server.base, path, auth=("mallory", users["alice"]))[0] == 401
    assert call(mlflow_server.base, path, auth=("alice", users["alice"]))[0] == 200
    assert call(mlflow_server.base, path, auth=mlflow_server.admin)[0] == 200
    # Creating logins is the admin's: a teammate cannot make one.
    status, _ = call(mlflow_server.base, "2.0/mlflow/users/create",
                     {"username": "eve", "password": "pw-" + secrets.token_urlsafe(18)}, auth=("alice", users["alice"]))
    assert status == 403


def test_read_only_user_cannot_create_runs(mlflow_server, users):
    base, alice, bob, rita = (mlflow_server.base, ("alice", users["alice"]), ("bob", users["bob"]),
                              ("rita", users["rita"]))
    experiment_id = api(base, "2.0/mlflow/experiments/create", {"name": "alice-private-study"}, alice)["experiment_id"]
    # rita holds READ on it explicitly (--read-only users hold it on every experiment anyway).
    api(base, "3.0/mlflow/users/permissions/grant", {"username": "rita", "resource_type": "experiment",
                                                      "resource_id": experiment_id, "permission": "READ"},
        mlflow_server.admin)
    permission = api(base, f"3.0/mlflow/users/permissions/get?username=rita&resource_type=experiment"
                           f"&resource_id={experiment_id}", auth=mlflow_server.admin)
    assert permission["permission"] == "READ"

    assert call(base, f"2.0/mlflow/experiments/get?experiment_id={experiment_id}", auth=rita)[0] == 200
    status, answer = call(base, "2.0/mlflow/runs/create", {"experiment_id": experiment_id}, rita)
    assert status == 403, answer
    # The experiment does take runs, from a teammate with write access...
    run_id = api(base, "2.0/mlflow/runs/create", {"experiment_id": experiment_id}, bob)["run"]["info"]["run_id"]
    # ...which rita can read but not add to.
    assert call(base, f"2.0/mlflow/runs/get?run_id={run_id}", auth=rita)[0] == 200
    status, _ = call(base, "2.0/mlflow/runs/log-metric",
                     {"run_id": run_id, "key": "x", "value": 1.0, "timestamp": 0, "step": 0}, rita)
    assert status == 403
    runs = api(base, "2.0/mlflow/runs/search", {"experiment_ids": [experiment_id]}, alice)["runs"]
    assert [r["info"]["run_id"] for r in runs] == [run_id]


def test_add_user_says_what_went_wrong_in_one_line(mlflow_server, users):
    cases = [
        (add_user(mlflow_server, "alice", "pw-" + secrets.token_urlsafe(18)), "refused to create the user 'alice'"),
        (add_user(mlflow_server, "dave", "short"), "at least 12 characters"),
        (add_user(mlflow_server, "dave", "pw-" + secrets.token_urlsafe(18),
                  MLFLOW_AUTH_ADMIN_PASSWORD="not-the-admin-password"), "refused the admin password"),
    ]
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
        result = subprocess.run([sys.executable, str(SCRIPT), "--dir", str(mlflow_server.folder), "--add-user", "dave",
                                 "--url", f"http://127.0.0.1:{port}"], input="pw-" + secrets.token_urlsafe(18) + "\n",
                                capture_output=True, text=True, timeout=120, env=env())
    cases.append((result, "no MLflow server answers"))
    for result, reason in cases:
        assert result.returncode == 1, result.stdout
        assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
        assert reason in result.stderr, result.stderr
    assert call(mlflow_server.base, "2.0/mlflow/users/get?username=dave", auth=mlflow_server.admin)[0] != 200


def leaks(secret_values: list[str], files: list[Path] = (), texts: list[str] = ()) -> list[str]:
    """Where any of `secret_values` occurs, byte for byte, in these files and texts."""
    found = []
    for value in secret_values:
        needle = value.encode()
        found += [str(p) for p in files if p.is_file() and needle in p.read_bytes()]
        found += [f"text #{i}: ...{text[max(0, text.find(value) - 80):text.find(value)]}"
                  for i, text in enumerate(texts) if value in text]
    return found


def files_under(*folders: Path) -> list[Path]:
    return [p for folder in folders for p in folder.rglob("*") if p.is_file() and not p.is_symlink()]


@pytest.mark.slow
def test_a_wrong_password_costs_the_tracking_not_the_stage(mlflow_server, users, trained_project, tmp_path):
    project = tmp_path / "project"
    shutil.copytree(trained_project, project)
    write_params(project, {"tracking": {"enabled": True, "uri": mlflow_server.base}})
    wrong = "pw-" + secrets.token_urlsafe(18)
    result = run_stage(project, "train", env={"MLFLOW_TRACKING_USERNAME": "alice", "MLFLOW_TRACKING_PASSWORD": wrong})
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("warning: MLflow tracking off") == 1 and "401" in result.stderr, result.stderr
    assert json.loads((project / "models/mlflow_run.json").read_text())["run_id"] is None
    found = leaks([wrong], files_under(project), [result.stdout, result.stderr, mlflow_server.log()])
    assert not found, found


def test_no_auth_is_refused_off_loopback(tmp_path):
    require_postgresql()
    for host in ("0.0.0.0", "192.168.1.10", "myhost.example.com"):
        result = subprocess.run([sys.executable, str(SCRIPT), "--dir", str(tmp_path / "srv"), "--host", host,
                                 "--no-auth"], capture_output=True, text=True, timeout=60, env=env())
        assert result.returncode == 1
        assert result.stderr.startswith(f"error: refusing to serve {host} without logins"), result.stderr
        assert result.stderr.count("\n") == 1
    assert not (tmp_path / "srv").exists()


@pytest.mark.slow
def test_ctrl_c_stops_everything_and_a_restart_keeps_the_logins(tmp_path):
    require_postgresql()
    folder = server_folder()
    log_path = tmp_path / "server.out"
    server = start_server(folder, log_path)
    try:
        password_file = folder / "admin_password"
        assert password_file.stat().st_mode & 0o777 == 0o600
        admin = server.admin
        assert len(admin[1]) >= 24
        assert str(password_file) in server.log()
        bob = ("bob", "pw-" + secrets.token_urlsafe(18))
        assert add_user(server, *bob).returncode == 0

        def stop_with_ctrl_c() -> None:
            postgres_pid = int((server.pgdata / "postmaster.pid").read_text().split()[0])
            assert alive(postgres_pid)
            os.kill(server.proc.pid, signal.SIGINT)
            assert server.proc.wait(timeout=180) == 0, server.log()[-3000:]
            assert server.log().rstrip().endswith("stopped the MLflow server and PostgreSQL")
            deadline = time.time() + 60
            while (alive(postgres_pid) or session_pids(server.proc.pid)) and time.time() < deadline:
                time.sleep(0.5)
            assert not alive(postgres_pid), "postgres still running"
            assert not session_pids(server.proc.pid), f"leftover processes: {session_pids(server.proc.pid)}"
            wait_until(lambda: not marked_pids(folder), 60, lambda: f"left running: {marked_pids(folder)}")
            assert not port_open(server.port)
            assert not (server.pgdata / "postmaster.pid").exists()
            assert not (server.pgdata / ".s.PGSQL.5432").exists()

        stop_with_ctrl_c()
        # Same folder, same port: the users are in PostgreSQL, the admin password file is reused.
        server = start_server(folder, log_path, server.port)
        assert server.admin == admin
        assert call(server.base, "2.0/mlflow/experiments/search?max_results=1", auth=bob)[0] == 200
        assert call(server.base, "2.0/mlflow/experiments/search?max_results=1", auth=admin)[0] == 200
        stop_with_ctrl_c()
        assert admin[1] not in server.log() and bob[1] not in server.log()

        # A lost password file is not silently replaced by one the admin user does not have.
        password_file.rename(folder / "admin_password.saved")
        result = subprocess.run([sys.executable, str(SCRIPT), "--dir", str(folder), "--port", str(free_port())],
                                capture_output=True, text=True, timeout=300, env=env())
        assert result.returncode == 1 and "MLFLOW_AUTH_ADMIN_PASSWORD" in result.stderr, result.stderr
        assert result.stderr.count("\n") == 1 and not password_file.exists()
        assert not (server.pgdata / "postmaster.pid").exists()
    finally:
        stop_server(server)
        shutil.rmtree(folder, ignore_errors=True)


def test_server_refuses_a_busy_port(tmp_path):
    require_postgresql()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = subprocess.run([sys.executable, str(SCRIPT), "--dir", str(tmp_path / "srv"), "--port", str(port)],
                                capture_output=True, text=True, timeout=60, env=env())
    assert result.returncode == 1
    assert result.stderr.startswith(f"error: cannot listen on 127.0.0.1:{port}") and result.stderr.count("\n") == 1
    assert not (tmp_path / "srv" / "pgdata").exists()


# --- roles, promotion, login throttle, user names, a killed server (findings of an adversarial review) ---

def test_read_only_user_creates_nothing(mlflow_server, users):
    """MLflow's basic auth lets every login create experiments, runs and registered models; the read-only
    role (tools/mlflow_auth.py) creates nothing, through the REST API or the UI's ajax-api."""
    base, admin = mlflow_server.base, mlflow_server.admin
    alice, rita = ("alice", users["alice"]), ("rita", users["rita"])
    tag = secrets.token_hex(4)
    experiment_id = api(base, "2.0/mlflow/experiments/create", {"name": f"alice-shared-{tag}"}, alice)["experiment_id"]
    model = api(base, "2.0/mlflow/registered-models/create", {"name": f"alice-model-{tag}"}, alice)["registered_model"]
    run_id = api(base, "2.0/mlflow/runs/create", {"experiment_id": experiment_id}, alice)["run"]["info"]["run_id"]
    runs_before = {e: len(api(base, "2.0/mlflow/runs/search", {"experiment_ids": [e]}, admin).get("runs", []))
                   for e in ("0", experiment_id)}
    prompt_tag = [{"key": "mlflow.prompt.is_prompt", "value": "true"}]
    attempts = {
        "an experiment": ("2.0/mlflow/experiments/create", {"name": f"rita-{tag}"}),
        "an experiment (UI)": ("/ajax-api/2.0/mlflow/experiments/create", {"name": f"rita-ui-{tag}"}),
        "a run in Default": ("2.0/mlflow/runs/create", {"experiment_id": "0"}),
        "a run in alice's experiment": ("2.0/mlflow/runs/create", {"experiment_id": experiment_id}),
        "a registered model": ("2.0/mlflow/registered-models/create", {"name": f"rita-{tag}"}),
        "a prompt": ("2.0/mlflow/registered-models/create", {"name": f"rita-prompt-{tag}", "tags": prompt_tag}),
        "a model version": ("2.0/mlflow/model-versions/create",
                            {"name": model["name"], "source": f"runs:/{run_id}/model", "run_id": run_id}),
        "a logged model": ("2.0/mlflow/logged-models", {"experiment_id": experiment_id, "name": f"rita-{tag}"}),
    }
    for what, (path, body) in attempts.items():
        status, answer = call(base, path, body, rita)
        assert status == 403, f"rita created {what}: HTTP {status} {answer}"
    experiments = api(base, "2.0/mlflow/experiments/search", {"max_results": 1000}, admin)["experiments"]
    assert not [e["name"] for e in experiments if e["name"].startswith("rita-")]
    models = api(base, "2.0/mlflow/registered-models/search?max_results=1000", auth=admin).get("registered_models", [])
    assert not [m["name"] for m in models if m["name"].startswith("rita-")]
    assert {e: len(api(base, "2.0/mlflow/runs/search", {"experiment_ids": [e]}, admin).get("runs", []))
            for e in ("0", experiment_id)} == runs_before
    # rita still reads everything.
    assert call(base, "2.0/mlflow/experiments/search", {"max_results": 10}, rita)[0] == 200
    assert call(base, f"2.0/mlflow/runs/get?run_id={run_id}", auth=rita)[0] == 200
    assert call(base, f"2.0/mlflow/registered-models/get?name={model['name']}", auth=rita)[0] == 200
    # The role is MLflow's own RBAC role, visible to the admin through MLflow's API.
    roles = api(base, "3.0/mlflow/users/roles/list?username=rita", auth=admin)["roles"]
    assert AUTH.READ_ONLY_ROLE in {r["name"] for r in roles}


def test_only_manage_or_promoter_moves_champion(mlflow_server, users):
    """EDIT registers versions (with the pipeline's tags), but moving @champion, deleting it, stage
    transitions and writing model-version tags need MANAGE on the model, the promoter role or the admin."""
    base, admin = mlflow_server.base, mlflow_server.admin
    alice, bob, pete = ("alice", users["alice"]), ("bob", users["bob"]), ("pete", users["pete"])
    name = f"classifier-{secrets.token_hex(4)}"
    api(base, "2.0/mlflow/registered-models/create", {"name": name}, alice)  # alice: creator, MANAGE
    experiment_id = api(base, "2.0/mlflow/experiments/create", {"name": f"{name}-runs"}, alice)["experiment_id"]
    versions = {}
    for who in (alice, bob):
        run_id = api(base, "2.0/mlflow/runs/create", {"experiment_id": experiment_id}, who)["run"]["info"]["run_id"]
        versions[who[0]] = api(base, "2.0/mlflow/model-versions/create", {
            "name": name, "source": f"runs:/{run_id}/model", "run_id": run_id,
            "tags": [{"key": "test_accuracy", "value": "0.91"}]}, who)["model_version"]["version"]
    api(base, "2.0/mlflow/registered-models/alias", {"name": name, "alias": "champion", "version": versions["alice"]},
        alice)

    def state() -> tuple:
        model = api(base, f"2.0/mlflow/registered-models/get?name={name}", auth=admin)["registered_model"]
        tags = {v: {t["key"]: t["value"] for t in api(base, f"2.0/mlflow/model-versions/get?name={name}&version={v}",
                                                        auth=admin)["model_version"].get("tags", [])}
                for v in versions.values()}
        return {a["alias"]: a["version"] for a in model.get("aliases", [])}, tags

    before = state()
    assert before[0] == {"champion": versions["alice"]}
    refused = [
        ("2.0/mlflow/registered-models/alias", {"name": name, "alias": "champion", "version": versions["bob"]}, "POST"),
        ("2.0/mlflow/registered-models/alias", {"name": name, "alias": "champion"}, "DELETE"),
        ("2.0/mlflow/model-versions/set-tag", {"name": name, "version": versions["alice"], "key": "test_accuracy",
                                                "value": "0.99"}, "POST"),
        ("2.0/mlflow/model-versions/set-tag", {"name": name, "version": versions["bob"], "key": "test_accuracy",
                                                "value": "0.99"}, "POST"),  # even on his own version
        ("2.0/mlflow/model-versions/delete-tag", {"name": name, "version": versions["alice"], "key": "test_accuracy"},
         "DELETE"),
        ("2.0/mlflow/model-versions/transition-stage", {"name": name, "version": versions["bob"],
                                                         "stage": "Production", "archive_existing_versions": False},
         "POST"),
    ]
    for path, body, method in refused:
        status, answer = call(base, path, body, bob, method)
        assert status == 403, f"bob (EDIT): {method} {path}: HTTP {status} {answer}"
    assert state() == before

    # The promoter role, the creator (MANAGE), the admin, and a teammate granted MANAGE may.
    move = "2.0/mlflow/registered-models/alias"
    api(base, move, {"name": name, "alias": "champion", "version": versions["bob"]}, pete)
    api(base, "2.0/mlflow/model-versions/set-tag", {"name": name, "version": versions["bob"], "key": "validated",
                                                    "value": "yes"}, pete)
    assert state()[0] == {"champion": versions["bob"]} and state()[1][versions["bob"]]["validated"] == "yes"
    api(base, move, {"name": name, "alias": "champion", "version": versions["alice"]}, alice)
    api(base, move, {"name": name, "alias": "champion", "version": versions["bob"]}, admin)
    api(base, "3.0/mlflow/users/permissions/grant", {"username": "bob", "resource_type": "registered_model",
                                                      "resource_id": name, "permission": "MANAGE"}, admin)
    api(base, move, {"name": name, "alias": "champion", "version": versions["alice"]}, bob)
    assert state()[0] == {"champion": versions["alice"]}


def request_from(address: str, port: int, login: tuple[str, str]) -> tuple[int, str | None, str]:
    """One authenticated GET from the loopback address `address`: (status, Retry-After, body)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60, source_address=(address, 0))
    try:
        conn.request("GET", "/api/2.0/mlflow/experiments/search?max_results=1",
                     headers={"Authorization": "Basic " + base64.b64encode(":".join(login).encode()).decode()})
        response = conn.getresponse()
        return response.status, response.getheader("Retry-After"), response.read().decode(errors="replace")
    finally:
        conn.close()


def checks_allowed(free: int, elapsed: float) -> int:
    """The most password checks one key can get within `elapsed` seconds: `free`, then one per expired lock."""
    checks, waited = free, 0.0
    while waited + AUTH.lock_seconds(checks, free) <= elapsed:
        waited += AUTH.lock_seconds(checks, free)
        checks += 1
    return checks


def guess(port: int, address: str, logins: list[tuple[str, str]]) -> tuple[list[int], float]:
    started = time.monotonic()
    statuses = [request_from(address, port, login)[0] for login in logins]
    return statuses, time.monotonic() - started


def test_failed_logins_are_throttled_per_user_and_address(mlflow_server, users):
    """Wrong passwords get 401 until a user or an address has used its free failures, then 429 with
    Retry-After and no password check. Asserts counts, never speed: a lock that expires on a slow machine
    allows one more check, which the bound allows for."""
    base, port, admin = mlflow_server.base, mlflow_server.port, mlflow_server.admin
    net = f"127.{20 + secrets.randbelow(200)}.{1 + secrets.randbelow(250)}"  # fresh addresses, not 127.0.0.1
    attacker, attacker2, teammate, other = (f"{net}.{i}" for i in (1, 2, 3, 4))
    logins = {}
    for name in ("tara", "tom", "uma"):
        logins[name] = (name, "pw-" + secrets.token_urlsafe(18))
        api(base, "2.0/mlflow/users/create", {"username": name, "password": logins[name][1]}, admin)
    assert request_from(teammate, port, logins["tom"])[0] == 200  # tom is logged in before the attack

    # Per user: 12 guesses at tara's password.
    n = 12
    statuses, elapsed = guess(port, attacker, [("tara", f"guess-{i}") for i in range(n)])
    assert set(statuses) <= {401, 429}, statuses
    assert statuses[:AUTH.USER_FREE] == [401] * AUTH.USER_FREE, statuses
    assert statuses.count(401) <= checks_allowed(AUTH.USER_FREE, elapsed), statuses
    assert statuses.count(429) >= n - checks_allowed(AUTH.USER_FREE, elapsed) > 0, statuses
    # What tara sees, with her right password from her own machine: 429, how long to wait, no check.
    status, retry_after, body = request_from(teammate, port, logins["tara"])
    assert status == 429 and 1 <= int(retry_after) <= AUTH.MAX_LOCK_S, (status, retry_after, body)
    assert "Too many failed logins" in body
    # Other users are not affected; tom, already logged in, keeps working while his password is guessed at.
    assert request_from(teammate, port, ("alice", users["alice"]))[0] == 200
    statuses, elapsed = guess(port, attacker2, [("tom", f"guess-{i}") for i in range(AUTH.USER_FREE + 2)])
    assert statuses[-1] == 429 and statuses.count(401) <= checks_allowed(AUTH.USER_FREE, elapsed), statuses
    assert request_from(other, port, logins["tom"])[0] == 200

    # Per address: one guess each at many user names from one address.
    n = AUTH.ADDRESS_FREE + 6
    statuses, elapsed = guess(port, other, [(f"ghost-{i}", "guess") for i in range(n)])
    assert statuses[:AUTH.ADDRESS_FREE] == [401] * AUTH.ADDRESS_FREE, statuses
    assert statuses.count(401) <= checks_allowed(AUTH.ADDRESS_FREE, elapsed), statuses
    assert statuses.count(429) >= n - checks_allowed(AUTH.ADDRESS_FREE, elapsed) > 0, statuses
    assert request_from(other, port, logins["uma"])[0] == 429  # a fresh login from that address waits too
    assert request_from(teammate, port, logins["uma"])[0] == 200  # ... from anywhere else it works
    assert request_from(other, port, logins["tom"])[0] == 200  # and a login verified before stays usable
    # The counts are in the auth database, where every worker of the server sees them.
    import psycopg

    with psycopg.connect(host=str(mlflow_server.pgdata), port=5432, user="mlflow", dbname="mlflow_auth",
                         connect_timeout=10) as db:
        locked = dict(db.execute(f"SELECT key, failures FROM {AUTH.THROTTLE_TABLE} WHERE locked_until > 0").fetchall())
    assert locked.get("user:tara", 0) >= AUTH.USER_FREE and locked.get(f"addr:{other}", 0) >= AUTH.ADDRESS_FREE


def test_user_names_cannot_run_shell_code(mlflow_server, users, tmp_path):
    """`make mlflow-user NAME=...` used to paste NAME into a shell command: a backtick ran."""
    marker = tmp_path / "ran"
    admin_env = env(MLFLOW_AUTH_ADMIN_PASSWORD=mlflow_server.admin[1])
    make = ["make", "--no-print-directory", "-o", "setup", "mlflow-user", f"SERVER_PORT={mlflow_server.port}"]
    for name in (f"x`touch {marker}`", f"x$$(touch {marker})", f"x; touch {marker}", f"x' && touch '{marker}"):
        result = subprocess.run([*make, f"NAME={name}"], cwd=REPO, input="pw-" + secrets.token_urlsafe(18) + "\n",
                                capture_output=True, text=True, timeout=300, env=admin_env)
        assert result.returncode != 0 and not marker.exists(), (name, result.stdout, result.stderr)
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "is not a user name" in errors[0], result.stderr
    for name in ("-x", "a b", "", "x" * 65, "ü", "x\nerror: forged"):
        result = subprocess.run([sys.executable, str(SCRIPT), "--dir", str(mlflow_server.folder), "--port",
                                 str(mlflow_server.port), f"--add-user={name}"], input="pw-" + secrets.token_urlsafe(18),
                                capture_output=True, text=True, timeout=120, env=env())
        assert result.returncode == 1 and result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, \
            (name, result.stderr)
    # A plain name goes through make and the script to the server.
    result = subprocess.run([*make, "NAME=dora.m-1", "READ_ONLY=1"], cwd=REPO,
                            input="pw-" + secrets.token_urlsafe(18) + "\n", capture_output=True, text=True,
                            timeout=300, env=admin_env)
    assert result.returncode == 0 and "created the MLflow user 'dora.m-1'" in result.stdout, result.stderr
    assert call(mlflow_server.base, "2.0/mlflow/users/get?username=dora.m-1", auth=mlflow_server.admin)[0] == 200


@pytest.mark.slow
def test_a_killed_server_leaves_nothing_running(tmp_path):
    """kill -9 of `make mlflow-server`'s process group used to leave MLflow and PostgreSQL running (the
    next start: "Address already in use"; --stop stopped only PostgreSQL)."""
    require_postgresql()
    folder = server_folder()
    log_path = tmp_path / "server.out"
    server = start_server(folder, log_path)

    def left() -> str:
        return f"left running: {marked_pids(folder)}, port open: {port_open(server.port)}\n{server.log()[-2000:]}"

    try:
        postgres = int((server.pgdata / "postmaster.pid").read_text().split()[0])
        assert len(marked_pids(folder)) >= 3  # the watchdog, mlflow server, uvicorn
        os.killpg(server.proc.pid, signal.SIGKILL)  # the script's process group, as make's
        server.proc.wait(timeout=60)
        wait_until(lambda: not marked_pids(folder) and not alive(postgres) and not port_open(server.port), 180, left)

        # The same folder and port serve again at once.
        server = start_server(folder, log_path, server.port)
        postgres = int((server.pgdata / "postmaster.pid").read_text().split()[0])
        watchdogs = [pid for pid in marked_pids(folder) if b"--watchdog" in Path(f"/proc/{pid}/cmdline").read_bytes()]
        assert len(watchdogs) == 1
        # Kill -9 the watchdog too: MLflow and PostgreSQL are orphans now ...
        os.kill(watchdogs[0], signal.SIGKILL)
        os.killpg(server.proc.pid, signal.SIGKILL)
        server.proc.wait(timeout=60)
        assert alive(postgres) and port_open(server.port) and marked_pids(folder)
        # ... and --stop stops them all, MLflow included.
        result = subprocess.run([sys.executable, str(SCRIPT), "--stop", "--dir", str(folder)], capture_output=True,
                                text=True, timeout=300, env=env())
        assert result.returncode == 0 and "stopped the MLflow server and PostgreSQL" in result.stdout, result.stderr
        wait_until(lambda: not marked_pids(folder) and not alive(postgres) and not port_open(server.port), 60, left)
    finally:
        stop_server(server)
        shutil.rmtree(folder, ignore_errors=True)


# --- DVC remotes -----------------------------------------------------------------------------------------

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


@dataclass
class SSHServer:
    port: int
    home: Path     # a HOME whose ~/.ssh/config names this server `team-storage`, with the key to log in
    storage: Path  # a folder "on the storage machine" (here: this one) for the team's DVC remote


@pytest.fixture
def sshd(tmp_path):
    """Debian's sshd on 127.0.0.1 and a free port, as the current user, with a generated host key and a
    generated client key, all in a temporary folder; the system's sshd and its config are not touched."""
    needs(SSHD.exists(), "openssh-server is not installed: apt-get install openssh-server")
    folder = tmp_path / "sshd"
    folder.mkdir()
    for key in ("host_key", "client_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", key, "-f", str(folder / key)],
                       check=True, timeout=60)
    shutil.copy(folder / "client_key.pub", folder / "authorized_keys")
    if os.geteuid() == 0:  # as root sshd insists on its privilege-separation folder (systemd makes it at boot)
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
    port, user = free_port(), pwd.getpwuid(os.getuid()).pw_name
    (folder / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {folder / 'host_key'}\nPidFile {folder / 'sshd.pid'}\n"
        f"AuthorizedKeysFile {folder / 'authorized_keys'}\nAllowUsers {user}\nPermitRootLogin prohibit-password\n"
        "PubkeyAuthentication yes\nPasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\n"
        "StrictModes no\n"  # the keys sit in pytest's temporary folders
        "Subsystem sftp internal-sftp\n")
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    (folder / "known_hosts").write_text(f"[127.0.0.1]:{port} {(folder / 'host_key.pub').read_text()}")
    config = home / ".ssh" / "config"
    config.write_text(f"Host team-storage\n  HostName 127.0.0.1\n  Port {port}\n  User {user}\n"
                      f"  IdentityFile {folder / 'client_key'}\n  IdentitiesOnly yes\n"
                      f"  UserKnownHostsFile {folder / 'known_hosts'}\n  StrictHostKeyChecking yes\n")
    config.chmod(0o600)
    storage = tmp_path / "storage"
    storage.mkdir()
    with open(folder / "sshd.log", "w") as log:
        proc = subprocess.Popen([str(SSHD), "-D", "-e", "-f", str(folder / "sshd_config")], stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        # Ready when a real login works: OpenSSH's client, checking the host key this time.
        deadline = time.time() + 120
        while True:
            login = subprocess.run(["ssh", "-F", str(config), "-o", "BatchMode=yes", "-o", "ConnectTimeout=10",
                                    "team-storage", "true"], capture_output=True, text=True, timeout=60,
                                   env=env(HOME=str(home)))
            if login.returncode == 0:
                break
            log_text = (folder / "sshd.log").read_text(errors="replace")
            assert proc.poll() is None, f"sshd exited with {proc.returncode}: {log_text}"
            assert time.time() < deadline, f"no ssh login after 120 s: {login.stderr}\n{log_text}"
            time.sleep(0.5)
        yield SSHServer(port, home, storage)
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
        kill_session(proc)


def machine_env(home: Path, login: tuple[str, str] | None = None) -> dict:
    """One "machine": its own HOME (~/.ssh/config) and, optionally, its MLflow login."""
    extra = {"HOME": str(home), "PATH": venv_path(), **GIT_ENV}
    if login:
        extra.update(MLFLOW_TRACKING_USERNAME=login[0], MLFLOW_TRACKING_PASSWORD=login[1])
    return env(**extra)


def run_on(folder: Path, machine: dict, *args: str, timeout: float = 900, check: bool = True) -> str:
    result = subprocess.run(args, cwd=folder, env=machine, capture_output=True, text=True, timeout=timeout)
    if check:
        assert result.returncode == 0, f"{args}: {result.stdout}\n{result.stderr}"
    return result.stdout + result.stderr


def test_dvc_remote_over_ssh_round_trip_and_refuses_altered_files(sshd, tmp_path):
    machine = machine_env(sshd.home)
    repo = tmp_path / "repo"
    repo.mkdir()
    run_on(repo, machine, "git", "init", "-q")
    run_on(repo, machine, "dvc", "init", "-q")
    (repo / "weights.bin").write_bytes(os.urandom(300_000))
    run_on(repo, machine, "dvc", "add", "-q", "weights.bin")
    run_on(repo, machine, "dvc", "remote", "add", "-d", "team", f"ssh://team-storage{sshd.storage}")
    run_on(repo, machine, "dvc", "remote", "modify", "team", "verify", "true")
    run_on(repo, machine, "git", "add", "-A")
    run_on(repo, machine, "git", "commit", "-qm", "data")
    run_on(repo, machine, "dvc", "push")
    md5 = hashlib.md5((repo / "weights.bin").read_bytes()).hexdigest()
    stored = sshd.storage / "files" / "md5" / md5[:2] / md5[2:]
    assert stored.read_bytes() == (repo / "weights.bin").read_bytes()

    run_on(tmp_path, machine, "git", "clone", "-q", str(repo), "clone")
    run_on(tmp_path / "clone", machine, "dvc", "pull")
    assert (tmp_path / "clone" / "weights.bin").read_bytes() == (repo / "weights.bin").read_bytes()

    # verify=true: DVC checks what it downloads against dvc.lock's md5, so a remote (or anyone between it and
    # us: DVC's SSH client does not check the server's host key) that serves other bytes is refused.
    stored.chmod(0o644)
    stored.write_bytes(os.urandom(300_000))
    run_on(tmp_path, machine, "git", "clone", "-q", str(repo), "victim")
    out = run_on(tmp_path / "victim", machine, "dvc", "pull", check=False)
    assert not (tmp_path / "victim" / "weights.bin").exists(), out


def check_complete_run(server: Server, run_id: str, project: Path, login: tuple[str, str]) -> None:
    """The run `project`'s pipeline logged, read back through the REST API with `login`: finished, with
    its params, metrics and artifacts (served only to a login), stored in PostgreSQL."""
    base = server.base
    run = api(base, f"2.0/mlflow/runs/get?run_id={run_id}", auth=login)["run"]
    assert run["info"]["status"] == "FINISHED"
    params = {p["key"]: p["value"] for p in run["data"]["params"]}
    assert params["train.lr"] == "0.01" and params["preprocess.max_train"] == "600"
    metrics = {m["key"]: m["value"] for m in run["data"]["metrics"]}
    assert metrics["test_accuracy"] == json.loads((project / "metrics/eval.json").read_text())["test_accuracy"]
    assert {"train_loss", "val/accuracy", "test_loss"} <= set(metrics)

    # Artifacts go through the server, to logins only, into --artifacts-destination.
    listed = api(base, f"2.0/mlflow/artifacts/list?run_id={run_id}&path=metrics", auth=login)["files"]
    assert "metrics/eval.json" in {f["path"] for f in listed}
    artifact_uri = run["info"]["artifact_uri"]
    assert artifact_uri.startswith("mlflow-artifacts:/"), artifact_uri
    location = artifact_uri.removeprefix("mlflow-artifacts:/").strip("/")
    artifact_path = f"2.0/mlflow-artifacts/artifacts/{location}/metrics/eval.json"
    assert call(base, artifact_path)[0] == 401
    request = urllib.request.Request(f"{base}/api/{artifact_path}", headers={
        "Authorization": "Basic " + base64.b64encode(":".join(login).encode()).decode()})
    with urllib.request.urlopen(request, timeout=60) as response:
        assert response.read() == (project / "metrics/eval.json").read_bytes()
    assert (server.folder / "artifacts" / location / "metrics/eval.json").read_bytes() == \
        (project / "metrics/eval.json").read_bytes()
    assert list((server.folder / "artifacts").rglob("MLmodel")), "the logged model is missing"

    # The run is in PostgreSQL; the logins in their own database of the same cluster, as hashes.
    import psycopg

    with psycopg.connect(host=str(server.pgdata), port=5432, user="mlflow", dbname="mlflow", connect_timeout=10) as db:
        assert db.execute("SELECT status FROM runs WHERE run_uuid = %s", (run_id,)).fetchone() == ("FINISHED",)
    with psycopg.connect(host=str(server.pgdata), port=5432, user="mlflow", dbname="mlflow_auth",
                         connect_timeout=10) as db:
        rows = db.execute("SELECT username, password_hash FROM users").fetchall()
    assert {"admin", login[0]} <= {name for name, _ in rows}
    assert not leaks([login[1], server.admin[1]], texts=[h for _, h in rows]), "a password is stored in clear"


def exp_show(folder: Path, machine: dict) -> dict:
    """{experiment name: its row of `dvc exp show --csv`}."""
    text = run_on(folder, machine, "dvc", "exp", "show", "--csv", "--no-pager")
    rows = csv.DictReader(io.StringIO(text[text.index("Experiment,"):]))
    return {row["Experiment"]: row for row in rows if row["Experiment"]}


@pytest.mark.slow
def test_three_machines_share_experiments_through_git_ssh_and_mlflow(mlflow_server, users, sshd, tmp_path, mirror):
    base = mlflow_server.base
    # Each machine has its own HOME with the ssh config. alice and bob log in to MLflow through the
    # environment, carol through ~/.mlflow/credentials (the README shows both).
    homes = {name: tmp_path / f"home-{name}" for name in ("carol", "alice", "bob")}
    for home in homes.values():
        shutil.copytree(sshd.home, home)
    (homes["carol"] / ".mlflow").mkdir()
    credentials = homes["carol"] / ".mlflow" / "credentials"
    credentials.write_text(f"[mlflow]\nmlflow_tracking_username = carol\nmlflow_tracking_password = {users['carol']}\n")
    credentials.chmod(0o600)
    machine = {name: machine_env(homes[name], None if name == "carol" else (name, users[name])) for name in homes}
    origin = tmp_path / "origin.git"
    sh(tmp_path, "git", "init", "-q", "--bare", "--initial-branch=main", str(origin))
    outputs = []

    # carol sets the project up: the team's git and DVC remotes, tracking.uri committed, a baseline run.
    carol = make_dvc_repo(tmp_path / "carol", {"data": {"mirrors": [str(mirror)]},
                                               "tracking": {"enabled": True, "uri": base}})
    for args in (("dvc", "remote", "add", "-d", "team", f"ssh://team-storage{sshd.storage}/tudui-dvc"),
                 ("dvc", "remote", "modify", "team", "verify", "true"),
                 ("dvc", "repro"),
                 ("git", "add", "-A"), ("git", "commit", "-qm", "baseline"), ("git", "branch", "-M", "main"),
                 ("git", "remote", "add", "origin", str(origin)), ("git", "push", "-q", "-u", "origin", "main"),
                 ("dvc", "push")):
        outputs.append(run_on(carol, machine["carol"], *args))
    assert "warning: MLflow" not in "".join(outputs), outputs
    baseline_run = json.loads((carol / "models/mlflow_run.json").read_text())["run_id"]
    check_complete_run(mlflow_server, baseline_run, carol, ("carol", users["carol"]))

    # alice and bob clone it, pull the data over SSH and run an experiment each, at the same time.
    experiments = {"alice": ("alice-lr02", "0.02"), "bob": ("bob-lr05", "0.05")}
    for name in experiments:
        run_on(tmp_path, machine[name], "git", "clone", "-q", str(origin), name)
        outputs.append(run_on(tmp_path / name, machine[name], "dvc", "pull"))
        assert digests(tmp_path / name) == digests(carol)
    procs = {}
    try:
        for name, (exp, lr) in experiments.items():
            with open(tmp_path / f"{name}.out", "w") as log:
                procs[name] = subprocess.Popen(["dvc", "exp", "run", "-n", exp, "-S", f"train.lr={lr}"],
                                               cwd=tmp_path / name, env=machine[name], stdout=log,
                                               stderr=subprocess.STDOUT, start_new_session=True)
        for name, proc in procs.items():
            proc.wait(timeout=1800)  # a safety net for a hung run, not a timing assumption
    finally:
        for proc in procs.values():
            kill_session(proc)
    for name, (exp, _) in experiments.items():
        out = (tmp_path / f"{name}.out").read_text(errors="replace")
        outputs.append(out)
        assert procs[name].returncode == 0, out
        assert "Running stage 'train'" in out and "warning" not in out, out
        outputs.append(run_on(tmp_path / name, machine[name], "dvc", "exp", "push", "origin", exp))
    results = {name: {"eval": json.loads((tmp_path / name / "metrics/eval.json").read_text()),
                      "model": (tmp_path / name / "models/model.pt").read_bytes(),
                      "run": json.loads((tmp_path / name / "models/mlflow_run.json").read_text())["run_id"]}
               for name in experiments}
    assert results["alice"]["model"] != results["bob"]["model"]

    # carol pulls both experiments: dvc exp show lists them with their metrics.
    cached_before = {p.name for p in files_under(carol / ".dvc" / "cache")}
    outputs.append(run_on(carol, machine["carol"], "dvc", "exp", "pull", "origin"))
    shown = exp_show(carol, machine["carol"])
    for name, (exp, lr) in experiments.items():
        assert exp in shown, shown.keys()
        assert float(shown[exp]["test_accuracy"]) == pytest.approx(results[name]["eval"]["test_accuracy"], abs=1e-6)
        assert shown[exp]["train.lr"] == lr

    # dvc exp apply + dvc pull: alice's model, byte for byte, from the SSH remote (git holds no model bytes).
    outputs.append(run_on(carol, machine["carol"], "dvc", "exp", "apply", "alice-lr02"))
    outputs.append(run_on(carol, machine["carol"], "dvc", "pull"))
    model = (carol / "models/model.pt").read_bytes()
    assert model == results["alice"]["model"]
    md5 = hashlib.md5(model).hexdigest()
    assert md5[2:] not in cached_before
    assert (sshd.storage / "tudui-dvc" / "files" / "md5" / md5[:2] / md5[2:]).read_bytes() == model
    assert json.loads((carol / "metrics/eval.json").read_text()) == results["alice"]["eval"]

    # All three logged to the one server, each with their own login: carol's baseline and the two experiments.
    admin = mlflow_server.admin
    experiment_id = api(base, "2.0/mlflow/experiments/get-by-name?experiment_name=tudui-pipeline",
                        auth=admin)["experiment"]["experiment_id"]
    runs = {r["info"]["run_id"]: r for r in api(base, "2.0/mlflow/runs/search", {"experiment_ids": [experiment_id],
                                                                                 "max_results": 1000}, admin)["runs"]}
    assert runs[baseline_run]["info"]["status"] == "FINISHED"
    assert "test_accuracy" in {m["key"] for m in runs[baseline_run]["data"]["metrics"]}
    for name, (exp, lr) in experiments.items():
        run = runs[results[name]["run"]]
        assert run["info"]["status"] == "FINISHED" and run["info"]["run_name"] == exp
        assert {p["key"]: p["value"] for p in run["data"]["params"]}["train.lr"] == lr
        metrics = {m["key"]: m["value"] for m in run["data"]["metrics"]}
        assert metrics["test_accuracy"] == results[name]["eval"]["test_accuracy"]

    # No password anywhere: params, tags, artifacts, dvc.lock, workspaces, git history, the DVC remote,
    # command output or the server's log.
    passwords = [users[name] for name in homes] + [admin[1]]
    for name in homes:
        folder = tmp_path / name
        refs = run_on(folder, machine[name], "git", "for-each-ref", "--format=%(objectname)").split()
        grep = subprocess.run(["git", "grep", "-I", "-F", *[f"-e{p}" for p in passwords], *refs], cwd=folder,
                              env=machine[name], capture_output=True, text=True, timeout=300)
        assert grep.returncode == 1, grep.stdout[:2000] + grep.stderr  # 1: no match
        assert (folder / "dvc.lock").exists()
    texts = [*outputs, mlflow_server.log(),
             *(json.dumps(run["data"].get("params", [])) + json.dumps(run["data"].get("tags", []))
               for run in runs.values())]
    found = leaks(passwords, files_under(*(tmp_path / name for name in homes), sshd.storage,
                                         mlflow_server.folder / "artifacts"), texts)
    assert not found, found
