"""Is a difference between two groups of runs real, or within seed noise?

`verdict(candidate, baseline)` takes the test accuracies of each group's seeds and answers with Welch's
t-test (unequal variances, scipy.stats.ttest_ind): the mean difference, its 95% confidence interval, and
"better" when the whole interval is above 0, "worse" when below, "within seed noise" when it spans 0.
With fewer than two seeds in a group there is no noise estimate: the answer is "needs seeds".
"""
from __future__ import annotations

import fnmatch
import hashlib
import json
import math
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from scipy import stats

from stages.lib import errors
from stages.lib.errors import PipelineError, one_line

BETTER, WORSE, NOISE, NEEDS_SEEDS = "better", "worse", "within seed noise", "needs seeds"
CONFIDENCE = 0.95
TEST = "Welch's t-test, 95% confidence interval of the difference in means"


@dataclass(frozen=True)
class Verdict:
    label: str                 # better | worse | within seed noise | needs seeds
    diff: float                # mean(candidate) - mean(baseline)
    low: float                 # the confidence interval of diff (nan without seeds)
    high: float
    p: float                   # two-sided p-value (nan without seeds)

    def __str__(self) -> str:
        if self.label == NEEDS_SEEDS:
            return f"{self.diff:+.4f}: needs seeds (one run per group gives no noise estimate; run 3 seeds)"
        return f"{self.diff:+.4f} [{self.low:+.4f}, {self.high:+.4f}], p={self.p:.3g}: {self.label}"


def verdict(candidate: Sequence[float], baseline: Sequence[float]) -> Verdict:
    if not candidate or not baseline:
        raise ValueError("verdict: both groups need at least one run")
    diff = statistics.fmean(candidate) - statistics.fmean(baseline)
    if len(candidate) < 2 or len(baseline) < 2:
        return Verdict(NEEDS_SEEDS, diff, math.nan, math.nan, math.nan)
    if statistics.pvariance(candidate) == 0 and statistics.pvariance(baseline) == 0:
        # Identical seeds in both groups (e.g. one run repeated): no noise, so any difference is real.
        label = BETTER if diff > 0 else WORSE if diff < 0 else NOISE
        return Verdict(label, diff, diff, diff, 0.0 if diff else 1.0)
    result = stats.ttest_ind(candidate, baseline, equal_var=False)
    ci = result.confidence_interval(CONFIDENCE)
    label = BETTER if ci.low > 0 else WORSE if ci.high < 0 else NOISE
    return Verdict(label, diff, float(ci.low), float(ci.high), float(result.pvalue))


# ---- `python -m tools.compare`: experiments grouped by their params, each group against a baseline ----

REPORT = Path("reports/compare.md")
METRICS = ("test_accuracy", "test_loss")


@dataclass(frozen=True)
class Run:
    name: str
    params: dict               # the flattened params the stages read
    seed: int
    test_accuracy: float
    test_loss: float


@dataclass
class Group:
    params: dict               # its params (seed aside), the same for each run
    runs: list
    label: str = ""            # the params that differ between the groups compared
    verdict: Verdict | None = None

    def values(self, metric: str) -> list[float]:
        return [getattr(run, metric) for run in self.runs]

    def mean(self, metric: str) -> float:
        return statistics.fmean(self.values(metric))

    def sd(self, metric: str) -> float:
        return statistics.stdev(self.values(metric)) if len(self.runs) > 1 else math.nan

    def worst(self, metric: str) -> Run:
        pick = min if metric == "test_accuracy" else max
        return pick(self.runs, key=lambda run: getattr(run, metric))


def stage_params(dvc_yaml: Path = Path("dvc.yaml")) -> list[str]:
    """The params.yaml keys (or sections) some stage reads: tracking and serve change no result."""
    from stages.lib.params import read_yaml

    keys = []
    for stage in read_yaml(dvc_yaml).get("stages", {}).values():
        for entry in stage.get("params", []):
            keys += [entry] if isinstance(entry, str) else [k for ks in entry.values() for k in ks]
    return keys


