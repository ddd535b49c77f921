"""The champion: the one model `make serve` serves, the same in MLflow's Model Registry and in GTO.

A champion is a trained run's logged model (export logs it into the run and registers nothing). Promotion
(tools/promote.py) checks a candidate against the champion and then, in one step, makes it
- in MLflow: a version of tracking.registered_model (registered now, or reused when that run's model already
  is one) that holds the alias `champion` (ALIAS), with who and when as version tags;
- in GTO (git tags, dvc.yaml's artifact tudui-classifier): the commit that holds the run's outputs (the DVC
  experiment's commit under refs/exps/, or a commit of the branch) registered as a version and assigned
  the stage `prod` (STAGE).

The two registries are written MLflow first, then GTO. Before either, the MLflow version gets the tag
`promotion_pending` (PENDING: the commit and who); it is removed once both are written. A promotion cut
short between the two leaves that tag, and the next call finishes it (and says so). MLflow's @champion
is what is served, so it is the reference; GTO's prod is made to agree with it.

Each step reads what is there before writing: a version already registered for the run, a commit
already registered in GTO, a stage already assigned are reused, so repeating a promotion changes nothing.
Nothing is ever deleted: old versions keep their tags, and GTO keeps every assignment as a git tag.
"""
from __future__ import annotations

import datetime
import getpass
import json
import os
import statistics
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from stages.lib.errors import PipelineError, one_line
from stages.lib.tracking.runs import _configure_mlflow, project_root, tracking_uri

ALIAS = "champion"   # MLflow's alias for the served version (models:/NAME@champion)
STAGE = "prod"       # GTO's stage for it: the name dvc.yaml's artifact and `dvc artifacts get --stage prod` use
PENDING = "promotion_pending"  # model-version tag of a promotion whose two writes are not both done
# Run params that do not make a different model: the seed (a group's seeds are its noise), where and how fast
# it ran, where it was logged, how it is served; MLflow's own keys for the model config (no dot) too.
NOT_A_RECIPE = ("seed", "threads", "data.mirrors", "data.timeout_s", "train.log_every")
NOT_A_RECIPE_SECTIONS = ("tracking.", "serve.")


def who() -> str:
    """The promoter: the tracking server's login when there is one, else the OS user."""
    for var in ("MLFLOW_TRACKING_USERNAME", "USER", "LOGNAME"):
        if os.environ.get(var):
            return os.environ[var]
    try:
        return getpass.getuser()
    except Exception:
        return "unknown"


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def recipe(params: dict) -> dict:
    """The params that make the model: a run's params without the seed and the other NOT_A_RECIPE keys."""
    return {key: value for key, value in params.items()
            if "." in key and key not in NOT_A_RECIPE and not key.startswith(NOT_A_RECIPE_SECTIONS)}


# --- git and DVC: which commit holds a run's outputs ---------------------------------------------------

def git(*args: str, check: bool = True) -> str:
    result = subprocess.run(["git", *args], cwd=project_root(), capture_output=True, text=True, timeout=60)
    if check and result.returncode != 0:
        raise PipelineError(f"git {' '.join(args)}: {one_line(RuntimeError(result.stderr or result.stdout))}")
    return result.stdout.strip()


def exp_commits(name: str) -> list[str]:
    """The commits of the DVC experiments called `name` (refs/exps/<baseline>/<name>; one per baseline)."""
    refs = git("for-each-ref", "--format=%(objectname) %(refname)", "refs/exps", check=False).splitlines()
    return [sha for sha, ref in (line.split(" ", 1) for line in refs if " " in line)
            if len(ref.split("/")) == 5 and ref.split("/")[-1] == name]


def lock_at(commit: str) -> dict:
    import yaml

    text = git("show", f"{commit}:dvc.lock", check=False)
    try:
        return yaml.safe_load(text) or {} if text else {}
    except yaml.YAMLError:
        return {}


def out_md5(lock: dict, stage: str, path: str) -> str:
    for out in (lock.get("stages", {}).get(stage, {}) or {}).get("outs", []) or []:
        if out.get("path") == path:
            return out.get("md5", "")
    return ""


