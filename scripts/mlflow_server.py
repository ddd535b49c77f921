"""`make mlflow-server`: a shared MLflow tracking server backed by a private PostgreSQL cluster.

    python scripts/mlflow_server.py [--host 127.0.0.1] [--port 5001] [--dir mlserver]
    python scripts/mlflow_server.py --stop      # stop a PostgreSQL left running by a killed server

Python rather than shell: the script owns two servers and must stop both on Ctrl-C, SIGTERM, a
closed terminal or a failed start; try/finally and subprocess say that more plainly than traps.

Everything lives under --dir (default <repo>/mlserver, git-ignored):
    pgdata/         the PostgreSQL cluster, made with initdb on first use; its Unix socket is here too
    postgres.log    PostgreSQL's log
    artifacts/      the artifact store the server serves (--serve-artifacts --artifacts-destination)

PostgreSQL listens on no TCP port, only on a Unix socket inside pgdata/ (mode 0700) with trust
authentication: only the folder's owner and root can connect, no password is stored anywhere, and
neither the Debian package's own cluster (port 5432) nor another checkout's server can collide with
it. PostgreSQL refuses to run as root, so as root initdb and pg_ctl run as the `postgres` user, which
then owns pgdata/. MLflow itself runs as the caller.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path
from urllib.parse import quote

REPO = Path(__file__).resolve().parents[1]
PG_USER = "postgres"  # the account Debian's postgresql package creates; used only when run as root
DB_USER = DB_NAME = "mlflow"


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
        conf.write("\n# scripts/mlflow_server.py: no TCP, socket inside this folder\n"
                   "listen_addresses = ''\nunix_socket_directories = '.'\nport = 5432\n")


def check_not_running(bin_dir: Path, pgdata: Path) -> None:
    if pg_ctl(bin_dir, pgdata, "status").returncode == 0:
        raise Fail(f"PostgreSQL is already running in {pgdata} (another mlflow server, or one that was "
                   f"killed?): stop it first with `python scripts/{Path(__file__).name} --stop --dir {pgdata.parent}`")


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


def backend_uri(pgdata: Path) -> str:
    return f"postgresql+psycopg://{DB_USER}@/{DB_NAME}?host={quote(str(pgdata), safe='/')}&port=5432"


def ensure_database(pgdata: Path) -> None:
    import psycopg

    try:
        with psycopg.connect(host=str(pgdata), port=5432, user=DB_USER, dbname="postgres", autocommit=True,
                             connect_timeout=10) as conn:
            if not conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (DB_NAME,)).fetchone():
                conn.execute(f"CREATE DATABASE {DB_NAME}")
    except psycopg.Error as exc:
        raise Fail(f"cannot create the database {DB_NAME!r}: {' '.join(str(exc).split())}") from None


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


def serve(args, bin_dir: Path, folder: Path) -> int:
    pgdata, artifacts = folder / "pgdata", folder / "artifacts"
    mlflow_cli = Path(sys.executable).with_name("mlflow")
    if not mlflow_cli.exists():
        raise Fail(f"{mlflow_cli} is missing: run `make setup` (or pip install mlflow) first")
    if importlib.util.find_spec("psycopg") is None:
        raise Fail("the PostgreSQL driver is missing: run `make setup` (or pip install 'psycopg[binary]')")
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
        ensure_database(pgdata)
        # Listening on all interfaces: teammates reach it by this machine's name, not 0.0.0.0.
        url = f"http://{socket.getfqdn() if args.host in ('0.0.0.0', '::') else args.host}:{args.port}"
        print(f"MLflow tracking server on {url}: runs in PostgreSQL ({pgdata}), artifacts in {artifacts}\n"
              f"log the pipeline to it: dvc exp run -S tracking.uri={url}  (or export MLFLOW_TRACKING_URI={url})\n"
              "Ctrl-C stops the server and PostgreSQL", flush=True)
        # Own process group: a terminal's Ctrl-C reaches only this script, which then stops the
        # server and PostgreSQL in order instead of everything dying at once.
        server = subprocess.Popen([mlflow_cli, "server", "--backend-store-uri", backend_uri(pgdata),
                                   "--serve-artifacts", "--artifacts-destination", str(artifacts),
                                   "--host", args.host, "--port", str(args.port), "--workers", str(args.workers)],
                                  env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}, preexec_fn=os.setpgrp)
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1", help="interface for the MLflow server (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=5001)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--dir", type=Path, default=REPO / "mlserver", help="where PostgreSQL and artifacts live")
    parser.add_argument("--stop", action="store_true", help="stop a PostgreSQL left running in --dir, then exit")
    args = parser.parse_args()
    folder = args.dir.resolve()
    # SIGTERM (kill, CI) and SIGHUP (closed terminal) unwind like Ctrl-C, through serve()'s finally.
    # SIGINT explicitly too: a shell starts `... &` with it ignored, and `kill -INT` must still stop us.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda *_: sys.exit(0))
    try:
        bin_dir = pg_bin_dir()
        if args.stop:
            stopped = stop_postgres(bin_dir, folder / "pgdata")
            print(f"{'stopped' if stopped else 'no'} PostgreSQL running in {folder / 'pgdata'}")
            return 0
        return serve(args, bin_dir, folder)
    except Fail as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
