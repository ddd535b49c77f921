"""The prepared data set on disk (data/prepared/): written by preprocess, read by every later stage."""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F

from stages.lib.errors import PipelineError

PREPARED_DIR = Path("data/prepared")
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


def pad_images(images: torch.Tensor, size: int) -> torch.Tensor:
    """N×H×W or N×C×H×W uint8 -> N×C×H'×W', zero-padded evenly up to size×size (28 -> 32 pads 2 on
    each side). Images already that large are left as they are."""
    if images.dim() == 3:
        images = images.unsqueeze(1)
    h, w = images.shape[-2:]
    ph, pw = max(size - h, 0), max(size - w, 0)
    return F.pad(images, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2)).contiguous()