_CACHE: list[Path] = []


def cache_file(md5: str) -> Path | None:
    """The DVC cache's copy of the object `md5` (a directory's listing when it ends in .dir), or None."""
    if not md5:
        return None
    if not _CACHE:
        default = project_root() / ".dvc/cache"
        configured = subprocess.run(["dvc", "cache", "dir"], cwd=project_root(), capture_output=True, text=True,
                                    timeout=60).stdout.strip() if not default.is_dir() else ""
        _CACHE.append(Path(configured) if configured else default)
    path = _CACHE[0] / "files" / "md5" / md5[:2] / md5[2:]
    return path if path.is_file() else None


def dir_file(dir_md5: str, relpath: str) -> Path | None:
    """The cached file `relpath` inside the cached directory `dir_md5`, or None."""
    listing = cache_file(dir_md5)
    try:
        entries = json.loads(listing.read_text()) if listing else []
    except (OSError, ValueError):
        return None
    return next((cache_file(e.get("md5", "")) for e in entries if e.get("relpath") == relpath), None)


def dir_entry_md5(dir_md5: str, relpath: str) -> str:
    listing = cache_file(dir_md5)
    try:
        entries = json.loads(listing.read_text()) if listing else []
    except (OSError, ValueError):
        return ""
    return next((e.get("md5", "") for e in entries if e.get("relpath") == relpath), "")


def data_of(commit: str) -> tuple[str, str]:
    """(md5 of data/raw, md5 of data/prepared/test.pt) at `commit`: the data set's version and the test split
    accuracy is measured on. Not data/prepared as a whole: its validation split is carved with the seed, so
    every seed has its own md5 while the data are the same. ("", "") when dvc.lock or the cache lacks them."""
    lock = lock_at(commit) if commit else {}
    return (out_md5(lock, "download", "data/raw"),
            dir_entry_md5(out_md5(lock, "preprocess", "data/prepared"), "test.pt"))


def run_in_commit(commit: str) -> str | None:
    """The MLflow run whose outputs `commit` holds: train's models/mlflow_run.json, read from the DVC cache."""
    path = cache_file(out_md5(lock_at(commit), "train", "models/mlflow_run.json"))
    try:
        return json.loads(path.read_text()).get("run_id") if path else None
    except (OSError, ValueError):
        return None


def commit_of(run) -> str:
    """The commit holding `run`'s outputs (what GTO registers): its DVC experiment's, else a commit of the
    current branch whose dvc.lock names it. PipelineError when there is none."""
    tags, run_id = run.data.tags, run.info.run_id
    for commit in exp_commits(tags["dvc_exp_name"]) if tags.get("dvc_exp_name") else []:
        if run_in_commit(commit) == run_id:
            return commit
    for commit in git("log", "--format=%H", "-n", "200", "--", "dvc.lock", check=False).split():
        if run_in_commit(commit) == run_id:
            return commit
    exp = tags.get("dvc_exp_name")
    raise PipelineError(
        (f"experiment {exp!r} no longer holds run {run_id} (it was run again, or removed): promote its newer run"
         if exp else f"run {run_id} ({run.info.run_name}) is in no commit: GTO versions commits; commit its "
                     "outputs (git add dvc.lock; git commit) or train it as a DVC experiment (dvc exp run)"))


# --- MLflow ---------------------------------------------------------------------------------------------

