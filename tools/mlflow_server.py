"""`make mlflow-server`: a shared MLflow tracking server with logins, backed by a private PostgreSQL cluster.

    python tools/mlflow_server.py [--host 127.0.0.1] [--port 5001] [--dir mlserver]
    python tools/mlflow_server.py --add-user NAME [--read-only | --promoter]   # a login; the password is asked for
    python tools/mlflow_server.py --stop            # stop the server of --dir, running or left by a killed one

Python rather than shell: the script owns two servers and must stop both on Ctrl-C, SIGTERM, a
closed terminal or a failed start; try/finally and subprocess say that more plainly than traps.
It owns them when it is killed too (kill -9, OOM): a watchdog in its own session waits on a pipe from
the script; when the pipe closes without the script's "done" it stops what the script started. Every
process it starts carries TUDUI_MLFLOW_SERVER=<--dir> in its environment, so a later start or --stop
finds what a lost watchdog left (PostgreSQL by its own postmaster.pid). The script holds an flock on
server.lock while it serves: one server per folder, and --stop knows whom to ask (the pid in it).

Everything lives under --dir (default <repo>/mlserver, git-ignored):
    pgdata/         the PostgreSQL cluster, made with initdb on first use; its Unix socket is here too
    postgres.log    PostgreSQL's log
    artifacts/      the artifact store the server serves (--serve-artifacts --artifacts-destination)
    admin_password  the password of the MLflow user `admin`, generated on first start (mode 0600)
    secret_key      the key MLflow's login app signs its forms with (mode 0600)
    auth.ini        the login app's config (MLFLOW_AUTH_CONFIG_PATH), rewritten at every start
    plugin/         registers tools/mlflow_auth.py as MLflow app `tudui-auth` (an `mlflow.app` entry point)
    server.lock     held (flock) by the running server, with its pid

Logins: MLflow's basic-auth app with tools/mlflow_auth.py's rules (`mlflow server --app-name tudui-auth`:
read-only and promoter roles, aliases and version tags need MANAGE, failed logins throttled). Its users,
permissions and roles live in a second database, mlflow_auth, of the same cluster. The admin password comes from
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
import contextlib
import fcntl
import getpass
import importlib.util
import ipaddress
import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path
from urllib.parse import quote

try:  # the roles tools/mlflow_auth.py enforces; run as a script, tools/ is on the path
    from tools.mlflow_auth import APP_NAME, PROMOTER_ROLE, READ_ONLY_ROLE, ROLE_WORKSPACE
except ImportError:
    from mlflow_auth import APP_NAME, PROMOTER_ROLE, READ_ONLY_ROLE, ROLE_WORKSPACE

REPO = Path(__file__).resolve().parents[1]
PG_USER = "postgres"  # the account Debian's postgresql package creates; used only when run as root
DB_USER = DB_NAME = "mlflow"
AUTH_DB = "mlflow_auth"  # MLflow's users and permissions
ADMIN = "admin"
# What a user may do on an experiment nobody gave them rights on. MLflow raises every grant to at least
# this, so anything above READ would make read-only users impossible; writers get EDIT from --add-user.
DEFAULT_PERMISSION = "READ"
AUTH_CACHE_S = 60
MARK = "TUDUI_MLFLOW_SERVER"  # in the environment of every process the script starts: the folder
MARK_RUN = "TUDUI_MLFLOW_SERVER_RUN"  # ... and one start's token
USER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")


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
        raise Fail(f"PostgreSQL is still running in {pgdata} and would not stop: see {pgdata.parent / 'postgres.log'}")


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


# --- owning what it starts: the lock, the marks, the watchdog ----------------------------------------

def take_lock(folder: Path, wait_s: float = 0) -> int | None:
    """An flock on <folder>/server.lock with our pid in it (the fd, kept until exit), or None while another
    process holds it, after polling up to `wait_s` seconds."""
    fd = os.open(folder / "server.lock", os.O_RDWR | os.O_CREAT, 0o644)
    deadline = time.monotonic() + wait_s
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() >= deadline:
                os.close(fd)
                return None
            time.sleep(0.2)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def lock_holder(folder: Path) -> int | None:
    try:
        return int((folder / "server.lock").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def marked_pids(folder: Path, run: str | None = None) -> list[int]:
    """Live processes started for `folder` (and by start `run`, when given), found by their environment."""
    mark, found = f"{MARK}={folder}".encode(), []
    run_mark = f"{MARK_RUN}={run}".encode() if run else None
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:  # gone, or another user's
            continue
        if mark in environ and (run_mark is None or run_mark in environ):
            found.append(int(entry.name))
    return found


def stop_marked(folder: Path, run: str | None = None) -> bool:
    """SIGTERM the marked processes, SIGKILL what is left after 30 s; True if there were any. Rescans:
    a worker a supervisor restarted in between is marked too."""
    pids = marked_pids(folder, run)
    found = bool(pids)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + 30
        while (pids := marked_pids(folder, run)) and time.monotonic() < deadline:
            time.sleep(0.2)
        if not pids:
            break
    return found


def stop_leftovers(bin_dir: Path, folder: Path) -> bool:
    """Whatever an earlier, killed start left: its MLflow server, its watchdog, then PostgreSQL."""
    killed = stop_marked(folder)
    return stop_postgres(bin_dir, folder / "pgdata") or killed


def start_watchdog(folder: Path, env: dict) -> subprocess.Popen:
    """`--watchdog` in its own session (a signal to our process group misses it), reading our pipe."""
    return subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--watchdog", "--dir", str(folder)],
                            stdin=subprocess.PIPE, env=env, start_new_session=True)


def watchdog(bin_dir: Path, folder: Path) -> int:
    """Wait for the server script's pipe to close; unless it said "done", stop what it started."""
    for sig in (signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    if sys.stdin.buffer.read() == b"done":
        return 0
    stop_marked(folder, os.environ[MARK_RUN])
    stop_postgres(bin_dir, folder / "pgdata")
    return 0


def write_plugin(folder: Path) -> Path:
    """Register tools/mlflow_auth.py as the MLflow app APP_NAME: an `mlflow.app` entry point in a
    dist-info folder that the server finds on PYTHONPATH (nothing installed into the venv)."""
    dist_info = folder / "plugin" / "tudui_mlflow_auth-1.dist-info"
    dist_info.mkdir(parents=True, exist_ok=True)
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: tudui-mlflow-auth\nVersion: 1\n")
    (dist_info / "entry_points.txt").write_text(f"[mlflow.app]\n{APP_NAME} = tools.mlflow_auth:create_app\n")
    return dist_info.parent


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
    folder.mkdir(parents=True, exist_ok=True)
    if take_lock(folder) is None:
        raise Fail(f"an MLflow server is already running from {folder} (pid {lock_holder(folder)}): "
                   f"stop it with `python tools/{Path(__file__).name} --stop --dir {folder}`")
    if stop_leftovers(bin_dir, folder):
        print(f"stopped the MLflow server and PostgreSQL that a killed start left running in {folder}", flush=True)
    check_port_free(args.host, args.port)
    check_root_setup(folder)
    init_cluster(bin_dir, pgdata)
    artifacts.mkdir(exist_ok=True)
    check_not_running(bin_dir, pgdata)
    marks = {MARK: str(folder), MARK_RUN: secrets.token_hex(8)}
    guard = start_watchdog(folder, {**os.environ, **marks})
    server = None
    try:
        start_postgres(bin_dir, pgdata, folder / "postgres.log")
        created = ensure_databases(pgdata, DB_NAME, *([] if args.no_auth else [AUTH_DB]))
        env = {**os.environ, **marks, "MLFLOW_DISABLE_TELEMETRY": "true"}
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
                                                                     "MLFLOW_FLASK_SERVER_SECRET_KEY", True),
                       PYTHONPATH=os.pathsep.join([str(write_plugin(folder)), str(REPO),
                                                   *filter(None, [os.environ.get("PYTHONPATH")])]))
            # What `mlflow server` does for its own basic-auth app before it starts the workers (the auth
            # database's migrations, the admin user), plus our roles and throttle table.
            result = subprocess.run([sys.executable, "-m", "tools.mlflow_auth", "bootstrap"], env=env, cwd=REPO,
                                    capture_output=True, text=True, timeout=300)
            if result.returncode != 0:
                raise Fail(f"the login app did not start: {' '.join(result.stderr.split())[-300:]}")
            command += ["--app-name", APP_NAME]
            source = ("MLFLOW_AUTH_ADMIN_PASSWORD" if os.environ.get("MLFLOW_AUTH_ADMIN_PASSWORD")
                      else f"{password_file} (mode 0600)")
            login = (f"logins: user {ADMIN!r} with the password in {source}\n"
                     f"add a teammate: python tools/{Path(__file__).name} --add-user NAME [--read-only | --promoter] "
                     f"--port {args.port}\n"
                     "clients log in with MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD")
        print(f"MLflow tracking server on {url}: runs in PostgreSQL ({pgdata}), artifacts in {artifacts}\n"
              f"{login}\n"
              f"log the pipeline to it: dvc exp run -S tracking.uri={url}  (or export MLFLOW_TRACKING_URI={url})\n"
              "Ctrl-C stops the server and PostgreSQL", flush=True)
        # Own process group: a terminal's Ctrl-C reaches only this script, which then stops the
        # server and PostgreSQL in order instead of everything dying at once.
        # In --dir: a `tools` folder where it was started must not shadow ours (PYTHONPATH).
        server = subprocess.Popen(command, env=env, cwd=folder, process_group=0)
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
        with contextlib.suppress(OSError, subprocess.TimeoutExpired):
            guard.communicate(b"done", timeout=30)


