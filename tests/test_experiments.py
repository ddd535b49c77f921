"""Sweeps and verdicts: tools/sweep.py names and queues a grid × seeds, tools/compare.py groups the finished
experiments and judges each group against the baseline; on real runs, a bad lr is "worse", two groups of
the same training (evaluated in other batches) are "within seed noise", a lone run "needs seeds"."""
import subprocess
import sys

import pytest

from conftest import REPO, clean_env, run_stage, sh, tool_env
from tools.compare import BETTER, NEEDS_SEEDS, NOISE, WORSE, Run, group_runs, judge, pick_baseline, verdict
from tools.sweep import exp_name, plan

# The real runs: tests/conftest.py's `swept` repository, eight experiments of two sweeps made by tools.sweep.
GOOD, BAD = "lr0.02", "lr0.0001"


def tool(repo, module, *args, timeout=600):
    """`python -m tools.X` in `repo` with this checkout on the path and the venv first on PATH (as make runs it)."""
    return subprocess.run([sys.executable, "-m", module, *args], cwd=repo, env=tool_env(), capture_output=True,
                          text=True, timeout=timeout)


def compare(repo, *args):
    return tool(repo, "tools.compare", "--no-mlflow", "--out", "", *args)


def verdicts(output: str) -> dict:
    """{group label: verdict} from compare's terminal table."""
    found = {}
    for line in output.splitlines()[2:]:
        if not line.strip():
            break
        label = line.split("  ")[0]
        found[label] = next((v for v in ("baseline", WORSE, BETTER, NOISE, NEEDS_SEEDS) if line.endswith(v)), "")
    return found


# ---- the verdict on numbers ----

def test_verdict_on_numbers():
    assert verdict([0.90, 0.91, 0.92], [0.80, 0.81, 0.82]).label == BETTER
    assert verdict([0.80, 0.81, 0.82], [0.90, 0.91, 0.92]).label == WORSE
    noise = verdict([0.868, 0.871, 0.864], [0.866, 0.872, 0.869])
    assert noise.label == NOISE and noise.low < 0 < noise.high and noise.p > 0.05
    lone = verdict([0.95], [0.80, 0.81])
    assert lone.label == NEEDS_SEEDS and lone.diff == pytest.approx(0.145) and "needs seeds" in str(lone)
    assert verdict([0.9, 0.9], [0.8, 0.8]).label == BETTER  # no noise at all: any difference is real
    with pytest.raises(ValueError):
        verdict([], [0.8])


def test_groups_ignore_the_seed_and_the_baseline_is_the_committed_params(monkeypatch):
    import tools.compare as compare_module

    def run(name, lr, seed, acc, epochs=2):
        return Run(name, {"seed": seed, "train.lr": lr, "train.epochs": epochs}, seed, acc, 1 - acc)

    runs = [run("a0", 0.01, 0, 0.80), run("a1", 0.01, 1, 0.81), run("b0", 0.05, 0, 0.70), run("b1", 0.05, 1, 0.71),
            run("c0", 0.1, 0, 0.90)]
    groups = group_runs(runs)
    assert sorted(g.label for g in groups) == ["train.lr=0.01", "train.lr=0.05", "train.lr=0.1"]
    # HEAD has epochs 10: epochs is the same in every group (a sweep's SET), so only train.lr decides
    monkeypatch.setattr(compare_module, "head_params", lambda: {"seed": 0, "train.lr": 0.01, "train.epochs": 10})
    base, how = pick_baseline(groups)
    assert base.label == "train.lr=0.01" and "train.lr=0.01" in how
    judge(groups, base)
    assert {g.label: g.verdict and g.verdict.label for g in groups} == {
        "train.lr=0.01": None, "train.lr=0.05": WORSE, "train.lr=0.1": NEEDS_SEEDS}
    assert pick_baseline(groups, "b1")[0].label == "train.lr=0.05"
    assert pick_baseline(groups, "train.lr=0.1")[0].label == "train.lr=0.1"
    worst = next(g for g in groups if g.label == "train.lr=0.01").worst("test_accuracy")
    assert (worst.name, worst.seed) == ("a0", 0)


