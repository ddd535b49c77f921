"""The prepared data set on disk (data/prepared/): written by preprocess, read by every later stage."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from stages.lib.errors import PipelineError
from stages.lib.paths import PREPARED_DIR

SPLITS = ("train", "val", "test")


def load_meta(folder: Path = PREPARED_DIR) -> dict:
    path = Path(folder) / "meta.json"
    if not path.exists():
        raise PipelineError(f"{path} not found; run the preprocess stage first (dvc repro preprocess)")
    return json.loads(path.read_text())


def load_split(name: str, folder: Path = PREPARED_DIR, device: torch.device | str = "cpu"):
    """(uint8 images N×C×H×W, int64 labels N) of one split, moved to `device`."""
    path = Path(folder) / f"{name}.pt"
    if not path.exists():
        raise PipelineError(f"{path} not found; run the preprocess stage first (dvc repro preprocess)")
    try:
        split = torch.load(path, weights_only=True)
        images, labels = split["images"], split["labels"]
    except Exception as exc:  # a damaged file makes torch.load raise almost anything
        raise PipelineError(f"{path} is damaged ({exc.__class__.__name__}); rerun: dvc repro --force preprocess") from None
    return images.to(device), labels.to(device)


def training_images(data: dict, train_on_val: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """What training fits: data["train"], with data["val"] appended when `train_on_val` (train.train_on_val:
    a final fit on every labelled image, e.g. all 60,000 of Fashion-MNIST's)."""
    if not train_on_val:
        return data["train"]
    (x, y), (vx, vy) = data["train"], data["val"]
    return torch.cat([x, vx]), torch.cat([y, vy])