def read_experiments(all_commits: bool = False, keys: list[str] | None = None) -> list[Run]:
    """Every finished DVC experiment of HEAD (all_commits: of every commit) with its test metrics."""
    from stages.lib.params import flatten

    keys = keys if keys is not None else stage_params()
    result = subprocess.run(["dvc", "exp", "show", "--json", *(["--all-commits"] if all_commits else [])],
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise PipelineError(f"dvc exp show: {' '.join(result.stderr.split())[:300]}")
    runs = []
    for baseline in json.loads(result.stdout or "[]"):
        for exp in baseline.get("experiments") or []:
            rev = exp["revs"][0]
            data = rev.get("data") or {}
            metrics = ((data.get("metrics") or {}).get("metrics/eval.json") or {}).get("data") or {}
            params = ((data.get("params") or {}).get("params.yaml") or {}).get("data") or {}
            if rev.get("error") or not all(m in metrics for m in METRICS) or "seed" not in params:
                continue  # queued, running or failed
            flat = {k: v for k, v in flatten(params).items() if any(k == p or k.startswith(p + ".") for p in keys)}
            runs.append(Run(exp.get("name") or rev.get("name") or rev["rev"][:7], flat, params["seed"],
                            float(metrics["test_accuracy"]), float(metrics["test_loss"])))
    return runs


def group_runs(runs: list[Run], ignore: tuple = ()) -> list[Group]:
    """Runs of the same recipe (their params without the seed and what makes no other model, the
    grouping `make promote` uses too), and without the `ignore` keys, form a group."""
    from stages.lib.tracking.champion import recipe

    groups: dict[str, Group] = {}
    for run in runs:
        params = {k: v for k, v in recipe(run.params).items() if k not in ignore}
        groups.setdefault(json.dumps(params, sort_keys=True), Group(params, [])).runs.append(run)
    varying = sorted({k for g in groups.values() for k in g.params
                      if any(o.params.get(k) != g.params[k] for o in groups.values())})
    for group in groups.values():
        group.label = " ".join(f"{k}={group.params.get(k)}" for k in varying) or "all runs"
    return list(groups.values())


def head_params() -> dict:
    """The committed params.yaml (HEAD's), flattened."""
    from ruamel.yaml import YAML

    from stages.lib.params import flatten

    shown = subprocess.run(["git", "show", "HEAD:params.yaml"], capture_output=True, text=True)
    if shown.returncode != 0:
        raise PipelineError("no committed params.yaml (git show HEAD:params.yaml failed): name one with --baseline")
    return flatten(YAML(typ="safe", pure=True).load(shown.stdout))


def pick_baseline(groups: list[Group], spec: str = "") -> tuple[Group | None, str]:
    """(the baseline group, how it was chosen). spec: "" (the committed params), an experiment's name
    (its group) or `key=value ...` (the one group with those values)."""
    from ruamel.yaml import YAML

    if spec and "=" not in spec:
        found = [g for g in groups if any(run.name == spec for run in g.runs)]
        if not found:
            raise PipelineError(f"--baseline {spec}: no finished experiment of that name among those compared")
        return found[0], f"the group of {spec}"
    if spec:
        wanted = {k: YAML(typ="safe", pure=True).load(v) for k, v in (pair.split("=", 1) for pair in spec.split())}
        how = f"--baseline {spec}"
    else:
        # The committed params, on the params that differ between the groups: a sweep's --set values are
        # the same in every group and need not equal HEAD's.
        committed = head_params()
        varying = {k for g in groups for k in g.params if any(o.params.get(k) != g.params[k] for o in groups)}
        wanted = {k: committed.get(k) for k in varying}
        how = "the committed params" + (f" ({' '.join(f'{k}={v}' for k, v in sorted(wanted.items()))})" if wanted else "")
    found = [g for g in groups if all(g.params.get(k) == v for k, v in wanted.items())]
    if len(found) > 1:
        raise PipelineError(f"{how} matches {len(found)} groups: add keys to --baseline")
    return (found[0] if found else None), how


def judge(groups: list[Group], baseline: Group | None) -> None:
    for group in groups:
        if baseline is not None and group is not baseline:
            group.verdict = verdict(group.values("test_accuracy"), baseline.values("test_accuracy"))


def _ms(group: Group, metric: str, digits: int = 4) -> str:
    sd = group.sd(metric)
    return f"{group.mean(metric):.{digits}f} ± {sd:.{digits}f}" if not math.isnan(sd) else f"{group.mean(metric):.{digits}f}"


def rows(groups: list[Group], baseline: Group | None) -> list[dict]:
    """One row per group, the baseline first, then by mean test accuracy."""
    order = sorted(groups, key=lambda g: (g is not baseline, -g.mean("test_accuracy")))
    out = []
    for g in order:
        acc, loss = g.worst("test_accuracy"), g.worst("test_loss")
        v = g.verdict
        out.append({"group": g.label, "n": len(g.runs), "test accuracy": _ms(g, "test_accuracy"),
                    "worst (seed)": f"{acc.test_accuracy:.4f} ({acc.seed})", "test loss": _ms(g, "test_loss"),
                    "worst loss (seed)": f"{loss.test_loss:.4f} ({loss.seed})",
                    "Δ accuracy [95% CI]": "baseline" if g is baseline else "" if v is None else
                    f"{v.diff:+.4f}" if v.label == NEEDS_SEEDS else f"{v.diff:+.4f} [{v.low:+.4f}, {v.high:+.4f}]",
                    "verdict": "" if v is None else v.label})
    return out


def text_table(table: list[dict]) -> str:
    widths = {k: max(len(k), *(len(str(r[k])) for r in table)) for k in table[0]}
    line = lambda r: "  ".join(str(r[k]).ljust(widths[k]) for k in widths).rstrip()  # noqa: E731
    return "\n".join([line({k: k for k in widths}), line({k: "-" * w for k, w in widths.items()}), *map(line, table)])


def markdown(table: list[dict], groups: list[Group], how: str, baseline: Group | None) -> str:
    head = "| " + " | ".join(table[0]) + " |\n|" + "|".join("---" for _ in table[0]) + "|\n"
    body = "".join("| " + " | ".join(str(v) for v in r.values()) + " |\n" for r in table)
    note = f"Baseline: {how}." if baseline else f"No group has {how}: no verdicts (pick one with --baseline)."
    members = "".join(f"- {g.label}: {', '.join(r.name for r in g.runs)}\n" for g in groups)
    return (f"# Experiments compared\n\n{head}{body}\n{note} Verdict on the test accuracy: {TEST}; "
            f"\"needs seeds\" where a group has a single run.\n\nRuns per group:\n\n{members}")


# ---- MLflow: the group statistics on each run (sortable in the UI) and one summary run with the table ----

def mlflow_client(tracking):
    """A client on params.yaml's tracking store (runs.tracking_uri), or None when tracking is off; a
    dead server costs one request of tracking.timeout_s, as in the stages."""
    if not tracking.enabled:
        return None
    from stages.lib.tracking.runs import tracking_uri

    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(max(1, round(tracking.timeout_s))))
    os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri(tracking))


