"""tools/flips.py: the counts on predictions made up to know them, then on two real experiments of
tests/test_experiments.py's sweep, with the page checked in headless Chromium (every image decoded)."""
import csv
import re
import shutil
import subprocess

import pytest

from conftest import copy_repo, needs, sh
from test_experiments import BAD, GOOD, tool
from tools.flips import flips


def rows(predicted: str, actual: str = "aabbccdd") -> list[dict]:
    return [{"index": str(i), "actual": a, "predicted": p, "probability": "0.5"}
            for i, (a, p) in enumerate(zip(actual, predicted))]


def test_the_counts_image_by_image():
    #                  actual: a a b b c c d d
    a = rows("abbbcadc")  # A right on 0 2 3 4 6
    b = rows("aabbdbdd")  # B right on 0 1 2 3 6 7
    counts, changed = flips(a, b)
    assert counts == {"fixed": 2, "broken": 1, "both wrong, changed": 1, "unchanged": 4}
    assert [(r["index"], r["kind"], r["a_predicted"], r["b_predicted"]) for r in changed] == [
        (1, "fixed", "b", "a"), (4, "broken", "c", "d"), (5, "both wrong, changed", "a", "b"), (7, "fixed", "c", "d")]
    assert flips(b, a)[0] == {"fixed": 1, "broken": 2, "both wrong, changed": 1, "unchanged": 4}
    with pytest.raises(Exception, match="same test images"):
        flips(a, rows("ab", "ab"))


@pytest.mark.slow
def test_flips_of_two_real_experiments_and_the_page_in_chromium(swept, tmp_path):
    a, b = f"{GOOD}-seed0", f"{BAD}-seed0"
    out = tmp_path / "flips.html"
    result = tool(swept, "tools.flips", a, b, "--out", str(out), "--no-mlflow")
    assert result.returncode == 0, result.stderr
    counts = dict(re.findall(r"^\s*(.+?): (\d+)$", result.stdout, re.M))
    expected = {"fixed": 0, "broken": 0, "both wrong, changed": 0, "unchanged": 0}
    preds = {}
    for name in (a, b):
        shown = subprocess.run(["git", "show", f"{name_ref(swept, name)}:metrics/predictions.csv"], cwd=swept,
                               capture_output=True, text=True, check=True).stdout
        preds[name] = list(csv.DictReader(shown.splitlines()))
    for x, y in zip(preds[a], preds[b]):
        kind = ("unchanged" if x["predicted"] == y["predicted"] else "fixed" if y["predicted"] == y["actual"]
                else "broken" if x["predicted"] == x["actual"] else "both wrong, changed")
        expected[kind] += 1
    assert {k: int(v) for k, v in counts.items()} == expected and expected["broken"] > 0
    changed = sum(expected.values()) - expected["unchanged"]
    page = out.read_text()
    assert page.count('src="data:image/png;base64,') == changed
    assert "<script" not in page and not re.search(r'(src|href)="(https?:)?//', page)

    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    needs(bool(browser), "chromium is missing: apt-get install chromium")
    # a copy with a probe that counts the decoded images (the page itself runs no script)
    probe = tmp_path / "probe.html"
    probe.write_text(page.replace("</body>", "<script>addEventListener('load', () => document.body.dataset.decoded ="
                                  " [...document.images].filter(i => i.complete && i.naturalWidth > 0).length)"
                                  "</script></body>"))
    dom = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                          "--host-resolver-rules=MAP * ~NOTFOUND", f"--user-data-dir={tmp_path / 'chromium'}",
                          "--virtual-time-budget=10000", "--dump-dom", probe.as_uri()],
                         capture_output=True, text=True, timeout=300).stdout
    assert f'data-decoded="{changed}"' in dom, dom[:500]


@pytest.mark.slow
def test_flips_refuses_runs_on_different_data_in_one_line(swept, tmp_path):
    """An experiment with another validation split (preprocess.split_seed) has another data/prepared: flips
    against it is refused, and so is flips of two runs whose data/prepared is not the one here."""
    repo = copy_repo(swept, tmp_path / "repo")
    sh(repo, "dvc", "exp", "run", "-n", "other-split", "-S", "preprocess.split_seed=1", "evaluate")
    result = tool(repo, "tools.flips", f"{GOOD}-seed0", "other-split", "--no-mlflow")
    assert result.returncode == 2 and "evaluated on different data/prepared" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    result = tool(repo, "tools.flips", f"{GOOD}-seed1", f"{BAD}-seed1", "--no-mlflow")  # data/prepared here: other-split's
    assert result.returncode == 2 and "data/prepared here is not the one" in result.stderr
    result = tool(repo, "tools.flips", "nope", "workspace")
    assert result.returncode == 2 and "neither an experiment" in result.stderr


def name_ref(repo, name: str) -> str:
    refs = subprocess.run(["git", "for-each-ref", "--format=%(refname)", "refs/exps/"], cwd=repo, capture_output=True,
                          text=True, check=True).stdout.split()
    return next(ref for ref in refs if ref.endswith(f"/{name}"))
