"""dvc.yaml must name every project module a stage runs: the import closure of each stage's script,
derived from the code, equals the stage's `.py` deps plus the modules left out on purpose with a
`# not a dep: <path> (why)` comment in that stage's block (a path ending in / leaves out that whole
package). Otherwise a change to that code would leave a stale output reported as up to date. And the
paths the code writes (stages/lib/paths.py) are the outs dvc.yaml declares."""
import ast
import re
from pathlib import Path

import pytest
import yaml

from conftest import REPO

PACKAGE = "stages"


def module_path(name: str) -> Path | None:
    """stages.lib.files -> stages/lib/files.py (or the package's __init__.py); None outside the project."""
    if name != PACKAGE and not name.startswith(PACKAGE + "."):
        return None
    base = REPO.joinpath(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def imported_modules(path: Path) -> set[str]:
    """Every project module `path` imports, anywhere in the file (lazy imports in functions too),
    with the packages that importing it runs (their __init__.py)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)  # `from pkg import module`
    with_parents = set()
    for name in names:
        parts = name.split(".")
        with_parents.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    return {name for name in with_parents if module_path(name)}


def skipped(rel: str, skip: set[str]) -> bool:
    return rel in skip or any(rel.startswith(folder) for folder in skip if folder.endswith("/"))


def closure(script: Path, skip: set[str]) -> set[str]:
    """Relative paths of the project files that running `script` can import, not following `skip`
    (files, or packages given as folder paths ending in /)."""
    seen, todo = set(), [script]
    while todo:
        path = todo.pop()
        rel = path.relative_to(REPO).as_posix()
        if rel in seen or skipped(rel, skip):
            continue
        seen.add(rel)
        todo.extend(module_path(name) for name in imported_modules(path))
    return seen


def holds_no_code(rel: str) -> bool:
    """A package __init__.py with nothing but a docstring cannot change what a stage computes."""
    body = ast.parse((REPO / rel).read_text()).body
    return all(isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) for node in body)


def stage_blocks() -> dict[str, str]:
    """Each stage's lines of dvc.yaml, comments included."""
    blocks, current = {}, None
    for line in (REPO / "dvc.yaml").read_text().splitlines():
        match = re.match(r"^  (\w+):\s*$", line)
        if match:
            current = match.group(1)
            blocks[current] = ""
        elif re.match(r"^\S", line):
            current = None
        elif current:
            blocks[current] += line + "\n"
    return blocks


STAGES = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


@pytest.mark.parametrize("name", list(STAGES))
def test_stage_deps_are_the_import_closure_of_its_script(name):
    stage = STAGES[name]
    module = re.fullmatch(r"python -m ([\w.]+)", stage["cmd"]).group(1)
    script = module_path(module)
    assert script, f"{name}: {stage['cmd']} does not run a project module"
    left_out = dict(re.findall(r"#\s*not a dep:\s*(\S+)\s*(.*)", stage_blocks()[name]))
    for path, why in left_out.items():
        assert why.strip(), f"{name}: say why {path} is not a dep"
    deps = {dep for dep in stage["deps"] if dep.endswith(".py")}
    needed = {rel for rel in closure(script, set(left_out)) if not (rel.endswith("__init__.py") and holds_no_code(rel))}
    assert sorted(needed - deps) == [], f"dvc.yaml stage {name} lacks these deps"
    assert sorted(deps - needed) == [], f"dvc.yaml stage {name} lists deps it does not import"
    everything = {rel for rel in closure(script, set()) if not (rel.endswith("__init__.py") and holds_no_code(rel))}
    for path in left_out:
        assert any(rel == path or (path.endswith("/") and rel.startswith(path)) for rel in everything), \
            f"{name}: 'not a dep' names {path}, which it never imports"
    # a module reached only through one left out must be inside it (DVC sees neither)
    hidden = {rel for rel in everything - deps if not skipped(rel, set(left_out))}
    assert sorted(hidden) == [], f"dvc.yaml stage {name}: these are reached only through a left-out module"


def test_no_module_is_left_out_of_the_deps():
    """Every excuse would be a place where a change does not rerun a stage: there are none."""
    excuses = re.findall(r"#\s*not a dep:\s*(\S+)", (REPO / "dvc.yaml").read_text())
    assert excuses == [], excuses


def test_the_paths_the_code_writes_are_the_outs_dvc_yaml_declares():
    from stages.lib import paths

    declared = {next(iter(out)) if isinstance(out, dict) else out
                for stage in STAGES.values() for out in stage.get("outs", [])}
    written = {str(value) for name, value in vars(paths).items()
               if name.isupper() and isinstance(value, Path) and name != "RESUME_DIR"}  # RESUME_DIR: not an output
    assert written == declared


def test_the_closure_follows_lazy_and_package_imports(tmp_path):
    """The closure helper itself: `from stages import x`, imports inside functions, and packages."""
    found = closure(REPO / "stages/train.py", set())
    assert "stages/train.py" in found and len(found) > 5
    assert all((REPO / rel).is_file() for rel in found)
    evaluate = closure(REPO / "stages/evaluate.py", set())
    assert "stages/lib/nets.py" in evaluate  # through the model-file module


def test_every_output_survives_a_failed_run():
    """DVC deletes a stage's outputs before it runs the command unless they are `persist: true`; every
    stage here replaces its outputs itself, only when it succeeded (see stages/lib/files.py)."""
    for name, stage in STAGES.items():
        for kind in ("outs", "metrics", "plots"):
            for out in stage.get(kind, []):
                path, options = next(iter(out.items())) if isinstance(out, dict) else (out, {})
                assert options.get("persist") is True, f"{name}: {path} is not persist: true"