def runs_by_exp_name(client, experiment_id: str, names: set[str]) -> dict:
    """{DVC experiment name: its newest MLflow run} by the runs' dvc_exp_name tag."""
    found, token = {}, None
    while True:
        page = client.search_runs([experiment_id], "tags.dvc_exp_name != ''", max_results=1000,
                                  order_by=["attributes.start_time DESC"], page_token=token)
        for r in page:
            name = r.data.tags.get("dvc_exp_name")
            if name in names and name not in found:
                found[name] = r
        token = page.token
        if not token:
            return found


def log_to_mlflow(tracking, groups: list[Group], baseline: Group | None, table: list[dict], report: str) -> str:
    """Each run gets metrics group/test_accuracy_mean (and _sd, _worst, loss, n, diff) and tags group,
    group_verdict; one summary run per set of runs compared holds the table (log_table) and the report.
    Returns what was done, in one line; tracking never makes compare fail."""
    from mlflow.entities import Metric, RunTag

    try:
        client = mlflow_client(tracking)
        if client is None:
            return "MLflow: tracking.enabled is false, nothing logged"
        experiment = client.get_experiment_by_name(tracking.experiment)
        if experiment is None:
            return f"MLflow: no experiment {tracking.experiment!r} in the store, nothing logged"
        eid = experiment.experiment_id
        names = {r.name for g in groups for r in g.runs}
        found = runs_by_exp_name(client, eid, names)
        now = int(time.time() * 1000)
        for g in groups:
            v = g.verdict
            values = {"group/n": len(g.runs), "group/test_accuracy_mean": g.mean("test_accuracy"),
                      "group/test_accuracy_worst": g.worst("test_accuracy").test_accuracy,
                      "group/test_loss_mean": g.mean("test_loss"), "group/test_loss_worst": g.worst("test_loss").test_loss,
                      **({"group/test_accuracy_sd": g.sd("test_accuracy")} if len(g.runs) > 1 else {}),
                      **({"group/test_accuracy_diff": v.diff} if v else {})}
            tags = {"group": g.label, "group_verdict": "baseline" if g is baseline else v.label if v else ""}
            for member in g.runs:
                if member.name in found:
                    client.log_batch(found[member.name].info.run_id,
                                     metrics=[Metric(k, float(x), now, 0) for k, x in values.items()],
                                     tags=[RunTag(k, t) for k, t in tags.items() if t])
        key = hashlib.sha1(" ".join(sorted(names)).encode()).hexdigest()[:12]
        summary = client.search_runs([eid], f"tags.compare_key = '{key}'", max_results=1)
        run_id = summary[0].info.run_id if summary else client.create_run(
            eid, run_name=f"compare-{key[:6]}", tags={"compare_key": key, "compare_summary": "true",
                                                         "mlflow.note.content": f"{len(groups)} groups of {len(names)} runs"}).info.run_id
        client.log_table(run_id, data={k: [str(r[k]) for r in table] for k in table[0]}, artifact_file="compare/groups.json")
        client.log_text(run_id, report, "compare/compare.md")
        client.set_terminated(run_id)
        return (f"MLflow: group/test_accuracy_mean and group tags on {len(found)} of {len(names)} runs; "
                f"table in run compare-{key[:6]} ({run_id})")
    except Exception as exc:
        return f"warning: MLflow not updated: {one_line(exc)}"


