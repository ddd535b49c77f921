"""MLflow tracking: one MLflow run per training, opened by train and continued by evaluate and export.

The run id travels in models/mlflow_run.json, a DVC output of train, so it stays paired with the
model it describes. Tracking never breaks the pipeline: the first failure (unreachable server, locked
or corrupt store) prints one warning line and turns tracking off for the rest of that stage.

Default store: sqlite:///<repo root>/mlflow.db with artifacts in <repo root>/mlartifacts. The repo root
comes from DVC_ROOT when set: queued and --temp experiments run in a copy under .dvc/tmp/exps/ and
would otherwise log into that copy and lose their runs.
"""
from __future__ import annotations

import fcntl
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

from stages.lib.errors import PipelineError, one_line
from stages.lib.paths import RUN_FILE



def project_root() -> Path:
    return Path(os.environ.get("DVC_ROOT") or ".").resolve()


def tracking_uri(tracking) -> str:
    """tracking.uri when set, else MLFLOW_TRACKING_URI, else the sqlite store in the repo root."""
    return tracking.uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{project_root() / 'mlflow.db'}"


def _configure_mlflow(timeout_s: float) -> None:
    """Before mlflow is imported: no telemetry, and a dead server costs seconds, not minutes of retries."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(max(1, round(timeout_s))))
    os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # no "Downloading artifacts" bars on stderr


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def prepared_data_md5(lock_path: Path = Path("dvc.lock")) -> str:
    """md5 of data/prepared as recorded in dvc.lock (written before train runs)."""
    from stages.lib.params import read_yaml

    try:
        for out in read_yaml(lock_path)["stages"]["preprocess"]["outs"]:
            if out["path"] == "data/prepared":
                return out["md5"]
    except (PipelineError, KeyError, TypeError):
        pass
    return ""


def run_name() -> str:
    """The DVC experiment's name under `dvc exp run`, else repro-<short git commit>."""
    commit = _git("rev-parse", "--short", "HEAD")
    return os.environ.get("DVC_EXP_NAME") or (f"repro-{commit}" if commit else "repro")


def run_tags(env: dict) -> dict:
    """The run's tags: MLflow's own (its UI shows them as the run's source and commit), this project's
    (git state, DVC experiment, data version) and where it ran (`env`: device, precision, threads)."""
    import torch

    commit = _git("rev-parse", "HEAD")
    tags = {"mlflow.source.name": "dvc.yaml", "mlflow.source.type": "LOCAL", "mlflow.source.git.commit": commit,
            "mlflow.user": os.environ.get("USER") or os.environ.get("LOGNAME") or "unknown",
            "git_commit": commit, "git_dirty": str(bool(_git("status", "--porcelain"))).lower(),
            "prepared_data_md5": prepared_data_md5(), "torch_version": torch.__version__,
            **{key: str(value) for key, value in env.items()}}
    for var, tag in (("DVC_EXP_NAME", "dvc_exp_name"), ("DVC_EXP_BASELINE_REV", "dvc_exp_baseline_rev")):
        if os.environ.get(var):
            tags[tag] = os.environ[var]
    return {key: value for key, value in tags.items() if value}


def dataset_input(meta: dict):
    """data/prepared as an MLflow dataset input: its name, DVC's md5 of the folder as the digest (else a
    digest of the splits' sha256), where it lives, and the images per split; the runs table's "Dataset"
    column shows it."""
    import hashlib

    from mlflow.entities import Dataset, DatasetInput, InputTag

    digest = prepared_data_md5() or hashlib.md5(json.dumps(meta["sha256"], sort_keys=True).encode()).hexdigest()
    dataset = Dataset(name=meta["dataset"], digest=digest, source_type="local",
                      source=json.dumps({"uri": str(project_root() / "data/prepared")}),
                      profile=json.dumps({"images": meta["counts"], "classes": len(meta["classes"]),
                                          "input_shape": meta["input_shape"]}))
    return DatasetInput(dataset=dataset, tags=[InputTag("mlflow.data.context", "training")])


SQLITE_RETRIES = 8  # about 15 s of pauses in all
SYSTEM_METRICS_EVERY_S = 10  # seconds between samples of CPU and memory use during training


def _sqlite_contention(exc: Exception, uri: str) -> bool:
    text = str(exc).lower()
    return uri.startswith("sqlite:") and any(
        sign in text for sign in ("database is locked", "already exists", "unique constraint failed"))