# ---- sweep names ----

def test_sweep_names_each_run_after_its_params_and_seed_and_git_accepts_them(tmp_path):
    runs = plan(["train.lr=0.01,0.1", "model.name=cifar10_quick"], "2", ["train.epochs=2"], jobs=2)
    assert [name for name, _ in runs] == ["lr0.01-name_cifar10_quick-seed0", "lr0.01-name_cifar10_quick-seed1",
                                          "lr0.1-name_cifar10_quick-seed0", "lr0.1-name_cifar10_quick-seed1"]
    assert runs[0][1][:4] == ["train.lr=0.01", "model.name=cifar10_quick", "seed=0", "train.epochs=2"]
    assert runs[0][1][4].startswith("threads=")
    assert [n for n, _ in plan(["train.lr=0.02"], "3,4", ["threads=1"], 1)] == ["lr0.02-seed3", "lr0.02-seed4"]
    assert plan(["train.lr=0.02"], "1", ["threads=1"], 1)[0][1] == ["train.lr=0.02", "seed=0", "threads=1"]
    odd = [exp_name(["a.lr=1e-3", "b.lr=x/y..z", "seed=0"], ["a.lr", "b.lr", "seed"]),
           exp_name(["train.name=a b:c~d^e", "seed=1"], ["train.name", "seed"], prefix="my run"),
           exp_name(["x.data=.lock", "seed=1"], ["x.data", "seed"])]
    assert odd[0] == "a.lr1e-3-b.lr_x_y.z-seed0"  # keys ending alike keep their whole name
    for name in odd + [n for n, _ in runs]:
        assert subprocess.run(["git", "check-ref-format", f"refs/exps/ab/cdef/{name}"]).returncode == 0, name
        assert "/" not in name


def test_sweep_refuses_a_bad_grid_in_one_line(tmp_path):
    for args, message in ((["--grid", "train.lr=[0.1"], "bad sweep override"),
                          (["--grid", "seed=1,2"], "swept twice"),
                          (["--grid", "train.lr=0.1", "--set", "train.lr=0.2"], "also swept"),
                          (["--grid", "train.lr=0.1", "--seeds", "0"], "at least 1")):
        result = run_stage(tmp_path, "tools.sweep", "--dry-run", *args)
        assert result.returncode == 2 and result.stderr.startswith("error: ") and message in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1


# ---- on real runs ----

@pytest.mark.slow
def test_the_sweep_named_and_finished_every_run(swept):
    names = sh(swept, "dvc", "exp", "list", "--name-only").split()
    assert sorted(names) == sorted([*(f"{lr}-seed{s}" for lr in (GOOD, BAD) for s in (0, 1, 2)),
                                    "batch_size100-seed3", "batch_size100-seed4"])


@pytest.mark.slow
def test_a_bad_lr_is_worse_and_the_same_training_is_within_seed_noise(swept):
    result = compare(swept)
    assert result.returncode == 0, result.stderr
    found = verdicts(result.stdout)
    assert found == {"evaluate.batch_size=1000 train.lr=0.02": "baseline",
                     "evaluate.batch_size=100 train.lr=0.02": NOISE,
                     "evaluate.batch_size=1000 train.lr=0.0001": WORSE}, result.stdout
    assert "Baseline: the committed params (evaluate.batch_size=1000 train.lr=0.02)." in result.stdout


@pytest.mark.slow
def test_one_seed_needs_seeds(swept):
    result = compare(swept, f"{GOOD}-seed*", f"{BAD}-seed0")
    assert result.returncode == 0, result.stderr
    assert verdicts(result.stdout) == {"train.lr=0.02": "baseline", "train.lr=0.0001": NEEDS_SEEDS}, result.stdout