def compare(names: list[str] | None = None, select: list[str] | None = None, baseline: str = "",
            ignore: list[str] | None = None, all_commits: bool = False, out: Path | None = REPORT,
            mlflow: bool = True, params_file: Path = Path("params.yaml")) -> list[Group]:
    """Read, group, judge and print; write `out` and log to MLflow. `names`: exactly these experiments;
    `select`: glob patterns of names."""
    runs = read_experiments(all_commits)
    if names is not None:
        runs = [r for r in runs if r.name in names]
    if select:
        runs = [r for r in runs if any(fnmatch.fnmatchcase(r.name, pattern) for pattern in select)]
    if not runs:
        raise PipelineError("no finished experiment to compare (dvc exp show lists none with metrics/eval.json); "
                            "run some: make sweep GRID=\"train.lr=0.01,0.02\" SEEDS=3")
    groups = group_runs(runs, tuple(ignore or ()))
    chosen, how = pick_baseline(groups, baseline)
    judge(groups, chosen)
    table = rows(groups, chosen)
    report = markdown(table, groups, how, chosen)
    print(text_table(table))
    print()
    print(f"Baseline: {how}." if chosen else f"No group has {how}: no verdicts (pick one with --baseline).")
    print(f"Verdict on the test accuracy: {TEST}.")
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(report)
        print(f"wrote {out}")
    if mlflow:
        from stages.lib.params import load_params

        print(log_to_mlflow(load_params(params_file).tracking, groups, chosen, table, report))
    return groups


def add_arguments(parser) -> None:
    parser.add_argument("select", nargs="*", help="glob patterns of experiment names (default: every experiment of HEAD)")
    parser.add_argument("--baseline", default="",
                        help="the group to judge against: an experiment's name, or 'train.lr=0.01 ...' (default: the committed params)")
    parser.add_argument("--ignore", action="append", default=[], help="also group over this param, as over seed (e.g. evaluate.batch_size)")
    parser.add_argument("--all-commits", action="store_true", help="experiments of every commit, not only of HEAD")
    parser.add_argument("--out", type=lambda s: Path(s) if s else None, default=REPORT, help="the markdown report ('': none)")
    parser.add_argument("--no-mlflow", action="store_true", help="log nothing to MLflow")


def main(args) -> None:
    compare(select=args.select, baseline=args.baseline, ignore=args.ignore, all_commits=args.all_commits,
            out=args.out, mlflow=not args.no_mlflow)


if __name__ == "__main__":
    errors.run(main, description="compare — experiments grouped by their params (seed aside), each group against "
               "a baseline: better, worse, within seed noise or needs seeds", add_arguments=add_arguments)