class Tracker:
    """Logs to one MLflow run through MlflowClient; every method is a no-op once tracking is off."""

    def __init__(self, tracking, run_id: str | None = None):
        self.tracking, self.run_id, self.client, self.monitor = tracking, run_id, None, None

    def _open(self) -> "Tracker":
        if self.tracking.enabled:
            self._guard(self._connect)
        return self

    def _connect(self):
        _configure_mlflow(self.tracking.timeout_s)
        from mlflow import MlflowClient

        uri = tracking_uri(self.tracking)
        if not uri.startswith("sqlite:///"):
            self.client = MlflowClient(uri)
            return
        # Opening a sqlite store creates or upgrades its tables; two processes doing that at once (parallel
        # queued experiments on a new store) break each other's migration, so they take turns.
        with open(uri[len("sqlite:///"):] + ".lock", "a") as lock:
            deadline = time.monotonic() + 60  # a stuck neighbour must not stall training
            while time.monotonic() < deadline:
                try:
                    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    time.sleep(0.1)
            client = MlflowClient(uri)
            client.search_experiments(max_results=1)
        self.client = client

    @property
    def active(self) -> bool:
        return self.client is not None and self.run_id is not None

    def _guard(self, fn, *args, **kwargs):
        """fn(...), or None with one warning line that turns tracking off. SQLite allows one writer at a
        time: parallel queued experiments sharing mlflow.db get "database is locked" (or race to create
        its tables) now and then, so those errors are retried with a growing, jittered pause first."""
        for attempt in range(SQLITE_RETRIES + 1):
            try:
                return fn(*args, **kwargs)
            except Exception as exc:  # tracking must never be what breaks a stage
                if attempt < SQLITE_RETRIES and _sqlite_contention(exc, tracking_uri(self.tracking)):
                    time.sleep(min(0.2 * 2 ** attempt, 3.0) * (0.5 + random.random()))
                    continue
                print(f"warning: MLflow tracking off for this stage ({tracking_uri(self.tracking)}): {one_line(exc)}",
                      file=sys.stderr, flush=True)
                self.client = None
                return None

    @classmethod
    def start(cls, tracking, params, env: dict, meta: dict, run_id: str | None = None) -> "Tracker":
        """Open a run for this training (or reopen `run_id`, the run a resumed training began) and start
        sampling the machine's CPU and memory into it; the id is None when tracking is off or failing.
        train writes `record()` to RUN_FILE with its other outputs."""
        tracker = cls(tracking)._open()
        if tracker.client:
            tracker.run_id = run_id if run_id and tracker._reopen(run_id) else tracker._create_run(params, env, meta)
        if tracker.active:
            try:  # a sampler that cannot start costs the system metrics, not the run
                tracker.monitor = tracker._system_metrics()
            except Exception as exc:
                print(f"warning: MLflow system metrics off: {one_line(exc)}", file=sys.stderr, flush=True)
        return tracker

    def _system_metrics(self):
        """MLflow's sampler of CPU, memory and disk (system/... metrics) in a background thread, through its
        public API: the run made the active run with log_system_metrics=True; `finish` ends it."""
        import logging

        import mlflow

        logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)  # no "started monitoring" lines
        mlflow.set_tracking_uri(tracking_uri(self.tracking))
        if not os.environ.get("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL"):  # the user's setting wins
            mlflow.set_system_metrics_sampling_interval(SYSTEM_METRICS_EVERY_S)
        if not os.environ.get("MLFLOW_SYSTEM_METRICS_SAMPLES_BEFORE_LOGGING"):
            mlflow.set_system_metrics_samples_before_logging(1)
        return mlflow.start_run(run_id=self.run_id, log_system_metrics=True)

    def record(self) -> dict:
        """What RUN_FILE holds: the run evaluate and export add to."""
        return {"run_id": self.run_id, "tracking_uri": tracking_uri(self.tracking) if self.run_id else None}

    def _reopen(self, run_id: str) -> bool:
        try:
            self.client.update_run(run_id, status="RUNNING")
            return True
        except Exception:  # not in this store (any more): start a new run instead
            return False

    def _experiment_id(self) -> str:
        name, uri = self.tracking.experiment, tracking_uri(self.tracking)
        experiment = self.client.get_experiment_by_name(name)
        if experiment is not None:
            return experiment.experiment_id
        location = (project_root() / "mlartifacts" / name).as_uri() if uri.startswith("sqlite:") else None
        try:
            return self.client.create_experiment(name, artifact_location=location)
        except Exception:  # a run on another machine or worker created it first: use that one
            experiment = self.client.get_experiment_by_name(name)
            if experiment is None:
                raise
            return experiment.experiment_id

    def _create_run(self, params, env: dict, meta: dict) -> str | None:
        """A new run with its tags and params; each step guarded (and retried) on its own, so a retry
        never makes a second run."""
        from mlflow.entities import Param

        experiment_id = self._guard(self._experiment_id)
        if experiment_id is None:
            return None
        run = self._guard(self.client.create_run, experiment_id, run_name=run_name(), tags=run_tags(env))
        if run is None:
            return None
        params = [Param(k, json.dumps(v) if isinstance(v, list) else str(v)) for k, v in params.flat().items()]
        self._guard(self.client.log_batch, run.info.run_id, params=params)
        self._guard(self.client.log_inputs, run.info.run_id, datasets=[dataset_input(meta)])
        return run.info.run_id if self.client else None

    @classmethod
    def resume(cls, tracking) -> "Tracker":
        """The run train opened, for evaluate and export to add to."""
        try:
            run_id = json.loads(RUN_FILE.read_text()).get("run_id")
        except (OSError, ValueError):
            run_id = None
        tracker = cls(tracking, run_id)
        if tracking.enabled and not run_id:  # e.g. train ran with tracking off: `dvc repro` would not rerun it
            print(f"warning: MLflow tracking off for this stage: {RUN_FILE} names no run (train ran with tracking "
                  "off or failing); `dvc repro --force train` logs a new one", file=sys.stderr, flush=True)
        return tracker._open() if run_id else tracker

    def log_metrics(self, metrics: dict, step: int = 0) -> None:
        if self.active:
            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            batch = [Metric(k, float(v), now, step) for k, v in metrics.items() if v is not None]
            self._guard(self.client.log_batch, self.run_id, metrics=batch)

    def log_epoch(self, row: dict, seconds: float, images: int) -> None:
        """One epoch's curves. The validation ones are named val/...: MLflow's chart view shows metric
        sections (the part before "/") ahead of the rest, so a run's charts open with them."""
        self.log_metrics({"val/accuracy": row["val_accuracy"], "val/loss": row["val_loss"],
                          "train_loss": row["train_loss"], "epoch_seconds": seconds,
                          "images_per_s": images / seconds}, step=row["epoch"])

    def log_test(self, metrics: dict, per_class: list[dict], predictions: list[dict], step: int) -> None:
        """The test metrics; per-class accuracy and the per-image predictions as tables (MLflow's
        artifact view shows and filters them; per class: not ten metrics of one point each)."""
        self.log_metrics(metrics, step=step)
        if self.active:
            for name, rows in (("per_class", per_class), ("predictions", predictions)):
                columns = {key: [row[key] for row in rows] for key in rows[0]}
                self._guard(self.client.log_table, self.run_id, data=columns, artifact_file=f"metrics/{name}.json")

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        if self.active and Path(path).exists():
            log = self.client.log_artifacts if Path(path).is_dir() else self.client.log_artifact
            self._guard(log, self.run_id, str(path), artifact_path)

    def log_model(self, model_path: Path, model_file, example) -> None:
        """The served model (stages/lib/tracking/pyfunc.py: a pyfunc over image files running `model_path`, the
        raw-image model.onnx) into this run. Not registered: `make promote` registers a run's model when it
        becomes the champion (stages/lib/tracking/champion.py, docs/serving.md: why). `example`: a real test
        image, uint8 C×H×W, for the input example."""
        if self.active and self._guard(self._log_model, model_path, model_file, example):
            name = os.environ.get("DVC_EXP_NAME") or self.run_id
            print(f"logged the served model to MLflow run {self.run_id}; `make promote EXP={name}` checks it against "
                  "the champion and makes it the served model")

    def _log_model(self, model_path, model_file, example) -> str:
        import logging

        import mlflow

        from stages.lib.tracking.pyfunc import model_spec, png_bytes

        # MLflow's INFO lines while logging ("Validating input example against model signature"): nothing to act on
        logging.getLogger("mlflow").setLevel(logging.WARNING)
        mlflow.set_tracking_uri(tracking_uri(self.tracking))
        with mlflow.start_run(run_id=self.run_id):
            info = mlflow.pyfunc.log_model(name="model", **model_spec(model_path, model_file.classes, model_file.input,
                                                                      png_bytes(example)))
        return info.model_uri

    def finish(self, status: str = "FINISHED") -> None:
        if self.monitor is not None:
            import mlflow

            try:  # a sampler that fails to stop must not leave the run RUNNING
                mlflow.end_run(status)
            except Exception as exc:
                print(f"warning: MLflow system metrics: {one_line(exc)}", file=sys.stderr, flush=True)
            self.monitor = None
        if self.active:
            self._guard(self.client.set_terminated, self.run_id, status)


def ui_url(tracking, base: str) -> str:
    """The UI page that lists this pipeline's runs with their curves (MLflow 3 otherwise opens its
    GenAI view of an experiment, which shows "No data" for training runs)."""
    _configure_mlflow(tracking.timeout_s)
    from mlflow import MlflowClient

    experiment = MlflowClient(tracking_uri(tracking)).get_experiment_by_name(tracking.experiment)
    if experiment is None:
        return f"{base}/  (no runs yet: the experiment {tracking.experiment!r} appears after the first training)"
    return (f"{base}/#/experiments/{experiment.experiment_id}/runs"
            "?workflowType=machine_learning&compareRunsMode=CHART")


if __name__ == "__main__":
    import argparse

    from stages.lib.params import load_params

    parser = argparse.ArgumentParser(description="Print the tracking store and the MLflow UI link for this project")
    parser.add_argument("--port", type=int, default=5000)
    args = parser.parse_args()
    tracking = load_params().tracking
    print(f"store: {tracking_uri(tracking)}")
    print(f"open:  {ui_url(tracking, f'http://127.0.0.1:{args.port}')}")