@dataclass
class Model:
    """A run's model: the run, its logged model, and (once registered) its MLflow version."""
    run: object
    model_uri: str                          # the logged model (models:/m-...)
    version: object | None = None           # the registered ModelVersion, when there is one
    commit: str = ""                        # the git commit that holds its outputs (GTO's version), "" = not found

    @property
    def run_id(self) -> str:
        return self.run.info.run_id

    @property
    def label(self) -> str:
        return self.run.data.tags.get("dvc_exp_name") or self.run.info.run_name or self.run_id

    @property
    def accuracy(self) -> float | None:
        return self.run.data.metrics.get("test_accuracy")

    @property
    def data_md5(self) -> str:
        return self.run.data.tags.get("prepared_data_md5", "")

    @property
    def data(self) -> tuple[str, str]:
        """(data/raw md5, test split md5) from its commit (data_of); ("", "") when unknown."""
        if not hasattr(self, "_data"):
            self._data = data_of(self.commit)
        return self._data

    def same_data(self, other: "Model") -> bool:
        if all(self.data) and all(other.data):
            return self.data == other.data
        return bool(self.data_md5) and self.data_md5 == other.data_md5  # without the cache: data/prepared itself

    @property
    def data_label(self) -> str:
        raw, test = self.data
        return f"data/raw {raw[:8]}, test split {test[:8]}" if raw and test else f"data/prepared {self.data_md5[:8] or '?'}"


@dataclass
class State:
    """Both registries as they stand: MLflow's @champion, GTO's prod, and a promotion left half done."""
    champion: Model | None = None           # the version holding @champion
    gto_version: str = ""                   # GTO's version in STAGE ("" = none)
    gto_commit: str = ""
    pending: object | None = None           # a ModelVersion tagged PENDING
    gto_error: str = ""                     # GTO could not be read (no git repository, ...)
    notes: list = field(default_factory=list)

    @property
    def agree(self) -> bool:
        champion_commit = self.champion.version.tags.get("git_commit", "") if self.champion else ""
        return not self.pending and not self.gto_error and champion_commit == self.gto_commit


