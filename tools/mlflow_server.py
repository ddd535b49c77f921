"""`make mlflow-server`: a shared MLflow tracking server with logins, backed by a private PostgreSQL cluster.

    python tools/mlflow_server.py [--host 127.0.0.1] [--port 5001] [--dir mlserver]
    python tools/mlflow_server.py --add-user NAME [--read-only]   # a login; the password is asked for
    python tools/mlflow_server.py --stop            # stop a PostgreSQL left running by a killed server

Python rather than shell: the script owns two servers and must stop both on Ctrl-C, SIGTERM, a
closed terminal or a failed start; try/finally and subprocess say that more plainly than traps.

Everything lives under --dir (default <repo>/mlserver, git-ignored):
    pgdata/         the PostgreSQL cluster, made with initdb on first use; its Unix socket is here too
    postgres.log    PostgreSQL's log
    artifacts/      the artifact store the server serves (--serve-artifacts --artifacts-destination)
    admin_password  the password of the MLflow user `admin`, generated on first start (mode 0600)
    secret_key      the key MLflow's login app signs its forms with (mode 0600)
    auth.ini        the login app's config (MLFLOW_AUTH_CONFIG_PATH), rewritten at every start

Logins: MLflow's basic-auth app (`mlflow server --app-name basic-auth`). Its users and permissions live
in a second database, mlflow_auth, of the same cluster. The admin password comes from
MLFLOW_AUTH_ADMIN_PASSWORD when set, else from admin_password; it is never printed. Clients log in with
MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD. --no-auth serves without logins, on loopback only.

PostgreSQL listens on no TCP port, only on a Unix socket inside pgdata/ (mode 0700) with trust
authentication: only the folder's owner and root can connect, no database password exists, and
neither the Debian package's own cluster (port 5432) nor another checkout's server can collide with
it. PostgreSQL refuses to run as root, so as root initdb and pg_ctl run as the `postgres` user, which
then owns pgdata/. MLflow itself runs as the caller.
"""
from __future__ import annotations

import argparse
import base64
import getpass
import importlib.util
import ipaddress
import json
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import quote

REPO = Path(__file__).resolve().parents[1]
PG_USER = "postgres"  # the account Debian's postgresql package creates; used only when run as root
DB_USER = DB_NAME = "mlflow"
AUTH_DB = "mlflow_auth"  # MLflow's users and permissions
ADMIN = "admin"
# What a user may do on an experiment nobody gave them rights on. MLflow raises every grant to at least
# this, so anything above READ would make read-only users impossible; writers get EDIT from --add-user.
DEFAULT_PERMISSION = "READ"
AUTH_CACHE_S = 60


class Fail(Exception):
    """A problem the user can fix: printed as one line, exit code 1."""


def pg_bin_dir() -> Path:
    """The newest /usr/lib/postgresql/<version>/bin (Debian's layout), else the folder of pg_ctl on PATH."""
    found = [p.parent for p in Path("/usr/lib/postgresql").glob("*/bin/initdb")]
    if found:
        return max(found, key=lambda b: [int(x) for x in b.parent.name.split(".") if x.isdigit()])
    on_path = shutil.which("pg_ctl")
    if on_path and shutil.which("initdb"):
        return Path(on_path).parent
    raise Fail("PostgreSQL is not installed (no /usr/lib/postgresql/*/bin/initdb): "
               "apt-get install postgresql")


def as_server_user(cmd: list) -> list:
    if os.geteuid() == 0:
        return ["runuser", "-u", PG_USER, "--", *map(str, cmd)]
    return [str(c) for c in cmd]


def give_to_server_user(path: Path) -> None:
    if os.geteuid() == 0:
        shutil.chown(path, PG_USER, PG_USER)


def check_root_setup(folder: Path) -> None:
    if os.geteuid() != 0:
        return
    try:
        pwd.getpwnam(PG_USER)
    except KeyError:
        raise Fail(f"running as root, and PostgreSQL refuses root, but there is no {PG_USER!r} user "
                   "to run it as: run as a normal user, or apt-get install postgresql (creates it)") from None
    probe = subprocess.run(as_server_user(["test", "-x", folder]), capture_output=True)
    if probe.returncode != 0:
        raise Fail(f"the {PG_USER!r} user cannot reach {folder}: make its parent folders searchable "
                   "(chmod o+x) or run as a normal user")


def pg_ctl(bin_dir: Path, pgdata: Path, *args) -> subprocess.CompletedProcess:
    return subprocess.run(as_server_user([bin_dir / "pg_ctl", "-D", pgdata, *args]),
                          capture_output=True, text=True, timeout=120)


