"""Reading image files safely: any Pillow-readable file -> a uint8 tensor in the model's format.

Used by predict (one file at a time) and by preprocess for image-folder data sets.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from stages.lib.errors import PipelineError, one_line

MAX_PIXELS = 64_000_000  # refuse larger images (decompression bombs) before decoding them


def load_image(path: Path, channels: int, size: list[int], invert: bool = False,
               resize: str = "stretch") -> torch.Tensor:
    """An image file -> uint8 tensor C×H×W at `size` (H, W). resize="stretch" scales the whole image
    to that size (small data sets); "center_crop" scales the shorter side, then crops the middle
    (image folders, as preprocess does)."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"{path}: {'no such file' if not path.exists() else 'not a file'}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                if image.width * image.height > MAX_PIXELS:
                    raise PipelineError(f"{path}: {image.width}×{image.height} is too large to decode safely")
                image = ImageOps.exif_transpose(image)
                image.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise PipelineError(f"{path}: image is too large to decode safely") from None
    except UnidentifiedImageError:
        raise PipelineError(f"{path}: not a readable image (unknown format)") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise PipelineError(f"{path}: damaged image ({one_line(exc)})") from None
    try:
        image = to_channels(image, channels)
    except ValueError as exc:  # e.g. LAB or CMYK-with-alpha TIFFs, which Pillow cannot convert
        raise PipelineError(f"{path}: unsupported {image.mode} image ({one_line(exc)})") from None
    if invert:
        image = ImageOps.invert(image)
    if resize == "center_crop":
        image = ImageOps.fit(image, (size[1], size[0]), Image.Resampling.BILINEAR)
    else:
        image = image.resize((size[1], size[0]), Image.Resampling.BILINEAR)
    tensor = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
    return tensor.view(size[0], size[1], channels).permute(2, 0, 1).contiguous()


def to_channels(image: Image.Image, channels: int) -> Image.Image:
    """Any Pillow mode -> L (channels=1) or RGB, with transparency composited onto black."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit grayscale (Pillow opens some as I): to 8 bits
        image = image.point(lambda v: v / 256).convert("L")
    if image.mode in ("P", "PA", "LA", "RGBA", "La") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("L" if channels == 1 else "RGB")