class Registry:
    """tracking.registered_model in the project's MLflow store and in GTO."""

    def __init__(self, tracking):
        _configure_mlflow(tracking.timeout_s)
        import mlflow
        from mlflow import MlflowClient

        self.tracking, self.name, self.uri = tracking, tracking.registered_model, tracking_uri(tracking)
        if self.uri.startswith("sqlite:///") and not Path(self.uri.removeprefix("sqlite:///")).is_file():
            raise PipelineError(f"no MLflow store at {self.uri}: train with tracking.enabled: true first (make run)")
        mlflow.set_tracking_uri(self.uri)
        mlflow.set_registry_uri(self.uri)
        self.client = MlflowClient(self.uri, registry_uri=self.uri)
        try:
            self.experiment = self.client.get_experiment_by_name(tracking.experiment)
        except Exception as exc:
            raise PipelineError(f"cannot read the MLflow store at {self.uri}: {one_line(exc)}") from None
        self._runs = None

    # reading
    def runs(self) -> list:
        """Every finished run of the pipeline's experiment with a test accuracy, newest first."""
        if self._runs is None:
            self._runs = [] if self.experiment is None else [
                run for run in self.client.search_runs([self.experiment.experiment_id], "attributes.status = 'FINISHED'",
                                                       max_results=5000, order_by=["attributes.start_time DESC"])
                if "test_accuracy" in run.data.metrics]
        return self._runs

    def versions(self) -> list:
        try:
            return sorted(self.client.search_model_versions(f"name = '{self.name}'"), key=lambda v: int(v.version))
        except Exception as exc:
            raise PipelineError(f"cannot read the model registry at {self.uri}: {one_line(exc)}") from None

    def logged_model_uri(self, run) -> str:
        models = self.client.search_logged_models([run.info.experiment_id],
                                                  filter_string=f"source_run_id = '{run.info.run_id}'",
                                                  order_by=[{"field_name": "creation_timestamp", "ascending": False}])
        if not models:
            raise PipelineError(f"run {run.info.run_id} ({run.info.run_name}) has no logged model: its export ran "
                                "with tracking off; rerun it with tracking on (dvc exp run -f / dvc repro --force export)")
        return models[0].model_uri

    def model_of_version(self, version) -> Model:
        run = self.client.get_run(version.run_id)
        return Model(run, version.source, version, version.tags.get("git_commit", ""))

    def resolve(self, what: str) -> Model:
        """A candidate named as a DVC experiment, an MLflow run id or models:/NAME/VERSION (or @ALIAS)."""
        what = what.strip()
        if what.startswith("models:/"):
            name, _, rest = what.removeprefix("models:/").partition("/")
            if "@" in name:
                name, alias = name.split("@", 1)
                getter = lambda: self.client.get_model_version_by_alias(name, alias)  # noqa: E731
            else:
                getter = lambda: self.client.get_model_version(name, rest)  # noqa: E731
            if name != self.name:
                raise PipelineError(f"{what}: the served model is {self.name!r} (tracking.registered_model), not {name!r}")
            try:
                return self.model_of_version(getter())
            except Exception as exc:
                raise PipelineError(f"{what}: {one_line(exc)}") from None
        runs = [run for run in self.runs() if run.info.run_id == what]
        runs = runs or [run for run in self.runs() if run.data.tags.get("dvc_exp_name") == what]
        if not runs:
            known = [run.data.tags.get("dvc_exp_name") for run in self.runs()][:5]
            raise PipelineError(f"no finished, evaluated run is a DVC experiment or run id {what!r} in {self.uri}"
                                + (f" (recent experiments: {', '.join(n for n in known if n)})" if any(known) else ""))
        run = runs[0]  # the newest: a name reused with `dvc exp run -f` means its latest run
        version = next((v for v in self.versions() if v.run_id == run.info.run_id), None)
        return Model(run, self.logged_model_uri(run), version)

    def seeds(self, model: Model) -> list:
        """`model`'s run and its seeds: the runs with the same recipe (params but the seed; the data set and
        preprocess params are part of it)."""
        key = recipe(model.run.data.params)
        runs = [run for run in self.runs() if recipe(run.data.params) == key]
        return runs if any(run.info.run_id == model.run_id for run in runs) else [model.run, *runs]

    def state(self) -> State:
        state = State()
        versions = self.versions()
        pending = [v for v in versions if PENDING in v.tags]
        state.pending = pending[-1] if pending else None
        try:
            state.champion = self.model_of_version(self.client.get_model_version_by_alias(self.name, ALIAS))
        except Exception:
            state.champion = None
        try:
            state.gto_version, state.gto_commit = gto_in_stage(self.name)
        except PipelineError as exc:
            state.gto_error = str(exc)
        return state

    # writing (each step idempotent)
    def ensure_version(self, model: Model, tags: dict):
        if model.version is None:
            model.version = next((v for v in self.versions() if v.run_id == model.run_id), None)
        if model.version is None:
            import mlflow

            try:
                self.client.get_registered_model(self.name)
            except Exception:
                self.client.create_registered_model(self.name, description=(
                    "The image classifier: one version per promoted run; @champion is what make serve serves"))
            model.version = mlflow.register_model(model.model_uri, self.name, tags=tags)
            print(f"registered {self.name} version {model.version.version} (models:/{self.name}/{model.version.version}) "
                  f"from run {model.run_id}")
        else:
            for key, value in tags.items():
                if model.version.tags.get(key) != value:
                    self.client.set_model_version_tag(self.name, model.version.version, key, value)
        return model.version

    def set_tags(self, version, tags: dict) -> None:
        for key, value in tags.items():
            self.client.set_model_version_tag(self.name, version.version, key, value)

    def set_alias(self, version) -> None:
        self.client.set_registered_model_alias(self.name, ALIAS, version.version)

    def done(self, version) -> None:
        self.client.delete_model_version_tag(self.name, version.version, PENDING)


def version_tags(model: Model) -> dict:
    """What a registered version is: the DVC experiment that made it ("workspace" for a plain `dvc repro`),
    the run, the commit holding its outputs (GTO's version), its data and its test accuracy."""
    tags = model.run.data.tags
    return {"dvc_exp_name": tags.get("dvc_exp_name") or "workspace", "git_commit": model.commit,
            "prepared_data_md5": model.data_md5, "raw_data_md5": model.data[0], "test_split_md5": model.data[1],
            "test_accuracy": str(model.accuracy),
            "seed": model.run.data.params.get("seed", "")}


# --- GTO ------------------------------------------------------------------------------------------------