def init_cluster(bin_dir: Path, pgdata: Path) -> None:
    if (pgdata / "PG_VERSION").exists():
        return
    print(f"creating the PostgreSQL cluster in {pgdata}", flush=True)
    pgdata.mkdir(mode=0o700)
    give_to_server_user(pgdata)
    result = subprocess.run(as_server_user([bin_dir / "initdb", "-D", pgdata, "-U", DB_USER, "-E", "UTF8",
                                            "--no-locale", "--auth-local=trust", "--auth-host=reject"]),
                            capture_output=True, text=True, timeout=300)
    if result.returncode != 0:
        shutil.rmtree(pgdata, ignore_errors=True)  # a half-made cluster would be "found" next time
        raise Fail(f"initdb failed: {result.stderr.strip()}")
    # '.' is the data folder: the postmaster runs inside it.
    with open(pgdata / "postgresql.conf", "a") as conf:
        conf.write("\n# tools/mlflow_server.py: no TCP, socket inside this folder\n"
                   "listen_addresses = ''\nunix_socket_directories = '.'\nport = 5432\n")


def check_not_running(bin_dir: Path, pgdata: Path) -> None:
    if pg_ctl(bin_dir, pgdata, "status").returncode == 0:
        raise Fail(f"PostgreSQL is already running in {pgdata} (another mlflow server, or one that was "
                   f"killed?): stop it first with `python tools/{Path(__file__).name} --stop --dir {pgdata.parent}`")


def start_postgres(bin_dir: Path, pgdata: Path, log: Path) -> None:
    log.touch()
    give_to_server_user(log)
    result = pg_ctl(bin_dir, pgdata, "start", "-w", "-t", "60", "-l", log)
    if result.returncode != 0:
        tail = "; ".join(log.read_text(errors="replace").strip().splitlines()[-3:])
        raise Fail(f"PostgreSQL did not start (log {log}): {tail}")


def stop_postgres(bin_dir: Path, pgdata: Path) -> bool:
    """Fast shutdown (ends open sessions, then a clean checkpoint); False when none was running."""
    if not (pgdata / "postmaster.pid").exists():
        return False
    return pg_ctl(bin_dir, pgdata, "stop", "-m", "fast", "-w", "-t", "60").returncode == 0


def database_uri(pgdata: Path, name: str = DB_NAME) -> str:
    return f"postgresql+psycopg://{DB_USER}@/{name}?host={quote(str(pgdata), safe='/')}&port=5432"


def ensure_databases(pgdata: Path, *names: str) -> set[str]:
    """Create the databases that are missing; returns the ones it created."""
    import psycopg

    created = set()
    try:
        with psycopg.connect(host=str(pgdata), port=5432, user=DB_USER, dbname="postgres", autocommit=True,
                             connect_timeout=10) as conn:
            for name in names:
                if not conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone():
                    conn.execute(f"CREATE DATABASE {name}")
                    created.add(name)
    except psycopg.Error as exc:
        raise Fail(f"cannot create the databases {', '.join(names)}: {' '.join(str(exc).split())}") from None
    return created


def write_private(path: Path, text: str) -> None:
    """Write `text` to `path` atomically, readable by its owner only from the first byte on."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(text)
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, path)


def read_private(path: Path) -> str:
    if path.stat().st_mode & 0o077:
        raise Fail(f"{path} holds a secret but others may read it: chmod 600 {path}")
    return path.read_text().strip()


def server_secret(path: Path, env_var: str, may_create: bool) -> str:
    """The secret in `env_var` when set, else the one in `path`; generated into `path` when `may_create`."""
    if os.environ.get(env_var):
        return os.environ[env_var]
    if path.exists():
        return read_private(path)
    if not may_create:
        raise Fail(f"{path} is missing and {env_var} is not set, but the server was set up before: "
                   f"set {env_var} to the password it was first started with")
    value = secrets.token_urlsafe(24)
    write_private(path, value + "\n")
    return value


def write_auth_config(path: Path, pgdata: Path) -> None:
    """MLflow's basic-auth settings (read through MLFLOW_AUTH_CONFIG_PATH); no secret in it."""
    uri = database_uri(pgdata, AUTH_DB).replace("%", "%%")  # configparser interpolates %
    write_private(path, "[mlflow]\n"
                        f"default_permission = {DEFAULT_PERMISSION}\n"
                        f"database_uri = {uri}\n"
                        f"admin_username = {ADMIN}\n"
                        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
                        # Checking a password (scrypt) costs ~0.2 s of CPU, and logging a model makes dozens
                        # of requests: each worker remembers a good login for a minute. A changed password or
                        # deleted user then still works for up to that long on the workers that did not
                        # handle the change.
                        f"auth_cache_ttl_seconds = {AUTH_CACHE_S}\n")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: assume other machines can reach it


