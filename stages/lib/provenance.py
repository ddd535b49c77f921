"""What a stage ran with, checked again just before it writes: dvc.lock must never pair outputs with
settings or inputs they were not made from.

DVC records dvc.lock from params.yaml and the deps as they are when a stage *ends*. An edit to
params.yaml during a run (by hand, or by a refused `dvc exp run -S`), a `dvc checkout` that swaps
data/prepared, or an edit to the code would be recorded as if the outputs came from it, and `dvc
status` would then call them up to date. So a stage takes `Inputs.read(name)` when it starts: the
values of the params its dvc.yaml entry lists and the size and modification time of every file of its
deps; `verify()` before writing raises a one-line PipelineError naming what changed, and the stage
writes nothing. It also notices outputs that something else replaced while the stage ran (a `dvc
checkout` or `dvc exp apply` in another terminal) and says so; the stage's own outputs then replace
them, and dvc.lock describes those. dvc.yaml is the one beside this code (the project's root).
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

from stages.lib.errors import PipelineError
from stages.lib.params import flatten, read_yaml

ROOT = Path(__file__).resolve().parents[2]


def _stat(path: Path) -> dict:
    """{file: (size, mtime_ns)} of a file, or of every file under a folder."""
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(Path(folder) / name for folder, _, names in os.walk(path) for name in names)
    else:
        return {str(path): None}
    out = {}
    for file in files:
        try:
            info = file.stat()
            out[str(file)] = (info.st_size, info.st_mtime_ns)
        except OSError:
            out[str(file)] = None
    return out


def _params(keys: list[str], params_file: Path) -> dict:
    """{dotted key: value} of params.yaml for the keys (or whole sections) a stage lists."""
    flat = flatten(read_yaml(params_file) or {})
    return {key: value for key, value in flat.items()
            if any(key == wanted or key.startswith(wanted + ".") for wanted in keys)}


@dataclass
class Inputs:
    stage: str
    params_file: Path
    keys: list[str]
    deps: list[Path]
    params: dict
    files: dict
    outs: dict

    @classmethod
    def read(cls, stage: str, params_file: Path = Path("params.yaml"), dvc_yaml: Path = ROOT / "dvc.yaml",
             rewritten: tuple = ()) -> "Inputs":
        """`rewritten`: outputs the stage itself rewrites while it runs (train's live metrics)."""
        spec = read_yaml(dvc_yaml)["stages"][stage]
        keys = [key for entry in spec.get("params", []) for key in ([entry] if isinstance(entry, str) else entry)]
        # the code deps are this code's files; the data deps are the working directory's (the same folder under DVC)
        deps = [ROOT / dep if dep.endswith(".py") else Path(dep) for dep in spec.get("deps", [])]
        files = {}
        for dep in deps:
            files.update(_stat(dep))
        outs = {}
        for out in spec.get("outs", []):
            path = Path(next(iter(out)) if isinstance(out, dict) else out)
            if path not in map(Path, rewritten):
                outs.update(_stat(path))
        return cls(stage, params_file, keys, deps, _params(keys, params_file), files, outs)

    def verify(self) -> None:
        """PipelineError (one line) when a listed param or a dep changed since `read`."""
        now = _params(self.keys, self.params_file)
        changed = [f"{key} {self.params.get(key)!r} -> {now.get(key)!r}" for key in sorted(set(self.params) | set(now))
                   if self.params.get(key) != now.get(key)]
        if changed:
            raise PipelineError(f"{self.params_file} changed while {self.stage} ran ({'; '.join(changed[:3])}): "
                                f"nothing was written, so nothing is recorded as made from it; run it again")
        files = {}
        for dep in self.deps:
            files.update(_stat(dep))
        moved = sorted(path for path in set(self.files) | set(files) if self.files.get(path) != files.get(path))
        if moved:
            raise PipelineError(f"{', '.join(moved[:3])} changed while {self.stage} ran (an edit, or a dvc checkout): "
                                "nothing was written; run it again")
        now_outs = {}
        for path in self.outs:
            now_outs.update(_stat(Path(path)))
        swapped = sorted(path for path in self.outs if self.outs[path] != now_outs.get(path))
        if swapped:
            print(f"warning: {', '.join(swapped[:3])} changed while {self.stage} ran (a dvc checkout or exp apply?); "
                  f"this run's outputs replace them", file=sys.stderr, flush=True)
