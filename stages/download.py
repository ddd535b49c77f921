"""Stage 1 — download: put the data set's raw files, checksum-verified, into data/raw/<dataset>/.

The data set's entry in stages/lib/datasets.py says where its files come from: folders or http(s) base
URLs from `data.mirrors` first, then the folder an OS package installed (Debian's dataset-fashion-mnist),
then the official mirrors; an image folder comes from `data.source`. data/raw is built in a staging
folder and replaces the old one only when every file arrived and checked out.
"""
from __future__ import annotations

from stages.lib.datasets import DATASETS
from stages.lib.errors import run
from stages.lib.files import replaced_dir
from stages.lib.params import load_params
from stages.lib.paths import RAW_DIR
from stages.lib.provenance import Inputs


def main(args) -> None:
    inputs = Inputs.read("download")
    data = load_params(choices={"data.dataset": DATASETS}).data
    dataset = DATASETS[data.dataset]
    with replaced_dir(RAW_DIR) as staging:
        used = dataset.fetch(data, staging / dataset.name)
        inputs.verify()
    for name, source in used.items():
        print(f"{RAW_DIR / dataset.name / name}  <- {source}")


if __name__ == "__main__":
    run(main, description=__doc__.splitlines()[0])
