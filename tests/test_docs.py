"""The README and docs/ as a reader meets them: every shell block runs (on small params, in a small copy of the
project) or carries a marker that is checked, every link and anchor resolves, every `make` target named exists,
every figure is its results file's, and no page speaks of the project's own history (docs/testing.md)."""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import GIT_ENV, REPO, clean_env, make_dvc_repo, sh, venv_path

sys.path.insert(0, str(REPO))  # tools/

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]

KINDS = {"run", "slow", "tested-by", "server", "ci", "long", "gpu", "network"}
LONG_TARGETS = {"run", "test", "test-fast", "bench", "bench-serve", "reproduce", "fast-recipe", "setup", "lock",
                "lock-check", "sweep"}
SERVER_PROGRAMS = ("tools.serve", "tools/mlflow_server.py", "mlflow ui", "tensorboard --logdir")
NETWORK = re.compile(r"https?://|ssh://|s3://|git@|example\.com|apt-get|pip install|git clone")
GPU = re.compile(r"cuda|CUDA|GPU")


@dataclass
class Block:
    page: Path
    line: int             # 1-based line of the opening fence
    lang: str
    body: str
    marker: str | None    # the `<!-- cmd: ... -->` on the line before the fence

    @property
    def kind(self) -> str:
        return (self.marker or "run").split()[0]

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(REPO)}:{self.line}"

    def commands(self) -> list[str]:
        """The block's command lines, continuation lines joined, comments dropped."""
        text = re.sub(r"\\\n\s*", " ", self.body)
        return [line.split("  #")[0].strip() for line in text.splitlines()
                if line.strip() and not line.strip().startswith("#")]


def blocks(page: Path) -> list[Block]:
    found, lines = [], page.read_text().splitlines()
    i = 0
    while i < len(lines):
        m = re.match(r"^\s*```(\S*)\s*$", lines[i])
        if not m:
            i += 1
            continue
        end = next(j for j in range(i + 1, len(lines)) if lines[j].strip() == "```")
        before = lines[i - 1].strip() if i else ""
        marker = re.fullmatch(r"<!-- cmd: (.+?) -->", before)
        indent = len(lines[i]) - len(lines[i].lstrip())
        body = "\n".join(line[indent:] for line in lines[i + 1:end]) + "\n"
        found.append(Block(page, i + 1, m.group(1), body, marker.group(1) if marker else None))
        i = end + 1
    return found


ALL = [b for page in PAGES for b in blocks(page)]
SHELL = [b for b in ALL if b.lang in ("bash", "sh", "shell", "console")]


def makefile_targets() -> dict[str, str]:
    """target -> its recipe, from the Makefile."""
    text = (REPO / "Makefile").read_text()
    targets = {}
    for m in re.finditer(r"^([a-z][\w-]*(?: [a-z][\w-]*)*):(?!=)([^\n]*)\n((?:\t[^\n]*\n)*)", text, re.M):
        for name in m.group(1).split():
            targets[name] = targets.get(name, "") + m.group(3)
    return targets


TARGETS = makefile_targets()


def make_targets_named(text: str) -> set[str]:
    return set(re.findall(r"(?:^|[\s(;&|`])make ([a-z][\w-]*)", text, re.M))


# --- every fence is labelled, every marker holds -----------------------------------------------------------------

def test_every_fence_names_its_language():
    assert [b.where for b in ALL if not b.lang] == []


