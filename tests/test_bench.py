"""benchmarks/bench.py end to end on a tiny budget: every route really trains and the report is complete.
(The speed targets themselves are measured by `make bench`, never asserted in tests.)"""
import json
import subprocess
import sys

import pytest
import yaml

from conftest import REPO, clean_env


@pytest.mark.slow
def test_benchmark_runs_every_route_and_writes_the_report(mirror, tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "benchmarks/bench.py"), "--raw", str(mirror), "--epochs", "2",
                             "--limit", "1000", "--test-limit", "300", "--fast-epochs", "2", "--fast-short-epochs", "1",
                             "--set", "train.batch_size=64", "--out", str(tmp_path)],
                            env=clean_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "results.json").read_text())
    summary = {s["route"]: s for s in report["summary"]}
    assert list(summary) == ["reference", "project", "fast-short", "fast"]
    assert [summary[r]["epochs"] for r in summary] == [2, 2, 1, 2]
    for s in summary.values():
        assert s["images_per_s"] > 0 and s["peak_rss_mb"] > 100 and len(s["accuracy_per_epoch"]) == s["epochs"]
        assert all(0 <= a <= 1 for a in s["accuracy_per_epoch"])
    assert report["raw"]["fast"]["epochs"][0]["images"] == 1000
    assert summary["fast"]["accuracy_per_epoch"][-1] > 0.5  # 1,000 images, 2 epochs: far above chance (0.1)
    assert set(report["checks"]) >= {"project/reference throughput", "project - reference test accuracy",
                                     "fast: time to 93.00% / reference elapsed"}
    table = (tmp_path / "results.md").read_text()
    assert "| reference | 2 |" in table and "| fast | 2 |" in table


def test_readme_states_the_fast_recipe_exactly_as_the_preset():
    """The `dvc exp run` line in README and `make fast-recipe` must be the recipe the benchmark measures."""
    preset = yaml.safe_load((REPO / "benchmarks/fast_recipe.yaml").read_text())
    readme = (REPO / "README.md").read_text()
    line = next(line for line in readme.splitlines() if line.startswith("dvc exp run -n fast-recipe"))
    flags = dict(flag.split("=", 1) for flag in line.split(" -S ")[1:])
    assert {k: yaml.safe_load(v) for k, v in flags.items()} == preset