def _gto(fn, *args, **kwargs):
    import logging

    logging.getLogger("gto").setLevel(logging.ERROR)
    try:
        return fn(*args, **kwargs)
    except PipelineError:
        raise
    except Exception as exc:
        raise PipelineError(f"GTO: {one_line(exc)}") from None


def gto_versions(name: str) -> list[dict]:
    """GTO's registered versions of `name`: dicts with version, commit_hexsha and stages."""
    import logging

    from gto import api
    from gto.exceptions import ArtifactNotFound, NoRepo

    logging.getLogger("gto").setLevel(logging.ERROR)
    try:
        return api.show(str(project_root()), name, registered_only=True)
    except ArtifactNotFound:  # nothing registered in GTO yet
        return []
    except NoRepo:
        raise PipelineError(f"{project_root()} is not a git repository: GTO keeps versions as git tags") from None
    except Exception as exc:
        raise PipelineError(f"GTO: {one_line(exc)}") from None


def gto_in_stage(name: str) -> tuple[str, str]:
    """(version, commit) that GTO's STAGE holds now, ("", "") when none."""
    for version in gto_versions(name):
        if any(stage.get("stage") == STAGE for stage in version.get("stages", [])):
            return version["version"], version["commit_hexsha"]
    return "", ""


def gto_promote(name: str, commit: str, wanted: str, message: str) -> str:
    """Register `commit` in GTO (as `wanted`, a semver like v3.0.0, unless it already is a version, or
    `wanted` is taken: then GTO's next) and assign it STAGE; returns its GTO version."""
    from gto import api

    root, author = str(project_root()), who()
    email = git("config", "user.email", check=False) or f"{author}@localhost"
    existing = {v["version"]: v["commit_hexsha"] for v in gto_versions(name)}
    version = next((v for v, sha in existing.items() if sha == commit), "")
    if not version:
        _gto(api.register, root, name, commit, version=None if wanted in existing else wanted, message=message,
             author=author, author_email=email)
        version = next(v["version"] for v in gto_versions(name) if v["commit_hexsha"] == commit)
    if gto_in_stage(name)[0] != version:
        # force: a rollback assigns a version that held the stage before (a new tag #prod#N; GTO asks for force)
        _gto(api.assign, root, name, STAGE, version=version, message=message, author=author, author_email=email,
             force=True)
    return version


# --- the checks -----------------------------------------------------------------------------------------

@dataclass
class Check:
    name: str
    ok: bool
    detail: str


def mean_sd(values: list[float]) -> str:
    if not values:
        return "-"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.4f} ± {sd:.4f} (n={len(values)})"


def accuracies(runs) -> list[float]:
    return [run.data.metrics["test_accuracy"] for run in runs]


def prepared_test_split(md5: str, folder: Path) -> Path:
    """A folder holding the test split of the prepared data `md5`: data/prepared when the workspace has that
    version (dvc.lock says so), else its test.pt from the DVC cache, linked into `folder`."""
    from stages.lib.tracking.runs import prepared_data_md5

    here = project_root() / "data/prepared"
    if md5 and prepared_data_md5(project_root() / "dvc.lock") == md5 and (here / "test.pt").is_file():
        return here
    cached = dir_file(md5, "test.pt")
    if cached is None:
        raise PipelineError(f"the test images of data/prepared {md5[:12] or '(unknown)'} are neither in the "
                            "workspace nor in the DVC cache: dvc pull, or dvc repro preprocess")
    (folder / "test.pt").symlink_to(cached)
    return folder


