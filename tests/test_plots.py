"""`dvc plots`: exactly the intended plots, each once, with named axes, drawn offline: DVC's page with
tools/offline_plots.py's template in a real browser (Debian's chromium), and the SVG, PNG and page that
`tools/offline_plots.py --render` (`make plots`) draws with vl-convert."""
import importlib.util
import json
import re
import shutil
import subprocess
import sys

import pytest

from conftest import REPO, make_dvc_repo, needs, sh

INTENDED = {"loss", "accuracy", "confusion", "per_class"}


@pytest.fixture(scope="module")
def repo(tmp_path_factory, mirror):
    folder = make_dvc_repo(tmp_path_factory.mktemp("plots_repo"))
    sh(folder, "dvc", "repro")
    return folder


@pytest.mark.slow
def test_plots_are_exactly_the_intended_ones_each_once(repo):
    shown = json.loads(sh(repo, "dvc", "plots", "show", "--json", stdout_only=True))
    assert not shown.get("errors")
    shown = shown["data"]
    assert set(shown) == INTENDED
    per_class = shown["per_class"][0]["content"]
    assert {row["class"] for row in per_class["data"]["values"]} >= {"Ankle boot", "Trouser"}


@pytest.fixture(scope="module")
def vl_convert():
    needs(importlib.util.find_spec("vl_convert") is not None, "vl-convert-python is missing: make setup (uv.lock)")


