"""Stage 2 — preprocess: raw idx files -> compact tensors in data/prepared/, saved once.

Writes train.pt / val.pt / test.pt ({"images": uint8 N×C×H×W, "labels": int64 N}) and meta.json
(class names, per-channel mean/std of the training split, shapes, sha256 of each split). The
validation split is carved from train with a seeded permutation; output bytes are identical across runs.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from stages.data import PREPARED_DIR, pad_images
from stages.datasets import get_dataset, read_idx
from stages.errors import PipelineError, run
from stages.files import torch_save, write_json
from stages.params import load_params

RAW_DIR = Path("data/raw")


def channel_stats(images: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of uint8 images, on the 0..1 scale, computed in float64."""
    x = images.to(torch.float64).div_(255).transpose(0, 1).reshape(images.shape[1], -1)
    return [round(v, 6) for v in x.mean(1).tolist()], [round(v, 6) for v in x.std(1).tolist()]


def split_digest(split: dict) -> str:
    h = hashlib.sha256()
    for key in ("images", "labels"):
        h.update(split[key].numpy().tobytes())
    return h.hexdigest()


def prepare(raw: dict, classes: list[str], cfg: dict, seed: int) -> tuple[dict, dict]:
    """raw = {"train": (images, labels), "test": (...)} -> ({split: tensors}, meta)."""
    (train_x, train_y), (test_x, test_y) = raw["train"], raw["test"]
    if cfg["max_train"]:
        train_x, train_y = train_x[: cfg["max_train"]], train_y[: cfg["max_train"]]
    if cfg["max_test"]:
        test_x, test_y = test_x[: cfg["max_test"]], test_y[: cfg["max_test"]]
    if cfg["val_size"] >= len(train_x):
        raise PipelineError(f"preprocess.val_size={cfg['val_size']} must be smaller than the "
                            f"{len(train_x)} training images")
    order = torch.randperm(len(train_x), generator=torch.Generator().manual_seed(seed))
    val_idx, train_idx = order[: cfg["val_size"]].sort().values, order[cfg["val_size"]:].sort().values

    def make(x, y):
        return {"images": pad_images(x, cfg["pad_to"]), "labels": y.to(torch.int64).contiguous()}

    splits = {"train": make(train_x[train_idx], train_y[train_idx]),
              "val": make(train_x[val_idx], train_y[val_idx]),
              "test": make(test_x, test_y)}
    mean, std = channel_stats(splits["train"]["images"])
    c, h, w = splits["train"]["images"].shape[1:]
    meta = {
        "classes": classes,
        "mean": mean,
        "std": std,
        "input_shape": [c, h, w],
        "source_size": list(train_x.shape[-2:]),
        "counts": {name: len(s["labels"]) for name, s in splits.items()},
        "sha256": {name: split_digest(s) for name, s in splits.items()},
    }
    return splits, meta


def main(args) -> None:
    params = load_params()
    dataset = get_dataset(params["data"]["dataset"])
    src = RAW_DIR / dataset.name
    names = [name for name, _ in dataset.files]
    missing = [n for n in names if not (src / n).exists()]
    if missing:
        raise PipelineError(f"{src} lacks {', '.join(missing)}; run the download stage first")
    images_train, labels_train, images_test, labels_test = (read_idx(src / n) for n in names)
    raw = {"train": (images_train, labels_train), "test": (images_test, labels_test)}
    splits, meta = prepare(raw, dataset.classes, params["preprocess"], params["seed"])
    meta["dataset"] = dataset.name
    for name, split in splits.items():
        torch_save(split, PREPARED_DIR / f"{name}.pt")
    write_json(PREPARED_DIR / "meta.json", meta)
    print(f"{PREPARED_DIR}: {meta['counts']} images of {meta['input_shape']}, mean {meta['mean']} std {meta['std']}")


if __name__ == "__main__":
    run(main, description=__doc__.splitlines()[0])
