"""check — params.yaml as a whole, before any stage runs: `python -m tools.check [params.yaml]`.

Each stage checks the params it reads when it runs, but `dvc repro` runs no stage whose params did not
change: a misspelt top-level key (`sead: 1`) or a section no stage reads would pass unseen. This checks
every key and every registry name (data sets, nets) at once; `make run`, `make reproduce` and the
experiment targets run it first, and the test suite runs it on the committed params.yaml.
Exit 0 when valid, with the data set and net names allowed; exit 2 with `error: ...` (one line) when not.
"""
from __future__ import annotations

from pathlib import Path

from stages.lib.datasets import DATASETS
from stages.lib.errors import run
from stages.lib.nets import MODELS
from stages.lib.params import load_params

CHOICES = {"data.dataset": DATASETS, "model.name": MODELS}


def add_arguments(parser) -> None:
    parser.add_argument("params", nargs="?", type=Path, default=Path("params.yaml"), help="the file to check")


def main(args) -> None:
    params = load_params(args.params, CHOICES)
    print(f"{args.params}: valid ({len(params.flat())} settings)")
    for key, registry in CHOICES.items():
        print(f"  {key}: {getattr(getattr(params, key.split('.')[0]), key.split('.')[1])} (allowed: {', '.join(registry)})")


if __name__ == "__main__":
    run(main, description=__doc__.splitlines()[0], add_arguments=add_arguments)
