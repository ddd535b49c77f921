"""Reading image files safely: any Pillow-readable file -> a uint8 tensor in the model's format.

Used by predict (through the model file) and by preprocess for image-folder data sets. The decoding
itself is imagefile.decode_image, the same code the served MLflow model runs; this adds the file checks
and errors that name the file.
"""
from __future__ import annotations

from pathlib import Path

import torch

from stages.lib.errors import PipelineError
from stages.lib.imagefile import MAX_PIXELS, ImageError, decode_image  # noqa: F401 (MAX_PIXELS: the limit, for callers)


def load_image(path: Path, channels: int, size: list[int], invert: bool = False,
               resize: str = "stretch") -> torch.Tensor:
    """An image file -> uint8 tensor C×H×W at `size` (H, W). resize="stretch" scales the whole image
    to that size (small data sets); "center_crop" scales the shorter side, then crops the middle
    (image folders, as preprocess does)."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"{path}: {'no such file' if not path.exists() else 'not a file'}")
    try:
        return torch.from_numpy(decode_image(path, channels, size, invert, resize))
    except ImageError as exc:
        raise PipelineError(f"{path}: {exc}") from None