@pytest.mark.parametrize("block", [b for b in SHELL if b.marker], ids=lambda b: b.where)
def test_the_marker_of_a_block_that_is_not_run_holds(block):
    kind, _, rest = block.marker.partition(" ")
    assert kind in KINDS, f"{block.where}: unknown marker kind {kind!r} (one of {sorted(KINDS)})"
    commands = block.commands()
    if kind == "tested-by":
        file, _, name = rest.strip().partition("::")
        assert (REPO / file).is_file(), f"{block.where}: {file} does not exist"
        if name:
            assert re.search(rf"^def {re.escape(name)}\(", (REPO / file).read_text(), re.M), \
                f"{block.where}: no test {name} in {file}"
    elif kind == "server":
        target = rest.removeprefix("make ").strip()
        assert target in TARGETS, f"{block.where}: no make target {target!r}"
        assert any(p in TARGETS[target] for p in SERVER_PROGRAMS), f"{block.where}: make {target} starts no server"
    elif kind == "ci":
        ci = (REPO / ".ci/run").read_text()
        assert [c for c in commands if c not in ci] == [], f"{block.where}: not in .ci/run"
    elif kind == "long":
        def is_long(command: str) -> bool:
            words = command.split()
            if words[:1] == ["make"]:
                return words[1] in LONG_TARGETS
            return command.startswith(("dvc exp run", ".venv/bin/python -m pytest", "python -m pytest"))
        assert [c for c in commands if not is_long(c)] == [], f"{block.where}: not a long command"
    elif kind == "gpu":
        assert GPU.search(block.body), f"{block.where}: marked gpu but names no GPU"
    elif kind == "network":
        assert NETWORK.search(block.body), f"{block.where}: marked network but names no remote host or download"


# --- the blocks that run -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def project(tmp_path_factory, trained_project, mirror) -> Path:
    """A git + DVC repository of this checkout on small params, with the session's trained baseline committed
    (dvc commit: nothing is trained again), and the tools, examples, Makefile and venv a reader has."""
    folder = make_dvc_repo(tmp_path_factory.mktemp("docs") / "project", {"data": {"mirrors": [str(mirror)]}})
    for name in ("data", "models", "metrics", "logs"):
        shutil.copytree(trained_project / name, folder / name, dirs_exist_ok=True)
    for name in ("tools", "examples", "benchmarks"):
        shutil.copytree(REPO / name, folder / name, ignore=shutil.ignore_patterns("__pycache__", "results"))
    for name in ("Makefile", "pyproject.toml", "uv.lock"):
        shutil.copy2(REPO / name, folder / name)  # copy2: older than .venv/.installed, so make sets up nothing
    (folder / ".venv").symlink_to(REPO / ".venv")
    sh(folder, "dvc", "commit", "-f", timeout=600)
    sh(folder, "git", "add", "-A")
    sh(folder, "git", "commit", "-qm", "baseline")
    assert "up to date" in sh(folder, "dvc", "status")
    return folder


def run_block(block: Block, folder: Path) -> None:
    env = clean_env(**GIT_ENV, PATH=venv_path(),
                    COLUMNS="200")
    result = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", block.body], cwd=folder, env=env,
                            capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, f"{block.where} failed:\n{block.body}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"


@pytest.mark.parametrize("block", [pytest.param(b, id=b.where, marks=[pytest.mark.slow] if b.kind == "slow" else [])
                                   for b in SHELL if b.kind in ("run", "slow")])
def test_block_runs(block, project):
    """`run` blocks, and `slow` ones (in a test marked slow): each exits 0 in the small project."""
    run_block(block, project)


def test_the_blocks_that_run_train_once_and_the_rest_are_marked():
    """The run blocks stay cheap: at most one training (`dvc exp run`) among them; more goes in slow blocks."""
    trainings = [b.where for b in SHELL if b.kind == "run" and "dvc exp run" in b.body]
    assert len(trainings) <= 1, trainings


# --- links, anchors, make targets, references --------------------------------------------------------------------

def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"`|\*\*|\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = re.sub(r"^\s*```.*?^\s*```", "", page.read_text(), flags=re.M | re.S)
    return {slug(m.group(1)) for m in re.finditer(r"^#+ (.+)$", text, re.M)}


