"""Stage 2 — preprocess: the raw files -> compact tensors in data/prepared/, saved once.

Writes train.pt / val.pt / test.pt ({"images": uint8 N×C×H×W, "labels": int64 N}) and meta.json, the
data card (class names, per-channel mean/std of the training split, shapes, input format, sha256 of
each split, unreadable files skipped). The validation split is carved from train with a permutation
seeded by preprocess.split_seed; output bytes are identical across runs and machines.
"""
from __future__ import annotations

import hashlib
import torch

from stages.lib.datasets import DATASETS, Raw
from stages.lib.errors import PipelineError, run
from stages.lib.files import json_bytes, replaced_dir, torch_bytes, write_files
from stages.lib.params import load_params
from stages.lib.paths import PREPARED_DIR, RAW_DIR
from stages.lib.provenance import Inputs
from stages.lib.transforms import pad_images


def channel_stats(images: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of uint8 images, on the 0..1 scale, computed in float64."""
    x = images.to(torch.float64).div_(255).transpose(0, 1).reshape(images.shape[1], -1)
    return [round(v, 6) for v in x.mean(1).tolist()], [round(v, 6) for v in x.std(1).tolist()]


def split_digest(split: dict) -> str:
    h = hashlib.sha256()
    for key in ("images", "labels"):
        h.update(split[key].numpy().tobytes())
    return h.hexdigest()


def carve(n: int, size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded split of range(n) into (`size` held-out indices, the rest), both sorted."""
    order = torch.randperm(n, generator=generator)
    return order[:size].sort().values, order[size:].sort().values


def prepare(raw: Raw, settings, seed: int) -> tuple[dict, dict]:
    """Raw images -> ({split: tensors}, meta). Without a test split (an image folder with no val/ or
    test/), `test_size` images are carved from train first; then `val_size` validation images, both
    with the seeded permutation."""
    generator = torch.Generator().manual_seed(seed)
    train_x, train_y = raw.train
    if settings.max_train:
        train_x, train_y = train_x[: settings.max_train], train_y[: settings.max_train]
    if raw.test is None:
        if not 0 < settings.test_size < len(train_x):
            raise PipelineError(f"this data set has no test split: set preprocess.test_size to how many of its "
                                f"{len(train_x)} images to hold out for testing (now {settings.test_size})")
        test_idx, train_idx = carve(len(train_x), settings.test_size, generator)
        (test_x, test_y), (train_x, train_y) = (train_x[test_idx], train_y[test_idx]), (train_x[train_idx], train_y[train_idx])
    else:
        test_x, test_y = raw.test
    if settings.max_test:
        test_x, test_y = test_x[: settings.max_test], test_y[: settings.max_test]
    if settings.val_size >= len(train_x):
        raise PipelineError(f"preprocess.val_size={settings.val_size} must be smaller than the "
                            f"{len(train_x)} training images")
    val_idx, train_idx = carve(len(train_x), settings.val_size, generator)

    def make(x, y):
        return {"images": pad_images(x, settings.pad_to), "labels": y.to(torch.int64).contiguous()}

    splits = {"train": make(train_x[train_idx], train_y[train_idx]),
              "val": make(train_x[val_idx], train_y[val_idx]),
              "test": make(test_x, test_y)}
    mean, std = channel_stats(splits["train"]["images"])
    c, h, w = splits["train"]["images"].shape[1:]
    meta = {
        "classes": raw.classes,
        "mean": mean,
        "std": std,
        "input_shape": [c, h, w],
        "source_size": list(train_x.shape[-2:]),
        "input": {"channels": c, "size": list(train_x.shape[-2:]), "pad_to": [h, w], "resize": raw.resize},
        "counts": {name: len(s["labels"]) for name, s in splits.items()},
        "sha256": {name: split_digest(s) for name, s in splits.items()},
    }
    return splits, meta


def main(args) -> None:
    inputs = Inputs.read("preprocess")
    params = load_params(choices={"data.dataset": DATASETS})
    dataset = DATASETS[params.data.dataset]
    raw = dataset.read(RAW_DIR / dataset.name, params.preprocess)
    splits, meta = prepare(raw, params.preprocess, params.preprocess.split_seed)
    meta["dataset"] = dataset.name
    meta["skipped_files"] = {"count": len(raw.skipped), "first": raw.skipped[:20]}
    inputs.verify()
    with replaced_dir(PREPARED_DIR) as staging:
        write_files({**{staging / f"{name}.pt": torch_bytes(split) for name, split in splits.items()},
                     staging / "meta.json": json_bytes(meta)})
    print(f"{PREPARED_DIR}: {meta['counts']} images of {meta['input_shape']}, mean {meta['mean']} std {meta['std']}"
          + (f"; skipped {len(raw.skipped)} unreadable files (listed in meta.json)" if raw.skipped else ""))


if __name__ == "__main__":
    run(main, description=__doc__.splitlines()[0])