@pytest.fixture(scope="module")
def offline_template(vl_convert, tmp_path_factory):
    """The page template `make plots` (and `make run`, `make test`) writes, built here from the wheel."""
    path = tmp_path_factory.mktemp("template") / "plots_offline.html"
    result = subprocess.run([sys.executable, str(REPO / "tools/offline_plots.py"), "--out", str(path), "--no-config"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return path


@pytest.fixture(scope="module")
def chromium():
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    needs(bool(browser), "chromium is missing: apt-get install chromium")
    return browser


def rendered_dom(browser: str, page, tmp_path) -> str:
    """The page's DOM after its scripts ran, in headless Chromium with every host name unresolvable."""
    result = subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--host-resolver-rules=MAP * ~NOTFOUND",
         f"--user-data-dir={tmp_path / 'chromium'}", "--virtual-time-budget=30000", "--dump-dom", page.as_uri()],
        capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


TITLES = ["Loss per epoch", "Test accuracy per class", "Test confusion matrix", "Validation accuracy per epoch"]
AXES = {"Loss per epoch": ("epoch", "cross-entropy loss"),  # (x, y) as dvc.yaml's x_label and y_label
        "Validation accuracy per epoch": ("epoch", "validation accuracy"),
        "Test confusion matrix": ("actual class", "predicted class"),
        "Test accuracy per class": ("test accuracy", "class")}


def drawn_plots(svg_text: str) -> dict:
    """{plot title: its SVG} of every Vega drawing (not icons) in a page or an SVG file, each checked: a
    point per epoch and series, or at least one cell or bar per class, and both axes titled as dvc.yaml says."""
    svgs = re.findall(r'<svg[^>]*class="marks".*?</svg>', svg_text, flags=re.S)
    title = r"aria-label=\"Title text '([^']+)'\"[^>]*>\s*<text[^>]*font-size=\"13px\""  # the plot's, not a legend's
    drawn = {re.search(title, svg).group(1): svg for svg in svgs}
    for name, svg in drawn.items():
        if name in ("Loss per epoch", "Validation accuracy per epoch"):
            assert re.search(r'<g class="mark-(line|symbol) role-mark[^"]*"[^>]*>\s*<path[^>]* d="M', svg), name
        else:
            groups = re.findall(r'<g class="mark-rect role-mark[^"]*"[^>]*>(.*?)</g>', svg, flags=re.S)
            assert max(group.count("<path") for group in groups) >= 10, name
        x, y = AXES[name]
        assert f"X-axis titled '{x}'" in svg and f"Y-axis titled '{y}'" in svg, name
    return drawn


@pytest.mark.slow
def test_the_plots_page_draws_every_plot_offline(repo, offline_template, chromium, tmp_path):
    sh(repo, "dvc", "plots", "show", "--html-template", str(offline_template))
    page = repo / "dvc_plots/index.html"
    assert "cdn.jsdelivr.net" not in page.read_text()
    assert sorted(drawn_plots(rendered_dom(chromium, page, tmp_path))) == TITLES


@pytest.mark.slow
def test_make_plots_draws_every_plot_as_files_and_a_page_without_scripts(repo, vl_convert, chromium, tmp_path):
    out = tmp_path / "drawn"
    result = subprocess.run([sys.executable, str(REPO / "tools/offline_plots.py"), "--render", str(out)], cwd=repo,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    names = sorted(INTENDED)
    files = ["index.html", *(f"{n}.{e}" for n in names for e in ("png", "svg"))]
    assert sorted(p.name for p in out.iterdir()) == sorted(files)
    assert sorted(drawn_plots("".join((out / f"{n}.svg").read_text() for n in names))) == TITLES
    for name in names:
        png = (out / f"{name}.png").read_bytes()
        width, height = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and width > 400 and height > 400, name
    page = (out / "index.html").read_text()
    assert "<script" not in page and not re.search(r'(src|href)="(https?:)?//', page)
    # the page as a browser shows it, with every host name unresolvable: the same four drawings
    assert sorted(drawn_plots(rendered_dom(chromium, out / "index.html", tmp_path))) == TITLES


def y_axis_labels(spec: dict) -> list[float]:
    """The numbers on the y axis of a Vega-Lite plot as vl-convert draws it (the second axis's labels)."""
    import vl_convert as vlc

    svg = vlc.vegalite_to_svg(spec, vl_version="5.21")
    axis = re.findall(r"role-axis-label.*?</g>", svg, flags=re.S)[1]
    return [float(t) for t in re.findall(r">(\d+\.\d+)</text>", axis)]


def test_epochs_without_validation_are_gaps_in_the_curves_not_zeros(vl_convert, tmp_path):
    """train.val_every leaves an epoch's val_* cells blank in train_history.csv; the loss and accuracy plots
    (template linear_gaps) skip them, where DVC's linear template would draw them as 0."""
    folder = make_dvc_repo(tmp_path / "gaps")
    (folder / "metrics").mkdir()
    (folder / "metrics/train_history.csv").write_text(
        "epoch,train_loss,val_loss,val_accuracy\n1,0.9,,\n2,0.7,0.6,0.8\n3,0.6,0.5,0.85\n")
    shown = json.loads(sh(folder, "dvc", "plots", "show", "--json", stdout_only=True))["data"]
    for name, low in (("loss", 0.5), ("accuracy", 0.8)):
        assert min(y_axis_labels(shown[name][0]["content"])) >= low - 0.1, name  # a 0 would stretch the axis to 0
    unfiltered = {**shown["accuracy"][0]["content"], "transform": []}  # DVC's own template: the test can tell
    assert min(y_axis_labels(unfiltered)) < 0.1


def test_the_template_inlines_the_libraries_and_leaves_dvc_its_placeholders(offline_template):
    page = offline_template.read_text()
    assert page.count("<script>") == 2 and "{plot_divs}" in page and "{refresh_tag}" in page
    assert "window.vegaEmbed=" in page and "cdn.jsdelivr.net" not in page and "https://cdn" not in page
    code = page[page.index("<script>") + 8:page.index("</script>")]
    assert "</script" not in code and len(code) > 500_000  # all of Vega, Vega-Lite and vega-embed, one element


def test_render_says_in_one_line_when_there_is_nothing_to_draw(vl_convert, tmp_path):
    folder = make_dvc_repo(tmp_path / "empty")  # nothing run yet: dvc.yaml's plots have no data
    result = subprocess.run([sys.executable, str(REPO / "tools/offline_plots.py"), "--render", str(tmp_path / "out")],
                            cwd=folder, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1 and result.stderr.strip().splitlines()[-1].startswith("error: dvc plots shows no")
