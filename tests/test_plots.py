"""`dvc plots`: exactly the intended plots, each once, drawn offline in a real browser (Debian's chromium),
and the script that makes DVC's page work offline (tools/offline_plots.py)."""
import base64
import hashlib
import importlib.util
import io
import json
import re
import shutil
import subprocess
import tarfile

import pytest

from conftest import REPO, make_dvc_repo, needs, sh

INTENDED = {"loss", "accuracy", "confusion", "per_class"}


def load_script():
    spec = importlib.util.spec_from_file_location("offline_plots", REPO / "tools/offline_plots.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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
def offline_template():
    """The page template `make plots` (and `make run`, `make test`) writes (it is fetched from the npm registry, which tests must not call)."""
    path = load_script().TEMPLATE
    needs(path.is_file(), f"{path} is missing: run `make plots` (tools/offline_plots.py)")
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


@pytest.mark.slow
def test_the_plots_page_draws_every_plot_offline(repo, offline_template, chromium, tmp_path):
    sh(repo, "dvc", "plots", "show", "--html-template", str(offline_template))
    page = repo / "dvc_plots/index.html"
    assert "cdn.jsdelivr.net" not in page.read_text()
    dom = rendered_dom(chromium, page, tmp_path)
    svgs = re.findall(r'<svg[^>]*class="marks".*?</svg>', dom, flags=re.S)  # Vega's drawings, not icons
    title = r"aria-label=\"Title text '([^']+)'\"[^>]*>\s*<text[^>]*font-size=\"13px\""  # the plot's, not a legend's
    drawn = {re.search(title, svg).group(1): svg for svg in svgs}
    assert sorted(drawn) == ["Loss per epoch", "Test accuracy per class", "Test confusion matrix",
                             "Validation accuracy per epoch"]
    for title in ("Loss per epoch", "Validation accuracy per epoch"):  # a point per epoch and series
        assert re.search(r'<g class="mark-(line|symbol) role-mark[^"]*"[^>]*>\s*<path[^>]* d="M', drawn[title]), title
    for title in ("Test confusion matrix", "Test accuracy per class"):  # cells and bars: one per class at least
        groups = re.findall(r'<g class="mark-rect role-mark[^"]*"[^>]*>(.*?)</g>', drawn[title], flags=re.S)
        assert max(group.count("<path") for group in groups) >= 10, title


def fake_package(name: str) -> bytes:
    """A tarball laid out like the npm package, with a stand-in build/<name>.min.js."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        code = f"window.{name.replace('-', '_')} = 'stand-in'; /* </script> inside code */".encode()
        info = tarfile.TarInfo(f"package/build/{name}.min.js")
        info.size = len(code)
        tar.addfile(info, io.BytesIO(code))
    return buffer.getvalue()


def test_offline_plots_script_checks_what_it_downloads(serve_folder, tmp_path, monkeypatch):
    script = load_script()
    www = tmp_path / "registry"
    pinned = {}
    for name, (version, _) in script.PACKAGES.items():
        (www / name / "-").mkdir(parents=True)
        tarball = fake_package(name)
        (www / name / "-" / f"{name}-{version}.tgz").write_bytes(tarball)
        pinned[name] = (version, base64.b64encode(hashlib.sha512(tarball).digest()).decode())
    registry = serve_folder(www)

    with pytest.raises(script.Fail, match="is not the pinned"):  # the real pins do not match stand-ins
        script.template(registry, 10)
    monkeypatch.setattr(script, "PACKAGES", pinned)
    page = script.template(registry, 10)
    assert page.count("<script>") == 4 and "{plot_divs}" in page and "{refresh_tag}" in page
    assert "<\\/script> inside code" in page and "cdn.jsdelivr.net" not in page
    with pytest.raises(script.Fail, match="cannot download"):
        script.template(registry + "/nowhere", 10)