def onnx_check(model: Model, model_dir: Path, atol: float, images: int, work: Path) -> Check:
    """The served model.onnx (the one in the logged model) against PyTorch on the candidate's own test images,
    as export checks it: its weights from the commit's models/model.pt (DVC cache), the ONNX bytes compared
    with that commit's models/export/model.onnx, and export.json's recorded difference read too."""
    import torch

    from stages.export import onnx_max_abs_diff
    from stages.lib.modelfile import load_model
    from stages.lib.prepared import load_split
    from stages.lib.transforms import unpad

    onnx_path = model_dir / "artifacts" / "model.onnx"
    if not onnx_path.is_file():
        return Check("onnx", False, f"the logged model of run {model.run_id} holds no artifacts/model.onnx")
    lock = lock_at(model.commit)
    weights = cache_file(out_md5(lock, "train", "models/model.pt"))
    if weights is None:
        return Check("onnx", False, f"models/model.pt of commit {model.commit[:7]} is not in the DVC cache (dvc pull)")
    exported = dir_file(out_md5(lock, "export", "models/export"), "model.onnx")
    if exported is not None and exported.read_bytes() != onnx_path.read_bytes():
        return Check("onnx", False, f"the model.onnx in MLflow is not the one commit {model.commit[:7]} exported "
                                    "(models/export/model.onnx): the logged model was changed")
    net, model_file = load_model(weights)
    prepared, _ = load_split("test", prepared_test_split(model.data_md5, work))
    prepared = prepared[:images]
    with torch.inference_mode():
        logits = net(model_file.preprocess(padded=True)(prepared))
    diffs = onnx_max_abs_diff(onnx_path, unpad(prepared, model_file.input["size"]), logits)
    if max(diffs) > atol:
        return Check("onnx", False, f"model.onnx differs from PyTorch by {max(diffs):.2e} > export.onnx_atol={atol:g} "
                                    f"on {len(prepared)} test images")
    return Check("onnx", True, f"max |ONNX - PyTorch| {max(diffs):.2e} <= export.onnx_atol={atol:g} "
                               f"on {len(prepared)} test images")


def recorded_onnx_check(registry: Registry, model: Model, atol: float, work: Path) -> Check | None:
    """export.json as export logged it into the run: a failure when it records a difference over atol or is missing."""
    try:
        path = registry.client.download_artifacts(model.run_id, "export/export.json", str(work))
        report = json.loads(Path(path).read_text())
        recorded = max(float(report["onnx_max_abs_diff"]), float(report["onnx_probabilities_max_abs_diff"]))
    except Exception as exc:
        return Check("onnx", False, f"run {model.run_id} has no readable export/export.json ({one_line(exc, 120)})")
    if not recorded <= atol:
        return Check("onnx", False, f"export.json of run {model.run_id} records an ONNX difference of {recorded:.2e} "
                                    f"> export.onnx_atol={atol:g}")
    return None


def check_latency_requests(count: int) -> None:
    """--latency-requests of promote and champion: a p99 needs at least 20 requests."""
    if not 20 <= count <= 100_000:
        raise PipelineError(f"--latency-requests must be 20..100000 (a p99 needs requests), got {count}")


def latency_p99_ms(model_dir: Path, serve, requests: int) -> float:
    """p99 in ms of `requests` one-image requests answered by the served app (tools/serve.py's ServingApp:
    JSON parsed, limits checked, MLflow's invocations, the pyfunc, the JSON answer) in this process, without
    the network; the request is the model's input example, a real test image."""
    import threading
    import time

    import mlflow.pyfunc

    from tools.serve import ServingApp

    app = ServingApp(mlflow.pyfunc.load_model(str(model_dir)), serve)
    body = (model_dir / "serving_input_example.json").read_bytes()
    times = []
    for i in range(requests + 10):  # 10 warm-up requests
        started = time.perf_counter()
        status, _, answer = app.answer(bytearray(body), "application/json", threading.Event())
        if status != 200:
            raise PipelineError(f"the served model answered its own input example with HTTP {status}: {answer[:200]!r}")
        if i >= 10:
            times.append((time.perf_counter() - started) * 1000)
    times.sort()
    return times[min(len(times) - 1, int(round(0.99 * len(times))) - 1)]


def download_model(registry: Registry, model: Model, dest: Path) -> Path:
    import mlflow

    try:
        return Path(mlflow.artifacts.download_artifacts(model.model_uri, dst_path=str(dest)))
    except Exception as exc:
        raise PipelineError(f"cannot download the model of run {model.run_id}: {one_line(exc)}") from None