def stop(bin_dir: Path, folder: Path) -> int:
    """--stop: ask a running server to stop (SIGTERM, as Ctrl-C), then stop whatever is left."""
    if not folder.is_dir():
        print(f"nothing runs from {folder}")
        return 0
    if take_lock(folder) is None:
        pid = lock_holder(folder)
        if pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        if take_lock(folder, wait_s=180) is None:
            raise Fail(f"the MLflow server of {folder} (pid {pid}) did not stop within 180 s")
        print(f"stopped the MLflow server running from {folder} (pid {pid})")
    if stop_leftovers(bin_dir, folder):
        print(f"stopped the MLflow server and PostgreSQL that a killed start left running in {folder}")
    return 0


def read_new_password(name: str) -> str:
    """From the terminal (asked twice), or the first line of stdin when it is a pipe or a file."""
    if not sys.stdin.isatty():
        return sys.stdin.readline().rstrip("\r\n")
    password = getpass.getpass(f"password for {name}: ")
    if getpass.getpass("again: ") != password:
        raise Fail("the two passwords differ")
    return password


@contextlib.contextmanager
def refusal(url: str, what: str):
    """MLflow's client errors as one line that names `what`."""
    from mlflow.exceptions import MlflowException

    try:
        yield
    except MlflowException as exc:
        text = " ".join(str(exc.message).split())
        if "failed with exception" in text:
            raise Fail(f"no MLflow server answers at {url}: start it with `make mlflow-server`, "
                       "or name it with --url") from None
        status = re.search(r"failed with error code (\d+)", text)
        status = int(status.group(1)) if status else exc.get_http_status_code()
        if status == 401:
            raise Fail(f"{url} refused the admin password (changed through MLflow since the first start? "
                       "set MLFLOW_AUTH_ADMIN_PASSWORD to the current one)") from None
        # MLflow appends the failed SQL statement: the first sentence is the reason.
        raise Fail(f"{url} refused to {what} (HTTP {status}): {text.split('. ')[0][:200]}") from None


