"""Image files -> uint8 pixels exactly as the data set stores its images: the first half of the one
preprocessing (the second, padding and normalization, is `transforms.Preprocess`, which also runs inside
model.onnx). Used by preprocess (image-folder data sets), predict, and the served MLflow model on the
decoded bytes of each request.

Standalone on purpose: numpy and Pillow only, nothing from this repository. The MLflow model carries a
copy of this file, and must load where this project is not installed.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

MAX_PIXELS = 64_000_000  # refuse larger images (decompression bombs) before decoding them


class ImageError(ValueError):
    """An image that cannot be used; the message is one line that says why."""


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:300] or type(exc).__name__


def decode_image(source, channels: int, size: list[int], invert: bool = False,
                 resize: str = "stretch") -> np.ndarray:
    """An image file (a path or a binary file object; any format and mode Pillow reads) -> uint8
    C×H×W at `size` (H, W). resize="stretch" scales the whole image to that size (small data sets);
    "center_crop" scales the shorter side, then crops the middle (image folders, as preprocess does).
    Raises ImageError with a one-line reason."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(source) as image:
                if image.width * image.height > MAX_PIXELS:
                    raise ImageError(f"{image.width}×{image.height} is too large to decode safely")
                image = ImageOps.exif_transpose(image)
                image.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageError("image is too large to decode safely") from None
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError("not a readable image (unknown format)") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageError(f"damaged image ({_one_line(exc)})") from None
    try:
        image = to_channels(image, channels)
    except ValueError as exc:  # e.g. LAB or CMYK-with-alpha TIFFs, which Pillow cannot convert
        raise ImageError(f"unsupported {image.mode} image ({_one_line(exc)})") from None
    if invert:
        image = ImageOps.invert(image)
    if resize == "center_crop":
        image = ImageOps.fit(image, (size[1], size[0]), Image.Resampling.BILINEAR)
    else:
        image = image.resize((size[1], size[0]), Image.Resampling.BILINEAR)
    pixels = np.frombuffer(image.tobytes(), dtype=np.uint8).reshape(size[0], size[1], channels)
    return pixels.transpose(2, 0, 1).copy()  # a writable C×H×W array of its own


def to_channels(image: Image.Image, channels: int) -> Image.Image:
    """Any Pillow mode -> L (channels=1) or RGB, with transparency composited onto black."""
    if image.mode == "F":  # 32-bit float grayscale (TIFF): 0..1 as scientific images store it, or 0..255
        low, high = image.getextrema()
        if low < 0 or high > 255 or high != high:
            raise ValueError(f"float pixel values from {low:g} to {high:g}; expected 0..1 or 0..255")
        image = image.point(lambda v: v * 255) if high <= 1 else image
        return image.convert("L").convert("L" if channels == 1 else "RGB")
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit grayscale (Pillow opens some as I): to 8 bits
        image = image.point(lambda v: v / 256).convert("L")
    if image.mode in ("P", "PA", "LA", "RGBA", "La") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("L" if channels == 1 else "RGB")


def read_image_file(path, channels: int, size: list[int], invert: bool = False, resize: str = "stretch") -> np.ndarray:
    """decode_image of a file on disk; the ImageError's message starts with the path."""
    path = Path(path)
    if not path.is_file():
        raise ImageError(f"{path}: {'no such file' if not path.exists() else 'not a file'}")
    try:
        return decode_image(path, channels, size, invert, resize)
    except ImageError as exc:
        raise ImageError(f"{path}: {exc}") from None