def check_port_free(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: TIME_WAIT is no conflict
        try:
            s.bind((host, port))
        except OSError as exc:
            raise Fail(f"cannot listen on {host}:{port} ({exc.strerror}): another server there? "
                       "Pick another port: make mlflow-server SERVER_PORT=5002") from None


def stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM the server's process group (it forks workers), SIGKILL it after 30 s."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # any worker that outlived the server
    except ProcessLookupError:
        pass


def client_url(host: str, port: int) -> str:
    # Listening on all interfaces: teammates reach it by this machine's name, not 0.0.0.0.
    return f"http://{socket.getfqdn() if host in ('0.0.0.0', '::') else host}:{port}"


def serve(args, bin_dir: Path, folder: Path) -> int:
    pgdata, artifacts = folder / "pgdata", folder / "artifacts"
    if args.no_auth and not is_loopback(args.host):
        raise Fail(f"refusing to serve {args.host} without logins (--no-auth): anyone who reaches it could "
                   "read, change or delete every run; drop --no-auth, or bind 127.0.0.1")
    mlflow_cli = Path(sys.executable).with_name("mlflow")
    if not mlflow_cli.exists():
        raise Fail(f"{mlflow_cli} is missing: run `make setup` (or pip install mlflow) first")
    if importlib.util.find_spec("psycopg") is None:
        raise Fail("the PostgreSQL driver is missing: run `make setup` (or pip install 'psycopg[binary]')")
    if not args.no_auth and importlib.util.find_spec("flask_wtf") is None:
        raise Fail("MLflow's login app is missing Flask-WTF: run `make setup` (or pip install 'mlflow[auth]')")
    if len(str(pgdata / ".s.PGSQL.5432").encode()) > 107:  # the kernel's limit for a socket path
        raise Fail(f"{pgdata} is too deep for PostgreSQL's Unix socket: pass a shorter --dir")
    check_port_free(args.host, args.port)
    folder.mkdir(parents=True, exist_ok=True)
    check_root_setup(folder)
    init_cluster(bin_dir, pgdata)
    artifacts.mkdir(exist_ok=True)
    check_not_running(bin_dir, pgdata)
    server = None
    try:
        start_postgres(bin_dir, pgdata, folder / "postgres.log")
        created = ensure_databases(pgdata, DB_NAME, *([] if args.no_auth else [AUTH_DB]))
        env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
        # MLflow's job runner serves GenAI scoring, which the pipeline never asks for: without it the
        # server starts fewer processes and stops at once.
        env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
        command = [mlflow_cli, "server", "--backend-store-uri", database_uri(pgdata),
                   "--serve-artifacts", "--artifacts-destination", str(artifacts),
                   "--host", args.host, "--port", str(args.port), "--workers", str(args.workers)]
        url = client_url(args.host, args.port)
        if args.no_auth:
            login = "no logins (--no-auth): anyone who can reach it may change or delete runs"
        else:
            password_file = folder / "admin_password"
            password = server_secret(password_file, "MLFLOW_AUTH_ADMIN_PASSWORD", may_create=AUTH_DB in created)
            write_auth_config(folder / "auth.ini", pgdata)
            env.update(MLFLOW_AUTH_CONFIG_PATH=str(folder / "auth.ini"), MLFLOW_AUTH_ADMIN_PASSWORD=password,
                       MLFLOW_FLASK_SERVER_SECRET_KEY=server_secret(folder / "secret_key",
                                                                     "MLFLOW_FLASK_SERVER_SECRET_KEY", True))
            command += ["--app-name", "basic-auth"]
            source = ("MLFLOW_AUTH_ADMIN_PASSWORD" if os.environ.get("MLFLOW_AUTH_ADMIN_PASSWORD")
                      else f"{password_file} (mode 0600)")
            login = (f"logins: user {ADMIN!r} with the password in {source}\n"
                     f"add a teammate: python tools/{Path(__file__).name} --add-user NAME [--read-only] "
                     f"--port {args.port}\n"
                     "clients log in with MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD")
        print(f"MLflow tracking server on {url}: runs in PostgreSQL ({pgdata}), artifacts in {artifacts}\n"
              f"{login}\n"
              f"log the pipeline to it: dvc exp run -S tracking.uri={url}  (or export MLFLOW_TRACKING_URI={url})\n"
              "Ctrl-C stops the server and PostgreSQL", flush=True)
        # Own process group: a terminal's Ctrl-C reaches only this script, which then stops the
        # server and PostgreSQL in order instead of everything dying at once.
        server = subprocess.Popen(command, env=env, preexec_fn=os.setpgrp)
        return server.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # let the cleanup finish
            signal.signal(sig, signal.SIG_IGN)
        if server is not None:
            stop_group(server)
        if stop_postgres(bin_dir, pgdata) or server is not None:
            print("stopped the MLflow server and PostgreSQL", flush=True)


def read_new_password(name: str) -> str:
    """From the terminal (asked twice), or the first line of stdin when it is a pipe or a file."""
    if not sys.stdin.isatty():
        return sys.stdin.readline().rstrip("\r\n")
    password = getpass.getpass(f"password for {name}: ")
    if getpass.getpass("again: ") != password:
        raise Fail("the two passwords differ")
    return password


def admin_request(url: str, admin_password: str, path: str, body: dict, what: str) -> dict:
    """POST `body` to the server's REST API as the admin; a refusal becomes one line that names `what`."""
    token = base64.b64encode(f"{ADMIN}:{admin_password}".encode()).decode()
    request = urllib.request.Request(f"{url}/api/{path}", method="POST", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json", "Authorization": f"Basic {token}"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as exc:
        if exc.code == 401:
            raise Fail(f"{url} refused the admin password (changed through MLflow since the first start? "
                       "set MLFLOW_AUTH_ADMIN_PASSWORD to the current one)") from None
        text = exc.read().decode(errors="replace")
        try:
            text = json.loads(text).get("message", text)
        except ValueError:
            pass
        # MLflow appends the failed SQL statement: the first sentence is the reason.
        raise Fail(f"{url} refused to {what} (HTTP {exc.code}): {' '.join(text.split()).split('. ')[0][:200]}") from None
    except OSError as exc:
        raise Fail(f"no MLflow server answers at {url} ({getattr(exc, 'reason', exc)}): start it with "
                   "`make mlflow-server`, or name it with --url") from None


def add_user(args, folder: Path) -> int:
    """Create an MLflow login through the running server's REST API, as the admin; unless --read-only,
    with EDIT on every experiment and registered model (log runs and add model versions, not delete
    them; a resource's creator may)."""
    url = (args.url or f"http://{'127.0.0.1' if args.host in ('0.0.0.0', '::') else args.host}:{args.port}").rstrip("/")
    admin_password = server_secret(folder / "admin_password", "MLFLOW_AUTH_ADMIN_PASSWORD", may_create=False)
    name = args.add_user
    password = read_new_password(name)
    if len(password) < 12:
        raise Fail("the password must have at least 12 characters (MLflow's rule)")
    admin_request(url, admin_password, "2.0/mlflow/users/create", {"username": name, "password": password},
                  f"create the user {name!r}")
    if not args.read_only:  # runs in every experiment, versions of every registered model (the team's)
        for resource, what in (("experiment", "log runs"), ("registered_model", "register model versions")):
            admin_request(url, admin_password, "3.0/mlflow/users/permissions/grant",
                          {"username": name, "resource_type": resource, "resource_id": "*", "permission": "EDIT"},
                          f"let {name!r} {what}")
    rights = "read-only" if args.read_only else "may log runs and register model versions everywhere"
    print(f"created the MLflow user {name!r} on {url} ({rights}); they log in with "
          f"MLFLOW_TRACKING_USERNAME={name} and MLFLOW_TRACKING_PASSWORD")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1", help="interface for the MLflow server (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=5001)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--dir", type=Path, default=REPO / "mlserver", help="where PostgreSQL and artifacts live")
    parser.add_argument("--stop", action="store_true", help="stop a PostgreSQL left running in --dir, then exit")
    parser.add_argument("--no-auth", action="store_true", help="no logins (refused unless --host is loopback)")
    parser.add_argument("--add-user", metavar="NAME", help="create a login on the running server, then exit; "
                        "the password is asked for, or read from stdin; the user may log runs and register model versions")
    parser.add_argument("--read-only", action="store_true",
                        help="with --add-user: the user gets no write access to the team's experiments")
    parser.add_argument("--url", help="with --add-user: the server's address (default http://HOST:PORT)")
    args = parser.parse_args()
    folder = args.dir.resolve()
    # SIGTERM (kill, CI) and SIGHUP (closed terminal) unwind like Ctrl-C, through serve()'s finally.
    # SIGINT explicitly too: a shell starts `... &` with it ignored, and `kill -INT` must still stop us.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda *_: sys.exit(0))
    try:
        if args.add_user:
            return add_user(args, folder)
        bin_dir = pg_bin_dir()
        if args.stop:
            stopped = stop_postgres(bin_dir, folder / "pgdata")
            print(f"{'stopped' if stopped else 'no'} PostgreSQL running in {folder / 'pgdata'}")
            return 0
        return serve(args, bin_dir, folder)
    except Fail as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # at a password prompt
        return 130


if __name__ == "__main__":
    sys.exit(main())