def add_user(args, folder: Path) -> int:
    """Create an MLflow login through the running server, as the admin, with MLflow's client for its
    basic-auth app. --read-only: the read-only role (tools/mlflow_auth.py). Otherwise EDIT on every
    experiment and registered model (log runs and add model versions, not delete them; a resource's
    creator may); --promoter adds the promoter role (move aliases, write model-version tags)."""
    name = args.add_user
    if not USER_NAME.fullmatch(name):
        raise Fail(f"{name!r} is not a user name: 1 to 64 letters, digits, '.', '_', '@' or '-', "
                   "starting with a letter or digit")
    url = (args.url or f"http://{'127.0.0.1' if args.host in ('0.0.0.0', '::') else args.host}:{args.port}").rstrip("/")
    admin_password = server_secret(folder / "admin_password", "MLFLOW_AUTH_ADMIN_PASSWORD", may_create=False)
    password = read_new_password(name)
    if len(password) < 12:
        raise Fail("the password must have at least 12 characters (MLflow's rule)")
    # MLflow's client logs in from the environment; no retries: a refusal is reported at once.
    os.environ.update(MLFLOW_TRACKING_USERNAME=ADMIN, MLFLOW_TRACKING_PASSWORD=admin_password,
                      MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_TIMEOUT="60")
    with warnings.catch_warnings():  # importing MLflow's server app warns about Starlette
        warnings.simplefilter("ignore")
        from mlflow.server import get_app_client

        client = get_app_client("basic-auth", tracking_uri=url)
    with refusal(url, f"create the user {name!r}"):
        client.create_user(name, password)
    try:
        with refusal(url, f"give {name!r} their rights"):
            roles = {role.name: role.id for role in client.list_roles(ROLE_WORKSPACE)}
            wanted = [READ_ONLY_ROLE] if args.read_only else [PROMOTER_ROLE] if args.promoter else []
            if missing := [role for role in wanted if role not in roles]:
                raise Fail(f"{url} has no {missing[0]!r} role: restart it with this version of "
                           f"tools/{Path(__file__).name}")
            for role in wanted:
                client.assign_role(name, roles[role])
            if not args.read_only:  # runs in every experiment, versions of every registered model (the team's)
                for resource in ("experiment", "registered_model"):
                    client.grant_user_permission(name, resource, "*", "EDIT")
    except BaseException:
        with contextlib.suppress(Exception):  # no login with half its rights (a read-only one without the role)
            client.delete_user(name)
        raise
    rights = ("read-only" if args.read_only else "may log runs and register model versions everywhere"
              + (", move aliases and set version tags" if args.promoter else ""))
    print(f"created the MLflow user {name!r} on {url} ({rights}); they log in with "
          f"MLFLOW_TRACKING_USERNAME={name} and MLFLOW_TRACKING_PASSWORD")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1", help="interface for the MLflow server (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=5001)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--dir", type=Path, default=REPO / "mlserver", help="where PostgreSQL and artifacts live")
    parser.add_argument("--stop", action="store_true",
                        help="stop the server of --dir: a running one, or what a killed one left running")
    parser.add_argument("--no-auth", action="store_true", help="no logins (refused unless --host is loopback)")
    parser.add_argument("--add-user", metavar="NAME", help="create a login on the running server, then exit; "
                        "the password is asked for, or read from stdin; the user may log runs and register model versions")
    roles = parser.add_mutually_exclusive_group()
    roles.add_argument("--read-only", action="store_true",
                       help="with --add-user: the user may read, and create nothing")
    roles.add_argument("--promoter", action="store_true",
                       help="with --add-user: the user may also move aliases (@champion) and set model-version tags")
    parser.add_argument("--url", help="with --add-user: the server's address (default http://HOST:PORT)")
    parser.add_argument("--watchdog", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    folder = args.dir.resolve()
    # SIGTERM (kill, CI) and SIGHUP (closed terminal) unwind like Ctrl-C, through serve()'s finally.
    # SIGINT explicitly too: a shell starts `... &` with it ignored, and `kill -INT` must still stop us.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda *_: sys.exit(0))
    try:
        if args.add_user is not None:
            return add_user(args, folder)
        bin_dir = pg_bin_dir()
        if args.watchdog:
            return watchdog(bin_dir, folder)
        if args.stop:
            return stop(bin_dir, folder)
        return serve(args, bin_dir, folder)
    except Fail as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # at a password prompt
        return 130


if __name__ == "__main__":
    sys.exit(main())
