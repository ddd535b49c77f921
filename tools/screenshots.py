"""`make screenshots`: pictures of this checkout's real runs for the README, taken with headless Chromium.

    python tools/screenshots.py [--out docs/images] [--project DIR] [--flips A B] [REV ...]

- docs/images/mlflow-runs.png and mlflow-table.png: the MLflow UI's runs view (chart and table) of the
  project's store (`mlflow.db`), served by `mlflow ui` on a free loopback port for the occasion;
- docs/images/dvc-plots.png: `dvc plots diff` of the given revisions or experiments (default: the
  workspace and every experiment of HEAD), drawn offline with tools/offline_plots.py's template;
- docs/images/mlflow-groups.png: the runs table sorted by group/test_accuracy_mean (written by
  `make compare`), best group first;
- docs/images/flips.png (with --flips A B): the page `make flips A=... B=...` writes.

Needs Debian's chromium (`apt-get install chromium`); without it, says so in one line and exits 1.
"""
from __future__ import annotations

import argparse
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

REPO = Path(__file__).resolve().parents[1]
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars"]


def screenshot(browser: str, url: str, out: Path, size: str, wait_ms: int) -> None:
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run([browser, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--window-size={size}",
                        f"--virtual-time-budget={wait_ms}", f"--screenshot={out}", url],
                       check=True, capture_output=True, timeout=300)
    print(f"wrote {out}")


def free_address() -> tuple[str, int]:
    """A free loopback port, on 127.0.0.2 where the system has it (Linux): MLflow's UI opens its assistant
    panel over the runs view when the page's host is 127.0.0.1 or localhost."""
    for host in ("127.0.0.2", "127.0.0.1"):
        with socket.socket() as s:
            try:
                s.bind((host, 0))
            except OSError:
                continue
            return host, s.getsockname()[1]
    sys.exit("error: no free loopback port")


def mlflow_pictures(browser: str, out: Path, project: Path = REPO) -> None:
    sys.path.insert(0, str(REPO))
    from stages.lib.params import load_params
    from stages.lib.tracking.runs import tracking_uri

    os.chdir(project)  # tracking_uri's default store is the project's mlflow.db
    tracking = load_params(project / "params.yaml").tracking
    host, port = free_address()
    base = f"http://{host}:{port}"
    server = subprocess.Popen([Path(sys.executable).with_name("mlflow"), "ui", "--backend-store-uri", tracking_uri(tracking),
                               "--host", host, "--port", str(port), "--allowed-hosts", f"{host}:{port}",
                               "--cors-allowed-origins", base], cwd=project, start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"})
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=5):
                    break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    sys.exit("error: `mlflow ui` did not start")
                time.sleep(1)
        name = urllib.request.quote(tracking.experiment)
        with urllib.request.urlopen(f"{base}/api/2.0/mlflow/experiments/get-by-name?experiment_name={name}") as r:
            experiment = json.load(r)["experiment"]["experiment_id"]
        runs = f"{base}/#/experiments/{experiment}/runs?workflowType=machine_learning&compareRunsMode="
        # virtual time: the charts' metric histories arrive over many requests after the page has loaded
        screenshot(browser, runs + "CHART", out / "mlflow-runs.png", "1600,1000", 120000)
        screenshot(browser, runs + "TABLE", out / "mlflow-table.png", "1600,560", 120000)
        by_group = urllib.request.quote("metrics.`group/test_accuracy_mean`", safe="")
        screenshot(browser, f"{runs}TABLE&orderByKey={by_group}&orderByAsc=false", out / "mlflow-groups.png",
                   "1600,760", 120000)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)


def flips_picture(browser: str, out: Path, project: Path, a: str, b: str) -> None:
    with tempfile.TemporaryDirectory() as folder:
        page = Path(folder) / "flips.html"
        subprocess.run([sys.executable, "-m", "tools.flips", a, b, "--out", str(page), "--no-mlflow"], cwd=project,
                       check=True, env={**os.environ, "PYTHONPATH": str(REPO)})
        screenshot(browser, page.as_uri(), out / "flips.png", "1300,900", 5000)


def dvc_plots_picture(browser: str, out: Path, revisions: list[str]) -> None:
    if not revisions:
        listed = subprocess.run(["dvc", "exp", "list", "--name-only"], cwd=REPO, capture_output=True, text=True)
        revisions = ["workspace", *listed.stdout.split()]
    template = REPO / ".dvc/tmp/plots_offline.html"
    if not template.is_file():
        subprocess.run([sys.executable, str(REPO / "tools/offline_plots.py")], cwd=REPO, check=True)
    with tempfile.TemporaryDirectory() as folder:
        subprocess.run(["dvc", "plots", "diff", *revisions, "--html-template", str(template), "-o", folder],
                       cwd=REPO, check=True, capture_output=True)
        screenshot(browser, (Path(folder) / "index.html").as_uri(), out / "dvc-plots.png", "1400,1300", 20000)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("revisions", nargs="*", help="revisions or experiments for dvc plots diff")
    parser.add_argument("--out", type=Path, default=REPO / "docs/images")
    parser.add_argument("--project", type=Path, default=REPO, help="the checkout whose MLflow store is shown")
    parser.add_argument("--flips", nargs=2, metavar=("A", "B"), help="also the flips page of two experiments")
    parser.add_argument("--no-plots", action="store_true", help="skip dvc-plots.png")
    args = parser.parse_args()
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if not browser:
        sys.exit("error: chromium is not installed (apt-get install chromium); no screenshots taken")
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    project = args.project.resolve()
    if args.flips:
        flips_picture(browser, args.out, project, *args.flips)
    mlflow_pictures(browser, args.out, project)
    if not args.no_plots:
        dvc_plots_picture(browser, args.out, args.revisions)


if __name__ == "__main__":
    main()