@pytest.mark.slow
def test_compare_writes_the_markdown_report_and_a_baseline_can_be_chosen(swept, tmp_path):
    out = tmp_path / "compare.md"
    result = compare(swept, "--out", str(out), "--baseline", f"{BAD}-seed1", "--ignore", "evaluate.batch_size")
    assert result.returncode == 0, result.stderr
    assert verdicts(result.stdout) == {"train.lr=0.0001": "baseline", "train.lr=0.02": BETTER}, result.stdout
    report = out.read_text()
    assert report.startswith("# Experiments compared") and "| train.lr=0.02 | 5 |" in report and "Welch" in report
    result = compare(swept, "--baseline", "nope")
    assert result.returncode == 2 and result.stderr.startswith("error: --baseline nope")


def test_compare_tags_each_run_with_its_group_in_mlflow(tmp_path):
    """Runs tagged dvc_exp_name in a store: each gets group/test_accuracy_mean and the group tags; one
    summary run holds the table, and a second compare of the same runs reuses it."""
    from mlflow import MlflowClient

    from conftest import make_params
    from tools.compare import log_to_mlflow, markdown, rows

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracking = make_params({"tracking": {"enabled": True, "uri": uri, "experiment": "t"}}).tracking
    client = MlflowClient(uri)
    eid = client.create_experiment("t", artifact_location=(tmp_path / "art").as_uri())
    runs = [Run(f"r{i}", {"seed": i % 2, "train.lr": lr}, i % 2, acc, 0.5)
            for i, (lr, acc) in enumerate([(0.01, 0.8), (0.01, 0.82), (0.1, 0.5), (0.1, 0.52)])]
    for r in runs:
        client.create_run(eid, run_name=r.name, tags={"dvc_exp_name": r.name})
    groups = group_runs(runs)
    base = next(g for g in groups if g.label == "train.lr=0.01")
    judge(groups, base)
    table = rows(groups, base)
    for _ in range(2):
        message = log_to_mlflow(tracking, groups, base, table, markdown(table, groups, "x", base))
        assert message.startswith("MLflow: group/test_accuracy_mean and group tags on 4 of 4 runs"), message
    logged = {r.data.tags["dvc_exp_name"]: r for r in client.search_runs([eid], "tags.dvc_exp_name != ''")}
    assert logged["r0"].data.metrics["group/test_accuracy_mean"] == pytest.approx(0.81)
    assert logged["r3"].data.tags["group"] == "train.lr=0.1" and logged["r3"].data.tags["group_verdict"] == WORSE
    assert logged["r1"].data.tags["group_verdict"] == "baseline"
    ordered = client.search_runs([eid], "tags.dvc_exp_name != ''", order_by=["metrics.`group/test_accuracy_mean` DESC"])
    assert [r.info.run_name for r in ordered][:2] in (["r0", "r1"], ["r1", "r0"])
    summaries = client.search_runs([eid], "tags.compare_summary = 'true'")
    assert len(summaries) == 1
    artifacts = [a.path for a in client.list_artifacts(summaries[0].info.run_id, "compare")]
    assert sorted(artifacts) == ["compare/compare.md", "compare/groups.json"]
    off = make_params({"tracking": {"enabled": False}}).tracking
    assert log_to_mlflow(off, groups, base, table, "").startswith("MLflow: tracking.enabled is false")


def test_help_names_the_commands_and_their_defaults():
    for module in ("tools.sweep", "tools.compare", "tools.flips"):
        result = subprocess.run([sys.executable, "-m", module, "--help"], cwd=REPO, capture_output=True, text=True,
                                timeout=120, env=clean_env(PYTHONPATH=str(REPO)))
        assert result.returncode == 0 and result.stdout.startswith(f"usage: python -m {module} "), result.stdout
        assert "(default: False)" in result.stdout
