"""sweep — queue a grid of settings × seeds as named DVC experiments, run the queue, then compare them.

    python -m tools.sweep --grid "train.lr=0.01,0.02,0.05" --seeds 3 [--jobs 2] [--set "train.epochs=2"]

The grid is DVC's own `-S` sweep syntax (`dvc exp run --queue -S 'train.lr=0.01,0.02' -S 'seed=0,1,2'`),
expanded by DVC's own code. DVC names a sweep's runs `NAME-1`, `NAME-2`, ...; here each is queued on its
own with `-n` and a name made of its params and seed (`lr0.02-seed1`), so that `dvc exp show`, MLflow
and `make flips` name it by what it is. Each job gets `threads = cores / jobs`.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

from stages.lib.errors import PipelineError, run

POLL_S = 5


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def expand(overrides: list[str]) -> list[list[str]]:
    """Every combination of DVC `-S` overrides (commas, range(), choice() sweep), as DVC expands them."""
    from dvc.utils.hydra import get_hydra_sweeps

    try:
        return [combo["params.yaml"] for combo in get_hydra_sweeps({"params.yaml": overrides})]
    except Exception as exc:  # hydra's parser errors name the override
        raise PipelineError(f"bad sweep override in {' '.join(overrides)}: {' '.join(str(exc).split())}") from None


def _safe(text: str) -> str:
    """A piece of a git ref name: letters, digits, '.', '_', '+', '-' (git check-ref-format, no '/')."""
    text = re.sub(r"[^A-Za-z0-9._+-]+", "_", text)
    return re.sub(r"\.{2,}", ".", text).strip(".")


def exp_name(overrides: list[str], named: list[str], prefix: str = "") -> str:
    """`lr0.02-seed1` for ["train.lr=0.02", "seed=1"]: the value of each key in `named` (the swept ones)
    after its last component, or its whole key where two swept keys end alike."""
    values = dict(override.split("=", 1) for override in overrides)
    last = [key.rsplit(".", 1)[-1] for key in named]
    parts = [_safe(f"{tail if last.count(tail) == 1 else key}{'_' if values[key][:1].isalpha() else ''}{values[key]}")
             for key, tail in zip(named, last)]
    name = "-".join(part for part in [_safe(prefix), *parts] if part)
    if name.endswith(".lock"):
        name = name[:-5] + "_lock"
    return name


def plan(grid: list[str], seeds: str, fixed: list[str], jobs: int, prefix: str = "") -> list[tuple[str, list[str]]]:
    """[(name, every -S override of one run)]: the grid × seeds, then the fixed overrides and threads."""
    seed_values = ",".join(map(str, range(int(seeds)))) if seeds.isdigit() else seeds
    if seeds.isdigit() and int(seeds) < 1:
        raise PipelineError("--seeds must be at least 1 (3 gives a noise estimate)")
    sweep = [*grid, f"seed={seed_values}"]
    named = [override.split("=", 1)[0].lstrip("+~") for override in sweep]
    if len(set(named)) != len(named):
        raise PipelineError(f"a key is swept twice in {' '.join(sweep)}")
    if any(override.split("=", 1)[0] in named for override in fixed):
        raise PipelineError("a --set key is also swept: leave it in --grid only")
    extra = [*fixed, *([] if any(o.startswith("threads=") for o in [*fixed, *grid]) else [f"threads={max(1, cores() // jobs)}"])]
    runs = [(exp_name(combo, named, prefix), [*combo, *extra]) for combo in expand(sweep)]
    names = [name for name, _ in runs]
    if len(set(names)) != len(names):
        raise PipelineError("two runs of the sweep got the same name: use distinct values")
    return runs


def dvc(*args: str, check: bool = True) -> str:
    result = subprocess.run(["dvc", *args], capture_output=True, text=True)
    if check and result.returncode != 0:
        raise PipelineError(f"dvc {' '.join(args)}: {' '.join((result.stderr or result.stdout).split())[:400]}")
    return result.stdout


def queue_status() -> dict[str, tuple[str, str]]:
    """{task id: (experiment name, Queued | Running | Success | Failed | ...)} from `dvc queue status`
    (a name can appear twice: a failed run and its requeued namesake)."""
    status = {}
    for line in dvc("queue", "status", check=False).splitlines()[1:]:
        fields = line.split()
        if len(fields) >= 3 and fields[-1][:1].isupper():
            status[fields[0]] = (fields[1], fields[-1])
    return status


def existing(names: list[str]) -> list[str]:
    waiting = {name for name, state in queue_status().values() if state in ("Queued", "Running")}
    listed = set(dvc("exp", "list", "--name-only", check=False).split()) | waiting
    return [name for name in names if name in listed]


def wait(tasks: dict[str, str], jobs: int) -> dict[str, str]:
    """Start the queue and poll it until the `tasks` ({task id: name}) are done; {name: final state}."""
    # Started without pipes: the workers inherit its stdout and a pipe would wait for the whole queue.
    subprocess.run(["dvc", "queue", "start", "-j", str(jobs)], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    started, shown = time.monotonic(), ""
    while True:
        status = queue_status()
        mine = {name: status.get(task, (name, "Queued"))[1] for task, name in tasks.items()}
        done = sum(s not in ("Queued", "Running") for s in mine.values())
        line = f"{done}/{len(tasks)} done, {sum(s == 'Running' for s in mine.values())} running"
        if line != shown:
            print(f"[{time.monotonic() - started:5.0f} s] {line}", flush=True)
            shown = line
        if done == len(tasks):
            return mine
        if "Running" not in mine.values() and not re.search(r"Worker status: [1-9]", dvc("queue", "status", check=False)):
            # a worker that got an earlier `dvc queue stop` quits after its task: start them again
            subprocess.run(["dvc", "queue", "start", "-j", str(jobs)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(POLL_S)


def add_arguments(parser) -> None:
    parser.add_argument("--grid", action="append", default=[], required=True,
                        help="swept params, DVC -S syntax, several separated by spaces: 'train.lr=0.01,0.02 train.epochs=1,2'")
    parser.add_argument("--seeds", default="3", help="how many seeds (0..N-1), or a list such as 3,4,5")
    parser.add_argument("--jobs", type=int, default=1, help="experiments at a time; each gets threads = cores / jobs")
    parser.add_argument("--set", action="append", default=[], help="params every run gets: 'preprocess.max_train=2000 train.epochs=2'")
    parser.add_argument("--prefix", default="", help="put before each name (e.g. small-lr0.01-seed0)")
    parser.add_argument("--target", default="", help="run only up to this stage (e.g. evaluate: no export)")
    parser.add_argument("--force", action="store_true", help="replace experiments of the same names")
    parser.add_argument("--dry-run", action="store_true", help="print the runs and queue nothing")
    parser.add_argument("--no-wait", action="store_true", help="queue and start, do not wait or compare")


def main(args) -> None:
    if args.jobs < 1:
        raise PipelineError(f"--jobs must be at least 1, got {args.jobs}")
    split = lambda values: [item for value in values for item in value.split()]  # noqa: E731
    runs = plan(split(args.grid), args.seeds, split(args.set), args.jobs, args.prefix)
    for name, overrides in runs:
        print(f"{name}: " + " ".join(f"-S {o}" for o in overrides))
    if args.dry_run:
        return
    if not args.force and (taken := existing([name for name, _ in runs])):
        raise PipelineError(f"experiments {', '.join(taken)} exist already: --force (make sweep FORCE=1) replaces them, "
                            "`dvc exp remove NAME` removes one, --prefix names a new set")
    before = set(queue_status())
    for name, overrides in runs:
        dvc("exp", "run", "--queue", "-n", name, *(["-f"] if args.force else []),
            *[arg for o in overrides for arg in ("-S", o)], *([args.target] if args.target else []))
    print(f"queued {len(runs)} experiments; `dvc queue status` and `dvc queue logs NAME` follow them")
    if args.no_wait:
        subprocess.run(["dvc", "queue", "start", "-j", str(args.jobs)], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return
    names = {name for name, _ in runs}
    tasks = {task: name for task, (name, _) in queue_status().items() if task not in before and name in names}
    status = wait(tasks, args.jobs)
    failed = [name for name, s in status.items() if s != "Success"]
    print()
    from tools.compare import compare

    compare(names=[name for name, _ in runs if name not in failed])
    if failed:
        raise PipelineError(f"{len(failed)} of {len(runs)} failed: {', '.join(failed)} (dvc queue logs NAME says why)")


if __name__ == "__main__":
    run(main, description=__doc__.splitlines()[0], add_arguments=add_arguments)