def prose(page: Path) -> str:
    """A page without its fenced blocks."""
    return re.sub(r"^\s*```.*?^\s*```", "", page.read_text(), flags=re.M | re.S)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_link_and_anchor_resolves(page):
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", prose(page)):
        if re.match(r"[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(target)
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            broken.append(target)
    assert broken == []


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_make_target_named_exists(page):
    code = [b.body for b in blocks(page)] + re.findall(r"`([^`\n]+)`", prose(page))
    named = set().union(*(make_targets_named(c) for c in code))
    assert sorted(named - set(TARGETS)) == []


CODE_AND_CONFIG = [REPO / name for name in ("Makefile", "params.yaml", "dvc.yaml", "pyproject.toml", ".ci/run")] + \
    sorted((REPO / "tools").glob("*.py")) + sorted((REPO / "stages").rglob("*.py")) + \
    sorted((REPO / "benchmarks").glob("*.py"))

def test_references_from_code_and_config_name_sections_that_exist():
    """`README: Heading` / `README, Heading` name a README heading; `docs/x.md` names a page that exists."""
    readme = {slug(h) for h in re.findall(r"^#+ (.+)$", prose(REPO / "README.md"), re.M)}
    bad = set()
    for file in CODE_AND_CONFIG:
        text = file.read_text()
        name = str(file.relative_to(REPO))
        for m in re.finditer(r"README[:,] ([A-Z][\w ]+?)(?=[).;]|$)", text, re.M):
            if not any(h.startswith(slug(m.group(1))) for h in readme):
                bad.add((name, m.group(0)))
        for page in re.findall(r"\bdocs/[\w-]+\.md", text):
            if not (REPO / page).exists():
                bad.add((name, page))
    assert sorted(bad) == []


# --- history words -----------------------------------------------------------------------------------------------

HISTORY = re.compile(r"\bissue #?\d+|\b(?:this|last|previous|earlier|next|the) round\b|\btrust branch|\bbranch `?serve\b"
                     r"|\bearlier machine", re.I)
HISTORY_PROSE = re.compile(HISTORY.pattern + r"|\bnew (?:param|entry)\b|\bno longer\b|\bas before\b", re.I)


@pytest.mark.parametrize("file", PAGES + CODE_AND_CONFIG, ids=lambda p: str(p.relative_to(REPO)))
def test_no_words_from_the_project_s_history(file):
    words = HISTORY_PROSE if file.suffix == ".md" else HISTORY  # code may say "no longer" of the present
    assert [m.group(0) for m in words.finditer(file.read_text())] == []


# --- numbers -----------------------------------------------------------------------------------------------------

def test_every_figure_is_its_results_file_s():
    from tools.docs_numbers import stale

    assert stale() == [], "run `make docs`"


MEASURED = re.compile(r"\d+\.\d+ ?%|\d[\d,]* images/s|\d+(?:\.\d+)? ms\b")


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_measured_figures_live_in_numbers_regions(page):
    """Accuracies, throughputs and latencies in prose come from a results file, never typed by hand."""
    from tools.docs_numbers import REGION

    text = REGION.sub("", prose(page))
    assert MEASURED.findall(text) == []


def test_make_docs_rewrites_a_stale_figure(tmp_path):
    from tools.docs_numbers import rewrite

    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics/eval.json").write_text('{"test_accuracy": 0.8681}')
    text = "accuracy <!-- numbers: metrics/eval.json test_accuracy .1% -->99.9%<!-- /numbers -->."
    assert rewrite(text, tmp_path) == "accuracy <!-- numbers: metrics/eval.json test_accuracy .1% -->86.8%<!-- /numbers -->."


# --- the README's shape ------------------------------------------------------------------------------------------

def test_readme_is_short_and_reaches_a_compared_experiment_in_100_lines():
    lines = (REPO / "README.md").read_text().splitlines()
    assert len(lines) <= 250
    first = "\n".join(lines[:100])
    for needed in ("make run", "make test", "dvc exp run", "-S ", "make sweep", "dvc exp show", "make compare",
                   "make ui", "docs/images/"):
        assert needed in first, needed
    order = ["## Two commands", "## Your first experiment", "## Using the model", "## Settings", "## Outputs",
             "## Make targets", "## More"]
    positions = [next(i for i, line in enumerate(lines) if line.startswith(h)) for h in order]
    assert positions == sorted(positions)
